"""Finding and stopping every process of a run on this machine.

msrun starts each worker in a session of its own, so killing the launcher's process group is not
enough. Every process of a run inherits LAUNCHER_RUN_ID from the node script; that is how we find them.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

RUN_ID_VAR = "LAUNCHER_RUN_ID"


def run_processes(run_id: str) -> list[int]:
    """Pids of live processes whose environment carries LAUNCHER_RUN_ID=<run_id>."""
    marker = f"{RUN_ID_VAR}={run_id}".encode()
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if state != "Z" and marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return sorted(found)


def stop_run(run_id: str, group_leaders: list[int] = (), grace: float = 10.0) -> list[int]:
    """SIGTERM every process of the run, SIGKILL what is left after `grace` seconds.

    Returns the pids still alive at the end (empty when the run is fully stopped).
    """
    for pid in group_leaders:
        _signal_group(pid, signal.SIGTERM)
    for pid in run_processes(run_id):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not run_processes(run_id):
            return []
        time.sleep(0.2)
    for pid in group_leaders:
        _signal_group(pid, signal.SIGKILL)
    for pid in run_processes(run_id):
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while (left := run_processes(run_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass

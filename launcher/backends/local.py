"""The local backend: run the plan's node script on this machine, watch it, stop it, gather it.

The run directory is the node's work directory: the plan sits in plan/, MindFormers writes output/,
and gather copies each rank's files into ranks/rank_N/.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from launcher import gather
from launcher.entrypoints import nodectl
from launcher.errors import BackendError
from launcher.liveview import LiveView, rank_exit_codes
from launcher.plan import STATUS_DIR, LaunchPlan
from launcher.runs import PLAN_DIR, RunRecord

NODE_LOG = "node-0.log"
POLL_SECONDS = 0.25
_MSRUN_WORKER_FAILED = re.compile(r"Worker process (\d+) exit with exception")


def node_environment(run_id: str, job_name: str) -> dict[str, str]:
    env = dict(os.environ)
    env[nodectl.RUN_ID_VAR] = run_id
    env[nodectl.JOB_VAR] = job_name
    env[nodectl.NODE_VAR] = "0"
    # msrun and the rank-table script start `python` from PATH: it must be this interpreter's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def execute(plan: LaunchPlan, run_dir: Path, record: RunRecord, console: Console) -> RunRecord:
    """Start, watch and always stop the node; then gather. Returns the final record (saved in run.json)."""
    node = plan.nodes[0]
    with (run_dir / NODE_LOG).open("ab") as node_log:
        proc = subprocess.Popen(
            ["bash", str(run_dir / PLAN_DIR / node.script)],
            cwd=run_dir,
            env=node_environment(record.run_id, plan.job_name),
            stdin=subprocess.DEVNULL,
            stdout=node_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so Ctrl-C in the terminal reaches only us
        )
    record.leader_pid, record.state = proc.pid, "running"
    record.save(run_dir)
    interrupted = False
    try:
        with LiveView(plan, run_dir, console, title=record.run_id) as view:
            # A rank that records a failure ends the watch at once: the others are stopped now,
            # not when msrun notices.
            while proc.poll() is None and not _any_rank_failed(plan, run_dir):
                view.update()
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # A second Ctrl-C or SIGTERM must not cut the teardown short and leave ranks running.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            left = nodectl.stop_run(record.run_id, [proc.pid])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    rc = proc.wait()
    rank_failed = _any_rank_failed(plan, run_dir)
    record.finished = time.time()
    if left:
        record.state, record.message = "failed", f"processes still alive after teardown: {left}"
    elif interrupted:
        record.state, record.exit_code, record.message = "interrupted", 130, "stopped by the user; every rank stopped"
    elif rc == 0 and not rank_failed:
        record.state, record.exit_code = "succeeded", 0
    else:
        record.state, record.exit_code = "failed", rc if rc > 0 else 1
        record.failed_rank = failed_rank(plan, run_dir)
        record.message = f"node script exited with code {rc}"
    record.save(run_dir)
    if left:
        raise BackendError(f"could not stop processes {left} of run {record.run_id}; stop them by hand")
    return record


def _any_rank_failed(plan: LaunchPlan, workdir: Path) -> bool:
    return any(code != 0 for code in rank_exit_codes(plan, workdir).values())


def failed_rank(plan: LaunchPlan, workdir: Path) -> int | None:
    """The rank that failed first: from the ranks' own exit records, else from msrun's report and pid files."""
    codes = rank_exit_codes(plan, workdir)
    failed = [r for r, c in codes.items() if c != 0]
    if failed:
        return min(failed, key=lambda r: (workdir / STATUS_DIR / f"rank_{r}.exit").stat().st_mtime)
    pids = {}
    for slot in plan.ranks:
        try:
            pids[int((workdir / STATUS_DIR / f"rank_{slot.rank}.pid").read_text())] = slot.rank
        except (FileNotFoundError, ValueError):
            continue
    log = workdir / NODE_LOG
    if log.is_file():
        for m in _MSRUN_WORKER_FAILED.finditer(log.read_text(errors="replace")):
            if int(m[1]) in pids:
                return pids[int(m[1])]
    return None


def gather_run(plan: LaunchPlan, run_dir: Path, record: RunRecord) -> dict:
    gather.gather_local(plan, run_dir, run_dir)
    return gather.finish(plan, run_dir, record)

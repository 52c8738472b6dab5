"""The local backend: run the plan's node script on this machine, watch it, stop it, gather it.

The run directory is the node's work directory: the plan sits in plan/, MindFormers writes output/,
and gather copies each rank's files into ranks/rank_N/.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console

from launcher import gather, secret_env
from launcher.backends.base import Backend, Echo, Events, Outcome, Problem, Run, Status, sigterm_as_interrupt, teardown_shield
from launcher.entrypoints import nodectl
from launcher.errors import BackendError, ConfigError, LauncherError
from launcher.liveview import LiveView, rank_exit_codes
from launcher.plan import ENV_PATH, STATUS_DIR, LaunchPlan
from launcher.runs import NODE_LOG, PLAN_DIR, RunRecord
from launcher.models import model_spec
from launcher.spec import Job
from launcher.stall import STACKS_WAIT_S, StallWatch

POLL_SECONDS = 0.25
_MSRUN_WORKER_FAILED = re.compile(r"Worker process (\d+) exit with exception")


# MindSpore's graph compile cache (mindspore/common/api.py reads MS_COMPILER_CACHE_ENABLE and
# MS_COMPILER_CACHE_PATH): compiling SmolLM2's 30 layers on the CPU takes minutes, loading them seconds.
# A job turns it on with `env: {MS_COMPILER_CACHE_ENABLE: "1"}` (not every graph can be cached: the tiny
# model's SGD step fails with "Cannot export a PyExecute CNode in MindIR"), and the local backend gives
# it a folder outside the run. MindSpore detects only some changes of the network itself, so the folder
# is keyed by everything that shapes the graph: the MindSpore version, the entrypoint and the run's
# MindFormers config without its paths.
_RUN_PATHS = ("load_checkpoint", "output_dir", "dataset_dir", "src_strategy_path_or_dir")
_CACHE_ON = re.compile(r"^export MS_COMPILER_CACHE_ENABLE=(1|'1'|True)$", re.MULTILINE)


def wants_compile_cache(plan: LaunchPlan) -> bool:
    return bool(_CACHE_ON.search(plan.artifacts.get(ENV_PATH, "")))


def compile_cache_env(run_dir: Path) -> dict[str, str]:
    import hashlib
    from importlib import metadata

    import yaml

    from launcher.user_cache import cache_root

    def without_paths(node):
        if isinstance(node, dict):
            return {k: without_paths(v) for k, v in node.items() if k not in _RUN_PATHS}
        return [without_paths(v) for v in node] if isinstance(node, list) else node

    config = yaml.safe_load((run_dir / PLAN_DIR / "mindformers" / "run.yaml").read_text())
    try:
        version = metadata.version("mindspore")
    except metadata.PackageNotFoundError:
        version = "unknown"
    entrypoint = (run_dir / PLAN_DIR / "entrypoint" / "finetune.py").read_bytes()
    key = hashlib.sha256(repr((version, without_paths(config))).encode() + entrypoint).hexdigest()[:16]
    return {"MS_COMPILER_CACHE_PATH": str(cache_root() / "compile" / key)}


def node_environment(run_id: str, job_name: str, cache_from: Path | None = None,
                     secrets: Mapping[str, str] | None = None) -> dict[str, str]:
    """cache_from: the run directory whose config keys the compile cache, when the job turned it on.
    secrets: the job's secret_env values, which reach the ranks only through this environment."""
    env = dict(os.environ)
    env.update(secrets or {})
    if cache_from is not None:
        env.update(compile_cache_env(cache_from))
    env[nodectl.RUN_ID_VAR] = run_id
    env[nodectl.JOB_VAR] = job_name
    env[nodectl.NODE_VAR] = "0"
    # msrun and the rank-table script start `python` from PATH: it must be this interpreter's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def execute(plan: LaunchPlan, run_dir: Path, record: RunRecord, console: Console,
            secrets: Mapping[str, str] | None = None) -> RunRecord:
    """Start, watch and always stop the node; then gather. Returns the final record (saved in run.json)."""
    node = plan.nodes[0]
    cache_from = run_dir if wants_compile_cache(plan) else None
    with (run_dir / NODE_LOG).open("ab") as node_log:
        proc = subprocess.Popen(
            ["bash", str(run_dir / PLAN_DIR / node.script)],
            cwd=run_dir,
            env=node_environment(record.run_id, plan.job_name, cache_from, secrets),
            stdin=subprocess.DEVNULL,
            stdout=node_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so Ctrl-C in the terminal reaches only us
        )
    record.leader_pid, record.state = proc.pid, "running"
    record.save(run_dir)
    interrupted, stalled = False, None
    try:
        with LiveView(plan, run_dir, console, title=record.run_id, watch=StallWatch.for_plan(plan)) as view:
            # A rank that records a failure ends the watch at once: the others are stopped now,
            # not when msrun notices.
            while proc.poll() is None and not _any_rank_failed(plan, run_dir) and view.stalled is None:
                view.update()
                time.sleep(POLL_SECONDS)
            stalled = view.stalled
    except KeyboardInterrupt:
        interrupted = True
    finally:
        with teardown_shield():
            if stalled is not None and nodectl.dump_stacks(record.run_id, str(run_dir)):
                time.sleep(STACKS_WAIT_S)
            left = nodectl.stop_run(record.run_id, [proc.pid])
    rc = proc.wait()
    rank_failed = _any_rank_failed(plan, run_dir)
    record.finished = time.time()
    if left:
        record.state, record.message = "failed", f"processes still alive after teardown: {left}"
    elif interrupted:
        record.state, record.exit_code, record.message = "interrupted", 130, "stopped by the user; every rank stopped"
    elif stalled is not None:
        record.state, record.exit_code, record.failed_rank = "failed", 1, stalled.rank
        record.message = stalled.message()
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


# --- what a local run needs from this machine, checked before anything is written or started ---


def resolve_local_paths(job: Job, base: Path) -> Job:
    """For the local backend, relative dataset/checkpoint paths are relative to the working directory."""

    def absolute(p: str) -> str:
        return p if not p or Path(p).is_absolute() else str((base / p).resolve())

    return job.model_copy(
        update={
            "dataset": job.dataset.model_copy(update={"path": absolute(job.dataset.path)}),
            "checkpoint": job.checkpoint.model_copy(update={"load": absolute(job.checkpoint.load)}),
        }
    )


def installed_mindformers() -> str | None:
    """The MindFormers release installed beside the launcher (which local runs use), if any."""
    try:
        return importlib.metadata.version("mindformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_local_host(job: Job) -> None:
    """What a local run needs from this machine, checked before anything is written or started."""
    if not Path(job.dataset.path).exists():
        raise ConfigError(
            f"dataset.path: {job.dataset.path} does not exist; "
            "make the demo dataset with 'launcher dataset tiny PATH' or point to your MindRecord file"
        )
    if job.checkpoint.load and not Path(job.checkpoint.load).exists():
        raise ConfigError(f"checkpoint.load: {job.checkpoint.load} does not exist")
    installed = installed_mindformers()
    model = model_spec(job.model)
    if job.mindformers.version is None and installed and not model.carried_by(installed):
        raise ConfigError(f"model: {job.model} runs on {model.releases}; this machine has MindFormers {installed}")
    if not port_is_free(job.cluster.master_port):
        raise ConfigError(
            f"cluster.master_port: port {job.cluster.master_port} is in use on this machine; "
            "pick a free port (or stop what holds it)"
        )


class LocalBackend(Backend):
    """The ranks as processes of this machine; the run directory is the node's work directory."""

    name = "local"
    OPTIONS = ()

    def resolve_paths(self, job: Job, base: Path) -> Job:
        return resolve_local_paths(job, base)

    def check_host(self, job: Job) -> None:
        check_local_host(job)
        secret_env.resolve(job.secret_env)  # only to fail before anything exists; read again at the start
        if job.cluster.device == "ascend":
            from launcher import ascend

            problems = ascend.preflight(job.cluster.nodes[0].devices, False, ascend.local_runner(ascend.TIMEOUT_S))
            if problems:
                raise BackendError("preflight failed on this machine; nothing was started:\n  " + "\n  ".join(problems))

    def check_plan(self, plan: LaunchPlan) -> None:
        if not port_is_free(plan.master_port):
            raise ConfigError(f"port {plan.master_port} of this rendered plan is in use on this machine; "
                              "render it again with a free cluster.master_port")
        secret_env.resolve(secret_env.plan_sources(plan.artifacts))

    def where(self, plan: LaunchPlan) -> str:
        return "this machine"

    def execute(self, run: Run, events: Events) -> Outcome:
        secrets = secret_env.resolve(secret_env.plan_sources(run.plan.artifacts))
        with sigterm_as_interrupt():
            run.record = execute(run.plan, run.dir, run.record, events.console, secrets)
        events.info("gathering ...")
        gather.gather_local(run.plan, run.dir, run.dir)
        return Outcome(tail=gather.failed_rank_tail(run.dir, run.record))

    def status(self, run: Run) -> Status:
        alive = nodectl.run_processes(run.record.run_id)
        lines = []
        if run.record.state == "running" and not alive:
            lines.append("its processes are gone, but the launcher did not record the end (was it killed?)")
        lines.append(f"{len(alive)} processes alive")
        view = LiveView(run.plan, run.dir, Console(force_terminal=False), run.record.run_id)
        view.update()
        return Status(lines, view)

    def logs(self, run: Run, ranks: list[int], follow: bool, prefix: bool, echo: Echo) -> list[Problem]:
        slots = [run.plan.ranks[r] for r in ranks]
        offsets = {s.rank: 0 for s in slots}
        while True:
            for s in slots:
                path = run.dir / s.console_log
                if not path.is_file():
                    continue
                with path.open("rb") as f:
                    f.seek(offsets[s.rank])
                    data = f.read()
                complete = data[: data.rfind(b"\n") + 1] if follow else data
                offsets[s.rank] += len(complete)
                for line in complete.decode(errors="replace").splitlines():
                    echo(f"[rank {s.rank}] {line}" if prefix else line)
            if not follow or not nodectl.run_processes(run.record.run_id):
                return []
            time.sleep(0.5)

    def gather(self, run: Run) -> list[Problem]:
        gather.gather_local(run.plan, run.dir, run.dir)
        return []

    def down(self, run: Run, purge: bool) -> str:
        # Every process of the run carries its run id, the node script included; no pid from run.json is
        # trusted, since it may have been reused.
        left = nodectl.stop_run(run.record.run_id)
        if left:
            raise LauncherError(f"processes {left} of {run.record.run_id} would not stop")
        return f"run {run.record.run_id}: no process left"

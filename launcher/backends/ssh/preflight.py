"""SSH preflight: what every node must offer before anything starts anywhere, and device IPs for rank tables."""

from __future__ import annotations

import asyncio
import posixpath
import time
from pathlib import Path

import yaml
from rich.console import Console

from launcher import ascend
from launcher.backends.ssh import transport
from launcher.backends.ssh.session import (
    NODECTL,
    NODECTL_SOURCE,
    STOP_GRACE,
    NodeState,
    SshRun,
    failures_in_order,
)
from launcher.errors import BackendError, ConfigError, TransportError
from launcher.plan import CONFIG_PATH, LaunchPlan
from launcher.runs import RunRecord


def runner(run: SshRun, state: NodeState) -> ascend.Runner:
    """A blocking runner over this node's connection, for the Ascend checks (run in a worker thread)."""
    loop = asyncio.get_running_loop()
    env = ["env", f"PATH={state.remote_path}"]

    def run(argv: list[str]) -> ascend.Result:
        rc, out = asyncio.run_coroutine_threadsafe(
            state.node.run_result(env + argv, timeout=ascend.TIMEOUT_S), loop).result()
        return ascend.Result(rc, out)

    return run


async def discover(run: SshRun) -> dict[int, list[str]]:
    """Each node's device IPs (hccn_tool, or /etc/hccn.conf), read over SSH; every failure reported together."""

    async def one(state: NodeState) -> list[str]:
        devices = [run.plan.ranks[r].device for r in state.step.ranks]
        try:
            return await asyncio.to_thread(ascend.device_ips, devices, runner(run, state))
        except ConfigError as exc:
            raise TransportError(state.step.host, ["hccn_tool"], None, str(exc).replace("\n", "; ")) from None

    results, errors = await transport.gather_results(one(s) for s in run.nodes)
    if errors:
        raise BackendError(run.per_node("cannot read the device IPs of", errors))
    return {s.step.index: ips for s, ips in zip(run.nodes, results)}


def node_dataset(plan: LaunchPlan) -> str | None:
    """The dataset path each node reads from its own disk; None when the run carries its data (data/...)."""
    config = yaml.safe_load(plan.artifacts[CONFIG_PATH])
    path = ((config.get("train_dataset") or {}).get("data_loader") or {}).get("dataset_dir")
    return path if isinstance(path, str) and posixpath.isabs(path) else None


async def preflight(run: SshRun) -> None:
    dataset = node_dataset(run.plan)

    async def one(state: NodeState) -> dict:
        node, workdir = state.node, state.step.workdir
        await node.call(node.sftp.makedirs(workdir, exist_ok=True), f"mkdir {workdir}")
        await run.put_atomic(node, NODECTL_SOURCE, posixpath.join(workdir, f".launcher-{NODECTL}"))
        port = run.plan.master_port if state.step.node_rank == 0 else 0
        args = ["preflight", "--workdir", workdir, "--job", run.plan.job_name, "--port", str(port),
                "--min-free-mb", str(run.opts.min_free_mb)]
        if dataset:
            args += ["--dataset", dataset]
        try:
            report = await run.nodectl(state, *args)
        except TransportError as exc:
            if exc.rc == 127:
                raise TransportError(node.host, exc.argv, exc.rc,
                                     "python is not on PATH; set cluster.ssh.path_prefix") from None
            raise
        if run.plan.device == "ascend":
            devices = [run.plan.ranks[r].device for r in state.step.ranks]
            # nodectl read the MindSpore version of the job's python; judge() reports it missing.
            report["ascend"] = await asyncio.to_thread(
                ascend.preflight, devices, len(run.nodes) > 1, runner(run, state),
                mindspore=report["mindspore"], python=None)
        if report["stale"] and run.kill_stale:
            left = (await run.nodectl(state, "kill-job", run.plan.job_name, timeout=STOP_GRACE + 30))["left"]
            report["stale"] = [{"pid": pid, "cmd": "still alive after --kill-stale"} for pid in left]
        return report

    reports, errors = await transport.gather_results(one(s) for s in run.nodes)
    problems = []
    for state, report, failure in zip(run.nodes, reports, failures_in_order(reports, errors)):
        where = f"  node {state.step.index} ({state.step.host}): "
        if failure is not None:
            detail = failure.stderr_tail if isinstance(failure, TransportError) else str(failure)
            problems.append(where + detail)
            continue
        problems += [where + p for p in judge(run, state, report)]
    versions = {(r["mindspore"], r["mindformers"]) for r in reports if r}
    if len(versions) > 1:
        listing = ", ".join(f"node {s.step.index}: mindspore {r['mindspore']}, mindformers {r['mindformers']}"
                            for s, r in zip(run.nodes, reports) if r)
        problems.append(f"  MindSpore/MindFormers versions differ between nodes ({listing})")
    if problems:
        raise BackendError("preflight failed; nothing was started on any node:\n" + "\n".join(problems))


def judge(run: SshRun, state: NodeState, report: dict) -> list[str]:
    problems = []
    if not report["mindspore"] or not report["mindformers"]:
        problems.append(f"mindspore/mindformers not installed for {report['python']}; "
                        "set cluster.ssh.path_prefix to the environment that has them")
    if report.get("dataset_readable") is False:
        problems.append(f"dataset {report['dataset']} is missing or not readable by the SSH user")
    if not report.get("tar", True):
        problems.append("tar is not on PATH (the run's files are sent to the node as a tar archive)")
    if run.plan.launch == "msrun" and not report["msrun"]:
        problems.append("msrun is not on PATH; set cluster.ssh.path_prefix")
    if not report["workdir_writable"]:
        problems.append(f"work directory {state.step.workdir} is not writable ({report.get('workdir_error')})")
    elif not report["enough_room"]:
        problems.append(f"only {report['free_mb']} MB free in {state.step.workdir}; "
                        f"{run.opts.min_free_mb} MB needed (cluster.ssh.min_free_mb)")
    if report["port_free"] is False:
        problems.append(f"master port {run.plan.master_port} is in use; pick another cluster.master_port")
    problems += report.get("ascend", [])
    for proc in report["stale"]:
        problems.append(f"process {proc['pid']} of an earlier run of '{run.plan.job_name}' is alive "
                        f"({proc['cmd']}); stop it or pass --kill-stale")
    return problems


def discover_device_ips(plan: LaunchPlan, run_dir: Path, accept_new: bool) -> dict[int, list[str]]:
    """Connect to every node of a plan and read its device IPs (for rank-table mode without them)."""

    async def go():
        run = SshRun(plan, run_dir, RunRecord("discover", plan.job_name, "ssh", "starting", time.time()),
                     Console(quiet=True), accept_new)
        await run.connect_all()
        try:
            return await discover(run)
        finally:
            run.close()

    return asyncio.run(go())

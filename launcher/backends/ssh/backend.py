"""The SSH backend as the runner sees it: the flow of a run over SSH, and reaching a run again.

The pieces it puts together: session.py (the connections to the nodes and what is done on them),
preflight.py (what every node must offer) and gather.py (the ranks' files, verified).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from rich.console import Console

from launcher import secret_env
from launcher.backends.ssh import gather as ssh_gather
from launcher.backends.ssh import preflight as ssh_preflight
from launcher.backends.ssh import staging as ssh_staging
from launcher.backends.base import Backend, Echo, Events, Outcome, Problem, Run, Status
from launcher.backends.ssh.session import MIRROR_DIR, VANISHED_EXIT, SshRun
from launcher.data.cache import link_tree
from launcher.errors import LauncherError
from launcher.plan import LaunchPlan
from launcher.runs import RUN_DATA_DIR
from launcher.spec import Job


class SshBackend(Backend):
    """Each node's script started detached over SSH; status, logs, gather and down reconnect to it."""

    name = "ssh"
    can_purge = True
    OPTIONS = ("accept_new_host_keys", "kill_stale")

    def __init__(self, accept_new_host_keys: bool = False, kill_stale: bool = False):
        self.accept_new, self.kill_stale = accept_new_host_keys, kill_stale

    def where(self, plan: LaunchPlan) -> str:
        return f"{len(plan.nodes)} nodes over SSH"

    def check_host(self, job: Job) -> None:
        secret_env.resolve(job.secret_env)  # the values are read on this machine: fail before anything exists

    def check_plan(self, plan: LaunchPlan) -> None:
        secret_env.resolve(secret_env.plan_sources(plan.artifacts))

    def place_dataset(self, prepared: Path) -> tuple[str, Path]:
        # Staged with the run to every node, read relative to the node's run directory.
        return f"{RUN_DATA_DIR}/{prepared.name}", prepared

    def stage_dataset(self, prepared: Path, run_dir: Path) -> None:
        link_tree(prepared, run_dir / RUN_DATA_DIR / prepared.name)

    def complete(self, job: Job, plan: LaunchPlan, runs_dir: Path, events: Events) -> Job:
        """Rank-table jobs on Ascend without device IPs: read them from the nodes, so that the plan can
        carry the merged rank table."""
        cluster = job.cluster
        if not (cluster.device == "ascend" and cluster.launch == "ranktable"
                and any(n.device_ips is None for n in cluster.nodes)):
            return job
        events.info("reading device IPs from the nodes (hccn_tool or /etc/hccn.conf) ...")
        found = ssh_preflight.discover_device_ips(plan, runs_dir, self.accept_new)
        nodes = [n if n.device_ips else n.model_copy(update={"device_ips": found[i]})
                 for i, n in enumerate(cluster.nodes)]
        return job.model_copy(update={"cluster": cluster.model_copy(update={"nodes": nodes})})

    def execute(self, run: Run, events: Events) -> Outcome:
        secrets = secret_env.resolve(secret_env.plan_sources(run.plan.artifacts))
        ssh_run = SshRun(run.plan, run.dir, run.record, events.console, self.accept_new, self.kill_stale, secrets)
        problems, tail = asyncio.run(_execute(ssh_run))
        events.info("gathered; verifying ...")
        return Outcome([Problem(p) for p in problems], tail)

    def status(self, run: Run) -> Status:
        return Status(*_reconnect(run, SshRun.do_status))

    def logs(self, run: Run, ranks: list[int], follow: bool, prefix: bool, echo: Echo) -> list[Problem]:
        problems = _reconnect(run, SshRun.do_logs, ranks=ranks, follow=follow, prefix=prefix, echo=echo)
        return [Problem(p) for p in problems]

    def gather(self, run: Run) -> list[Problem]:
        return [Problem(p) for p in _reconnect(run, _gather_again)]

    def down(self, run: Run, purge: bool) -> str:
        problems = _reconnect(run, SshRun.do_down, purge=purge)
        if problems:
            raise LauncherError("; ".join(problems))
        return f"run {run.record.run_id}: no process left" + (", node directories removed" if purge else "")


async def _execute(run: SshRun) -> tuple[list[str], str]:
    """Connect, preflight, stage, start, watch, always tear down, gather. Returns the problems to report
    (teardown, gather) and the tail of the failing rank's log; the outcome is in run.record."""
    plan, record = run.plan, run.record
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, run.stop_requested.set)
    try:
        await run.connect_all()
        try:
            await ssh_preflight.preflight(run)
            await ssh_staging.stage(run)
            await run.start()
        except BaseException:
            run.close()
            raise
        record.state = "running"
        record.save(run.run_dir)
        try:
            outcome = await run.watch()
        finally:
            problems = await run.teardown()
        record.finished = time.time()
        record.state = outcome if outcome not in ("lost", "stalled") else "failed"
        record.exit_code = {"succeeded": 0, "interrupted": 130}.get(outcome, 1)
        failed = sorted(r for r, c in run.rank_codes(run.run_dir / MIRROR_DIR).items() if c != 0)
        lost = [s for s in run.nodes if s.lost]
        if outcome == "stalled":
            record.failed_rank, record.message = run.stalled.rank, run.stalled.message()
        elif outcome == "lost":
            record.message = "; ".join(f"node {s.step.index} ({s.step.host}) lost: no answer for "
                                       f"{plan.ssh.node_lost_after:.0f}s" for s in lost)
        elif outcome == "failed":
            if failed:
                record.failed_rank = failed[0]
            node = next((s for s in run.nodes if s.exit_code not in (None, 0)), None)
            failing_node = plan.ranks[failed[0]].node if failed else (node.step.index if node else None)
            record.message = f"node {failing_node} failed"
            if not failed and node and node.exit_code == VANISHED_EXIT:
                record.message += ": its node script ended without an exit code (killed?)"
        record.save(run.run_dir)
        problems += await ssh_gather.gather(run)
        tail = await run.tail(record.failed_rank) if record.failed_rank is not None else ""
        return problems, tail
    finally:
        run.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _gather_again(run: SshRun) -> list[str]:
    return run.unreachable() + await ssh_gather.gather(run, report_lost=False)


def _reconnect(run: Run, action, **kwargs):
    """Reach the run's nodes again (unreachable ones count as lost) and do one action there."""

    async def go():
        ssh_run = SshRun(run.plan, run.dir, run.record, Console())
        await ssh_run.connect_all(strict=False)
        try:
            return await action(ssh_run, **kwargs)
        finally:
            ssh_run.close()

    return asyncio.run(go())

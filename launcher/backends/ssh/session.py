"""The SSH backend: preflight every node, stage each node's bundle (staging.py), start detached, watch, tear
down, gather.

On each node a run lives in <workdir>/<run-id>/: the plan, start.sh, nodectl.py, node.log, node.pid,
node.exit and MindFormers' output/. The node script runs in its own session (setsid), so a dropped
SSH link does not stop the job, and `launcher status|logs|down RUN` can reconnect to it.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
from rich.console import Console

from launcher import gather, secret_env
from launcher.backends.ssh import transport
from launcher.entrypoints import nodectl
from launcher.errors import BackendError, TransportError
from launcher.liveview import LiveView, rank_exit_codes
from launcher.plan import STATUS_DIR, LaunchPlan, NodeStep
from launcher.runs import MIRROR_DIR, RunRecord
from launcher.stall import STACKS_WAIT_S, StallWatch

NODECTL = "nodectl.py"
POLL_SECONDS = 1.0
STOP_GRACE = 10.0
STOPPED_EXIT = 143  # 128 + SIGTERM: what a shell reports for a script stopped by the launcher
VANISHED_EXIT = 255  # the node script is gone and wrote no exit code (killed, or it never started)
NODECTL_SOURCE = Path(nodectl.__file__)


@dataclass
class NodeState:
    step: NodeStep
    node: transport.Node | None = None
    remote_path: str = ""  # PATH on the node, with the job's prefix in front
    last_ok: float = field(default_factory=time.monotonic)
    exit_code: int | None = None
    lost: bool = False
    error: Exception | None = None
    offsets: dict[str, int] = field(default_factory=dict)
    script_pid: int | None = None  # the node script's pid on the node (node.pid)


def remote_run_dir(step: NodeStep, run_id: str) -> str:
    return posixpath.join(step.workdir, run_id)


class SshRun:
    def __init__(self, plan: LaunchPlan, run_dir: Path, record: RunRecord, console: Console,
                 accept_new: bool = False, kill_stale: bool = False, secrets: Mapping[str, str] | None = None):
        if plan.ssh is None:
            raise BackendError("this plan was not rendered for the ssh backend")
        self.plan, self.run_dir, self.record, self.console = plan, run_dir, record, console
        self.secrets = dict(secrets or {})  # the job's secret_env values: kept in memory, sent with the start
        self.opts = plan.ssh
        self.accept_new, self.kill_stale = accept_new, kill_stale
        self.nodes = [NodeState(step) for step in plan.nodes]
        self.stop_requested = asyncio.Event()
        self.stalled = None  # the stall watchdog's finding, when it ended the watch
        self.connector: transport.Connector | None = None

    # --- connections -------------------------------------------------------------------------

    async def connect_all(self, strict: bool = True) -> None:
        """Connect to every node. strict: any failure is an error; else unreachable nodes count as lost."""
        self.connector = transport.Connector(self.opts.known_hosts, self.opts.connect_timeout,
                                             self.opts.command_timeout, self.accept_new, self.opts.jump,
                                             self.opts.identity_file)

        async def one(state: NodeState) -> bool:
            step = state.step
            endpoint = transport.Endpoint(step.host, step.port, step.user, step.identity_file)
            state.node = await self.connector.node(endpoint)
            path = (await state.node.run(["printenv", "PATH"], check=False)).strip()
            state.remote_path = ":".join([*self.opts.path_prefix, path or "/usr/local/bin:/usr/bin:/bin"])
            return True

        results, errors = await transport.gather_results(one(s) for s in self.nodes)
        if errors and strict:
            self.close()
            raise BackendError(self.per_node("cannot reach", errors) + "\nnothing was started on any node")
        for state, error in zip(self.nodes, failures_in_order(results, errors)):
            state.lost = error is not None
            state.error = error

    def close(self) -> None:
        for state in self.nodes:
            if state.node:
                state.node.close()
        if self.connector:
            self.connector.close()  # the jump hosts, after the connections through them

    def per_node(self, what: str, errors: list[Exception]) -> str:
        lines = [f"{what} {len(errors)} of {len(self.nodes)} nodes:"]
        for err in errors:
            host = getattr(err, "host", "?")
            index = next((s.step.index for s in self.nodes if s.step.host == host), "?")
            detail = err.stderr_tail if isinstance(err, TransportError) else str(err)
            lines.append(f"  node {index} ({host}): {detail}")
        return "\n".join(lines)

    async def nodectl(self, state: NodeState, *args: str, timeout: float | None = None) -> dict:
        script = posixpath.join(state.step.workdir, f".launcher-{NODECTL}")
        out = await state.node.run(["env", f"PATH={state.remote_path}", "python", script, *args], timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])

    # --- staging and start -------------------------------------------------------------------

    async def put_atomic(self, node: transport.Node, local: Path, remote: str) -> None:
        tmp = f"{remote}.tmp"
        await node.call(node.sftp.put(str(local), tmp, recurse=local.is_dir()), f"put {remote}")
        await node.call(node.sftp.posix_rename(tmp, remote), f"rename {remote}")

    async def start(self) -> None:
        # The secret values travel in the start command's standard input, over the SSH channel.
        payload = secret_env.stdin_payload(self.secrets) or None

        async def one(state: NodeState) -> None:
            await state.node.run(["bash", posixpath.join(remote_run_dir(state.step, self.record.run_id), "start.sh")],
                                 stdin=payload)

        _, errors = await transport.gather_results(one(s) for s in self.nodes)
        if errors:
            await self.teardown()
            raise BackendError(self.per_node("could not start on", errors) + "\nevery node was stopped")

    # --- watching ----------------------------------------------------------------------------

    async def poll(self, state: NodeState, mirror: Path) -> None:
        """Copy the node's new progress into the local mirror; raises TransportError if the node is silent."""
        node, base = state.node, remote_run_dir(state.step, self.record.run_id)
        # A short timeout per call, so that a silent node is noticed well within node_lost_after.
        timeout = max(1.0, self.opts.node_lost_after / 3)
        for rank in state.step.ranks:
            slot = self.plan.ranks[rank]
            for rel, append in ((slot.info_log, True), (f"{STATUS_DIR}/rank_{rank}.exit", False)):
                offset = state.offsets.get(rel, 0) if append else 0
                data = await node.call(node.read_from(posixpath.join(base, rel), offset), f"read {rel}", timeout)
                if data:
                    local = mirror / rel
                    local.parent.mkdir(parents=True, exist_ok=True)
                    with local.open("ab" if append else "wb") as f:
                        f.write(data)
                    state.offsets[rel] = offset + len(data)
        text = await node.call(node.read_from(posixpath.join(base, "node.exit"), 0), "read node.exit", timeout)
        if text.strip():
            state.exit_code = int(text.strip())
        elif not await self.node_script_alive(state, timeout):
            # Gone without writing node.exit (killed, or it could not start): look once more, then fail it.
            text = await node.call(node.read_from(posixpath.join(base, "node.exit"), 0), "read node.exit", timeout)
            state.exit_code = int(text.strip()) if text.strip() else VANISHED_EXIT

    async def node_script_alive(self, state: NodeState, timeout: float) -> bool:
        """Whether the node script (node.pid) still runs: its /proc entry, looked up over SFTP."""
        node, base = state.node, remote_run_dir(state.step, self.record.run_id)
        if not state.script_pid:
            text = await node.call(node.read_from(posixpath.join(base, "node.pid"), 0), "read node.pid", timeout)
            if not text.strip():
                return True  # not written yet
            state.script_pid = int(text.strip())
        return await node.call(node.exists(f"/proc/{state.script_pid}"), "look up the node script", timeout)

    async def watch(self) -> str:
        """Until every node ends, one fails, a node is lost, or the user stops. Returns the outcome."""
        mirror = self.run_dir / MIRROR_DIR
        watch = StallWatch.for_plan(self.plan)
        with LiveView(self.plan, mirror, self.console, title=self.record.run_id, watch=watch) as view:
            while not self.stop_requested.is_set():
                results = await asyncio.gather(*(self.poll(s, mirror) for s in self.nodes if not s.lost),
                                               return_exceptions=True)
                now = time.monotonic()
                for state, result in zip([s for s in self.nodes if not s.lost], results):
                    if isinstance(result, BaseException):
                        if now - state.last_ok > self.opts.node_lost_after:
                            state.lost = True
                            return "lost"
                    else:
                        state.last_ok = now
                view.update()
                if view.stalled is not None:
                    self.stalled = view.stalled
                    await self.dump_stacks()
                    return "stalled"
                codes = self.rank_codes(mirror)
                if any(c != 0 for c in codes.values()) or any(s.exit_code not in (None, 0) for s in self.nodes):
                    return "failed"
                if all(s.exit_code == 0 for s in self.nodes):
                    return "succeeded"
                try:
                    await asyncio.wait_for(self.stop_requested.wait(), POLL_SECONDS)
                except asyncio.TimeoutError:
                    pass
        return "interrupted"

    async def dump_stacks(self) -> None:
        """Every rank writes its Python stacks to its log (the stall watchdog's last look at a run)."""

        async def one(state: NodeState) -> None:
            await self.nodectl(state, "dump-stacks", self.record.run_id, "--workdir",
                               remote_run_dir(state.step, self.record.run_id), timeout=30)

        await transport.gather_results(one(s) for s in self.nodes if not s.lost and s.node)
        await asyncio.sleep(STACKS_WAIT_S)

    def rank_codes(self, mirror: Path) -> dict[int, int]:
        return rank_exit_codes(self.plan, mirror)

    # --- teardown and gather -----------------------------------------------------------------

    async def teardown(self, report_lost: bool = True) -> list[str]:
        """Stop the run on every reachable node; returns problems (nodes not reached or not stopped, and
        with report_lost the nodes lost during the run, whose processes may still run)."""

        async def one(state: NodeState) -> list[int]:
            left = (await self.nodectl(state, "stop", self.record.run_id, "--grace", str(STOP_GRACE),
                                       timeout=STOP_GRACE + 30))["left"]
            if not left:
                await self.mark_stopped(state)
            return left

        reachable = [s for s in self.nodes if not s.lost and s.node]
        results, _ = await transport.gather_results(one(s) for s in reachable)
        problems = []
        for state, left in zip(reachable, results):
            if left is None:
                problems.append(f"node {state.step.index} ({state.step.host}): could not be reached to stop it")
            elif left:
                problems.append(f"node {state.step.index} ({state.step.host}): processes {left} would not stop")
        if report_lost:
            problems += [f"node {s.step.index} ({s.step.host}) is lost; its processes may still run: "
                         f"'launcher down {self.record.run_id}' when it is back" for s in self.nodes if s.lost]
        return problems

    async def mark_stopped(self, state: NodeState) -> None:
        """Write node.exit for a node script that was stopped: start.sh, stopped with it, never does, and
        whoever follows the run (`logs -f`, `status`) waits for that file."""
        path = posixpath.join(remote_run_dir(state.step, self.record.run_id), "node.exit")
        try:
            async with state.node.sftp.open(path, "x") as f:  # only if the node did not write its own
                await f.write(f"{STOPPED_EXIT}\n")
        except (OSError, asyncssh.Error):
            pass  # it ended by itself and wrote its code, or its run directory is gone

    async def tail(self, rank: int, lines: int = 20) -> str:
        slot = self.plan.ranks[rank]
        state = next(s for s in self.nodes if rank in s.step.ranks)
        local = self.run_dir / gather.rank_dir(rank) / "console.log"
        if local.is_file():
            return "\n".join(local.read_text(errors="replace").splitlines()[-lines:])
        if state.lost or not state.node:
            return "(log not reachable)"
        data = await state.node.read_from(posixpath.join(remote_run_dir(state.step, self.record.run_id),
                                                         slot.console_log), 0)
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    # --- reconnected operations --------------------------------------------------------------

    def unreachable(self) -> list[str]:
        return [f"node {s.step.index} ({s.step.host}) cannot be reached: "
                f"{s.error.stderr_tail if isinstance(s.error, TransportError) else s.error}"
                for s in self.nodes if s.lost]

    async def do_status(self) -> tuple[list[str], LiveView]:
        """One poll of every node: per-node lines, and a live view filled from the mirror."""
        mirror = self.run_dir / MIRROR_DIR
        lines = []
        for state in self.nodes:
            if state.lost:
                continue
            await self.poll(state, mirror)
            alive = (await self.nodectl(state, "alive", self.record.run_id))["pids"]
            ended = "running" if state.exit_code is None else f"ended with code {state.exit_code}"
            lines.append(f"node {state.step.index} ({state.step.host}): {ended}, {len(alive)} processes alive")
        view = LiveView(self.plan, mirror, Console(force_terminal=False), self.record.run_id)
        view.update()
        return lines + self.unreachable(), view

    async def do_logs(self, ranks: list[int], follow: bool, prefix: bool, echo) -> list[str]:
        offsets = {r: 0 for r in ranks}
        while True:
            for rank in ranks:
                state = next(s for s in self.nodes if rank in s.step.ranks)
                if state.lost:
                    continue
                path = posixpath.join(remote_run_dir(state.step, self.record.run_id), self.plan.ranks[rank].console_log)
                data = await state.node.call(state.node.read_from(path, offsets[rank]), f"read {path}")
                complete = data[: data.rfind(b"\n") + 1] if follow else data
                offsets[rank] += len(complete)
                for line in complete.decode(errors="replace").splitlines():
                    echo(f"[rank {rank}] {line}" if prefix else line)
            if not follow:
                break
            for state in self.nodes:
                if not state.lost:
                    text = await state.node.read_from(
                        posixpath.join(remote_run_dir(state.step, self.record.run_id), "node.exit"), 0)
                    state.exit_code = int(text) if text.strip() else None
            if all(s.exit_code is not None for s in self.nodes if not s.lost):
                break
            await asyncio.sleep(POLL_SECONDS)
        return self.unreachable()

    async def do_down(self, purge: bool) -> list[str]:
        # Nodes that cannot be reached now are reported as unreachable, not as lost during a run.
        problems = await self.teardown(report_lost=False) + self.unreachable()
        if purge and not problems:
            for state in self.nodes:
                target = remote_run_dir(state.step, self.record.run_id)
                await state.node.call(state.node.sftp.rmtree(target, ignore_errors=True), f"remove {target}")
        return problems


def failures_in_order(results: list, errors: list[Exception]) -> list[Exception | None]:
    it = iter(errors)
    return [next(it) if r is None else None for r in results]

"""SSH gather: every rank's files from every node over SFTP, resumable, each checked against the node's sha256."""

from __future__ import annotations

import asyncio
import hashlib
import posixpath
from pathlib import Path

import asyncssh

from launcher import gather as local_gather
from launcher.backends.ssh import transport
from launcher.checksums import sha256_file, sha256_of
from launcher.backends.ssh.session import NodeState, SshRun, remote_run_dir
from launcher.errors import BackendError, TransportError

_FETCH_CHUNK = 32 << 20
_BLOCK = 255 << 10  # the largest read OpenSSH's sftp-server answers in one request


async def gather(run: SshRun, report_lost: bool = True) -> list[str]:
    """Copy every rank's files from every reachable node, verified by sha256. Returns problems (with
    report_lost, also the nodes lost during the run)."""

    async def one(state: NodeState) -> None:
        node, base = state.node, remote_run_dir(state.step, run.record.run_id)
        patterns = [p for r in state.step.ranks for p in run.plan.collect_sources(r)] + ["node.log"]
        listing = (await run.nodectl(state, "list-files", "--no-hash", base, *patterns))["files"]
        # The node hashes its files while they are already being downloaded.
        hashing = asyncio.ensure_future(run.nodectl(state, "list-files", base, *patterns, timeout=3600))
        try:
            paths = [f["path"] for f in listing]
            wanted = local_gather.wanted_from_paths(run.plan, paths, ranks=state.step.ranks)
            if "node.log" in paths:
                wanted.append(local_gather.Wanted(-1, "node.log", f"nodes/node-{state.step.index}/node.log"))
            for item in wanted:
                try:
                    await fetch(run, node, base, item.source, run.run_dir / item.dest, hashing)
                except (OSError, asyncssh.Error) as exc:
                    raise TransportError(node.host, ["get", item.source], None, str(exc)) from None
        finally:
            hashing.cancel()

    reachable = [s for s in run.nodes if not s.lost and s.node]
    _, errors = await transport.gather_results(one(s) for s in reachable)
    problems = [line for line in run.per_node("could not gather from", errors).splitlines()[1:]] if errors else []
    if report_lost:
        problems += [f"node {s.step.index} ({s.step.host}) is lost; nothing gathered from it"
                     for s in run.nodes if s.lost]
    return problems


async def fetch(run: SshRun, node: transport.Node, base: str, source: str, dest: Path,
                 hashing: asyncio.Future) -> None:
    """Download base/source to a .partial name, resuming what an interrupted gather left; rename it
    once its sha256 matches the one the node computed (the `hashing` listing)."""
    remote = posixpath.join(base, source)

    async def node_sha() -> str:
        return next(f["sha256"] for f in (await hashing)["files"] if f["path"] == source)

    if dest.is_file() and sha256_file(dest) == await node_sha():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    for _attempt in range(2):
        # Hash what a previous gather left, then the new bytes as they arrive: the file is read once.
        digest = sha256_of(partial) if partial.exists() else hashlib.sha256()
        offset = partial.stat().st_size if partial.exists() else 0
        # Large reads, each split by asyncssh into many requests in flight; written in order, so the
        # partial file is always a complete prefix that a later gather can resume from.
        async with node.sftp.open(remote, "rb", block_size=_BLOCK, max_requests=64) as f:
            with partial.open("ab") as out:
                while chunk := await node.call(f.read(_FETCH_CHUNK, offset), f"read {remote}"):
                    # Off the event loop (both release the GIL), so other nodes' downloads go on meanwhile.
                    await asyncio.to_thread(_write_and_hash, out, digest, chunk)
                    offset += len(chunk)
        if digest.hexdigest() == await node_sha():
            partial.replace(dest)
            return
        partial.unlink()  # a stale partial from another version of the file: start over once
    raise BackendError(f"{node.host}: {remote} does not match its sha256 after download")


def _write_and_hash(out, digest, chunk: bytes) -> None:
    out.write(chunk)
    digest.update(chunk)

"""SSH gather: every rank's files from every node over SFTP, resumable, each checked against the node's sha256."""

from __future__ import annotations

import asyncio
import hashlib
import posixpath
from collections import deque
from pathlib import Path

import asyncssh

from launcher import gather as local_gather
from launcher.backends.ssh import transport
from launcher.checksums import sha256_file, sha256_of
from launcher.backends.ssh.session import NodeState, SshRun, remote_run_dir
from launcher.errors import BackendError, TransportError

_BLOCK = 255 << 10  # the largest read OpenSSH's sftp-server answers in one request
_IN_FLIGHT = 64  # read requests outstanding per file (16 MiB)
_WRITE_BATCH = 8 << 20  # bytes handed to the writing thread at once


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
        # block_size 0: each read is one SFTP request; _download keeps many of them in flight itself.
        async with node.sftp.open(remote, "rb", block_size=0) as f:
            with partial.open("ab") as out:
                await _download(node, f, remote, out, digest, offset)
        if digest.hexdigest() == await node_sha():
            partial.replace(dest)
            return
        partial.unlink()  # a stale partial from another version of the file: start over once
    raise BackendError(f"{node.host}: {remote} does not match its sha256 after download")


async def _download(node: transport.Node, f, remote: str, out, digest, offset: int) -> None:
    """Copy the remote file from offset to its end into out, hashing it on the way: _IN_FLIGHT one-block
    reads outstanding at once, written in their order, so that out is always a complete prefix of the file
    (what a later gather resumes from). Writes and hashing run in a thread, while the next blocks arrive."""
    pending: deque[tuple[int, asyncio.Future]] = deque()
    batch: list[bytes] = []
    try:
        while offset < (size := (await node.call(f.stat(), f"stat {remote}")).size):  # again: it may grow
            ahead = offset  # where the next request starts
            while ahead < size or pending:
                while len(pending) < _IN_FLIGHT and ahead < size:
                    pending.append((ahead, asyncio.ensure_future(_read_block(f, ahead))))
                    ahead += _BLOCK
                at, request = pending.popleft()
                data = await node.call(request, f"read {remote}")
                batch.append(data)
                offset = at + len(data)
                if len(data) < min(_BLOCK, size - at):  # a short read: ask again from there, in order
                    _cancel(pending)
                    break
                if sum(map(len, batch)) >= _WRITE_BATCH:
                    await asyncio.to_thread(_write_and_hash, out, digest, batch)
                    batch = []
            await asyncio.to_thread(_write_and_hash, out, digest, batch)
            batch = []
            if offset < size and not data:  # the file shrank under us: the sha256 check will tell
                return
    finally:
        _cancel(pending)


async def _read_block(f, offset: int) -> bytes:
    try:
        return await f.read(_BLOCK, offset)
    except asyncssh.SFTPEOFError:
        return b""


def _cancel(pending: deque) -> None:
    while pending:
        pending.popleft()[1].cancel()


def _write_and_hash(out, digest, chunks: list[bytes]) -> None:
    # Both release the GIL, so other nodes' downloads go on meanwhile.
    for chunk in chunks:
        out.write(chunk)
        digest.update(chunk)

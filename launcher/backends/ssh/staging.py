"""SSH staging: each node's bundle put under a temporary name, then renamed to <workdir>/<run-id>/.

A node gets the plan's shared files and its own node folder (not the other nodes'), its start.sh and
nodectl.py, as one tar archive unpacked by the node's `tar`: one exchange instead of a few SFTP
requests per file, which grew with the square of the node count. Large folders (a prepared dataset, the
checkpoint a later attempt resumes from) follow over SFTP. If any node fails, what was staged is removed
from every node: no node keeps part of a run that never ran.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from pathlib import Path

from launcher.backends.ssh import transport
from launcher.backends.ssh.session import NODECTL, NODECTL_SOURCE, NodeState, SshRun, remote_run_dir
from launcher.errors import BackendError
from launcher.plan import NodeStep
from launcher.render import render_template
from launcher.runs import PLAN_DIR, RESUME_DIR, RUN_DATA_DIR


def staging_dir(step: NodeStep, run_id: str) -> str:
    return posixpath.join(step.workdir, f".{run_id}.staging")


def render_start_scripts(run: SshRun) -> None:
    """Each node's start.sh and nodectl.py, kept in the run directory under nodes/node-N/bundle/."""
    for state in run.nodes:
        bundle = bundle_dir(run, state.step)
        bundle.mkdir(parents=True, exist_ok=True)
        (bundle / "start.sh").write_text(render_template(
            "ssh_start.sh.j2", run_id=run.record.run_id, job_name=run.plan.job_name, node=state.step,
            path=state.remote_path, secret_names=list(run.secrets)))
        (bundle / NODECTL).write_bytes(NODECTL_SOURCE.read_bytes())


def bundle_dir(run: SshRun, step: NodeStep) -> Path:
    return run.run_dir / "nodes" / f"node-{step.index}" / "bundle"


def archive(run: SshRun, step: NodeStep) -> bytes:
    """The node's bundle as an uncompressed tar: plan/ without the other nodes' folders, start.sh, nodectl.py."""
    plan_dir = run.run_dir / PLAN_DIR
    own = posixpath.dirname(step.script)  # nodes/node-N
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(p for p in plan_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(plan_dir).as_posix()
            if rel.startswith("nodes/") and not rel.startswith(f"{own}/"):
                continue
            tar.add(path, arcname=f"{PLAN_DIR}/{rel}", recursive=False)
        for item in ("start.sh", NODECTL):
            tar.add(bundle_dir(run, step) / item, arcname=item, recursive=False)
    return buffer.getvalue()


async def stage(run: SshRun) -> None:
    """Stage every node at once; on any failure, remove every node's staging and raise."""
    render_start_scripts(run)

    async def one(state: NodeState) -> None:
        node, step = state.node, state.step
        staging = staging_dir(step, run.record.run_id)
        await node.unpack(archive(run, step), staging)
        if (run.run_dir / RUN_DATA_DIR).is_dir():  # a dataset prepared here, read as data/... on the node
            await node.call(node.sftp.put(str(run.run_dir / RUN_DATA_DIR), posixpath.join(staging, RUN_DATA_DIR),
                                          recurse=True), "put the prepared dataset")
        # A later attempt's checkpoint: each node gets only its own ranks' folders.
        resumes = [f"rank_{rank}" for rank in step.ranks if (run.run_dir / RESUME_DIR / f"rank_{rank}").is_dir()]
        if resumes:
            await node.call(node.sftp.makedirs(posixpath.join(staging, RESUME_DIR), exist_ok=True), "mkdir resume")
        for folder in resumes:
            await node.call(node.sftp.put(str(run.run_dir / RESUME_DIR / folder),
                                          posixpath.join(staging, RESUME_DIR, folder), recurse=True),
                            f"put the checkpoint {folder} resumes from")
        target = remote_run_dir(step, run.record.run_id)
        await node.call(node.sftp.posix_rename(staging, target), f"rename {target}")

    _, errors = await transport.gather_results(one(s) for s in run.nodes)
    if errors:
        await unstage(run)
        raise BackendError(run.per_node("could not stage the run on", errors) + "\nnothing was started")


async def unstage(run: SshRun) -> None:
    """Remove what staging left on every node, renamed or not."""

    async def one(state: NodeState) -> None:
        node = state.node
        for path in (staging_dir(state.step, run.record.run_id), remote_run_dir(state.step, run.record.run_id)):
            await node.call(node.sftp.rmtree(path, ignore_errors=True), f"remove {path}")

    await transport.gather_results(one(s) for s in run.nodes if s.node)

"""Gather a run into runs/<run-id>/: per-rank files, manifest.json, summary.json, loss.png and report.html.

Layout of runs/<run-id>/ranks/rank_N/:
  log/         MindFormers' output/log/rank_N/*  (info.log, error.log)
  console.log  the rank's stdout/stderr (msrun's worker_N.log, or the rank-table script's rank log)
  checkpoint/  output/checkpoint/rank_N/*
  strategy/    this rank's parallel strategy files, if any
  versions.json  what the rank ran with (entrypoints/finetune.py), folded into run.json's versions.nodes
and runs/<run-id>/tensorboard/rank_N/: output/tensorboard/rank_N/* (monitor.tensorboard), one directory per
rank as TensorBoard's --logdir expects.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path

from launcher import attempts, logparse, report, run_versions
from launcher.checksums import sha256_file
from launcher.errors import BackendError
from launcher.plan import LaunchPlan
from launcher.runs import MANIFEST, RANKS_DIR, SUMMARY, TENSORBOARD_DIR

LOSS_PLOT = "loss.png"


@dataclass(frozen=True)
class Wanted:
    """One file to gather: where it is under the node's work directory, where it goes under the run."""

    rank: int
    source: str
    dest: str


def rank_dir(rank: int) -> str:
    return f"{RANKS_DIR}/rank_{rank}"


def wanted_from_paths(plan: LaunchPlan, paths: list[str], ranks=None) -> list[Wanted]:
    """Map a node's files (paths relative to its work directory) to their places under ranks/rank_N/
    (and tensorboard/rank_N/)."""
    out = []
    present = sorted(paths)
    for rank in ranks if ranks is not None else range(plan.world_size):
        base = rank_dir(rank)
        log_glob, console, ckpt_glob, strategy_glob, events_glob, versions = plan.collect_sources(rank)
        folders = ((log_glob, f"{base}/log"), (ckpt_glob, f"{base}/checkpoint"), (strategy_glob, f"{base}/strategy"),
                   (events_glob, f"{TENSORBOARD_DIR}/rank_{rank}"))
        for pattern, folder in folders:
            for path in fnmatch.filter(present, pattern):
                out.append(Wanted(rank, path, f"{folder}/{posixpath.basename(path)}"))
        if console in present:
            out.append(Wanted(rank, console, f"{base}/console.log"))
        if versions in present:
            out.append(Wanted(rank, versions, f"{base}/{run_versions.RANK_FILE}"))
    return out


def wanted_files(plan: LaunchPlan, workdir: Path) -> list[Wanted]:
    """The same, for a local work directory."""
    output = workdir / "output"
    paths = [str(p.relative_to(workdir)) for p in output.rglob("*") if p.is_file()] if output.is_dir() else []
    return wanted_from_paths(plan, paths)


def copy_verified(src: Path, dest: Path, expected_sha: str | None = None) -> str:
    """Copy to a temporary name, check the hash, then rename: no partial file under its final name."""
    expected = expected_sha or sha256_file(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.copyfile(src, partial)
    got = sha256_file(partial)
    if got != expected:
        partial.unlink()
        raise BackendError(f"gather: {src} changed while it was copied (sha256 {got[:12]} != {expected[:12]})")
    os.replace(partial, dest)
    return got


def gather_local(plan: LaunchPlan, workdir: Path, run_dir: Path) -> list[Wanted]:
    """Copy every rank's files from a local work directory. Files already gathered and unchanged are kept."""
    wanted = wanted_files(plan, workdir)
    for item in wanted:
        src, dest = workdir / item.source, run_dir / item.dest
        if dest.is_file() and dest.stat().st_size == src.stat().st_size and sha256_file(dest) == sha256_file(src):
            continue
        copy_verified(src, dest)
    return wanted


def manifest_entries(run_dir: Path) -> dict[str, dict]:
    """Every gathered file of every attempt (attempts/<k>/ranks/..., launcher/attempts.py)."""
    files = {}
    for directory in attempts.attempt_dirs(run_dir):
        for top in (RANKS_DIR, TENSORBOARD_DIR, "plan", "nodes"):
            for path in sorted((directory / top).rglob("*")):
                if path.is_file() and not path.name.endswith(".partial"):
                    files[str(path.relative_to(run_dir))] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def write_manifest(run_dir: Path) -> dict:
    manifest = {"files": manifest_entries(run_dir)}
    (run_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_manifest(run_dir: Path) -> list[str]:
    """Every difference between the manifest and the files on disk."""
    try:
        recorded = json.loads((run_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return [f"{MANIFEST} is missing"]
    problems = []
    for rel, meta in recorded.items():
        path = run_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            problems.append(f"{rel}: content differs from the manifest")
    return problems


def write_summary(plan: LaunchPlan, run_dir: Path, extra: dict) -> dict:
    ranks = {}
    curves = {}
    for slot in plan.ranks:
        records = attempts.rank_records(run_dir, slot.rank)
        ckpts = []  # file names; a later attempt's as attempts/<k>/<name>
        for directory in attempts.attempt_dirs(run_dir):
            prefix = "" if directory == run_dir else f"{directory.relative_to(run_dir)}/"
            ckpts += sorted(prefix + p.name for p in (directory / rank_dir(slot.rank) / "checkpoint").glob("*.ckpt"))
        ranks[str(slot.rank)] = {
            "node": slot.node,
            "host": slot.host,
            "device": slot.device,
            **logparse.summarize(records, plan.seq_length, plan.batch_size),
            "checkpoints": ckpts,
        }
        curves[slot.rank] = records
    summary = {**extra, "world_size": plan.world_size, "seq_length": plan.seq_length,
               "batch_size": plan.batch_size, "ranks": ranks}
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    plot_losses(curves, run_dir / LOSS_PLOT, title=str(extra.get("run_id", plan.job_name)))
    return summary


def plot_losses(curves: dict[int, list[logparse.StepRecord]], out: Path, title: str) -> None:
    # The Figure API with the Agg canvas draws off-screen without importing pyplot (faster start).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for rank, records in sorted(curves.items()):
        if records:
            ax.plot([r.step for r in records], [r.loss for r in records], marker=".", label=f"rank {rank}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if any(curves.values()):
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no steps logged", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)


def finish(plan: LaunchPlan, run_dir: Path, record) -> dict:
    """After the files are in place: manifest.json, summary.json, loss.png, then report.html from them.
    The last three are made from the gathered files on every gather, so the manifest does not list them.
    The ranks' versions files are folded into run.json first."""
    record_node_versions(plan, run_dir, record)
    write_manifest(run_dir)
    summary = write_summary(plan, run_dir, {
        "run_id": record.run_id, "job": record.job_name, "state": record.state, "exit_code": record.exit_code,
        "failed_rank": record.failed_rank, "message": record.message,
    })
    report.write_report(run_dir, plan, record, summary, run_dir / LOSS_PLOT, failed_rank_tail(run_dir, record))
    return summary


def record_node_versions(plan: LaunchPlan, run_dir: Path, record) -> None:
    """run.json's versions.nodes from what the gathered ranks reported (left as it is if none did)."""
    reports = {}
    for slot in plan.ranks:
        found = run_versions.read_rank(run_dir / rank_dir(slot.rank))
        if found is not None:
            reports[slot.rank] = found
    if not reports:
        return
    nodes = run_versions.fold(reports, {slot.rank: slot.node for slot in plan.ranks})
    if record.versions.get("nodes") != nodes:
        record.versions = {**record.versions, "nodes": nodes}
        record.save(run_dir)


def failed_rank_tail(run_dir: Path, record, lines: int = 20) -> str:
    """The end of the failing rank's gathered console log."""
    if record.failed_rank is None:
        return ""
    log = run_dir / rank_dir(record.failed_rank) / "console.log"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""

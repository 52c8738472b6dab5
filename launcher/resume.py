"""Where a failed run resumes: the newest step of which every rank has a whole, verified checkpoint.

A checkpoint counts only if it is listed in the run's manifest.json with the size and sha256 it has on
disk now, and if it reads as a MindSpore checkpoint that records its step (MindFormers' CheckpointMonitor
appends step_num and epoch_num to every file: mindformers r1.8.0 core/callback/callback.py). The step is
read from the file, not its name: a resumed attempt names its files by the steps it made itself.
A step that only some ranks saved (a rank died while writing, a file was cut short) is passed over for
an older one that every rank has.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from launcher.checksums import sha256_file
from launcher.ckpt import stream
from launcher.errors import LauncherError
from launcher.runs import ATTEMPTS_DIR, MANIFEST, RANKS_DIR, RESUME_DIR

_GATHERED_CKPT = re.compile(rf"^(?:{ATTEMPTS_DIR}/(\d+)/)?{RANKS_DIR}/rank_(\d+)/checkpoint/([^/]+\.ckpt)$")


@dataclass(frozen=True)
class ResumePoint:
    step: int  # the global step the checkpoints were saved after (their step_num)
    epoch: int
    files: dict[int, Path]  # rank -> the gathered checkpoint, under the run directory
    passed_over: list[str] = field(default_factory=list, compare=False)  # newer candidates, and why not

    def file_name(self, rank: int) -> str:
        """The name each rank finds its checkpoint under, in MindFormers' {prefix}_rank_N-{epoch}_{step} form."""
        return f"resume_rank_{rank}-{self.epoch}_{self.step}.ckpt"

    def as_record(self, run_dir: Path) -> dict:
        return {"step": self.step, "epoch": self.epoch,
                "files": {str(r): str(p.relative_to(run_dir)) for r, p in sorted(self.files.items())}}


def checkpoint_step(path: Path) -> tuple[int, int]:
    """(step_num, epoch_num) recorded in a checkpoint; LauncherError if it is not a whole checkpoint."""
    with stream.CheckpointReader(path) as reader:
        found = {}
        for name in ("step_num", "epoch_num"):
            entry = reader.by_name.get(name)
            if entry is None:
                raise LauncherError(f"{path.name} records no {name}")
            value = reader.array(entry).reshape(-1)
            if value.size != 1 or value.dtype.kind not in "iu":
                raise LauncherError(f"{path.name}: {name} is not an integer")
            found[name] = int(value[0])
    return found["step_num"], found["epoch_num"]


def find_resume_point(run_dir: Path, world_size: int) -> ResumePoint | None:
    """The newest step every rank has a verified checkpoint of, over every attempt; None if there is none."""
    try:
        listed = json.loads((run_dir / MANIFEST).read_text())["files"]
    except (FileNotFoundError, ValueError, KeyError):
        return None
    by_step: dict[int, dict[int, tuple[int, Path]]] = {}  # step -> rank -> (epoch, file)
    passed_over = []
    gathered = sorted((int(m[1] or 1), rel, int(m[2])) for rel in listed if (m := _GATHERED_CKPT.match(rel)))
    for _, rel, rank in gathered:  # attempt by attempt
        path, meta = run_dir / rel, listed[rel]
        problem = _problem(path, meta)
        if problem is None:
            try:
                step, epoch = checkpoint_step(path)
            except LauncherError as err:
                problem = str(err)
        if problem is not None:
            passed_over.append(f"{rel}: {problem}")
            continue
        by_step.setdefault(step, {})[rank] = (epoch, path)  # a later attempt's file of a step wins
    for step in sorted(by_step, reverse=True):
        ranks = by_step[step]
        missing = [r for r in range(world_size) if r not in ranks]
        if missing:
            passed_over.append(f"step {step}: no whole checkpoint of rank {', '.join(map(str, missing))}")
            continue
        epoch = max(epoch for epoch, _ in ranks.values())
        return ResumePoint(step, epoch, {r: ranks[r][1] for r in range(world_size)}, passed_over)
    return None


def _problem(path: Path, meta: dict) -> str | None:
    if not path.is_file():
        return "missing"
    if path.stat().st_size != meta.get("size"):
        return f"{path.stat().st_size} bytes, the manifest says {meta.get('size')}"
    if sha256_file(path) != meta.get("sha256"):
        return "content differs from the manifest"
    return None


def stage(point: ResumePoint, attempt_dir: Path) -> None:
    """attempt_dir/resume/rank_N/<file_name(N)>: hard links to the gathered files (copies across devices)."""
    for rank, source in point.files.items():
        dest = attempt_dir / RESUME_DIR / f"rank_{rank}" / point.file_name(rank)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, dest)
        except OSError:
            shutil.copyfile(source, dest)

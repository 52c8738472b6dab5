"""Run directories: runs/<run-id>/ with run.json (what was started, where, and how it ended).

Every name inside a run directory is defined here, once.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from launcher.errors import ConfigError

RUN_FILE = "run.json"
PLAN_DIR = "plan"
# MindFormers' output in each node's work directory (a local run's work directory is its run directory).
OUTPUT_DIR = "output"
# A dataset prepared on this machine for a remote run: staged with the plan, read as data/<file> on the nodes.
RUN_DATA_DIR = "data"
DATA_RECORD = "data.json"  # what the run trained on (predict reads the tokenizer from it)
MIRROR_DIR = "mirror"  # local copies of remote ranks' progress files and logs, for the live view
NODE_LOG = "node-0.log"  # the local node script's output
TARGET_FILE = "k8s.json"  # how a Kubernetes run reaches its cluster again
RANKS_DIR = "ranks"  # ranks/rank_N/: each rank's gathered files
MANIFEST = "manifest.json"  # size and sha256 of every gathered file
SUMMARY = "summary.json"  # per-rank steps, losses and throughput (gather writes it)
TENSORBOARD_DIR = "tensorboard"  # tensorboard/rank_N/: each rank's gathered TensorBoard event files
REPORT = "report.html"  # the run on one self-contained page, rewritten by every gather
FILTERED_DIR = "filtered"  # launcher ckpt filter
MERGED_DIR = "merged"  # launcher ckpt merge
MERGED_LORA_DIR = "merged-lora"  # launcher ckpt merge-lora
# attempts/<k>/: attempt k (2, 3, ...) of a restarted run, laid out as a run directory; attempt 1 is the run
# directory itself. RESUME_DIR in an attempt: the checkpoint it resumes from, rank_N/<file> per rank.
ATTEMPTS_DIR = "attempts"
RESUME_DIR = "resume"


@dataclass
class RunRecord:
    run_id: str
    job_name: str
    backend: str
    state: str  # starting | running | succeeded | failed | interrupted
    started: float
    finished: float | None = None
    exit_code: int | None = None
    failed_rank: int | None = None
    leader_pid: int | None = None  # process-group leader of the node script (local)
    message: str = ""
    overrides: list[str] = field(default_factory=list)  # the --set key=value changes the job was started with
    # Why a run that did not succeed failed: kind, rank, summary, fix, evidence (launcher/diagnose.py).
    failure: dict | None = None
    # What the run ran with: launcher, job_sha256, git_commit, image, and nodes (see run_versions.py).
    versions: dict = field(default_factory=dict)
    attempts: int = 1  # how many attempts the run has started (launcher/attempts.py)
    # How each attempt ended, in order: attempt, run_id, dir, state, exit_code, failed_rank, failure, started,
    # finished, resumed_from ({step, epoch, files} or None); empty for a run that never restarted.
    attempt_records: list[dict] = field(default_factory=list)

    def save(self, run_dir: Path) -> None:
        tmp = run_dir / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, run_dir / RUN_FILE)

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord:
        return cls(**json.loads((run_dir / RUN_FILE).read_text()))


def new_run_id(job_name: str, runs_dir: Path) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_id, n = f"{job_name}-{stamp}", 1
    while (runs_dir / run_id).exists():
        n += 1
        run_id = f"{job_name}-{stamp}-{n}"
    return run_id


def find_run(run: str, runs_dir: Path) -> Path:
    """RUN is a run directory or a run id under runs_dir; a unique prefix of an id is enough."""
    candidates = [Path(run), runs_dir / run]
    for path in candidates:
        if (path / RUN_FILE).is_file():
            return path
    matches = sorted(p for p in runs_dir.glob(f"{run}*") if (p / RUN_FILE).is_file()) if runs_dir.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches[:5])
        raise ConfigError(f"run '{run}' is ambiguous: {names}")
    raise ConfigError(f"no run '{run}' in {runs_dir}/; give a run id or a run directory")

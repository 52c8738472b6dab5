"""A job's `data:` section: where its prepared dataset lives, and preparing it once.

The prepared MindRecord directory is named by content: `<cache_dir>/<job name>-<hash12>/`, where the
hash covers the source bytes, the tokenizer files, the format, the record length and the template
version (vicuna's key is the one it had before there was a choice of template). The same inputs
always find the same file, so `up` prepares a dataset once and reuses it; a changed row, tokenizer,
template or seq_length gives a new file. The job the planner sees has dataset.path
set to that file (resolve_data), so the plan stays a pure function of the job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from launcher.errors import ConfigError
from launcher.runs import DATA_RECORD
from launcher.job_sections import Data
from launcher.spec import Job




def model_seq_length(job: Job) -> int:
    """The model's seq_length: the base config's, or the job's override of it."""
    from launcher import mfconfig

    cfg = mfconfig.load_base(job)
    for dotted, value in job.mindformers.overrides.items():
        mfconfig.apply_override(cfg, dotted, value)
    return int(cfg["model"]["model_config"]["seq_length"])


def record_length(job: Job) -> int:
    """Tokens per record: seq_length + 1, as MindFormers' CausalLanguageModelDataset reads them
    (the model takes tokens [0, L) as input and [1, L] as labels), like `launcher dataset tiny`."""
    data = job.data
    return (data.seq_length or model_seq_length(job)) + 1


def _absolute(path: str, base: Path) -> Path:
    return Path(path) if Path(path).is_absolute() else (base / path).resolve()


def absolute_data(data: Data, base: Path) -> Data:
    """source, tokenizer and cache_dir relative to `base` (the current directory)."""
    return data.model_copy(update={k: str(_absolute(getattr(data, k), base))
                                   for k in ("source", "tokenizer", "cache_dir")})


def content_hash(data: Data, length: int) -> str:
    from launcher.data.tokenization import get_template
    from launcher.data.tokenizer import tokenizer_files

    source = Path(data.source)
    if not source.is_file():
        raise ConfigError(f"data.source: {source} does not exist")
    digest = hashlib.sha256()
    version = get_template(data.template).version
    digest.update(json.dumps({"format": data.format, "length": length, "template": version}).encode())
    for path in (source, *tokenizer_files(data.tokenizer)):
        digest.update(f"\0{path.name}\0".encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def cache_path(job: Job, length: int) -> Path:
    return Path(job.data.cache_dir) / f"{job.name}-{content_hash(job.data, length)[:12]}"


def resolve_data(job: Job, base: Path) -> tuple[Job, Path | None]:
    """The job with its data: paths absolute, and the cache directory its prepared dataset goes to
    (None without a data: section). Where the ranks read it is the backend's to say (place_dataset)."""
    if job.data is None:
        return job, None
    job = job.model_copy(update={"data": absolute_data(job.data, base)})
    return job, cache_path(job, record_length(job))


def with_dataset(job: Job, dataset_path: str) -> Job:
    return job.model_copy(update={"dataset": job.dataset.model_copy(update={"path": dataset_path})})


def prepare_job(job: Job, out: Path, progress=None, workers: int | None = None, strict: bool = False,
                force: bool = False):
    """Prepare the job's data: section into `out`; the options add to the section's own settings."""
    from launcher.data.prepare import default_workers, prepare

    data = job.data
    return prepare(Path(data.source), data.format, Path(data.tokenizer), out, record_length(job),
                   workers=workers or data.workers or default_workers(), strict=strict or data.strict,
                   force=force, progress=progress, template=data.template)


def ensure_prepared(job: Job, path: Path, progress_factory=None):
    """Prepare the job's data into `path` unless it is already there. Returns the Report or None (cached)."""
    if path.is_dir():  # it only appears there whole
        return None
    with progress_factory() if progress_factory else contextlib.nullcontext() as progress:
        return prepare_job(job, path, progress, force=True)


def record_run_data(job: Job, path: Path, run_dir: Path) -> None:
    """Record what the run trains on (data.json); predict reads the tokenizer and the template from it."""
    record = {"source": job.data.source, "format": job.data.format, "tokenizer": job.data.tokenizer,
              "template": job.data.template, "dataset": str(path), "record_length": record_length(job)}
    (run_dir / DATA_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def link_tree(src: Path, dst: Path) -> None:
    """A copy of a prepared dataset that shares the bytes with it where it can (hard links)."""
    shutil.copytree(src, dst, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)

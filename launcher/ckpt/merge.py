"""Checkpoint post-processing of a gathered run: filter training state out, merge the ranks into one.

Outputs, all under runs/<run-id>/ and each published whole (built in a hidden staging directory,
then renamed into place, so an interrupted command leaves no half-written output):
  filtered/rank_N/<name>.ckpt        each rank's checkpoint without optimizer and loss-scale state
  merged/<name>.ckpt (+ .sha256)     one complete model-only checkpoint of the run
The LoRA fold (merged-lora/) is in lora.py.

Checkpoints are streamed a parameter at a time (stream.py), so memory stays about one parameter whatever
their size. MindSpore is imported only for the model/pipeline-parallel merge (transform_checkpoints).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from launcher.ckpt import stream
from launcher.errors import ConfigError, LauncherError
from launcher.checksums import sha256_file
from launcher.gather import RANKS_DIR
from launcher.runs import FILTERED_DIR, MERGED_DIR, PLAN_DIR

RUN_CONFIG = Path(PLAN_DIR) / "mindformers" / "run.yaml"

# Substrings of training-state keys (optimizer moments, gradient accumulators, loss scale, counters).
# global_batch_size is not in issue 6's list, but MindFormers' CheckpointMonitor saves it next to the
# counters and it is no model parameter either (seen in a real tiny-lora run's checkpoint).
TRAINING_STATE_KEYS = (
    "adam", "accu_grads", "scale_sense", "global_step", "loss_scale", "epoch_num", "step_num",
    "current_iterator_step", "last_overflow_iterator_step", "global_batch_size",
)

# <prefix>_rank_<N>-<epoch>_<step>.ckpt, the name MindFormers' CheckpointMonitor gives each rank's file.
_CKPT_NAME = re.compile(r"^(?P<prefix>.*)_rank_(?P<rank>\d+)-(?P<epoch>\d+)_(?P<step>\d+)\.ckpt$")


def is_training_state(name: str) -> bool:
    return any(key in name for key in TRAINING_STATE_KEYS)


def run_config(run_dir: Path) -> dict:
    path = run_dir / RUN_CONFIG
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{run_dir.name}: {RUN_CONFIG} is missing; is this a run directory?") from None


def parallel_layout(run_dir: Path) -> tuple[int, int, int]:
    """(data_parallel, model_parallel, pipeline_stage) of the MindFormers config that ran."""
    par = run_config(run_dir).get("parallel_config") or {}
    return int(par.get("data_parallel", 1)), int(par.get("model_parallel", 1)), int(par.get("pipeline_stage", 1))


def _rank_of(path: Path) -> int:
    return int(path.name.removeprefix("rank_"))


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest .ckpt of a rank: by (epoch, step) in its name, else the last name in order."""
    files = sorted(directory.glob("*.ckpt"))
    if not files:
        return None

    def order(p: Path):
        m = _CKPT_NAME.match(p.name)
        return (int(m["epoch"]), int(m["step"]), p.name) if m else (-1, -1, p.name)

    return max(files, key=order)


def rank_checkpoints(run_dir: Path) -> dict[int, Path]:
    """Each rank's newest gathered checkpoint, ranks/rank_N/checkpoint/*.ckpt; every rank must have one."""
    rank_dirs = sorted((p for p in (run_dir / RANKS_DIR).glob("rank_*") if p.name[5:].isdigit()), key=_rank_of)
    if not rank_dirs:
        raise ConfigError(f"{run_dir.name} has no gathered ranks; run 'launcher gather {run_dir.name}' first")
    found, missing = {}, []
    for d in rank_dirs:
        ckpt = latest_checkpoint(d / "checkpoint")
        if ckpt is None:
            missing.append(_rank_of(d))
        else:
            found[_rank_of(d)] = ckpt
    if missing:
        raise ConfigError(f"{run_dir.name}: no checkpoint gathered for rank(s) {missing}; "
                          f"did the run finish? ('launcher gather {run_dir.name}' copies what is missing)")
    if sorted(found) != list(range(len(found))):
        raise ConfigError(f"{run_dir.name}: ranks {sorted(found)} are not numbered 0..{len(found) - 1}")
    return found


def merged_name(rank_file: Path) -> str:
    """llama_tiny_rank_0-1_16.ckpt -> llama_tiny-1_16.ckpt: the run's name for a whole checkpoint."""
    m = _CKPT_NAME.match(rank_file.name)
    return f"{m['prefix']}-{m['epoch']}_{m['step']}.ckpt" if m else rank_file.name


# ---- publishing: staging directory, then one rename ----

@contextlib.contextmanager
def publishing(target: Path):
    """Yield the hidden sibling .<name>.partial/ of the directory `target`, emptied (what an interrupted
    earlier command left is dropped); when the block succeeds it replaces `target` (the caller checked
    --force). Never left behind."""
    staging = target.parent / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_writable(run_dir: Path, name: str, force: bool) -> None:
    target = run_dir / name
    if target.exists() and any(target.iterdir()) and not force:
        raise ConfigError(f"{run_dir.name}/{name}/ already exists; pass --force to replace it")


def write_sha256(path: Path) -> str:
    """<file>.sha256 in sha256sum's format, so `sha256sum -c` in that directory verifies it."""
    digest = sha256_file(path)
    (path.parent / f"{path.name}.sha256").write_text(f"{digest}  {path.name}\n")
    return digest


# ---- filter ----

@dataclass(frozen=True)
class Filtered:
    rank: int
    source: Path
    dest: Path
    size_before: int
    size_after: int
    dropped: int


def filter_into(checkpoints: dict[int, Path], out_dir: Path) -> list[Filtered]:
    rows = []
    for rank, src in sorted(checkpoints.items()):
        dest = out_dir / f"rank_{rank}" / src.name
        with stream.CheckpointReader(src) as reader:
            kept = [e for e in reader.entries if not is_training_state(e.name)]
            if not kept:
                raise LauncherError(f"{src}: every key is training state; nothing of the model is left")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with stream.CheckpointWriter(dest) as writer:
                for entry in kept:  # the bytes as they are: any dtype (bfloat16 too) is kept exactly
                    writer.copy(reader, entry)
        dropped = len(reader.entries) - len(kept)
        rows.append(Filtered(rank, src, dest, src.stat().st_size, dest.stat().st_size, dropped))
    return rows


def filter_run(run_dir: Path, force: bool = False) -> list[Filtered]:
    """Write filtered/rank_N/<name>.ckpt for every rank; the rows tell the sizes before and after."""
    check_writable(run_dir, FILTERED_DIR, force)
    checkpoints = rank_checkpoints(run_dir)
    with publishing(run_dir / FILTERED_DIR) as staging:
        rows = filter_into(checkpoints, staging)
    target = run_dir / FILTERED_DIR
    return [Filtered(r.rank, r.source, target / r.dest.relative_to(staging), r.size_before, r.size_after, r.dropped)
            for r in rows]


def filtered_checkpoints(run_dir: Path) -> dict[int, Path] | None:
    """filtered/rank_N/*.ckpt when there is one for every gathered rank, else None."""
    ranks = rank_checkpoints(run_dir)
    found = {r: latest_checkpoint(run_dir / FILTERED_DIR / f"rank_{r}") for r in ranks}
    if all(p is not None and p.name == ranks[r].name for r, p in found.items()):
        return found
    return None


# ---- merge ----

@dataclass(frozen=True)
class Merged:
    path: Path
    sha256: str
    how: str
    params: int
    from_filtered: bool


# Elements per float64 block when comparing: the copies stay small next to the parameter.
_COMPARE_BLOCK = 1 << 18


def max_abs_diff(a, b) -> float:
    """max |a - b| in float64, block by block (inf if a difference is not finite)."""
    a, b, worst = a.reshape(-1), b.reshape(-1), 0.0
    for at in range(0, a.size, _COMPARE_BLOCK):
        block = np.abs(a[at:at + _COMPARE_BLOCK].astype(np.float64) - b[at:at + _COMPARE_BLOCK].astype(np.float64))
        most = float(np.max(block))
        if not np.isfinite(most):
            return float("inf")
        worst = max(worst, most)
    return worst


# tensor_type -> (unsigned type of its size, mask without the sign, bits of +inf): NaN is above +inf.
_FLOAT_BITS = {"Float16": ("<u2", 0x7FFF, 0x7C00), "BFloat16": ("<u2", 0x7FFF, 0x7F80),
               "Float32": ("<u4", 0x7FFF_FFFF, 0x7F80_0000),
               "Float64": ("<u8", 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000)}


def has_nan(piece, tensor_type: str) -> bool:
    """Any NaN in these raw bytes, tested on the bits (numpy's isnan on float16 is slow, not vectorized)."""
    if tensor_type not in _FLOAT_BITS or not len(piece):
        return False
    uint, mask, inf = _FLOAT_BITS[tensor_type]
    return bool((piece.view(uint) & mask).max() > inf)


def same_bytes(a, b) -> bool:
    """Two uint8 arrays hold the same bytes (compared 8 at a time)."""
    whole = len(a) // 8 * 8
    return len(a) == len(b) and np.array_equal(a[:whole].view(np.uint64), b[:whole].view(np.uint64)) \
        and np.array_equal(a[whole:], b[whole:])


def entry_diff(reader_a: stream.CheckpointReader, a: stream.Entry,
               reader_b: stream.CheckpointReader, b: stream.Entry) -> float:
    """max |a - b| of two parameters of one shape in float64, read side by side a piece at a time: 0.0 when
    they are bit for bit equal (the usual case: no float64 copies), inf when a difference is not finite
    (NaN included, as NaN - NaN is)."""
    if a.tensor_type not in stream.NUMERIC_TYPES or b.tensor_type not in stream.NUMERIC_TYPES:  # str, Int4...
        return 0.0 if (a.tensor_type, reader_a.raw(a)) == (b.tensor_type, reader_b.raw(b)) else float("inf")
    if a.tensor_type != b.tensor_type:  # pieces would not hold the same elements: whole arrays (rare)
        return max_abs_diff(reader_a.array(a), reader_b.array(b))
    worst = 0.0
    for piece_a, piece_b in zip(reader_a.pieces(a), reader_b.pieces(b)):
        if same_bytes(piece_a, piece_b) and not has_nan(piece_a, a.tensor_type):
            continue
        worst = max(worst, max_abs_diff(stream.decode(piece_a, a.tensor_type), stream.decode(piece_b, b.tensor_type)))
        if worst == float("inf"):
            break
    return worst


def compare_ranks(sources: dict[int, Path], atol: float) -> int:
    """Every rank's model parameters equal rank 0's (within atol), else name the worst one.
    Streams rank 0 and rank r side by side, a parameter at a time. Returns how many parameters rank 0 holds."""
    with stream.CheckpointReader(sources[0]) as reference:
        for rank, path in sorted(sources.items())[1:]:
            with stream.CheckpointReader(path) as other:
                _compare(reference, other, rank, atol)
        return len(reference.by_name)


def _compare(reference: stream.CheckpointReader, other: stream.CheckpointReader, rank: int, atol: float) -> None:
    if set(other.by_name) != set(reference.by_name):
        only0 = sorted(set(reference.by_name) - set(other.by_name))
        only_r = sorted(set(other.by_name) - set(reference.by_name))
        raise LauncherError(f"ranks 0 and {rank} hold different parameters (only in rank 0: {only0[:3]}, "
                            f"only in rank {rank}: {only_r[:3]}); not a data-parallel run?")
    worst, differing = (0.0, ""), 0
    for name, ref in reference.by_name.items():
        # by name, so another order works too; in rank 0's order, so equal files are read front to back
        oth = other.by_name[name]
        if ref.shape != oth.shape:
            raise LauncherError(f"rank {rank}'s {name} has shape {oth.shape}, rank 0's {ref.shape}; "
                                "sharded parameters need the strategy files (model or pipeline parallel)")
        diff = entry_diff(reference, ref, other, oth)
        if diff > atol:
            differing += 1
            worst = max(worst, (diff, name))
    if differing:
        raise LauncherError(
            f"data-parallel ranks disagree: {differing} parameter(s) of rank {rank} differ from rank 0's, "
            f"most {worst[1]} by {worst[0]:.3g} (--atol {atol:g}); the replicas should be identical, so "
            "check that the ranks ran the same steps (or raise --atol)")


def _strategy_files(run_dir: Path, ranks: list[int]) -> dict[int, Path]:
    found = {}
    for rank in ranks:
        files = sorted((run_dir / RANKS_DIR / f"rank_{rank}" / "strategy").glob("*.ckpt"))
        files += sorted((run_dir / RANKS_DIR / f"rank_{rank}" / "strategy").glob("*.json"))
        if files:
            found[rank] = files[0]
    return found


def merge_by_strategy(run_dir: Path, sources: dict[int, Path], out: Path, pipeline_stage: int, work: Path) -> str:
    """ms.transform_checkpoints from the run's layout to an unsharded one (no destination strategy).
    Not streamed: MindSpore loads the shards itself (re-slicing by the layouts is its own code)."""
    import mindspore as ms

    strategies = _strategy_files(run_dir, sorted(sources))
    if not strategies:
        raise ConfigError(
            f"{run_dir.name} is sharded but has no strategy files under {RANKS_DIR}/rank_N/strategy/; MindFormers "
            "writes them to output/strategy/ckpt_strategy_rank_N.ckpt under semi-auto parallel ('launcher gather' "
            "copies them)")
    if pipeline_stage > 1:
        # Each stage saves only its own parameters' layouts; MindSpore merges them into one file.
        stage_dir = work / "strategy"
        stage_dir.mkdir()
        for rank, path in strategies.items():
            shutil.copyfile(path, stage_dir / f"rank_{rank}{path.suffix}")
        strategy = work / f"merged_strategy{path.suffix}"
        ms.parallel.merge_pipeline_strategys(str(stage_dir), str(strategy))
        how = f"strategy files of {len(strategies)} ranks, {pipeline_stage} pipeline stages merged"
    else:
        # Without pipeline stages every rank's strategy file describes the whole network.
        strategy = strategies[min(strategies)]
        how = f"strategy file {strategy.relative_to(run_dir)}"
    # transform_checkpoints reads <dir>/rank_N/<one>.ckpt; links avoid copying large files.
    src = work / "src"
    for rank, path in sources.items():
        (src / f"rank_{rank}").mkdir(parents=True)
        os.symlink(path.resolve(), src / f"rank_{rank}" / path.name)
    dst = work / "dst"
    try:
        ms.transform_checkpoints(str(src), str(dst), "merged", src_strategy_file=str(strategy),
                                 dst_strategy_file=None)
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise LauncherError(f"mindspore.transform_checkpoints could not merge {run_dir.name}: {exc}") from None
    produced = sorted((dst / "rank_0").glob("*.ckpt"))
    if len(produced) != 1:
        raise LauncherError(f"mindspore.transform_checkpoints wrote {len(produced)} files for rank 0, expected 1")
    os.replace(produced[0], out)
    return how


def merge_run(run_dir: Path, force: bool = False, atol: float = 0.0) -> Merged:
    """Write merged/<name>.ckpt (model only) and its .sha256 from every rank's checkpoint."""
    check_writable(run_dir, MERGED_DIR, force)
    _, model_parallel, pipeline_stage = parallel_layout(run_dir)
    ranks = rank_checkpoints(run_dir)
    with publishing(run_dir / MERGED_DIR) as staging, \
            tempfile.TemporaryDirectory(prefix=".merge-work.", dir=run_dir) as tmp:
        work = Path(tmp)
        sources = filtered_checkpoints(run_dir)
        from_filtered = sources is not None
        if sources is None:
            sources = {row.rank: row.dest for row in filter_into(ranks, work / FILTERED_DIR)}
        out = staging / merged_name(ranks[0])
        if model_parallel == 1 and pipeline_stage == 1:
            params = compare_ranks(sources, atol)
            shutil.copyfile(sources[0], out)
            how = f"data parallel: {len(sources)} ranks agree, rank 0 taken"
        else:
            how = merge_by_strategy(run_dir, sources, out, pipeline_stage, work)
            params = len(stream.param_names(out))
        digest = write_sha256(out)
    return Merged(run_dir / MERGED_DIR / out.name, digest, how, params, from_filtered)

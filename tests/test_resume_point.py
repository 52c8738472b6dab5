"""Where a failed run resumes (launcher/resume.py), on synthetic checkpoints laid out as a gathered run."""

import os
from pathlib import Path

import numpy as np
import pytest

from launcher.ckpt import stream
from launcher.gather import write_manifest
from launcher.resume import ResumePoint, checkpoint_step, find_resume_point, stage


def ckpt(path: Path, step: int | None, epoch: int = 1, fill: float = 0.5) -> Path:
    """A MindFormers-style checkpoint: one float tensor, then step_num and epoch_num as int64 scalars,
    as CheckpointMonitor's append_dict makes them (mindspore save_checkpoint stores an int as Tensor(int))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with stream.CheckpointWriter(path) as w:
        w.write("model.layers.0.lora_a", np.full((2, 3), fill, np.float32))
        if step is not None:
            w.write("step_num", np.array(step, np.int64))
        w.write("epoch_num", np.array(epoch, np.int64))
    return path


def gathered(run_dir: Path, rank: int, step: int, epoch: int = 1, attempt: int = 1, name_step=None, **kw) -> Path:
    """run_dir/[attempts/<k>/]ranks/rank_N/checkpoint/llama_tiny_rank_N-<epoch>_<step>.ckpt"""
    top = run_dir if attempt == 1 else run_dir / "attempts" / str(attempt)
    name = f"llama_tiny_rank_{rank}-{epoch}_{step if name_step is None else name_step}.ckpt"
    return ckpt(top / "ranks" / f"rank_{rank}" / "checkpoint" / name, step, epoch, **kw)


def test_the_synthetic_checkpoint_is_what_mindspore_writes_and_reads(tmp_path):
    """The helper's file loads with mindspore.load_checkpoint, is byte for byte what save_checkpoint writes
    with append_dict step_num/epoch_num, and checkpoint_step reads (step, epoch) from either."""
    ms = pytest.importorskip("mindspore")
    ours = ckpt(tmp_path / "ours.ckpt", 8, 2)
    loaded = ms.load_checkpoint(str(ours))
    assert int(loaded["step_num"].asnumpy()) == 8 and int(loaded["epoch_num"].asnumpy()) == 2
    assert loaded["step_num"].dtype == ms.int64
    theirs = tmp_path / "theirs.ckpt"
    ms.save_checkpoint([{"name": "model.layers.0.lora_a", "data": ms.Tensor(np.full((2, 3), 0.5, np.float32))}],
                       str(theirs), append_dict={"step_num": 8, "epoch_num": 2})
    assert theirs.read_bytes() == ours.read_bytes()
    assert checkpoint_step(ours) == checkpoint_step(theirs) == (8, 2)


def two_ranks(run_dir: Path, *steps: int) -> None:
    for step in steps:
        for rank in (0, 1):
            gathered(run_dir, rank, step)


def test_the_newest_step_every_rank_has_is_picked(tmp_path):
    """Of steps 4, 8 and 12 on both ranks, 12; files map each rank to its own file; nothing passed over."""
    two_ranks(tmp_path, 4, 12, 8)
    write_manifest(tmp_path)
    point = find_resume_point(tmp_path, 2)
    assert (point.step, point.epoch, point.passed_over) == (12, 1, [])
    assert point.files == {r: tmp_path / f"ranks/rank_{r}/checkpoint/llama_tiny_rank_{r}-1_12.ckpt" for r in (0, 1)}


def test_a_step_only_some_ranks_have_is_passed_over(tmp_path):
    """Rank 1 died before saving step 12: resume from 8, and say why not 12. A rank beyond world_size is ignored."""
    two_ranks(tmp_path, 4, 8)
    gathered(tmp_path, 0, 12)
    gathered(tmp_path, 2, 16)  # a rank the run does not have
    write_manifest(tmp_path)
    point = find_resume_point(tmp_path, 2)
    assert point.step == 8 and set(point.files) == {0, 1}
    assert point.passed_over == ["step 16: no whole checkpoint of rank 0, 1", "step 12: no whole checkpoint of rank 1"]


def test_a_file_cut_short_or_changed_since_the_manifest_is_passed_over(tmp_path):
    """Rank 1's step 12 is truncated and step 8 rewritten with the same size: both differ from the manifest."""
    two_ranks(tmp_path, 4, 8, 12)
    write_manifest(tmp_path)
    cut = tmp_path / "ranks/rank_1/checkpoint/llama_tiny_rank_1-1_12.ckpt"
    cut.write_bytes(cut.read_bytes()[:-7])
    changed = tmp_path / "ranks/rank_1/checkpoint/llama_tiny_rank_1-1_8.ckpt"
    size = changed.stat().st_size
    gathered(tmp_path, 1, 8, fill=0.25)  # a readable checkpoint of step 8, other bytes
    assert changed.stat().st_size == size
    point = find_resume_point(tmp_path, 2)
    assert point.step == 4
    assert any(p.startswith("ranks/rank_1/checkpoint/llama_tiny_rank_1-1_12.ckpt: ") and "the manifest says" in p
               for p in point.passed_over), point.passed_over
    assert "ranks/rank_1/checkpoint/llama_tiny_rank_1-1_8.ckpt: content differs from the manifest" in point.passed_over


def test_a_listed_file_that_is_no_checkpoint_or_records_no_step_is_passed_over(tmp_path):
    """Hashes right but unreadable (garbage), or readable without step_num: neither is a resume point."""
    two_ranks(tmp_path, 4)
    garbage = tmp_path / "ranks/rank_0/checkpoint/llama_tiny_rank_0-1_8.ckpt"
    garbage.write_bytes(b"\x0a\xff\xff\xff\x0fnot a checkpoint")
    gathered(tmp_path, 1, 8)
    gathered(tmp_path, 0, None, name_step=12)
    gathered(tmp_path, 1, 12)
    write_manifest(tmp_path)
    point = find_resume_point(tmp_path, 2)
    assert point.step == 4
    text = "\n".join(point.passed_over)
    assert "ranks/rank_0/checkpoint/llama_tiny_rank_0-1_8.ckpt: " in text and "not a readable MindSpore checkpoint" in text
    assert "llama_tiny_rank_0-1_12.ckpt records no step_num" in text
    assert "step 12: no whole checkpoint of rank 0" in text and "step 8: no whole checkpoint of rank 0" in text


def test_no_manifest_or_no_checkpoint_gives_none(tmp_path):
    """Without manifest.json nothing is trusted; a manifest that lists no checkpoint of a rank gives None too."""
    two_ranks(tmp_path, 4)
    assert find_resume_point(tmp_path, 2) is None
    (tmp_path / "manifest.json").write_text("not json")
    assert find_resume_point(tmp_path, 2) is None
    write_manifest(tmp_path)
    assert find_resume_point(tmp_path, 3) is None  # no rank 2 anywhere


def test_a_later_attempts_checkpoints_count_and_their_step_is_read_from_the_file(tmp_path):
    """Attempt 2 resumed from step 4 and named its files by its own steps (-1_4) though they hold step 8;
    attempt 10 (after 2, not before) re-made step 8 and its files win."""
    two_ranks(tmp_path, 4)
    for rank in (0, 1):
        gathered(tmp_path, rank, 8, attempt=2, name_step=4)
    point = find_resume_point(tmp_path, 2)
    assert point is None  # not in a manifest yet
    write_manifest(tmp_path)
    point = find_resume_point(tmp_path, 2)
    assert point.step == 8
    assert point.files[1] == tmp_path / "attempts/2/ranks/rank_1/checkpoint/llama_tiny_rank_1-1_4.ckpt"
    for rank in (0, 1):
        gathered(tmp_path, rank, 8, attempt=10, name_step=2)
    write_manifest(tmp_path)
    point = find_resume_point(tmp_path, 2)
    assert point.step == 8 and all("attempts/10/" in str(p) for p in point.files.values()), point.files


def test_stage_hard_links_each_rank_under_its_resume_name(tmp_path):
    """stage(): attempt_dir/resume/rank_N/resume_rank_N-<epoch>_<step>.ckpt, the same inode as the gathered file."""
    for rank in (0, 1):
        gathered(tmp_path, rank, 12, epoch=2)
    write_manifest(tmp_path)
    point = find_resume_point(tmp_path, 2)
    assert (point.step, point.epoch) == (12, 2)
    attempt = tmp_path / "attempts" / "2"
    stage(point, attempt)
    for rank in (0, 1):
        staged = attempt / "resume" / f"rank_{rank}" / f"resume_rank_{rank}-2_12.ckpt"
        assert os.path.samefile(staged, point.files[rank])
        assert checkpoint_step(staged) == (12, 2)
    assert sorted(p.name for p in (attempt / "resume").iterdir()) == ["rank_0", "rank_1"]


def test_as_record_names_files_relative_to_the_run(tmp_path):
    """The record kept in run.json: step, epoch and run-relative paths keyed by rank as text."""
    point = ResumePoint(8, 1, {1: tmp_path / "attempts/2/ranks/rank_1/checkpoint/b.ckpt",
                               0: tmp_path / "ranks/rank_0/checkpoint/a.ckpt"}, ["step 12: ..."])
    assert point.as_record(tmp_path) == {"step": 8, "epoch": 1, "files": {
        "0": "ranks/rank_0/checkpoint/a.ckpt", "1": "attempts/2/ranks/rank_1/checkpoint/b.ckpt"}}
    assert point.file_name(3) == "resume_rank_3-1_8.ckpt"

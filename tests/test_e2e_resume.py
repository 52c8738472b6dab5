"""Restart, resume and the stall watchdog, end to end on this machine: real tiny runs of 2 data-parallel
ranks, 16 steps each, a checkpoint every 4 steps (checkpoint.save_steps).

The resumed runs must end exactly where an uninterrupted run of the same job ends. Both run the same
operations on the same data in the same order from the same state: MindFormers' checkpoint holds the
weights, both Adam moments, the step, epoch and loss scale (mindformers r1.8.0 core/callback/callback.py
CheckpointMonitor), the dataset skips the steps done (trainer/base_trainer.py set_init_step), the data is
not shuffled in the tiny config and dropout is 0. MindSpore's CPU kernels split the same shapes the same
way, so the tolerance is none: the final weights are compared byte for byte.
"""

import json

import numpy as np
import pytest
from conftest import outside_processes, run_launcher, wait_until, write_tiny_job

from launcher import logparse
from launcher.attempts import rank_records
from launcher.gather import verify_manifest
from launcher.resume import checkpoint_step

pytestmark = pytest.mark.e2e
WORLD, STEPS = 2, 16


def tiny_job(directory, dataset, fault=None, **sections):
    env = {"LAUNCHER_FAULT": fault} if fault else {}
    return write_tiny_job(directory, dataset, checkpoint={"save_steps": 4}, env=env, **sections)


def up(directory, job, *args):
    result = run_launcher("up", job, *args, cwd=directory, timeout=900)
    runs = sorted(p for p in (directory / "runs").iterdir() if p.is_dir())
    assert len(runs) == 1, (runs, result.stdout, result.stderr)
    return result, runs[0]


def final_checkpoint(directory, rank):
    """The rank's checkpoint of the last step, found by the step it records (names count an attempt's own steps)."""
    found = [p for p in (directory / "ranks" / f"rank_{rank}" / "checkpoint").glob("*.ckpt")
             if checkpoint_step(p)[0] == STEPS]
    assert len(found) == 1, sorted(p.name for p in found)
    return found[0]


def assert_same_weights(a, b):
    import mindspore as ms

    left, right = ms.load_checkpoint(str(a)), ms.load_checkpoint(str(b))
    assert set(left) == set(right)
    differ = [name for name in left if not np.array_equal(left[name].asnumpy(), right[name].asnumpy())]
    assert not differ, f"{len(differ)} of {len(left)} tensors differ, e.g. {differ[:3]}"


def logged_steps(directory, rank):
    info = directory / "ranks" / f"rank_{rank}" / "log" / "info.log"
    return [r.step for r in logparse.parse_text(info.read_text())]


def assert_nothing_left(run_dir):
    record = json.loads((run_dir / "run.json").read_text())
    for entry in record["attempt_records"]:
        left = wait_until(lambda: outside_processes(entry["run_id"], roots=[run_dir / entry["dir"]]))
        assert not left, left


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dataset):
    directory = tmp_path_factory.mktemp("uninterrupted")
    result, run_dir = up(directory, tiny_job(directory, tiny_dataset))
    assert result.returncode == 0, result.stderr
    return run_dir


def test_a_killed_rank_restarts_from_step_8_and_ends_where_an_uninterrupted_run_ends(tmp_path, tiny_dataset,
                                                                                     uninterrupted):
    # Rank 1 is killed (SIGKILL, as the OOM killer does) at step 10 of the first attempt only.
    job = tiny_job(tmp_path, tiny_dataset, "1:10:kill:1", restart={"max_attempts": 2, "backoff_s": 0})
    result, run_dir = up(tmp_path, job)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "attempt 2 of 2 resuming from step 8" in result.stdout

    record = json.loads((run_dir / "run.json").read_text())
    assert record["state"] == "succeeded" and record["attempts"] == 2
    first, second = record["attempt_records"]
    assert first["state"] == "failed" and first["failure"]["kind"] == "out_of_memory" and first["failed_rank"] == 1
    assert second["run_id"] == f"{record['run_id']}-a2" and second["dir"] == "attempts/2"
    assert second["resumed_from"] == {"step": 8, "epoch": 1, "files": {
        str(r): f"ranks/rank_{r}/checkpoint/llama_tiny_rank_{r}-1_8.ckpt" for r in range(WORLD)}}

    attempt = run_dir / "attempts" / "2"
    for rank in range(WORLD):
        assert logged_steps(attempt, rank) == list(range(9, STEPS + 1))  # continues, not 1..8
        assert [r.step for r in rank_records(run_dir, rank)] == list(range(1, STEPS + 1))
        assert_same_weights(final_checkpoint(attempt, rank), final_checkpoint(uninterrupted, rank))

    summary = json.loads((run_dir / "summary.json").read_text())
    assert [summary["ranks"][str(r)]["steps"] for r in range(WORLD)] == [STEPS] * WORLD
    listed = json.loads((run_dir / "manifest.json").read_text())["files"]
    assert "attempts/2/ranks/rank_1/checkpoint/llama_tiny_rank_1-1_8.ckpt" in listed
    assert "ranks/rank_1/checkpoint/llama_tiny_rank_1-1_8.ckpt" in listed
    assert verify_manifest(run_dir) == []
    assert_nothing_left(run_dir)

    listing = run_launcher("runs", "-o", "json", cwd=tmp_path)
    assert [row["attempts"] for row in json.loads(listing.stdout)] == [2], listing.stderr
    status = run_launcher("status", run_dir.name, cwd=tmp_path)
    assert status.returncode == 0 and f"run {run_dir.name}-a2: succeeded" in status.stdout, status.stdout
    assert "attempt 1: failed (out_of_memory), from the start" in status.stdout
    assert "attempt 2: succeeded, resumed from step 8" in status.stdout and "16/16" in status.stdout


def test_resume_by_hand_passes_over_a_cut_checkpoint(tmp_path, tiny_dataset, uninterrupted):
    """Rank 1 dies at step 14, after every rank saved step 12; rank 0's step-12 file is then cut short.
    `launcher resume` must take step 8, the newest that every rank has whole."""
    result, run_dir = up(tmp_path, tiny_job(tmp_path, tiny_dataset, "1:14:kill:1"))
    assert result.returncode == 1, result.stdout
    cut = run_dir / "ranks" / "rank_0" / "checkpoint" / "llama_tiny_rank_0-1_12.ckpt"
    assert (run_dir / "ranks" / "rank_1" / "checkpoint" / "llama_tiny_rank_1-1_12.ckpt").is_file()
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])

    resumed = run_launcher("resume", run_dir.name, cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from step 8" in resumed.stdout
    assert "passed over: ranks/rank_0/checkpoint/llama_tiny_rank_0-1_12.ckpt" in resumed.stdout
    assert "passed over: step 12: no whole checkpoint of rank 0" in resumed.stdout

    attempt = run_dir / "attempts" / "2"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["attempt_records"][1]["resumed_from"]["step"] == 8
    for rank in range(WORLD):
        assert logged_steps(attempt, rank) == list(range(9, STEPS + 1))
        assert_same_weights(final_checkpoint(attempt, rank), final_checkpoint(uninterrupted, rank))
    again = run_launcher("resume", run_dir.name, cwd=tmp_path)
    assert again.returncode == 2 and "succeeded; only a failed or interrupted run resumes" in again.stderr
    assert_nothing_left(run_dir)


def test_a_stalled_rank_is_caught_its_stacks_are_written_and_the_run_restarts(tmp_path, tiny_dataset):
    # Rank 1 stops making progress at step 6 of the first attempt; the other rank then waits for it.
    job = tiny_job(tmp_path, tiny_dataset, "1:6:sleep:1", monitor={"stall_after_s": 10},
                   restart={"max_attempts": 2, "backoff_s": 0})
    result, run_dir = up(tmp_path, job)
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = json.loads((run_dir / "run.json").read_text())["attempt_records"]
    assert first["failure"]["kind"] == "stalled", first
    assert "stalled: no new step for" in first["failure"]["summary"]
    assert second["resumed_from"]["step"] == 4 and second["state"] == "succeeded"
    # faulthandler's dump: the sleeping rank is in the drill's callback; the other one is still inside MindSpore.
    stacks = (run_dir / "ranks" / "rank_1" / "console.log").read_text()
    assert "most recent call first" in stacks and "in on_train_step_end" in stacks, stacks[-3000:]
    assert "most recent call first" in (run_dir / "ranks" / "rank_0" / "console.log").read_text()
    assert_nothing_left(run_dir)

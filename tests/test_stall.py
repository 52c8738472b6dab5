"""The stall watchdog (launcher/stall.py) on a fake clock, and nodectl.dump_stacks on real processes."""

import copy
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLES, wait_until

from launcher.entrypoints import nodectl
from launcher.logparse import RankProgress, StepRecord
from launcher.plan import CONFIG_PATH, build_plan
from launcher.spec import parse_job
from launcher.stall import STACKS_REQUEST, Stall, StallWatch, save_steps


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def progress(*step_ms, total=16, first=1) -> RankProgress:
    """A rank that has logged steps first, first+1, ... with these step times (ms; None for none)."""
    rank = RankProgress(Path("unused/info.log"))
    rank.records = [StepRecord(first + i, total, 5.0, ms) for i, ms in enumerate(step_ms)]
    return rank


def watch(stall_after_s=None, first_step_within_s=300.0, every_save=None):
    clock = Clock()
    return StallWatch(stall_after_s, first_step_within_s, every_save, clock=clock), clock


def test_before_the_first_step_the_budget_is_first_step_within_s():
    """A rank with no step yet may stay silent for first_step_within_s, counted from when the watch started."""
    w, clock = watch(first_step_within_s=300)
    ranks = {0: progress(), 1: progress()}
    clock.t += 300
    assert w.check(ranks, set()) is None
    clock.t += 1
    stall = w.check(ranks, set())
    assert stall == Stall(ranks=(0, 1), silent_s=301, budget_s=300, after_step=None)
    assert stall.rank is None  # both wait: neither is to blame
    assert "ranks 0, 1 stalled" in stall.message() and "before the first step" in stall.message()


def test_explicit_stall_after_s_is_the_budget_whatever_the_step_times_and_saves():
    """stall_after_s replaces the derived budget, and a save step adds nothing to it."""
    w, clock = watch(stall_after_s=30, every_save=2)
    assert w.budget(progress(60_000, 60_000, 60_000)) == 30  # ten times 60 s would be 600 s
    assert w.budget(progress(1000, 1000)) == 30  # step 2 saves: still 30
    ranks = {0: progress(1000, 1000, 1000)}
    assert w.check(ranks, set()) is None  # first sight of its records starts its timer
    clock.t += 30
    assert w.check(ranks, set()) is None
    clock.t += 0.5
    stall = w.check(ranks, set())
    assert (stall.rank, stall.budget_s, stall.after_step) == (0, 30, 3)
    assert "after step 3" in stall.message() and "budget 30s" in stall.message()


def test_derived_budget_is_ten_times_the_median_of_recent_step_times():
    """Without stall_after_s: 10 × the median of the last 20 step times, so a slow compile step does not count."""
    w, _ = watch()
    assert w.budget(progress(900_000, 20_000, 20_000)) == pytest.approx(200)  # median 20 s; the mean is 313 s
    assert w.budget(progress(13_000, None, 13_000, None)) == pytest.approx(130)  # steps without a time are skipped
    # only the last 20 steps: 21 slow ones then 20 of 15 s give 150 s, not 10 × 100 s
    assert w.budget(progress(*[100_000] * 21, *[15_000] * 20, total=100)) == pytest.approx(150)


def test_derived_budget_never_falls_under_the_floor():
    """Fast steps (or no step times at all) give MIN_BUDGET_S, 120 s."""
    w, clock = watch()
    assert w.budget(progress(26, 26, 26)) == 120
    assert w.budget(progress(None, None)) == 120
    ranks = {0: progress(26, 26, 26)}
    w.check(ranks, set())
    clock.t += 120
    assert w.check(ranks, set()) is None
    clock.t += 1
    assert w.check(ranks, set()).budget_s == 120


def test_a_saving_step_and_the_last_step_get_the_save_budget():
    """After a step that saves (every_save divides it) or the last step, the derived budget is 600 s more."""
    w, _ = watch(every_save=4)
    assert w.budget(progress(26, 26, 26)) == 120  # step 3
    assert w.budget(progress(26, 26, 26, 26)) == 720  # step 4 saves
    assert w.budget(progress(20_000, first=8)) == pytest.approx(800)  # step 8 saves: 200 + 600
    assert w.budget(progress(26, first=16, total=16)) == 720  # the last step saves and exits
    no_saves, _ = watch(every_save=None)
    assert no_saves.budget(progress(26, 26, 26, 26)) == 120
    assert no_saves.budget(progress(26, first=16, total=16)) == 720


def test_a_rank_that_is_done_is_not_reported():
    """A rank that wrote its exit status may be silent for ever; the others are still watched."""
    w, clock = watch()
    ranks = {0: progress(26), 1: progress(26)}
    w.check(ranks, set())
    clock.t += 10_000
    assert w.check(ranks, {0, 1}) is None
    assert w.check(ranks, {0}).rank == 1


def test_a_new_step_resets_the_timer():
    """Each new record restarts the silence count when the watch sees it, so a slow, steady rank never stalls."""
    w, clock = watch()
    rank = progress(26)
    ranks = {0: rank}
    w.check(ranks, set())
    for step in range(2, 8):
        clock.t += 100  # under the 120 s budget each time, 600 s in all
        rank.records.append(StepRecord(step, 16, 5.0, 26))
        assert w.check(ranks, set()) is None
    clock.t += 120
    assert w.check(ranks, set()) is None  # 120 s since step 7 was seen
    clock.t += 1
    assert w.check(ranks, set()) == Stall((0,), 121, 120, 7)


def test_a_rank_left_behind_is_blamed_and_ranks_stuck_together_are_not():
    """The stall names every rank that got no further than the silent one; only a lone one is the rank."""
    w, clock = watch(stall_after_s=10)
    behind, ahead = progress(1000, 1000, 1000), progress(1000, 1000, 1000, 1000, 1000)
    ranks = {0: ahead, 1: behind}
    w.check(ranks, set())
    clock.t += 11
    stall = w.check(ranks, set())
    assert (stall.ranks, stall.rank, stall.after_step) == ((0, 1), None, 5)  # rank 0 went silent too
    w2, clock2 = watch(stall_after_s=10)
    ranks = {0: ahead, 1: behind}
    w2.check(ranks, set())
    clock2.t += 6
    ahead.records.append(StepRecord(6, 16, 5.0, 1000))
    w2.check(ranks, set())
    clock2.t += 5
    stall = w2.check(ranks, set())
    assert (stall.ranks, stall.rank, stall.after_step) == ((1,), 1, 3)
    assert "rank 1 stalled" in stall.message() and "after step 3" in stall.message()


def tiny_plan(**sections):
    job = copy.deepcopy(yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text()))
    job["dataset"]["path"] = "/nonexistent/tiny.mindrecord"  # build_plan does not look at it
    job.update(sections)
    return build_plan(parse_job(job))


def test_save_steps_reads_the_rendered_plan_and_for_plan_uses_the_job_monitor():
    """save_steps() is the CheckpointMonitor's save_checkpoint_steps of the plan's MindFormers config."""
    assert save_steps(tiny_plan()) == 1000  # the tiny base config's
    plan = tiny_plan(checkpoint={"save_steps": 4}, monitor={"stall_after_s": 45, "first_step_within_s": 90})
    assert save_steps(plan) == 4
    w = StallWatch.for_plan(plan)
    assert (w.stall_after_s, w.first_step_within_s, w.every_save) == (45, 90, 4)
    defaults = StallWatch.for_plan(tiny_plan())
    assert (defaults.stall_after_s, defaults.first_step_within_s) == (None, 3600)
    assert save_steps(dataclasses.replace(plan, artifacts={})) is None
    assert save_steps(dataclasses.replace(plan, artifacts={CONFIG_PATH: "callbacks: [{type: X}]"})) is None


# ---- nodectl.dump_stacks: SIGUSR1 only to the run's ranks ----

RANK = ("import faulthandler, signal, sys, time\n"
        "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
        "def waiting_in_collective():\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "waiting_in_collective()\n")
NO_HANDLER = "import time; print('ready', flush=True); time.sleep(60)"


def start(code, log: Path, run_id=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != nodectl.RUN_ID_VAR}
    if run_id:
        env[nodectl.RUN_ID_VAR] = run_id
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True)
    assert proc.stdout.readline().strip() == "ready"  # its handler is registered
    return proc


def test_dump_stacks_signals_only_listed_pids_that_carry_the_run_id(tmp_path):
    """A rank with the run id gets SIGUSR1 and writes its stack; a pid file naming a process without the
    run id (a reused pid), and a run process that wrote no pid file (msrun), are left alone."""
    run_id = f"test-stall-{uuid.uuid4().hex[:8]}"
    status = tmp_path / "output" / "launcher"
    status.mkdir(parents=True)
    procs = []
    try:
        procs.append(rank := start(RANK, tmp_path / "rank0.err", run_id))
        procs.append(stranger := start(NO_HANDLER, tmp_path / "stranger.err"))
        procs.append(unlisted := start(NO_HANDLER, tmp_path / "unlisted.err", run_id))
        (status / "rank_0.pid").write_text(f"{rank.pid}\n")
        (status / "rank_1.pid").write_text(str(stranger.pid))
        (status / "rank_2.pid").write_text("not a pid")
        (status / "rank_0.exit").write_text(str(unlisted.pid))  # not a .pid file

        assert nodectl.dump_stacks(run_id, str(tmp_path)) == [rank.pid]
        log = tmp_path / "rank0.err"
        assert not wait_until(lambda: "waiting_in_collective" not in log.read_text(), timeout=10, step=0.1)
        assert 'File "<string>"' in log.read_text()
        assert rank.poll() is None  # the handler dumps and goes on
        assert stranger.poll() is None and unlisted.poll() is None  # SIGUSR1 would have ended them
        assert (tmp_path / "stranger.err").read_text() == "" == (tmp_path / "unlisted.err").read_text()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def test_dump_stacks_without_a_status_folder_signals_nothing(tmp_path):
    """A run whose ranks wrote no pid yet: nothing to signal, no error."""
    assert nodectl.dump_stacks("test-stall-none", str(tmp_path)) == []


def test_a_rank_writes_its_stacks_when_the_request_file_appears(tmp_path):
    """Where the launcher cannot signal a rank (a Kubernetes pod), it creates STACKS_REQUEST in the rank's
    status folder: the entrypoint's watcher thread has faulthandler write every thread's stack, and the
    rank goes on (the watcher thread has ended by then)."""
    from launcher.entrypoints import finetune

    assert finetune.STACKS_REQUEST == STACKS_REQUEST and finetune.STATUS_DIR == "output/launcher"
    code = ("import faulthandler, threading, time, sys\n"
            f"sys.path.insert(0, {str(Path(finetune.__file__).parent)!r})\n"
            "import finetune\n"
            "threading.Thread(target=finetune._watch_stacks_request, args=(0.1,), daemon=True).start()\n"
            "def waiting_in_collective():\n"
            "    print('ready', flush=True)\n"
            "    time.sleep(60)\n"
            "waiting_in_collective()\n")
    log = tmp_path / "rank.err"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        assert log.read_text() == ""  # no request, no stacks
        (tmp_path / "output" / "launcher").mkdir(parents=True)
        (tmp_path / "output" / "launcher" / STACKS_REQUEST).touch()
        assert not wait_until(lambda: "waiting_in_collective" not in log.read_text(), timeout=10, step=0.1)
        time.sleep(0.5)
        assert proc.poll() is None and "Segmentation fault" not in log.read_text()
    finally:
        proc.kill()
        proc.wait()

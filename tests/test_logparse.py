"""Parsing MindFormers loss lines, whole and as a log grows."""

import math

import pytest

from launcher.logparse import RankProgress, StepRecord, format_duration, parse_line, seconds_left, summarize

LINE = ("[INFO] 2026-11-23 18:27:00,765 [mindformers/core/callback/callback.py:616] print_output_info: "
        "{ Epoch:[  1/  1], step:[   16/   16], loss:[5.548754/5.545023], per_step_time: 26ms, lr: 0.001, "
        "overflow cond: False, loss_scale: 1.0, global_norm: [0.20497443], train_throughput_per_npu: 0.001T")


def test_parse_mindformers_line():
    record = parse_line(LINE)
    assert (record.step, record.total, record.loss, record.step_ms) == (16, 16, 5.548754, 26.0)
    assert parse_line("print_output_info:   100.0% |████| 75.29 samples/s/p  0:00:00 }") is None


def test_parse_plain_loss_and_nan():
    record = parse_line("{ Epoch:[  1/  2], step:[    3/   10], loss: nan, per_step_time: 10ms }")
    assert record.step == 3 and math.isnan(record.loss)


def test_progress_reads_only_complete_lines(tmp_path):
    log = tmp_path / "info.log"
    progress = RankProgress(log)
    progress.poll()  # no file yet
    assert progress.last is None
    half = LINE.replace("step:[   16/   16]", "step:[    1/   16]")
    log.write_text(half[:60])
    progress.poll()
    assert progress.last is None
    with log.open("a") as f:
        f.write(half[60:] + "\n" + LINE + "\n")
    progress.poll()
    assert [r.step for r in progress.records] == [1, 16]


def test_summary_tokens_per_second():
    records = [parse_line(LINE.replace("per_step_time: 26ms", f"per_step_time: {ms}ms")) for ms in (1000, 1000)]
    summary = summarize(records, seq_length=32, batch_size=2)
    # 32 tokens × 2 samples × 2 steps in 2 s.
    assert summary["tokens_per_s"] == 64.0
    assert summary["losses_finite"] is True
    assert summarize([], 32, 2)["steps"] == 0


def test_steps_count_across_epochs():
    # MFLossMonitor counts steps within the epoch (lines from a real 3-epoch SmolLM2 run, 5 steps each).
    from launcher.logparse import parse_text, summarize

    text = "\n".join([
        "print_output_info: { Epoch:[  1/  3], step:[    1/    5], loss:[3.115157/3.115157], per_step_time: 5779ms, lr",
        "print_output_info: { Epoch:[  2/  3], step:[    1/    5], loss:[0.618294/0.618294], per_step_time: 9818ms, lr",
        "print_output_info: { Epoch:[  3/  3], step:[    5/    5], loss:[0.001716/0.018626], per_step_time: 10082ms, lr",
    ])
    records = parse_text(text)
    assert [(r.step, r.total) for r in records] == [(1, 15), (6, 15), (15, 15)]
    summary = summarize(records, 64, 2)
    assert (summary["steps"], summary["total_steps"]) == (15, 15)


def _steps(times_ms, total):
    return [StepRecord(i + 1, total, 5.0, ms) for i, ms in enumerate(times_ms)]


def test_time_left_is_the_remaining_steps_at_the_recent_median_step_time():
    # 12 of 40 steps; the last 10 step times are 200 ms ×6 and 1000 ms ×4 (a checkpoint save, say): their
    # median is 200 ms. The first step's 90 s of graph compilation is outside the window.
    records = _steps([90000] + [200] * 7 + [1000] * 4, total=40)
    assert seconds_left(records) == pytest.approx(28 * 0.2)
    assert seconds_left(_steps([100] * 40, total=40)) == 0
    assert seconds_left([]) is None and seconds_left(_steps([None, None], total=4)) is None


def test_durations_read_as_people_write_them():
    assert [format_duration(s) for s in (7, 185, 7800, 3 * 86400 + 4 * 3600 + 59)] == ["7s", "3m05s", "2h10m", "3d04h"]


def test_the_live_view_title_shows_steps_and_time_left(tmp_path):
    from rich.console import Console

    from launcher.liveview import LiveView
    from launcher.plan import build_plan
    from launcher.spec import load_job
    from conftest import EXAMPLES

    plan = build_plan(load_job(EXAMPLES / "tiny-lora-local.yaml"))
    view = LiveView(plan, tmp_path, Console(file=None), "tiny")
    view.progress[0].records = _steps([100] * 10, total=16)  # 6 steps at 100 ms
    view.progress[1].records = _steps([200] * 8, total=16)  # the slowest: 8 steps at 200 ms
    assert view.eta_text() == "  steps 8/16, about 1s left"
    view.progress[1].records = []
    assert view.eta_text() == ""  # a rank not started yet: no estimate

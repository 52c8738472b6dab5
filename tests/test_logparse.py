"""Parsing MindFormers loss lines, whole and as a log grows."""

import math

from launcher.logparse import RankProgress, parse_line, summarize

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

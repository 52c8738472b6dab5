"""`launcher runs` and `launcher compare`: run directories written by hand with known values, and two
real tiny runs compared."""

import calendar
import hashlib
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import free_port, run_launcher

from launcher import compare, run_index
from launcher.cli.runs import compare_cmd, runs_cmd
from launcher.errors import ConfigError

NOW = time.time()


@pytest.fixture(autouse=True)
def _fresh_now():
    """Each test's runs are made relative to its own start: a live run's duration is measured from the clock."""
    global NOW
    NOW = time.time()
HOUR = 3600.0


def write_run(runs_dir: Path, run_id: str, job: str, state: str, started: float, finished: float | None = None,
              ranks: dict | None = None, files: dict | None = None, attempts: int | None = None,
              backend: str = "local") -> Path:
    """A run directory as the launcher leaves it: run.json; summary.json when ranks are given; ranks'
    files and a manifest.json of their sizes and sha256 when files are given."""
    run_dir = runs_dir / run_id
    run_dir.mkdir(parents=True)
    record = {"run_id": run_id, "job_name": job, "backend": backend, "state": state, "started": started,
              "finished": finished, "exit_code": None, "failed_rank": None, "leader_pid": None, "message": ""}
    if attempts is not None:
        record["attempts"] = attempts
    (run_dir / "run.json").write_text(json.dumps(record))
    if ranks is not None:
        summary = {"run_id": run_id, "job": job, "state": state, "world_size": len(ranks), "seq_length": 32,
                   "batch_size": 1, "ranks": ranks}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    if files is not None:
        manifest = {}
        for rel, data in files.items():
            (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / rel).write_bytes(data)
            manifest[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (run_dir / "manifest.json").write_text(json.dumps({"files": manifest}))
    return run_dir


def rank(steps, total, first, last, tokens_per_s):
    return {"node": 0, "host": "localhost", "device": 0, "steps": steps, "total_steps": total, "first_loss": first,
            "last_loss": last, "losses_finite": True, "train_seconds": 1.0, "tokens_per_s": tokens_per_s,
            "checkpoints": []}


@pytest.fixture
def three_runs(tmp_path) -> Path:
    """An old finished LoRA run, a failed full run restarted twice, and a LoRA run still running."""
    runs = tmp_path / "runs"
    write_run(runs, "tiny-lora-20261201-100000", "tiny-lora", "succeeded", NOW - 10 * HOUR, NOW - 10 * HOUR + 100,
              ranks={"0": rank(16, 16, 5.0, 1.0, 100.0), "1": rank(14, 16, 6.0, 2.0, 50.0)},
              files={"ranks/rank_0/log/info.log": b"step 1\n", "plan/plan.json": b"{}\n"})
    write_run(runs, "qwen-full-20261201-150000", "qwen-full", "failed", NOW - 5 * HOUR, NOW - 5 * HOUR + 4000,
              ranks={"0": rank(3, 100, 4.0, 3.5, 20.0)}, files={"ranks/rank_0/console.log": b"boom\n"},
              attempts=3, backend="ssh")
    write_run(runs, "tiny-lora-20261201-190000", "tiny-lora", "running", NOW - 2 * HOUR - 30)
    return runs


def invoke(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args])


def listed(runs: Path, *args) -> list[dict]:
    result = invoke(runs_cmd, "--runs-dir", runs, "-o", "json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_rows_are_newest_first_with_figures_from_the_summary(three_runs):
    rows = run_index.read_runs(three_runs, now=NOW).rows
    assert [r.run_id for r in rows] == ["tiny-lora-20261201-190000", "qwen-full-20261201-150000",
                                        "tiny-lora-20261201-100000"]
    running, failed, done = rows
    # the slowest rank's steps, the mean of the ranks' losses, the sum of their tokens/s
    assert (done.steps, done.total_steps, done.first_loss, done.last_loss, done.tokens_per_s) == (14, 16, 5.5, 1.5, 150)
    assert (done.duration, done.attempts, done.manifest, done.world_size) == (100, 1, "ok", 2)
    assert (failed.attempts, failed.steps, failed.total_steps, failed.duration, failed.backend) == (3, 3, 100, 4000,
                                                                                                     "ssh")
    # still running: no summary yet, its duration so far, no manifest expected yet
    assert (running.steps, running.last_loss, running.duration, running.manifest) == (None, None, 2 * HOUR + 30, None)


def test_the_table_shows_one_line_per_run_newest_first(three_runs):
    result = invoke(runs_cmd, "--runs-dir", three_runs)
    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()
    assert header.split()[:5] == ["RUN", "JOB", "BACKEND", "STATE", "ATTEMPTS"]
    assert [line.split()[0] for line in lines] == ["tiny-lora-20261201-190000", "qwen-full-20261201-150000",
                                                   "tiny-lora-20261201-100000"]
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(NOW - 10 * HOUR))
    assert lines[2].split() == ["tiny-lora-20261201-100000", "tiny-lora", "local", "succeeded", "1", "14/16",
                                "1.5000", "150", *started.split(), "1m40s", "ok"]
    assert lines[1].split()[3:6] == ["failed", "3", "3/100"]
    running = lines[0].split()
    assert running[5:8] == ["-", "-", "-"] and running[-2:] == ["2h00m", "-"]


def test_state_filter_takes_repeats_and_comma_lists(three_runs):
    assert [r["state"] for r in listed(three_runs, "--state", "failed,running")] == ["running", "failed"]
    assert [r["state"] for r in listed(three_runs, "--state", "succeeded", "--state", "failed")] == ["failed",
                                                                                                    "succeeded"]


def test_an_unknown_state_is_one_line_with_a_suggestion(three_runs):
    result = invoke(runs_cmd, "--runs-dir", three_runs, "--state", "runing")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --state: unknown state 'runing'; did you mean 'running'?"


def test_job_filter_is_a_glob(three_runs):
    assert [r["run_id"] for r in listed(three_runs, "--job", "tiny-*")] == ["tiny-lora-20261201-190000",
                                                                            "tiny-lora-20261201-100000"]
    assert [r["job"] for r in listed(three_runs, "--job", "qwen-full")] == ["qwen-full"]
    assert listed(three_runs, "--job", "tiny") == []


def test_since_filter(three_runs):
    assert [r["state"] for r in listed(three_runs, "--since", "3h")] == ["running"]
    assert [r["state"] for r in listed(three_runs, "--since", "6h")] == ["running", "failed"]
    since = datetime.fromtimestamp(NOW - 6 * HOUR).strftime("%Y-%m-%dT%H:%M:%S")
    assert [r["state"] for r in listed(three_runs, "--since", since)] == ["running", "failed"]


def test_since_parser():
    now = 1_000_000.0
    assert run_index.parse_since("30m", now) == now - 1800
    assert run_index.parse_since("2h", now) == now - 7200
    assert run_index.parse_since("3d", now) == now - 3 * 86400
    assert run_index.parse_since("1w", now) == now - 7 * 86400
    assert run_index.parse_since("1h30m", now) == now - 5400
    assert run_index.parse_since("2026-12-01T13:00:00+05:00", now) == calendar.timegm((2026, 12, 1, 8, 0, 0))
    assert run_index.parse_since("2026-12-01", now) == time.mktime((2026, 12, 1, 0, 0, 0, 0, 0, -1))
    assert run_index.parse_since("2026-12-01 13:05", now) == time.mktime((2026, 12, 1, 13, 5, 0, 0, 0, -1))
    for bad in ("yesterday", "2x", "h", "-3d", "2026-13-01"):
        with pytest.raises(ConfigError, match="--since"):
            run_index.parse_since(bad, now)


def test_a_bad_since_is_one_line(three_runs):
    result = invoke(runs_cmd, "--runs-dir", three_runs, "--since", "last week")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--since: 'last week'" in result.stderr


def test_json_lists_every_field_for_scripts(three_runs):
    rows = listed(three_runs)
    assert [r["run_id"] for r in rows] == ["tiny-lora-20261201-190000", "qwen-full-20261201-150000",
                                           "tiny-lora-20261201-100000"]
    done = rows[2]
    assert {k: done[k] for k in ("job", "backend", "state", "attempts", "steps", "total_steps", "first_loss",
                                 "last_loss", "tokens_per_s", "world_size", "manifest", "manifest_problems")} == {
        "job": "tiny-lora", "backend": "local", "state": "succeeded", "attempts": 1, "steps": 14,
        "total_steps": 16, "first_loss": 5.5, "last_loss": 1.5, "tokens_per_s": 150, "world_size": 2,
        "manifest": "ok", "manifest_problems": []}
    assert done["started"] == NOW - 10 * HOUR and done["duration"] == 100
    assert rows[0]["steps"] is None and rows[0]["manifest"] is None


def test_a_broken_run_json_is_a_warning_and_the_others_are_listed(three_runs):
    (three_runs / "broken-run").mkdir()
    (three_runs / "broken-run" / "run.json").write_text('{"run_id": ')
    (three_runs / "no-record").mkdir()
    (three_runs / "compare-a_b.png").write_bytes(b"\x89PNG")  # a file beside the runs is no run
    failed = three_runs / "qwen-full-20261201-150000"
    (failed / "summary.json").write_text('{"ranks": ')
    result = invoke(runs_cmd, "--runs-dir", three_runs)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4  # the header and the three runs
    assert lines[2].split()[:6] == ["qwen-full-20261201-150000", "qwen-full", "ssh", "failed", "3", "-"]
    warnings = result.stderr.splitlines()
    assert warnings == [f"warning: {three_runs / 'broken-run'}: run.json is not valid JSON; not listed",
                        f"warning: {three_runs / 'no-record'}: no run.json; not listed",
                        f"warning: {failed / 'summary.json'}: not valid JSON; the run is listed without figures"]


def test_no_runs_is_said(tmp_path):
    result = invoke(runs_cmd, "--runs-dir", tmp_path / "none")
    assert result.exit_code == 0 and result.stdout.strip() == f"no runs in {tmp_path / 'none'}/"


def test_the_cheap_check_sees_sizes_and_verify_sees_contents(three_runs):
    log = three_runs / "tiny-lora-20261201-100000" / "ranks/rank_0/log/info.log"
    log.write_bytes(b"step 2\n")  # same size, other bytes
    assert listed(three_runs, "--job", "tiny-lora", "--state", "succeeded")[0]["manifest"] == "ok"
    verified = listed(three_runs, "--job", "tiny-lora", "--state", "succeeded", "--verify")[0]
    assert verified["manifest"] == "differs"
    assert verified["manifest_problems"] == ["ranks/rank_0/log/info.log: content differs from the manifest"]
    log.write_bytes(b"step 2 and more\n")  # another size: the cheap check sees it
    cheap = listed(three_runs, "--job", "tiny-lora", "--state", "succeeded")[0]
    assert cheap["manifest"] == "differs" and "size 16 differs from the manifest's 7" in cheap["manifest_problems"][0]
    log.unlink()
    assert listed(three_runs, "--state", "succeeded")[0]["manifest_problems"] == ["ranks/rank_0/log/info.log: missing"]
    (three_runs / "qwen-full-20261201-150000" / "manifest.json").unlink()
    assert listed(three_runs, "--state", "failed")[0]["manifest"] == "missing"


def test_the_listing_opens_no_log(three_runs):
    """Only run.json, summary.json and manifest.json are opened (the logs are only stat'ed)."""
    opened = []
    listening = [False]

    def hook(event, args):
        if listening[0] and event == "open" and isinstance(args[0], str):
            opened.append(Path(args[0]).name)

    sys.addaudithook(hook)  # a hook cannot be removed: it listens only while the flag is up
    listening[0] = True
    try:
        run_index.read_runs(three_runs)
    finally:
        listening[0] = False
    assert opened and set(opened) <= {"run.json", "summary.json", "manifest.json"}, opened


MF_LINE = ("2026-12-01 10:00:0{step},000 - mindformers - INFO - print_output_info: {{ Epoch:[  1/  1], "
           "step:[    {step}/    3], loss:[{loss:.6f}/{loss:.6f}], per_step_time: 20ms, lr: 0.001 }}\n")


def write_info_log(run_dir: Path, rank_n: int, losses: list[float]) -> None:
    log = run_dir / "ranks" / f"rank_{rank_n}" / "log" / "info.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("some other line\n" + "".join(MF_LINE.format(step=i + 1, loss=v) for i, v in enumerate(losses)))


def write_plan(run_dir: Path, plan: dict, config: dict, job: dict | None = None) -> None:
    (run_dir / "plan" / "mindformers").mkdir(parents=True)
    (run_dir / "plan" / "plan.json").write_text(json.dumps(plan))
    (run_dir / "plan" / "mindformers" / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if job is not None:
        (run_dir / "plan" / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))


def test_flatten_names_keys_dotted_with_list_indexes():
    job = {"parallel": {"data_parallel": 2}, "cluster": {"nodes": [{"host": "a"}, {"host": "b", "devices": [0, 1]}]},
           "env": {}}
    assert compare.flatten(job) == {"parallel.data_parallel": 2, "cluster.nodes[0].host": "a",
                                    "cluster.nodes[1].host": "b", "cluster.nodes[1].devices[0]": 0,
                                    "cluster.nodes[1].devices[1]": 1, "env": {}}
    found = compare.differences([compare.flatten(job), compare.flatten(
        {"parallel": {"data_parallel": 4}, "cluster": {"nodes": [{"host": "a"}, {"host": "c", "devices": [0, 1]}]},
         "env": {}, "seed": 1})])
    assert [(d.key, d.values) for d in found] == [("parallel.data_parallel", (2, 4)),
                                                  ("cluster.nodes[1].host", ("b", "c")),
                                                  ("seed", (compare.ABSENT, 1))]
    # true and 1 are equal in Python, not in a config
    assert [d.key for d in compare.differences([{"flag": True}, {"flag": 1}])] == ["flag"]


def two_hand_made_runs(runs: Path, with_job_copies: bool) -> list[Path]:
    """Two runs of tiny-lora with another learning rate, the second in another runs directory; its
    rank 1 logged one step less."""
    dirs = []
    for where, run_id, port, lr, losses in (
            (runs, "tiny-lora-20261201-100000", 8118, 0.001, ([4.0, 2.0, 1.0], [2.0, 1.0, 0.5])),
            (runs.parent / "other-runs", "tiny-lora-20261201-110000", 8119, 0.01, ([3.0, 1.0], [1.0]))):
        run_dir = write_run(where, run_id, "tiny-lora", "succeeded", NOW - HOUR, NOW,
                            ranks={"0": rank(3, 3, 4.0, 1.0, 10.0), "1": rank(3, 3, 2.0, 0.5, 10.0)})
        # the run's own directory in output_dir and its id in a prefix differ; they are no difference
        config = {"output_dir": f"{run_dir.resolve()}/output", "optimizer": {"learning_rate": lr},
                  "callbacks": [{"type": "CheckpointMonitor", "prefix": f"ckpt-{run_id}"}]}
        job = {"name": "tiny-lora", "optimizer": {"learning_rate": lr}, "cluster": {"master_port": port}}
        write_plan(run_dir, {"job_name": "tiny-lora", "master_port": port}, config, job if with_job_copies else None)
        for n, rank_losses in enumerate(losses):
            write_info_log(run_dir, n, rank_losses)
        dirs.append(run_dir)
    return dirs


def test_compare_diffs_plan_json_without_job_copies(tmp_path):
    dirs = two_hand_made_runs(tmp_path / "runs", with_job_copies=False)
    found = compare.compare(dirs)
    assert found.job_source == "plan/plan.json"
    assert [(d.key, d.values) for d in found.job] == [("master_port", (8118, 8119))]
    assert [(d.key, d.values) for d in found.config] == [("optimizer.learning_rate", (0.001, 0.01))]
    assert found.labels == ["20261201-100000", "20261201-110000"]


def test_compare_prefers_the_job_copies(tmp_path):
    dirs = two_hand_made_runs(tmp_path / "runs", with_job_copies=True)
    found = compare.compare(dirs)
    assert found.job_source == "plan/job.yaml"
    assert [(d.key, d.values) for d in found.job] == [("optimizer.learning_rate", (0.001, 0.01)),
                                                      ("cluster.master_port", (8118, 8119))]


def test_loss_curve_is_the_mean_over_ranks_at_steps_every_rank_logged(tmp_path):
    first, second = two_hand_made_runs(tmp_path / "runs", with_job_copies=False)
    curve = compare.loss_curve(first, "a")
    assert (curve.steps, curve.losses, curve.ranks) == ([1, 2, 3], [3.0, 1.5, 0.75], 2)
    assert (compare.loss_curve(second, "b").steps, compare.loss_curve(second, "b").losses) == ([1], [2.0])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert compare.loss_curve(empty, "c").steps == []
    png = tmp_path / "plot.png"
    curves = [compare.loss_curve(first, "a"), compare.loss_curve(empty, "c"), compare.loss_curve(second, "b")]
    assert compare.plot_curves(curves, png) == ["a (mean of 2 ranks)", "b (mean of 2 ranks)"]  # c has no line
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_compare_command_prints_the_differences_and_writes_the_plot(tmp_path):
    runs = tmp_path / "runs"
    first, second = two_hand_made_runs(runs, with_job_copies=False)
    result = invoke(compare_cmd, "--runs-dir", runs, "tiny-lora-20261201-10", second)
    assert result.exit_code == 0, result.output
    assert "master_port" in result.stdout and "8118" in result.stdout and "8119" in result.stdout
    assert "optimizer.learning_rate" in result.stdout and "output_dir" not in result.stdout
    png = runs / "compare-20261201-100000_20261201-110000.png"
    assert png.read_bytes().startswith(b"\x89PNG") and f"loss curves: {png}" in result.stdout


def test_compare_refuses_one_run_and_the_same_run_twice(tmp_path):
    runs = tmp_path / "runs"
    first, _ = two_hand_made_runs(runs, with_job_copies=False)
    result = invoke(compare_cmd, "--runs-dir", runs, first.name)
    assert result.exit_code == 2 and "two or more runs" in result.stderr
    result = invoke(compare_cmd, "--runs-dir", runs, first.name, first)
    assert result.exit_code == 2 and "given twice" in result.stderr


# Two real tiny LoRA runs of the shipped example, differing in lora.rank (and each on its own port): the
# session's shared run of the example as it is, and one with the other rank.
LORA_RANKS = (4, 8)


@pytest.fixture
def two_real_runs(tmp_path, tiny_run):
    runs = tmp_path / "runs"
    job = yaml.safe_load((tmp_path / "job.yaml").read_text())  # the shared run's job
    assert job["lora"]["rank"] == LORA_RANKS[0]
    ports = [job["cluster"]["master_port"]]
    job["lora"]["rank"] = LORA_RANKS[1]
    job["cluster"]["master_port"] = free_port()
    ports.append(job["cluster"]["master_port"])
    path = tmp_path / f"job-r{LORA_RANKS[1]}.yaml"
    path.write_text(yaml.safe_dump(job))
    result = run_launcher("up", path, "--runs-dir", runs, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # started a second apart or more, the ids sort as the runs were made
    dirs = sorted(p for p in runs.iterdir() if p.is_dir())
    assert len(dirs) == 2 and dirs[0] == tiny_run
    return runs, dirs, tuple(ports)


@pytest.mark.e2e
def test_compare_two_real_runs(two_real_runs, tmp_path):
    runs, dirs, ports = two_real_runs
    found = compare.compare(dirs)
    assert found.job_source == "plan/job.yaml"
    assert {d.key: d.values for d in found.job} == {"lora.rank": LORA_RANKS, "cluster.master_port": ports}
    assert {d.key: d.values for d in found.config} == {"model.model_config.pet_config.lora_rank": LORA_RANKS}
    assert [r.state for r in found.runs] == ["succeeded", "succeeded"]

    curves = [compare.loss_curve(d, label) for d, label in zip(dirs, found.labels)]
    summary = json.loads((dirs[0] / "summary.json").read_text())
    assert curves[0].steps == list(range(1, summary["ranks"]["0"]["steps"] + 1)) and curves[0].ranks == 2
    drawn = compare.plot_curves(curves, tmp_path / "direct.png")
    assert drawn == [f"{label} (mean of 2 ranks)" for label in found.labels]

    png = tmp_path / "compare.png"
    result = invoke(compare_cmd, "--runs-dir", runs, dirs[0].name, dirs[1].name, "-o", png)
    assert result.exit_code == 0, result.output
    assert "model.model_config.pet_config.lora_rank" in result.stdout
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000

    listing = listed(runs)
    assert [r["run_id"] for r in listing] == [dirs[1].name, dirs[0].name]
    assert all(r["manifest"] == "ok" and r["steps"] == r["total_steps"] for r in listing)

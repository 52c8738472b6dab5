"""End-to-end: real MindSpore/MindFormers tiny fine-tunes on this machine's CPU through `launcher up`."""

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    EXAMPLES,
    LAUNCHER,
    assert_lora_checkpoints,
    free_port,
    only_run,
    run_launcher,
)

from launcher import gather
from launcher.entrypoints import nodectl
from launcher.runs import RunRecord

pytestmark = pytest.mark.e2e


def write_job(tmp_path, dataset, env=None, **cluster):
    data = yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text())
    data["dataset"]["path"] = str(dataset)
    data["cluster"].update(master_port=free_port(), **cluster)
    if env:
        data["env"] = env
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path




def assert_nothing_left(run_dir: Path):
    record = RunRecord.load(run_dir)
    assert nodectl.run_processes(record.run_id) == []




@pytest.mark.parametrize("launch", ["msrun", "ranktable"])
def test_tiny_lora_two_ranks(tmp_path, tiny_dataset, launch):
    job = write_job(tmp_path, tiny_dataset, launch=launch)
    result = run_launcher("up", job, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run(tmp_path)
    assert_lora_checkpoints(run_dir, world=2)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "succeeded"
    for rank in ("0", "1"):
        r = summary["ranks"][rank]
        assert r["steps"] == 16 and r["total_steps"] == 16
        assert r["losses_finite"] is True and math.isfinite(r["last_loss"])
        assert r["tokens_per_s"] > 0
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert (run_dir / "ranks" / "rank_1" / "console.log").is_file()
    assert (run_dir / "plan" / "plan.json").is_file()

    assert gather.verify_manifest(run_dir) == []
    manifest = json.loads((run_dir / "manifest.json").read_text())["files"]
    assert any(k.startswith("ranks/rank_1/checkpoint/") and k.endswith(".ckpt") for k in manifest)
    # Gathering again verifies what is there; a damaged file is reported, not hidden.
    again = run_launcher("gather", run_dir.name, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"verified {len(manifest)} files" in again.stdout
    info = run_dir / "ranks" / "rank_0" / "log" / "info.log"
    info.write_text(info.read_text() + "tampered\n")
    damaged = run_launcher("gather", run_dir.name, cwd=tmp_path)
    assert damaged.returncode == 1
    assert "ranks/rank_0/log/info.log: content differs from the manifest" in damaged.stderr

    status = run_launcher("status", run_dir.name, cwd=tmp_path)
    assert status.returncode == 0 and "succeeded" in status.stdout and "16/16" in status.stdout
    logs = run_launcher("logs", run_dir.name, "--rank", "1", cwd=tmp_path)
    assert logs.returncode == 0 and logs.stdout.strip()
    assert_nothing_left(run_dir)


def test_failing_rank_stops_the_others_and_is_named(tmp_path, tiny_dataset):
    job = write_job(tmp_path, tiny_dataset, env={"LAUNCHER_FAULT": "1:3"})
    result = run_launcher("up", job, cwd=tmp_path)
    assert result.returncode == 1
    assert "error: rank 1 failed" in result.stderr
    assert "LAUNCHER_FAULT: rank 1 fails at step 3" in result.stderr  # from the tail of its log
    run_dir = only_run(tmp_path)
    record = RunRecord.load(run_dir)
    assert record.state == "failed" and record.failed_rank == 1
    for rank in (0, 1):
        assert (run_dir / "ranks" / f"rank_{rank}" / "log" / "info.log").is_file()
        assert (run_dir / "ranks" / f"rank_{rank}" / "console.log").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed_rank"] == 1 and summary["ranks"]["1"]["steps"] < 16
    assert gather.verify_manifest(run_dir) == []
    assert_nothing_left(run_dir)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_every_process(tmp_path, tiny_dataset, sig):
    job = write_job(tmp_path, tiny_dataset)
    proc = subprocess.Popen([LAUNCHER, "up", str(job)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # Wait until both ranks are up (their MindFormers logs exist), then interrupt.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        logs = list((tmp_path / "runs").glob("*/output/log/rank_*/info.log"))
        if len(logs) == 2:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    else:
        pytest.fail("the ranks did not start")
    run_dir = only_run(tmp_path)
    record = RunRecord.load(run_dir)
    assert len(nodectl.run_processes(record.run_id)) >= 3  # msrun, scheduler and two workers at least
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "every rank of" in stderr
    assert RunRecord.load(run_dir).state == "interrupted"
    assert (run_dir / "manifest.json").is_file()
    assert_nothing_left(run_dir)


def test_down_stops_a_running_job(tmp_path, tiny_dataset):
    job = write_job(tmp_path, tiny_dataset)
    proc = subprocess.Popen([LAUNCHER, "up", str(job)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "runs").glob("*/output/log/rank_*/info.log"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.5)
    run_dir = only_run(tmp_path)
    down = run_launcher("down", run_dir.name, cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert f"run {run_dir.name}: no process left" in down.stdout
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1  # the run did not finish: the launcher says so
    assert "failed" in stderr
    assert_nothing_left(run_dir)
    purge = run_launcher("down", run_dir.name, "--purge", cwd=tmp_path)
    assert purge.returncode == 2 and "--purge removes node directories of ssh runs" in purge.stderr

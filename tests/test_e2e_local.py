"""End-to-end on this machine only: real MindSpore/MindFormers ranks under `launcher up`.

What every backend does (train and gather, a failing rank, Ctrl-C and SIGTERM, status/logs/gather/down
from new processes) is in test_backend_contract.py; here is what only the local backend shows.
"""

import subprocess
import time

import pytest
import yaml
from conftest import EXAMPLES, LAUNCHER, free_port, only_run, outside_processes, run_launcher, wait_until

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


def test_down_stops_a_watched_run_and_the_launcher_says_so(tmp_path, tiny_dataset):
    job = write_job(tmp_path, tiny_dataset)
    proc = subprocess.Popen([LAUNCHER, "up", str(job)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list((tmp_path / "runs").glob("*/output/log/rank_*/info.log"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.5)
        run_dir = only_run(tmp_path)
        down = run_launcher("down", run_dir.name, cwd=tmp_path)
        assert down.returncode == 0, down.stderr
        assert f"run {run_dir.name}: no process left" in down.stdout
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1  # the run did not finish: the launcher that watched it says so
        assert "failed" in stderr
        left = wait_until(lambda: outside_processes(run_dir.name, roots=[run_dir]))
        assert not left, left
    finally:
        if proc.poll() is None:
            proc.kill()

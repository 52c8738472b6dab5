"""What each SSH node is sent when a run is staged (the archive itself; the e2e tests unpack it on real hosts)."""

import io
import tarfile
import time

from rich.console import Console

from launcher.backends.ssh import staging
from launcher.backends.ssh.session import SshRun
from launcher.plan import build_plan
from launcher.runs import PLAN_DIR, RunRecord
from launcher.spec import parse_job


def three_node_run(tmp_path) -> SshRun:
    job = {"name": "stage", "model": "tiny_llama", "method": "lora", "dataset": {"path": "/srv/data/tiny.mindrecord"},
           "parallel": {"data_parallel": 3},
           "cluster": {"backend": "ssh", "device": "cpu", "ssh": {},
                       "nodes": [{"host": f"10.0.0.{i}", "devices": [0]} for i in range(3)]}}
    plan = build_plan(parse_job(job))
    plan.write(tmp_path / PLAN_DIR)
    return SshRun(plan, tmp_path, RunRecord("stage-1", "stage", "ssh", "starting", time.time()), Console(quiet=True))


def test_a_node_is_sent_the_shared_plan_its_own_folder_and_its_scripts(tmp_path):
    run = three_node_run(tmp_path)
    staging.render_start_scripts(run)
    with tarfile.open(fileobj=io.BytesIO(staging.archive(run, run.plan.nodes[1]))) as tar:
        names = set(tar.getnames())
        start = tar.extractfile("start.sh").read().decode()
    shared = {f"{PLAN_DIR}/{p.relative_to(tmp_path / PLAN_DIR).as_posix()}"
              for p in (tmp_path / PLAN_DIR).rglob("*") if p.is_file() and "nodes" not in p.parts}
    assert shared and shared <= names  # plan.json, the MindFormers config, the entrypoint, the env file
    assert f"{PLAN_DIR}/nodes/node-1/launch.sh" in names
    assert not [n for n in names if n.startswith(f"{PLAN_DIR}/nodes/") and "/node-1/" not in n]  # no other node's
    assert {"start.sh", "nodectl.py"} <= names and "node 1 (10.0.0.1)" in start

"""End-to-end on Kubernetes: the launcher's official-client backend over HTTP against an API emulator,
with a pod runner playing the kubelet (both test doubles, see k8scluster.py); the ranks are real
MindSpore/MindFormers processes."""

import json
import math
import os
import signal
import subprocess
import time

import pytest
import yaml

import k8scluster
from conftest import EXAMPLES, LAUNCHER, assert_lora_checkpoints, free_port, only_run, run_launcher
from launcher import gather
from launcher.runs import RunRecord

pytestmark = pytest.mark.e2e
CLAIM = "launcher-output"


@pytest.fixture
def cluster(tmp_path):
    built = k8scluster.Cluster(tmp_path / "cluster")
    yield built
    built.stop()


def write_job(tmp_path, dataset, env=None, **k8s):
    data = yaml.safe_load((EXAMPLES / "tiny-lora-k8s.yaml").read_text())
    data["dataset"]["path"] = str(dataset)
    data["cluster"]["master_port"] = free_port()
    data["cluster"]["k8s"].update(output_pvc=CLAIM, **k8s)
    if env:
        data["env"] = env
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def launcher_env(cluster):
    return {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}


def up(tmp_path, cluster, job, *extra, timeout=600):
    return run_launcher("up", job, "--pvc-dir", cluster.runner.pvc_dir(CLAIM), *extra, cwd=tmp_path,
                        env=launcher_env(cluster), timeout=timeout)


def assert_nothing_left(cluster, run_id):
    deadline = time.monotonic() + 15
    while (cluster.runner.alive() or cluster.objects(f"launcher/run-id={run_id}")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.objects(f"launcher/run-id={run_id}") == []
    assert cluster.runner.alive() == []
    assert cluster.runner.errors == []


def test_two_rank_pods_train_together(tmp_path, cluster, tiny_dataset):
    job = write_job(tmp_path, tiny_dataset)
    result = up(tmp_path, cluster, job)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run(tmp_path)
    run_id = run_dir.name
    assert_lora_checkpoints(run_dir, world=2)
    summary = json.loads((run_dir / "summary.json").read_text())
    for rank in ("0", "1"):
        assert summary["ranks"][rank]["steps"] == 16 and math.isfinite(summary["ranks"][rank]["last_loss"])
        console = (run_dir / "ranks" / f"rank_{rank}" / "console.log").read_text()
        assert "loss" in console  # the pod's log, read through the API
    assert gather.verify_manifest(run_dir) == []
    # Names are unique per run, every object carries the run id, and the pods are owned by the ConfigMap.
    short = run_id.removeprefix("tiny-lora-k8s-")
    pods = {name: pod for name, pod in cluster.runner.seen.items() if short in name}
    assert sorted(pods) == [f"tiny-lora-k8s-{short}-rank-0", f"tiny-lora-k8s-{short}-rank-1"]
    owners = {pod["metadata"]["ownerReferences"][0]["uid"] for pod in pods.values()}
    assert len(owners) == 1 and owners != {"00000000-0000-0000-0000-000000000000"}
    assert all(pod["metadata"]["labels"]["launcher/run-id"] == run_id for pod in pods.values())
    assert_nothing_left(cluster, run_id)
    # logs and gather reach the run again; the pods are gone, so logs come from what was gathered.
    logs = run_launcher("logs", run_id, "--rank", "1", cwd=tmp_path, env=launcher_env(cluster))
    assert logs.returncode == 0, logs.stderr
    assert "loss" in logs.stdout
    again = run_launcher("gather", run_id, cwd=tmp_path, env=launcher_env(cluster))
    assert again.returncode == 0, again.stdout + again.stderr

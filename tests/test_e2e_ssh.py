"""End-to-end over SSH: real sshd in network namespaces (one per host), real MindSpore ranks across them."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import sshcluster
from conftest import EXAMPLES, LAUNCHER, free_port, run_launcher
from launcher import gather
from launcher.runs import RunRecord

pytestmark = pytest.mark.e2e
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture
def cluster(tmp_path):
    reason = sshcluster.missing_capabilities()
    if reason:
        if os.environ.get("LAUNCHER_TESTS_STRICT"):
            pytest.fail(f"SSH end-to-end tests must run in CI: {reason}")
        pytest.skip(reason)
    built = sshcluster.build(tmp_path / "cluster", 2)
    yield built
    sshcluster.teardown(2, built)


def write_job(tmp_path, cluster, dataset, launch="msrun", env=None, workdirs=None, **ssh):
    data = yaml.safe_load((EXAMPLES / "tiny-lora-ssh.yaml").read_text())
    data["dataset"]["path"] = str(dataset)
    data["cluster"]["launch"] = launch
    data["cluster"]["master_port"] = free_port()
    data["cluster"]["ssh"].update(identity_file=str(cluster.identity_file), known_hosts=str(cluster.known_hosts),
                                  path_prefix=[VENV_BIN], workdir=str(tmp_path / "nodes" / "default"), **ssh)
    for i, (node, host) in enumerate(zip(data["cluster"]["nodes"], cluster.hosts)):
        node["host"] = host.address
        # The hosts share this machine's disk: give each node its own work directory.
        node["workdir"] = (workdirs or {}).get(i, str(tmp_path / "nodes" / f"node{i}"))
    if env:
        data["env"] = env
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def only_run(tmp_path) -> Path:
    runs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def node_processes(host, run_id) -> list[int]:
    """Processes of the run on one host, seen from inside its PID namespace."""
    result = subprocess.run(
        ["ssh", "-i", str(host_cluster_key(host)), "-o", f"UserKnownHostsFile={host.known_hosts_path}",
         f"root@{host.address}", f"grep -l LAUNCHER_RUN_ID={run_id} /proc/[0-9]*/environ 2>/dev/null | wc -l"],
        capture_output=True, text=True, timeout=30)
    return int(result.stdout.strip() or 0)


def host_cluster_key(host):
    return host.identity_file


def assert_lora_checkpoints(run_dir: Path, world: int):
    import mindspore as ms

    for rank in range(world):
        ckpts = sorted((run_dir / "ranks" / f"rank_{rank}" / "checkpoint").glob("*.ckpt"))
        assert len(ckpts) == 1, ckpts
        params = ms.load_checkpoint(str(ckpts[0]))
        assert any("lora_a" in n for n in params) and any("lora_b" in n for n in params)


@pytest.mark.parametrize("launch", ["msrun", "ranktable"])
def test_two_hosts_train_together(tmp_path, cluster, tiny_dataset, launch):
    job = write_job(tmp_path, cluster, tiny_dataset, launch=launch, env={"GLOG_v": "1"})
    result = run_launcher("up", job, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run(tmp_path)
    assert_lora_checkpoints(run_dir, world=2)
    summary = json.loads((run_dir / "summary.json").read_text())
    for rank in ("0", "1"):
        assert summary["ranks"][rank]["steps"] == 16 and math.isfinite(summary["ranks"][rank]["last_loss"])
    assert gather.verify_manifest(run_dir) == []
    # The scheduler on the first host saw the second host's worker connect from its own address.
    log = "scheduler.log" if launch == "msrun" else "scheduler.log"
    sched = (tmp_path / "nodes" / "node0" / run_dir.name / "output" /
             ("msrun_log" if launch == "msrun" else "rank_log") / log).read_text()
    assert cluster.hosts[1].address in sched

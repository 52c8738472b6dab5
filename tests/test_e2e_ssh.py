"""End-to-end over SSH: real sshd hosts with their own disks (sshcluster.py), real MindSpore ranks across them.

What every backend does (train and gather, a failing rank, Ctrl-C and SIGTERM, status/logs/gather/down
from new processes) is in test_backend_contract.py; here is what only the SSH backend has. The jump host,
~/.ssh/config and per-node options, host keys, atomic staging and a resumed gather are in
test_e2e_ssh_options.py.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import sshcluster
import yaml
from conftest import (
    EXAMPLES,
    LAUNCHER,
    assert_lora_checkpoints,
    free_port,
    only_run,
    outside_processes,
    run_launcher,
    use_prepared_data,
    wait_until,
)
from sshcluster import WORKDIR

from launcher import gather

pytestmark = pytest.mark.e2e
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture
def cluster(tmp_path):
    built = sshcluster.build_or_skip(tmp_path / "cluster", 2)
    yield built
    sshcluster.teardown(2, built)


def write_job(tmp_path, cluster, dataset, launch="msrun", env=None, workdirs=None, **ssh):
    """The example SSH job on the cluster's hosts; a dataset file is copied onto every host's disk first."""
    data = yaml.safe_load((EXAMPLES / "tiny-lora-ssh.yaml").read_text())
    if Path(dataset).is_file():
        data["dataset"]["path"] = cluster.place_dataset(Path(dataset))
    data["cluster"]["launch"] = launch
    data["cluster"]["master_port"] = free_port()
    data["cluster"]["ssh"].update({"identity_file": str(cluster.identity_file),
                                   "known_hosts": str(cluster.known_hosts), "path_prefix": [VENV_BIN], **ssh})
    for i, (node, host) in enumerate(zip(data["cluster"]["nodes"], cluster.hosts)):
        node["host"] = host.address
        if workdirs and i in workdirs:
            node["workdir"] = workdirs[i]
    if env:
        data["env"] = env
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def assert_nothing_left(run_id):
    # This test runs in the hosts' parent PID namespace, so /proc shows the processes of every host.
    left = wait_until(lambda: outside_processes(run_id))
    assert not left, left


def rank_logs(cluster) -> list[Path]:
    """Every rank's MindFormers log so far, read on the hosts' own disks."""
    logs = []
    for host in cluster.hosts:
        if host.sshd.poll() is None:
            logs += host.path(WORKDIR).glob("*/output/log/rank_*/info.log")
    return logs


def test_prepared_dataset_is_staged_to_every_host(tmp_path, cluster, tiny_sp_tokenizer):
    """A data: section is tokenized once here; each node gets the file in its run directory."""
    job = write_job(tmp_path, cluster, "unused")
    job.write_text(yaml.safe_dump(use_prepared_data(yaml.safe_load(job.read_text()), tmp_path, tiny_sp_tokenizer)))
    result = run_launcher("up", job, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wrote 64 records" in result.stdout
    run_dir = only_run(tmp_path)
    assert_lora_checkpoints(run_dir, world=2)
    [prepared] = (tmp_path / "data" / "cache").iterdir()
    files = sorted(p.name for p in prepared.iterdir())
    assert files == ["part-00000.mindrecord", "part-00000.mindrecord.db"]
    for host in cluster.hosts:
        staged = host.path(WORKDIR) / run_dir.name / "data" / prepared.name
        assert {f: (staged / f).read_bytes() for f in files} == {f: (prepared / f).read_bytes() for f in files}
    run_yaml = yaml.safe_load((run_dir / "plan" / "mindformers" / "run.yaml").read_text())
    assert run_yaml["train_dataset"]["data_loader"]["dataset_dir"] == f"data/{prepared.name}"
    assert_nothing_left(run_dir.name)


@pytest.mark.parametrize("how", ["host dies", "link cut"])
def test_lost_host_stops_the_other(tmp_path, cluster, tiny_dataset, how):
    job = write_job(tmp_path, cluster, tiny_dataset, node_lost_after=6)
    proc = subprocess.Popen([LAUNCHER, "up", str(job)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_ranks(cluster, proc)
    run_dir = only_run(tmp_path)
    if how == "host dies":
        cluster.hosts[1].kill()  # the host's sshd is PID 1 of its PID namespace: everything on it dies
    else:
        cluster.hosts[1].cut_link()  # the host keeps running, unreachable: its veth is down
    lost_at = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert f"node 1 ({cluster.hosts[1].address}) lost: no answer for 6s" in stderr
    assert time.monotonic() - lost_at < 6 + 15 + 30  # noticed, torn down (grace) and gathered
    assert "is lost; its processes may still run" in stderr
    if how == "link cut":
        cluster.hosts[1].kill()  # what a reboot would do; the launcher could not reach it
    assert_nothing_left(run_dir.name)
    assert (run_dir / "ranks" / "rank_0" / "log" / "info.log").is_file()


def test_a_node_script_gone_without_an_exit_code_fails_the_run(tmp_path, cluster, tiny_dataset):
    """Node 1's script is SIGKILLed (as the OOM killer would): it never writes node.exit, and its ranks run on.
    The launcher sees the script's process gone, fails the run and stops every rank on both nodes."""
    job = write_job(tmp_path, cluster, tiny_dataset)
    data = yaml.safe_load(job.read_text())
    data["mindformers"] = {"overrides": {"runner_config.epochs": 100}}  # it would train for long
    job.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([LAUNCHER, "up", str(job)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_ranks(cluster, proc)
    run_dir = only_run(tmp_path)
    host = cluster.hosts[1]
    script = (host.path(WORKDIR) / run_dir.name / "node.pid").read_text().strip()
    host.enter("kill", "-9", script)  # a pid in the host's own PID namespace
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert "failed: node 1 failed: its node script ended without an exit code" in stderr, stderr
    assert_nothing_left(run_dir.name)


def wait_for_ranks(cluster, proc, count=2):
    """Until every node's rank has its MindFormers log (read on each host's own disk)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if len(rank_logs(cluster)) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    pytest.fail("the ranks did not start")


def test_unreachable_host_starts_nothing(tmp_path, cluster, tiny_dataset):
    job = write_job(tmp_path, cluster, tiny_dataset, connect_timeout=3)
    data = yaml.safe_load(job.read_text())
    data["cluster"]["nodes"][1]["host"] = "10.231.0.99"  # on the test bridge, but no host answers
    job.write_text(yaml.safe_dump(data))
    result = run_launcher("up", job, cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot reach 1 of 2 nodes:" in result.stderr
    assert "node 1 (10.231.0.99)" in result.stderr
    assert "nothing was started on any node" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "runs").iterdir())
    assert not cluster.hosts[0].path(WORKDIR).exists()


def test_host_key_mismatch_is_refused(tmp_path, cluster, tiny_dataset):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    pub = other.with_suffix(".pub").read_text().split()
    lines = cluster.known_hosts.read_text().splitlines()
    lines[0] = f"{cluster.hosts[0].address} {pub[0]} {pub[1]}"
    cluster.known_hosts.write_text("\n".join(lines) + "\n")
    job = write_job(tmp_path, cluster, tiny_dataset)
    for extra in ([], ["--accept-new-host-keys"]):  # a changed key is never accepted
        result = run_launcher("up", job, *extra, cwd=tmp_path)
        assert result.returncode == 1
        assert f"node 0 ({cluster.hosts[0].address}): host key does not match" in result.stderr
        assert "ssh-keygen -R" in result.stderr


def test_hostile_paths_and_stale_processes(tmp_path, cluster, tiny_dataset):
    # An injected command would run in some working directory: the test's, a home, or a work directory.
    hostile = "we $(touch pwned) 'it\"s' `touch pwned` ; x"
    dataset_dir = tmp_path / hostile
    dataset_dir.mkdir()
    for suffix in ("", ".db"):
        (dataset_dir / f"tiny.mindrecord{suffix}").write_bytes(Path(f"{tiny_dataset}{suffix}").read_bytes())
    job = write_job(tmp_path, cluster, dataset_dir / "tiny.mindrecord", workdirs={0: f"{WORKDIR}/{hostile}"})
    # A process left by an earlier run of the same job on host 0.
    stale = subprocess.Popen(cluster.hosts[0].enter_argv("env", "LAUNCHER_JOB=tiny-lora-ssh", "sleep", "600"))
    try:
        time.sleep(1)
        refused = run_launcher("up", job, cwd=tmp_path)
        assert refused.returncode == 1
        assert "of an earlier run of 'tiny-lora-ssh' is alive" in refused.stderr
        assert "pass --kill-stale" in refused.stderr
        result = run_launcher("up", job, "--kill-stale", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        stale.wait(timeout=30)  # --kill-stale ended it
    finally:
        if stale.poll() is None:
            stale.kill()
    run_dir = only_run(tmp_path)
    on_host0 = cluster.hosts[0].path(WORKDIR) / hostile / run_dir.name
    assert (on_host0 / "output" / "log" / "rank_0" / "info.log").is_file()
    assert gather.verify_manifest(run_dir) == []
    assert not list(tmp_path.rglob("pwned")) and not Path.home().joinpath("pwned").exists()
    for host in cluster.hosts:
        for where in ("/root", "/srv", "/tmp"):
            assert not list(host.path(where).rglob("pwned")), (host.address, where)


def test_preflight_meets_real_differences_between_hosts(tmp_path, tiny_dataset):
    """Three hosts: one as the others should be; one with MindFormers 1.7.0 installed instead of 1.8.0; one
    with a bare Python environment, a 64 MB disk and no copy of the dataset."""
    cluster = sshcluster.build_or_skip(tmp_path / "cluster", 3, envs={2: "mindformers-1.7.0", 3: "bare"},
                                       disks={3: "64m"})
    try:
        job = write_job(tmp_path, cluster, "unused", min_free_mb=100)
        data = yaml.safe_load(job.read_text())
        data["dataset"]["path"] = cluster.place_dataset(Path(tiny_dataset), hosts=cluster.hosts[:2])
        data["parallel"]["data_parallel"] = 3
        data["cluster"]["nodes"] = [{"host": h.address, "devices": [0]} for h in cluster.hosts]
        job.write_text(yaml.safe_dump(data))
        result = run_launcher("up", job, cwd=tmp_path)
        assert result.returncode == 1, result.stdout
        err = result.stderr
        assert "preflight failed; nothing was started on any node" in err
        first, older, bare = (f"node {i} ({h.address}): " for i, h in enumerate(cluster.hosts))
        assert first not in err, err  # the host that has what the job needs
        # Known-good pins (mindspore 2.7.2, mindformers 1.8.0) against the 1.7.0 wheel mounted on host 2.
        assert ("MindSpore/MindFormers versions differ between nodes (node 0: mindspore 2.7.2, mindformers 1.8.0, "
                "node 1: mindspore 2.7.2, mindformers 1.7.0, node 2: mindspore None, mindformers None)") in err
        assert older not in err, err  # its own checks pass: only the versions differ
        assert f"{bare}mindspore/mindformers not installed for {VENV_BIN}/python" in err
        assert f"{bare}msrun is not on PATH" in err
        assert f"{bare}dataset /srv/data/tiny.mindrecord is missing or not readable by the SSH user" in err
        assert f"{bare}only 6" in err and f"MB free in {WORKDIR}; 100 MB needed" in err  # 64 MB, less a little
        assert not list((tmp_path / "runs").iterdir())
        for host in cluster.hosts:  # preflight leaves only its helper
            assert [p.name for p in host.path(WORKDIR).iterdir()] == [".launcher-nodectl.py"], host.address
    finally:
        sshcluster.teardown(3, cluster)


FAKE_HCCN_TOOL = """#!/usr/bin/env bash
# Fake hccn_tool: "-i N -ip -g" prints the real tool's format, with an address made from the host's own.
last=$(hostname -I | awk '{print $1}' | cut -d. -f4)
if [ "$3" = "-ip" ]; then printf 'ipaddr:192.168.%s.%s\\nnetmask:255.255.255.0\\n' "$2" "$last"; fi
if [ "$3" = "-net_health" ]; then echo "net health status: Success"; fi
"""
# /etc/hccn.conf as the driver writes it (address_N / netmask_N lines; see launcher/ascend.py's sources).
HCCN_CONF = "address_0=192.168.100.12\nnetmask_0=255.255.255.0\nnetdetect_0=192.168.100.1\n"


def test_ascend_rank_table_is_discovered_and_preflight_runs_on_every_host(tmp_path, cluster, tiny_dataset):
    """Stand-ins for the NPU tools (no NPU here) on the hosts' own disks: host 1 has hccn_tool, host 2 only
    /etc/hccn.conf. Everything else is real SSH."""
    from test_ascend import FAKE_NPU_SMI, npu_smi_info

    from launcher.backends.ssh import preflight as ssh_preflight
    from launcher.plan import build_plan
    from launcher.spec import load_job

    tools = "/srv/ascend-tools"
    for host in cluster.hosts:
        fake = host.path(tools)
        fake.mkdir(parents=True)
        (fake / "npu-smi").write_text(FAKE_NPU_SMI.format(sleep=""))
        (fake / "npu-smi.out").write_text(npu_smi_info(holders={0: [4242]}))
        (fake / "npu-smi").chmod(0o755)
    (cluster.hosts[0].path(tools) / "hccn_tool").write_text(FAKE_HCCN_TOOL)
    (cluster.hosts[0].path(tools) / "hccn_tool").chmod(0o755)
    cluster.hosts[1].path("/etc/hccn.conf").write_text(HCCN_CONF)
    assert not Path("/etc/hccn.conf").exists()  # written on host 2's own /etc only
    job = write_job(tmp_path, cluster, tiny_dataset, launch="ranktable", path_prefix=[tools, VENV_BIN])
    data = yaml.safe_load(job.read_text())
    data["cluster"]["device"] = "ascend"
    job.write_text(yaml.safe_dump(data))

    found = ssh_preflight.discover_device_ips(build_plan(load_job(job)), tmp_path, accept_new=False)
    assert found == {0: ["192.168.0.11"], 1: ["192.168.100.12"]}

    result = run_launcher("up", job, cwd=tmp_path)
    assert result.returncode == 1
    assert "reading device IPs from the nodes" in result.stdout
    assert "preflight failed; nothing was started on any node" in result.stderr
    for i, host in enumerate(cluster.hosts):
        assert f"node {i} ({host.address}): /usr/local/Ascend/driver is missing" in result.stderr
        assert f"node {i} ({host.address}): device 0: held by process 4242 (npu-smi info)" in result.stderr
    assert not list((tmp_path / "runs").iterdir())

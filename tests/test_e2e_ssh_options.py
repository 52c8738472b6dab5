"""What the README promises of the SSH backend, each on real sshd hosts with their own disks (sshcluster.py):
~/.ssh/config and per-node options, the default known_hosts and recorded host keys, a jump host, atomic
staging, and a gather that resumes from its .partial files.

What is checked is read outside the launcher: the hosts' sshd logs (who logged in, from where; every SFTP
file's bytes read, internal-sftp -l INFO), the files on the hosts' own disks, and the process table.
"""

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import sshcluster
import yaml
from conftest import LAUNCHER, assert_lora_checkpoints, only_run, outside_processes, run_launcher, use_prepared_data
from sshcluster import TRAINER_UID, WORKDIR
from test_e2e_ssh import write_job

from launcher import gather

pytestmark = pytest.mark.e2e


def home_with_config(tmp_path: Path, config: str) -> dict:
    """An environment whose HOME holds .ssh/config (and nothing else: no default key, no known_hosts)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(config)
    return {**os.environ, "HOME": str(home)}


def sshd_log(cluster, host) -> str:
    return (cluster.root / f"sshd{host.index}.log").read_text()


def test_ssh_config_per_node_user_and_port_and_the_default_known_hosts(tmp_path, tiny_dataset):
    """Node 0 is an alias of ~/.ssh/config (HostName, User, Port, IdentityFile); node 1 gets the same from
    its own job fields. Both sshd listen only on port 2222, and the user is `trainer`, who exists only on the
    hosts. The job names no known_hosts: ~/.ssh/known_hosts it is, empty at first."""
    cluster = sshcluster.build_or_skip(tmp_path / "cluster", 2, port=2222)
    try:
        key = tmp_path / "keys" / "cluster-key"  # not a default key name: only IdentityFile finds it
        key.parent.mkdir()
        shutil.copy(cluster.identity_file, key)
        first, second = cluster.hosts
        env = home_with_config(tmp_path, f"Host trainer-a\n  HostName {first.address}\n  User trainer\n"
                                         f"  Port 2222\n  IdentityFile {key}\n")
        known_hosts = Path(env["HOME"]) / ".ssh" / "known_hosts"
        job = write_job(tmp_path, cluster, tiny_dataset)
        data = yaml.safe_load(job.read_text())
        for option in ("user", "identity_file", "known_hosts", "workdir"):
            data["cluster"]["ssh"].pop(option, None)  # the workdir: launcher-runs, under the user's home
        data["cluster"]["nodes"] = [
            {"host": "trainer-a", "server_ip": first.address, "devices": [0]},
            {"host": second.address, "user": "trainer", "port": 2222, "identity_file": str(key), "devices": [0]},
        ]
        job.write_text(yaml.safe_dump(data))

        refused = run_launcher("up", job, cwd=tmp_path, env=env)
        assert refused.returncode == 1, refused.stdout
        for i, host in enumerate(cluster.hosts):
            assert f"host key of [{host.address}]:2222 is not in {known_hosts}" in refused.stderr
        assert "--accept-new-host-keys" in refused.stderr and not known_hosts.exists()

        result = run_launcher("up", job, "--accept-new-host-keys", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        # Recorded under the name and port OpenSSH would use: [HostName]:Port, with each host's own key (sshd(8),
        # "SSH_KNOWN_HOSTS FILE FORMAT": a non-standard port is written as [host]:port; openssh-portable
        # hostfile.c put_host_port).
        assert sorted(known_hosts.read_text().splitlines()) == sorted(h.host_key_line for h in cluster.hosts)
        run_dir = only_run(tmp_path)
        assert_lora_checkpoints(run_dir, world=2)
        assert gather.verify_manifest(run_dir) == []
        for host in cluster.hosts:
            staged = host.path(f"/home/trainer/launcher-runs/{run_dir.name}")
            assert staged.stat().st_uid == TRAINER_UID
            assert (staged / "output" / "checkpoint").stat().st_uid == TRAINER_UID  # the ranks ran as trainer
            log = sshd_log(cluster, host)
            assert "Accepted publickey for trainer from 10.231.0.1" in log and "for root" not in log

        # The next process trusts the recorded keys without being told.
        status = run_launcher("status", run_dir.name, cwd=tmp_path, env=env)
        assert status.returncode == 0, status.stderr
        assert "node 0 (trainer-a): ended with code 0" in status.stdout
        assert f"node 1 ({second.address}): ended with code 0" in status.stdout
    finally:
        sshcluster.teardown(2, cluster)


def test_nodes_behind_a_jump_host(tmp_path, tiny_dataset, monkeypatch):
    """The nodes are on a bridge this machine has no route to; only the jump host is on both. ProxyJump comes
    from ~/.ssh/config in the run; cluster.ssh.jump is tried through the same connector afterwards."""
    cluster = sshcluster.build_or_skip(tmp_path / "cluster", 2, jump=True)
    try:
        jump = cluster.jump
        with pytest.raises(OSError):  # no route from here to the nodes
            socket.create_connection((cluster.hosts[0].address, 22), timeout=3).close()
        env = home_with_config(tmp_path, f"Host login\n  HostName {jump.address}\n  User root\n"
                                         f"  IdentityFile {cluster.identity_file}\n"
                                         f"Host {sshcluster.INNER_SUBNET}.*\n  ProxyJump login\n")
        # The job's known_hosts has the nodes' keys, not the jump host's.
        cluster.known_hosts.write_text("".join(f"{h.host_key_line}\n" for h in cluster.hosts))
        job = write_job(tmp_path, cluster, tiny_dataset)

        refused = run_launcher("up", job, cwd=tmp_path, env=env)
        assert refused.returncode == 1, refused.stdout
        assert (f"node 0 ({cluster.hosts[0].address}): jump host login: host key of {jump.address} is not in "
                f"{cluster.known_hosts}") in refused.stderr
        assert "nothing was started on any node" in refused.stderr
        assert not list((tmp_path / "runs").iterdir())

        result = run_launcher("up", job, "--accept-new-host-keys", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert jump.host_key_line in cluster.known_hosts.read_text().splitlines()
        run_dir = only_run(tmp_path)
        assert_lora_checkpoints(run_dir, world=2)
        assert gather.verify_manifest(run_dir) == []
        assert sshd_log(cluster, jump).count("Accepted publickey for root from 10.231.0.1") == 1  # one login
        for host in cluster.hosts:  # every node was reached from the jump host's inner address
            assert f"Accepted publickey for root from {sshcluster.INNER_SUBNET}.2" in sshd_log(cluster, host)

        # cluster.ssh.jump, without any ~/.ssh/config.
        from launcher.backends.ssh import transport

        monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))

        async def through_job_jump() -> str:
            connector = transport.Connector(str(cluster.known_hosts), 5, 30, jump=f"root@{jump.address}",
                                            jump_identity_file=str(cluster.identity_file))
            try:
                node = await connector.node(transport.Endpoint(cluster.hosts[1].address, user="root",
                                                               identity_file=str(cluster.identity_file)))
                return await node.run(["hostname", "-I"])
            finally:
                connector.close()

        assert asyncio.run(through_job_jump()).split() == [cluster.hosts[1].address]
    finally:
        sshcluster.teardown(2, cluster)


def test_a_failure_half_way_through_staging_leaves_nothing_on_any_node(tmp_path, tiny_sp_tokenizer):
    """Host 2's disk holds 64 KiB: preflight passes (its helper fits), the run's bundle does not."""
    cluster = sshcluster.build_or_skip(tmp_path / "cluster", 2, disks={2: "64k"})
    try:
        job = write_job(tmp_path, cluster, "unused", min_free_mb=0)
        job.write_text(yaml.safe_dump(use_prepared_data(yaml.safe_load(job.read_text()), tmp_path, tiny_sp_tokenizer)))
        result = run_launcher("up", job, cwd=tmp_path)
        assert result.returncode == 1, result.stdout
        assert "could not stage the run on 1 of 2 nodes:" in result.stderr
        assert f"node 1 ({cluster.hosts[1].address}): " in result.stderr and "nothing was started" in result.stderr
        assert not list((tmp_path / "runs").iterdir())
        for host in cluster.hosts:  # no <run-id>, no .<run-id>.staging: only preflight's helper
            assert sorted(p.name for p in host.path(WORKDIR).iterdir()) == [".launcher-nodectl.py"], host.address
        assert outside_processes("tiny-lora-ssh") == []  # the job's name is in every process's environment
    finally:
        sshcluster.teardown(2, cluster)


def test_an_interrupted_gather_resumes_from_its_partial_files(tmp_path, tiny_dataset):
    cluster = sshcluster.build_or_skip(tmp_path / "cluster", 2)
    try:
        job = write_job(tmp_path, cluster, tiny_dataset)
        result = run_launcher("up", job, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        run_dir = only_run(tmp_path)
        host = cluster.hosts[1]
        # A large checkpoint file on node 1 that this machine does not have yet.
        big = host.path(f"{WORKDIR}/{run_dir.name}/output/checkpoint/rank_1/big.ckpt")
        digest = hashlib.sha256()
        with big.open("wb") as f:
            for _ in range(256):
                chunk = os.urandom(2 << 20)
                digest.update(chunk)
                f.write(chunk)
        total = big.stat().st_size
        partial = run_dir / "ranks" / "rank_1" / "checkpoint" / ".big.ckpt.partial"

        proc = subprocess.Popen([LAUNCHER, "gather", run_dir.name], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not (partial.is_file() and partial.stat().st_size > 32 << 20):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the gather did not start on big.ckpt"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # mid-transfer, nothing cleaned up
        proc.wait()
        kept = partial.stat().st_size
        assert 0 < kept < total

        again = run_launcher("gather", run_dir.name, cwd=tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        gathered = run_dir / "ranks" / "rank_1" / "checkpoint" / "big.ckpt"
        assert hashlib.sha256(gathered.read_bytes()).hexdigest() == digest.hexdigest()
        assert not partial.exists()
        assert gather.verify_manifest(run_dir) == []
        # The node's SFTP server sent only what the partial file lacked: sftp-server -l INFO logs each close as
        # 'close "PATH" bytes read N written M' (openssh-portable sftp-server.c handle_log_close).
        closes = [line for line in host.path(sshcluster.SFTP_LOG).read_text().splitlines()
                  if "close " in line and "/rank_1/big.ckpt" in line]
        assert closes and f"bytes read {total - kept} written 0" in closes[-1], closes
    finally:
        sshcluster.teardown(2, cluster)

"""Real test hosts: Linux network namespaces joined by a bridge, each with its own PID namespace and sshd.

Each host is `ip netns` + `unshare --pid --mount-proc`, so its processes are invisible to the other
hosts, and killing its sshd (PID 1 of the host) ends everything that ran there, as a lost machine would.
The hosts share this machine's filesystem, so each node gets its own work directory.
The bridge, namespaces and addresses have fixed names, so one cluster exists at a time on a machine:
build() holds an exclusive lock (flock) until teardown(), and a second test session waits for it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.231.0"
BRIDGE = "lch-br0"
LOCK = Path("/run/lock" if Path("/run/lock").is_dir() else tempfile.gettempdir()) / "lch-sshcluster.lock"


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


def missing_capabilities() -> str | None:
    """Why this machine cannot build test hosts, or None."""
    if os.geteuid() != 0:
        return "building network namespaces needs root"
    for tool in ("ip", "unshare", "ssh-keygen"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if not Path("/usr/sbin/sshd").exists():
        return "sshd (openssh-server) is not installed"
    probe = subprocess.run(["ip", "netns", "add", "lch-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.strip()}"
    run("ip", "netns", "del", "lch-probe", check=False)
    return None


@dataclass
class Host:
    index: int
    netns: str
    address: str
    veth: str  # the host's end, inside its namespace
    sshd: subprocess.Popen | None = None
    host_key_line: str = ""

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command inside the host's network namespace (not its PID namespace)."""
        return run("ip", "netns", "exec", self.netns, *argv, check=check)

    def kill(self) -> None:
        """Kill the host's sshd, PID 1 of its PID namespace: every process on the host dies with it."""
        if self.sshd and self.sshd.poll() is None:
            try:
                os.kill(self.sshd_pid(), 9)
            except (IndexError, FileNotFoundError, ProcessLookupError):
                pass
            self.sshd.kill()
            self.sshd.wait(timeout=10)

    def sshd_pid(self) -> int:
        """Pid (in this PID namespace) of the host's sshd, PID 1 of the host's own PID namespace."""
        children = Path(f"/proc/{self.sshd.pid}/task/{self.sshd.pid}/children").read_text().split()
        return int(children[0])

    def cut_link(self) -> None:
        self.exec("ip", "link", "set", self.veth, "down")


@dataclass
class Cluster:
    root: Path
    identity_file: Path
    known_hosts: Path
    hosts: list[Host] = field(default_factory=list)
    lock: object = None  # the open LOCK file while the cluster exists
    lock_wait: float = 0.0  # seconds build() waited for another session's cluster


def _exclusive_lock():
    lock = open(LOCK, "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def build_or_skip(root: Path, count: int) -> Cluster:
    """build, in a test: a machine that cannot host the cluster skips the test, and fails it in CI."""
    import pytest

    reason = missing_capabilities()
    if reason:
        if os.environ.get("LAUNCHER_TESTS_STRICT"):
            pytest.fail(f"SSH end-to-end tests must run in CI: {reason}")
        pytest.skip(reason)
    return build(root, count)


def build(root: Path, count: int) -> Cluster:
    started = time.monotonic()
    lock = _exclusive_lock()
    waited = time.monotonic() - started
    try:
        cluster = _build(root, count)
    except BaseException:
        teardown(count + 4)
        lock.close()
        raise
    cluster.lock, cluster.lock_wait = lock, waited
    return cluster


def _build(root: Path, count: int) -> Cluster:
    root.mkdir(parents=True, exist_ok=True)
    teardown(count + 4)  # leftovers from an earlier, interrupted test run
    key = root / "id_ed25519"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
    authorized = root / "authorized_keys"
    authorized.write_text((root / "id_ed25519.pub").read_text())
    authorized.chmod(0o600)
    Path("/run/sshd").mkdir(exist_ok=True)
    cluster = Cluster(root, key, root / "known_hosts")
    run("ip", "link", "add", BRIDGE, "type", "bridge")
    run("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    known = []
    for i in range(1, count + 1):
        host = Host(i, f"lch-n{i}", f"{SUBNET}.{10 + i}", f"lch-v{i}")
        run("ip", "netns", "add", host.netns)
        run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", f"lch-p{i}")
        run("ip", "link", "set", f"lch-p{i}", "master", BRIDGE)
        run("ip", "link", "set", f"lch-p{i}", "up")
        run("ip", "link", "set", host.veth, "netns", host.netns)
        host.exec("ip", "addr", "add", f"{host.address}/24", "dev", host.veth)
        host.exec("ip", "link", "set", host.veth, "up")
        host.exec("ip", "link", "set", "lo", "up")
        host_key = root / f"host{i}_ed25519"
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
        config = root / f"sshd{i}.conf"
        config.write_text(
            f"ListenAddress {host.address}\nPort 22\nHostKey {host_key}\nAuthorizedKeysFile {authorized}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"UsePAM no\nStrictModes no\nPidFile {root}/sshd{i}.pid\nAcceptEnv LANG\nSubsystem sftp internal-sftp\n"
            "MaxSessions 64\nMaxStartups 64\n"
        )
        host.sshd = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
             "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
            stdout=subprocess.DEVNULL, stderr=open(root / f"sshd{i}.log", "w"),
        )
        pub = (root / f"host{i}_ed25519.pub").read_text().split()
        host.host_key_line = f"{host.address} {pub[0]} {pub[1]}"
        known.append(host.host_key_line)
        cluster.hosts.append(host)
    cluster.known_hosts.write_text("\n".join(known) + "\n")
    for host in cluster.hosts:
        _wait_for_port(host)
    return cluster


def _wait_for_port(host: Host, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = host.exec("bash", "-c", f"exec 3<>/dev/tcp/{host.address}/22", check=False)
        if probe.returncode == 0:
            return
        if host.sshd.poll() is not None:
            raise RuntimeError(f"sshd on {host.netns} exited with {host.sshd.returncode}")
        time.sleep(0.2)
    raise RuntimeError(f"sshd on {host.netns} did not start")


def teardown(count: int, cluster: Cluster | None = None) -> None:
    for host in cluster.hosts if cluster else []:
        host.kill()
    for i in range(1, count + 1):
        run("ip", "netns", "del", f"lch-n{i}", check=False)
        run("ip", "link", "del", f"lch-p{i}", check=False)
    run("ip", "link", "del", BRIDGE, check=False)
    if cluster and cluster.lock:
        cluster.lock.close()
        cluster.lock = None

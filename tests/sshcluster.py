"""Real test hosts: Linux network namespaces joined by a bridge, each with its own PID and mount namespace,
its own disk and its own sshd.

Each host is `ip netns` + `unshare --pid --mount`: its processes are invisible to the other hosts, and killing
its sshd (PID 1 of the host) ends everything that ran there, as a lost machine would. Its disk is its own:
/tmp, /srv, /home and root's home are empty tmpfs mounts and /etc is an overlay, all seen only inside the
host, so a file reaches a host over SSH or not at all. What stays shared is the installed software: the
system, the Python interpreter (also when it lives under root's home) and the tests' virtualenv, in which
the launcher's own package is hidden (an empty tmpfs): a node runs nothing of it but what is staged.
A test reads and writes a host's files through Host.path() (/proc/<pid>/root of its sshd).

Every host has root and a user `trainer` (uid 1500), both logging in with the cluster's key. A host can get
another Python environment (ENVS) so that the launcher's tool and version checks meet a real difference.
With jump=True the nodes sit on a second bridge this machine has no route to; only the jump host, which is
on both bridges, reaches them.

The bridges, namespaces and addresses have fixed names, so one cluster exists at a time on a machine:
build() holds an exclusive lock (flock) until teardown(), and a second test session waits for it.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.231.0"  # this machine (.1), the jump host (.2) and, without a jump host, the nodes (.11 on)
INNER_SUBNET = "10.232.0"  # the nodes behind a jump host; this machine has no route there
BRIDGE, INNER_BRIDGE = "lch-br0", "lch-br1"
HOST_FILES = Path("/run/lch-sshcluster")  # sshd configs and host keys, outside the hosts' private mounts
LOCK = Path("/run/lock" if Path("/run/lock").is_dir() else tempfile.gettempdir()) / "lch-sshcluster.lock"
TRAINER_UID = 1500
WORKDIR = "/srv/launcher-runs"  # the example job's work directory on every node
DATA_DIR = "/srv/data"
SFTP_LOG = "/tmp/sftp-server.log"  # on each host's own disk  # where a test puts a node's copy of the dataset, as the example job reads it
VENV = Path(sys.prefix)
SITE_PACKAGES = VENV / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
OLDER_MINDFORMERS = "1.7.0"
# Each host's own empty folders (tmpfs), with their modes: 755 on root's home lets trainer reach a kept
# interpreter there.
PRIVATE_DIRS = {Path("/root"): "755", Path("/tmp"): "1777", Path("/srv"): "755", Path("/home"): "755"}
# Another Python environment for a host, at the same path as the tests' virtualenv:
# - "bare": a new virtualenv with nothing installed (no MindSpore, MindFormers or msrun);
# - "mindformers-1.7.0": the tests' virtualenv with MindFormers 1.7.0 (the real package, from its wheel)
#   in place of 1.8.0.
ENVS = ("bare", f"mindformers-{OLDER_MINDFORMERS}")


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=60)


def wheel_cache() -> Path:
    """Where scripts/setup keeps wheels (the same rule as there)."""
    cache = os.environ.get("LAUNCHER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "launcher"
    return Path(cache) / "wheels"


def missing_capabilities() -> str | None:
    """Why this machine cannot build test hosts, or None."""
    if os.geteuid() != 0:
        return "building network namespaces needs root"
    for tool in ("ip", "unshare", "nsenter", "ssh-keygen"):
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
    index: int  # 1.. for nodes, 0 for the jump host
    netns: str
    address: str
    veth: str  # the host's end, inside its namespace
    port: int = 22
    sshd: subprocess.Popen | None = None
    host_key_line: str = ""

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command inside the host's network namespace (not its PID or mount namespace)."""
        return run("ip", "netns", "exec", self.netns, *argv, check=check)

    def enter(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command on the host: its network, PID and mount namespaces (its own disk)."""
        return run(*self.enter_argv(*argv), check=check)

    def enter_argv(self, *argv: str, cwd: str = "/") -> list[str]:
        # nsenter opens --wd before it enters the mount namespace, so a directory on the host's disk is
        # entered by a shell once inside; exec leaves argv as the process's command line.
        return ["ip", "netns", "exec", self.netns, "nsenter", f"--target={self.sshd_pid()}", "--pid", "--mount",
                "--wd=/", "sh", "-c", 'cd "$0" && exec "$@"', cwd, *argv]

    def path(self, path: str | Path) -> Path:
        """A path on the host's own disk, as this machine reaches it (through its sshd's root)."""
        return Path(f"/proc/{self.sshd_pid()}/root") / str(path).lstrip("/")

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

    @property
    def known_hosts_name(self) -> str:
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"


@dataclass
class Cluster:
    root: Path
    identity_file: Path
    known_hosts: Path
    hosts: list[Host] = field(default_factory=list)
    jump: Host | None = None
    lock: object = None  # the open LOCK file while the cluster exists
    lock_wait: float = 0.0  # seconds build() waited for another session's cluster

    def place_dataset(self, dataset: Path, hosts: list[Host] | None = None) -> str:
        """Copy a MindRecord file (and its .db) onto each host's disk, as an admin would; its path there."""
        for host in self.hosts if hosts is None else hosts:
            target = host.path(DATA_DIR)
            target.mkdir(parents=True, exist_ok=True)
            for companion in (dataset, dataset.with_name(dataset.name + ".db")):
                if companion.is_file():
                    shutil.copyfile(companion, target / companion.name)
        return f"{DATA_DIR}/{dataset.name}"


def _exclusive_lock():
    lock = open(LOCK, "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def build_or_skip(root: Path, count: int, **options) -> Cluster:
    """build, in a test: a machine that cannot host the cluster skips the test, and fails it in CI."""
    import pytest

    reason = missing_capabilities()
    if reason:
        if os.environ.get("LAUNCHER_TESTS_STRICT"):
            pytest.fail(f"SSH end-to-end tests must run in CI: {reason}")
        pytest.skip(reason)
    return build(root, count, **options)


def build(root: Path, count: int, jump: bool = False, port: int = 22, envs: dict[int, str] | None = None,
          disks: dict[int, str] | None = None) -> Cluster:
    """count node hosts (index 1..count), each sshd on `port`. envs: host index -> one of ENVS;
    disks: host index -> the size of its /srv (a tmpfs size such as "64m"; default: half the memory)."""
    started = time.monotonic()
    lock = _exclusive_lock()
    waited = time.monotonic() - started
    try:
        cluster = _build(root, count, jump, port, envs or {}, disks or {})
    except BaseException:
        teardown(count + 4)
        lock.close()
        raise
    cluster.lock, cluster.lock_wait = lock, waited
    return cluster


def _build(root: Path, count: int, jump: bool, port: int, envs: dict[int, str], disks: dict[int, str]) -> Cluster:
    root.mkdir(parents=True, exist_ok=True)
    teardown(count + 4)  # leftovers from an earlier, interrupted test run
    HOST_FILES.mkdir(mode=0o700)
    key = root / "id_ed25519"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "launcher-tests", "-f", str(key))
    shutil.copy(root / "id_ed25519.pub", HOST_FILES / "authorized_keys")
    Path("/run/sshd").mkdir(exist_ok=True)
    cluster = Cluster(root, key, root / "known_hosts")
    _bridge(BRIDGE, f"{SUBNET}.1/24")
    node_subnet, node_bridge = SUBNET, BRIDGE
    if jump:
        _bridge(INNER_BRIDGE, None)
        run("ip", "route", "add", "unreachable", f"{INNER_SUBNET}.0/24")
        cluster.jump = Host(0, "lch-j", f"{SUBNET}.2", "lch-vj")
        _add_host(cluster.jump, [(BRIDGE, cluster.jump.address, "lch-vj", "lch-pj"),
                                 (INNER_BRIDGE, f"{INNER_SUBNET}.2", "lch-wj", "lch-qj")])
        node_subnet, node_bridge = INNER_SUBNET, INNER_BRIDGE
    for i in range(1, count + 1):
        host = Host(i, f"lch-n{i}", f"{node_subnet}.{10 + i}", f"lch-v{i}", port)
        _add_host(host, [(node_bridge, host.address, host.veth, f"lch-p{i}")])
        cluster.hosts.append(host)
    for host in [cluster.jump] * jump + cluster.hosts:
        _start_sshd(root, host, envs.get(host.index), disks.get(host.index))
    cluster.known_hosts.write_text("".join(f"{h.host_key_line}\n" for h in [cluster.jump] * jump + cluster.hosts))
    for host in [cluster.jump] * jump + cluster.hosts:
        _wait_for_port(host)
    return cluster


def _bridge(name: str, address: str | None) -> None:
    run("ip", "link", "add", name, "type", "bridge")
    if address:
        run("ip", "addr", "add", address, "dev", name)
    run("ip", "link", "set", name, "up")


def _add_host(host: Host, links: list[tuple[str, str, str, str]]) -> None:
    """The host's network namespace with one veth per (bridge, address, inner name, bridge-side name)."""
    run("ip", "netns", "add", host.netns)
    for bridge, address, inner, outer in links:
        run("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
        run("ip", "link", "set", outer, "master", bridge)
        run("ip", "link", "set", outer, "up")
        run("ip", "link", "set", inner, "netns", host.netns)
        host.exec("ip", "addr", "add", f"{address}/24", "dev", inner)
        host.exec("ip", "link", "set", inner, "up")
    host.exec("ip", "link", "set", "lo", "up")


def _start_sshd(root: Path, host: Host, env: str | None, disk: str | None) -> None:
    files = HOST_FILES / f"host{host.index}"
    files.mkdir()
    host_key = files / "ssh_host_ed25519_key"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
    config = files / "sshd_config"
    config.write_text(
        f"ListenAddress {host.address}\nPort {host.port}\nHostKey {host_key}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"UsePAM no\nStrictModes no\nPidFile {files}/sshd.pid\nAcceptEnv LANG\n"
        # Debian's default sftp-server, logging (-e -l INFO) each file's close with the bytes read into the
        # host's /tmp (SFTP_LOG), so a test can see what was sent. sshd runs it through the user's shell.
        f"Subsystem sftp /usr/lib/openssh/sftp-server -e -l INFO 2>>{SFTP_LOG}\nMaxSessions 64\nMaxStartups 64\n"
    )
    host.sshd = subprocess.Popen(
        ["ip", "netns", "exec", host.netns, "unshare", "--pid", "--fork", "--kill-child", "--mount",
         "--propagation", "private", "bash", "-c", _host_setup(files, env, disk), "host-setup"],
        stdout=subprocess.DEVNULL, stderr=open(root / f"sshd{host.index}.log", "w"),
    )
    pub = (files / "ssh_host_ed25519_key.pub").read_text().split()
    host.host_key_line = f"{host.known_hosts_name} {pub[0]} {pub[1]}"


def _host_setup(files: Path, env: str | None, disk: str | None) -> str:
    """The shell that makes a host's own disk in its new mount namespace, then becomes its sshd (PID 1)."""
    q = shlex.quote
    base = Path(sys.base_prefix)
    lines = ["set -euo pipefail", "mount -t proc proc /proc"]
    if env == "bare":
        lines.append(f"mount -t tmpfs -o mode=755 tmpfs {q(str(VENV))}")
        lines.append(f"{q(str(Path(sys.base_prefix) / 'bin' / 'python3'))} -m venv --without-pip {q(str(VENV))}")
    elif env == f"mindformers-{OLDER_MINDFORMERS}":
        older = _unpacked_older_mindformers()
        lines.append(f"mount --bind {q(str(older / 'mindformers'))} {q(str(SITE_PACKAGES / 'mindformers'))}")
        [dist_info] = SITE_PACKAGES.glob("mindformers-*.dist-info")
        lines.append(f"mount --bind {q(str(older / f'mindformers-{OLDER_MINDFORMERS}.dist-info'))} {q(str(dist_info))}")
    elif env is not None:
        raise ValueError(f"unknown host environment {env!r}; one of {ENVS}")
    if env != "bare":  # a node has MindSpore and MindFormers, not the launcher: what it runs arrives over SSH
        lines += [f"mount --bind /dev/null {q(str(pth))}" for pth in SITE_PACKAGES.glob("*editable*launcher*.pth")]
        if (SITE_PACKAGES / "launcher").is_dir():
            lines.append(f"mount -t tmpfs -o mode=755 tmpfs {q(str(SITE_PACKAGES / 'launcher'))}")
    # Installed software under a folder the host gets empty (pyenv under root's home, a virtualenv in a
    # clone under /tmp) stays visible: bound aside with what is mounted on it, then moved back on top.
    kept = [p for p in dict.fromkeys([base, VENV]) if any(p.is_relative_to(d) for d in PRIVATE_DIRS)]
    for i, path in enumerate(kept):
        lines += [f"mkdir -p {files}/kept{i}", f"mount --rbind {q(str(path))} {files}/kept{i}"]
    lines += [f"mount -t tmpfs -o mode={mode} tmpfs {d}" for d, mode in PRIVATE_DIRS.items()]
    if disk:
        lines.append(f"mount -o remount,size={disk} /srv")
    for i, path in enumerate(kept):
        lines += [f"mkdir -p {q(str(path))}", f"mount --move {files}/kept{i} {q(str(path))}"]
    overlay = f"{files}/etc-overlay"
    lines += [
        # /etc of its own: the trainer account, /etc/hccn.conf and the like are this host's alone.
        f"mkdir -p {overlay} && mount -t tmpfs tmpfs {overlay} && mkdir {overlay}/upper {overlay}/work",
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={overlay}/upper,workdir={overlay}/work /etc",
        f"echo 'trainer:x:{TRAINER_UID}:{TRAINER_UID}::/home/trainer:/bin/bash' >>/etc/passwd",
        f"echo 'trainer:x:{TRAINER_UID}:' >>/etc/group",
        "echo 'trainer:*:19000:0:99999:7:::' >>/etc/shadow",
        f"for home in /root /home/trainer; do mkdir -p $home/.ssh && cp {files}/../authorized_keys $home/.ssh/; done",
        f"chown -R {TRAINER_UID}:{TRAINER_UID} /home/trainer",
        f"exec /usr/sbin/sshd -D -e -f {files}/sshd_config",
    ]
    return "\n".join(lines)


def _unpacked_older_mindformers() -> Path:
    """MindFormers OLDER_MINDFORMERS, unpacked from the wheel scripts/setup downloads, under HOST_FILES."""
    wheel = wheel_cache() / f"mindformers-{OLDER_MINDFORMERS}-py3-none-any.whl"
    if not wheel.is_file():
        raise RuntimeError(f"{wheel} is missing: scripts/setup downloads it")
    target = HOST_FILES / f"mindformers-{OLDER_MINDFORMERS}"
    if not target.is_dir():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
    return target


def _wait_for_port(host: Host, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = host.exec("bash", "-c", f"exec 3<>/dev/tcp/{host.address}/{host.port}", check=False)
        if probe.returncode == 0:
            return
        if host.sshd.poll() is not None:
            raise RuntimeError(f"sshd on {host.netns} exited with {host.sshd.returncode}")
        time.sleep(0.2)
    raise RuntimeError(f"sshd on {host.netns} did not start")


def teardown(count: int, cluster: Cluster | None = None) -> None:
    for host in ([cluster.jump] if cluster and cluster.jump else []) + (cluster.hosts if cluster else []):
        host.kill()
    for i in range(1, count + 1):
        run("ip", "netns", "del", f"lch-n{i}", check=False)
        run("ip", "link", "del", f"lch-p{i}", check=False)
    run("ip", "netns", "del", "lch-j", check=False)
    for link in ("lch-pj", "lch-qj", BRIDGE, INNER_BRIDGE):
        run("ip", "link", "del", link, check=False)
    run("ip", "route", "del", "unreachable", f"{INNER_SUBNET}.0/24", check=False)
    shutil.rmtree(HOST_FILES, ignore_errors=True)
    if cluster and cluster.lock:
        cluster.lock.close()
        cluster.lock = None

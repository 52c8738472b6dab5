"""The contract every backend keeps, as the same scenarios run through the `launcher` command on each:

- local: the ranks are processes of this machine;
- ssh: two real sshd hosts in network and PID namespaces of their own (sshcluster.py);
- k8s: a real control plane (etcd, kube-apiserver, controller manager, scheduler) and a node agent that
  plays the kubelet, the one test double (k8scluster.py).

The ranks are real MindSpore/MindFormers processes of a tiny 2-rank LoRA job. Whether anything is left
of a run is judged from outside the launcher, never by its own finder: the process table (/proc: command
line, environment, working directory) in the PID namespaces where the run's processes live, and on
Kubernetes also the pod runner's children and the objects in the emulated API.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import k8scluster
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
    pid_namespace,
    run_launcher,
    wait_until,
)

pytestmark = pytest.mark.e2e
VENV_BIN = str(Path(sys.executable).parent)
FAULT = {"LAUNCHER_FAULT": "1:3"}  # the entrypoint's drill: rank 1 raises at step 3
STEPS = 16  # what the tiny job trains
# SIGINT reaches the launcher as Ctrl-C would even when these tests run with SIGINT ignored (a background
# job of a non-interactive shell), which a child would inherit and Python would then leave ignored.
SIGINT_AS_CTRL_C = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                    "os.execv(sys.argv[1], sys.argv[1:])"]
# A run that is stopped on purpose trains long enough that nothing of it can end by itself meanwhile.
LONG = {"runner_config.epochs": 100}


class Backend:
    """How one backend is driven by the scenarios: its job file, its `launcher` options and environment,
    and what of a run is left on it."""

    name = ""
    example = ""
    launches = ("msrun",)  # the launch modes the run that trains to the end is tried with
    launch_of_the_reconnect_run = "msrun"  # the launch mode of the run that new processes reach
    job_env: dict | None = None  # the env: of those two runs
    console_outlives_the_ranks = True  # whether a rank's console log can be gathered after `down`
    can_purge = False  # whether `down --purge` removes something the backend leaves (node directories)
    follow_ends_after_down = True  # whether `logs -f` returns once `down` stopped the run

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.launch = "msrun"
        self.started: list[subprocess.Popen] = []

    # -- setting up and tearing down --------------------------------------------------------------------
    def open(self) -> None:
        pass

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if not hasattr(self, "cluster") and self.name != "local":
            return  # skipped before it was built
        self.stop()
        # What a failed test left running is ended here, found the same way.
        runs = self.tmp_path / "runs"
        for run in runs.iterdir() if runs.is_dir() else []:
            kill_listed(self.processes(run.name))

    def stop(self) -> None:
        """Take down what open() built."""

    # -- the job and the launcher -------------------------------------------------------------------------
    def job(self, dataset, launch: str = "msrun", env: dict | None = None, long: bool = False) -> Path:
        data = yaml.safe_load((EXAMPLES / self.example).read_text())
        data["dataset"]["path"] = self.dataset_path(Path(dataset))
        data["cluster"].update(launch=launch, master_port=free_port())
        self.configure(data["cluster"])
        if env:
            data["env"] = env
        if long:
            data.setdefault("mindformers", {}).setdefault("overrides", {}).update(LONG)
        self.launch = launch
        path = self.tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def configure(self, cluster: dict) -> None:
        pass

    def dataset_path(self, dataset: Path) -> str:
        """Where the ranks read the dataset."""
        return str(dataset)

    def env(self) -> dict | None:
        return None

    def up_options(self) -> list[str]:
        return []

    def cli(self, *args, timeout: float = 600) -> subprocess.CompletedProcess:
        return run_launcher(*args, cwd=self.tmp_path, env=self.env(), timeout=timeout)

    def up(self, job: Path) -> subprocess.CompletedProcess:
        return self.cli("up", job, *self.up_options())

    def start(self, *args, stdout=subprocess.PIPE) -> subprocess.Popen:
        """`launcher ARGS...` in the background."""
        proc = subprocess.Popen([*SIGINT_AS_CTRL_C, LAUNCHER, *map(str, args)], cwd=self.tmp_path, env=self.env(),
                                stdout=stdout, stderr=subprocess.PIPE, text=True)
        self.started.append(proc)
        return proc

    # -- what the backend shows ---------------------------------------------------------------------------
    def rank_logs(self) -> list[Path]:
        """MindFormers' info.log of every rank that has started."""
        raise NotImplementedError

    def rank_failed(self, run_id: str) -> str:
        return "error: rank 1 failed"

    def assert_running(self, run_id: str, status: str) -> None:
        """`launcher status` output while both ranks run."""
        assert f"run {run_id}: running" in status, status

    def down_says(self, run_id: str) -> str:
        return f"run {run_id}: no process left"

    def processes(self, run_id: str) -> list[str]:
        """The run's processes, from /proc."""
        raise NotImplementedError

    def leftovers(self, run_id: str) -> list[str]:
        """Everything of the run that still exists."""
        return self.processes(run_id)

    def assert_seen_running(self, run_id: str) -> None:
        """The outside check sees the running ranks (so that an empty answer later means something)."""
        assert len(self.processes(run_id)) >= 2, self.processes(run_id)

    def spawn_unmarked(self, run_id: str) -> subprocess.Popen:
        """A process of the run that lost every marker variable: only its working directory tells."""
        raise NotImplementedError

    def check_unmarked(self, found: str) -> None:
        """Where the outside check saw that process."""

    # -- checks only this backend can make ------------------------------------------------------------------
    def check_success(self, run_dir: Path) -> None:
        pass

    def check_connected(self, run_dir: Path) -> None:
        """The ranks found each other (once they train)."""

    def check_failure(self, run_dir: Path) -> None:
        pass

    def check_purge(self, run_dir: Path) -> None:
        purge = self.cli("down", run_dir.name, "--purge")
        assert purge.returncode == 2 and "--purge removes node directories of ssh runs" in purge.stderr, purge


def scrubbed_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("LAUNCHER_")}


class Local(Backend):
    """The ranks run on this machine, in the run directory."""

    name = "local"
    example = "tiny-lora-local.yaml"
    launches = ("msrun", "ranktable")
    launch_of_the_reconnect_run = "ranktable"

    def rank_logs(self):
        return list((self.tmp_path / "runs").glob("*/output/log/rank_*/info.log"))

    def run_dir(self, run_id):
        return self.tmp_path / "runs" / run_id

    def processes(self, run_id):
        return outside_processes(run_id, roots=[self.run_dir(run_id)])

    def assert_running(self, run_id, status):
        super().assert_running(run_id, status)
        assert re.search(r"\b[1-9]\d* processes alive", status), status

    def spawn_unmarked(self, run_id):
        self.run_dir(run_id).mkdir(parents=True)
        proc = subprocess.Popen(["sleep", "300"], cwd=self.run_dir(run_id), env=scrubbed_env(),
                                start_new_session=True)
        self.started.append(proc)
        return proc



def kill_listed(lines: list[str]) -> None:
    for line in lines:
        try:
            os.kill(int(line.split()[1]), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


class Ssh(Backend):
    """Two hosts of sshcluster.py, each with its own disk: the example's work directory and a copy of the
    dataset on each, read here through the host's root."""

    name = "ssh"
    example = "tiny-lora-ssh.yaml"
    launches = ("msrun", "ranktable")
    launch_of_the_reconnect_run = "ranktable"
    can_purge = True
    job_env = {"GLOG_v": "1"}  # the scheduler logs the address each worker connects from

    def open(self):
        self.cluster = sshcluster.build_or_skip(self.tmp_path / "cluster", 2)
        # Each host is PID 1 (its sshd) of a PID namespace of its own, a child of this test's.
        self.namespaces = {pid_namespace(h.sshd_pid()): h for h in self.cluster.hosts}
        self.namespaces[pid_namespace(os.getpid())] = None

    def stop(self):
        if getattr(self, "cluster", None):
            sshcluster.teardown(2, self.cluster)  # killing each host's PID 1 ends whatever ran there

    def configure(self, cluster):
        cluster["ssh"].update(identity_file=str(self.cluster.identity_file),
                              known_hosts=str(self.cluster.known_hosts), path_prefix=[VENV_BIN])
        for node, host in zip(cluster["nodes"], self.cluster.hosts):
            node["host"] = host.address  # each node's work directory: the example's, sshcluster.WORKDIR

    def dataset_path(self, dataset):
        return self.cluster.place_dataset(dataset)

    def node_dir(self, node: int, run_id: str = "") -> Path:
        """A node's run directory on its own disk, as this machine reaches it."""
        return self.cluster.hosts[node].path(sshcluster.WORKDIR) / run_id

    def check_resume_staged(self, run_id, resumed_from):
        # Each node was given only its own rank's checkpoint to resume from.
        for rank in (0, 1):
            staged = self.node_dir(rank, run_id) / "resume"
            assert sorted(p.name for p in staged.iterdir()) == [f"rank_{rank}"], staged

    def rank_logs(self):
        return [log for i in range(2) for log in self.node_dir(i).glob("*/output/log/rank_*/info.log")]

    def processes(self, run_id):
        # The run directory as the processes on the hosts see it (their working directory).
        return outside_processes(run_id, roots=[f"{sshcluster.WORKDIR}/{run_id}"], namespaces=set(self.namespaces))

    def assert_seen_running(self, run_id):
        found = self.processes(run_id)
        for ns, host in self.namespaces.items():
            if host is not None:
                assert any(f"({ns})" in line for line in found), (host.address, found)

    def rank_failed(self, run_id):
        return f"error: rank 1 failed (node 1, {self.cluster.hosts[1].address})"

    def assert_running(self, run_id, status):
        super().assert_running(run_id, status)
        for i, host in enumerate(self.cluster.hosts):
            assert f"node {i} ({host.address}): running" in status, status

    def spawn_unmarked(self, run_id):
        host = self.cluster.hosts[1]
        self.node_dir(1, run_id).mkdir(parents=True)
        proc = subprocess.Popen(host.enter_argv("env", "-i", "sleep", "300", cwd=f"{sshcluster.WORKDIR}/{run_id}"),
                                env=scrubbed_env(), start_new_session=True)
        self.started.append(proc)
        return proc

    def check_unmarked(self, found):
        host = self.cluster.hosts[1]
        assert self.namespaces[found.split("(")[1].split(")")[0]] is host, found  # seen inside host 2

    def check_connected(self, run_dir):
        # The scheduler on the first host saw the second host's worker connect from its own address.
        logs = "msrun_log" if self.launch == "msrun" else "rank_log"
        sched = self.node_dir(0, run_dir.name) / "output" / logs / "scheduler.log"
        address = self.cluster.hosts[1].address
        wait_until(lambda: not (sched.is_file() and address in sched.read_text()), timeout=30)
        assert address in sched.read_text()

    def check_failure(self, run_dir):
        for node in (0, 1):
            assert (run_dir / "nodes" / f"node-{node}" / "node.log").is_file()

    def check_purge(self, run_dir):
        assert all(self.node_dir(i, run_dir.name).is_dir() for i in range(2))
        purge = self.cli("down", run_dir.name, "--purge")
        assert purge.returncode == 0, purge.stderr
        assert "node directories removed" in purge.stdout
        assert not any(self.node_dir(i, run_dir.name).exists() for i in range(2))


class K8s(Backend):
    """k8scluster.py's real control plane and its node agent, with the output claim as a local directory."""

    name = "k8s"
    example = "tiny-lora-k8s.yaml"
    claim = "launcher-output"
    console_outlives_the_ranks = False  # a pod's log is gone with the pod; output/ stays on the claim

    def open(self):
        self.cluster = k8scluster.Cluster(self.tmp_path / "cluster")

    def stop(self):
        self.cluster.stop()  # kills every process the node agent started, then empties the namespace

    def configure(self, cluster):
        cluster["k8s"].update(output_pvc=self.claim)

    def env(self):
        return {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)}

    def up_options(self):
        return ["--pvc-dir", self.cluster.runner.pvc_dir(self.claim)]

    def rank_logs(self):
        return list(self.cluster.runner.pvc_dir(self.claim).glob("runs/*/log/rank_*/info.log"))

    def check_resume_staged(self, run_id, resumed_from):
        # The checkpoint went onto the claim, into the attempt's folder its pods mount at output/: the
        # very bytes of the gathered files the attempt resumed from.
        staged = self.cluster.runner.pvc_dir(self.claim) / "runs" / run_id / "resume"
        assert sorted(p.name for p in staged.iterdir()) == ["rank_0", "rank_1"], staged
        for rank, gathered in resumed_from["files"].items():
            [copy] = (staged / f"rank_{rank}").iterdir()
            assert copy.read_bytes() == (self.tmp_path / "runs" / run_id.rsplit("-a", 1)[0] / gathered).read_bytes()

    def processes(self, run_id):
        # Pod names start with the run id, and so does every path the runner gives a pod.
        return outside_processes(run_id, roots=[self.cluster.runner.pvc_dir(self.claim)])

    def leftovers(self, run_id):
        objects = set(self.cluster.objects(f"launcher/run-id={run_id}"))
        objects |= {o for o in self.cluster.objects("") if run_id in o}  # also one that lost its label
        return ([f"API object {o}" for o in sorted(objects)]
                + [f"pod runner child {pid}" for pid in self.cluster.runner.alive()]
                + [f"pod runner error {e}" for e in self.cluster.runner.errors]
                + self.processes(run_id))

    def assert_seen_running(self, run_id):
        super().assert_seen_running(run_id)
        assert len(self.cluster.runner.alive()) >= 2

    def rank_failed(self, run_id):
        return f"error: rank 1 failed (pod {run_id}-rank-1)"

    def assert_running(self, run_id, status):
        super().assert_running(run_id, status)
        for rank in (0, 1):
            assert f"pod {run_id}-rank-{rank} (rank {rank}): Running" in status, status

    def down_says(self, run_id):
        return f"run {run_id}: every object with label launcher/run-id={run_id} is deleted"

    def spawn_unmarked(self, run_id):
        """A pod of the run without its label, whose container runs with no environment at all."""
        self.cluster.runner.core.create_namespaced_pod("default", {
            "metadata": {"name": f"{run_id}-stray"},
            "spec": {"restartPolicy": "Never",
                     "containers": [{"name": "stray", "image": "busybox", "command": ["env", "-i", "sleep", "300"]}]}})
        wait_until(lambda: not self.cluster.runner.alive())
        assert self.cluster.runner.alive(), "the pod runner did not start the pod"
        return None

    def check_success(self, run_dir):
        run_id = run_dir.name
        for rank in (0, 1):
            assert "loss" in (run_dir / "ranks" / f"rank_{rank}" / "console.log").read_text()  # read through the API
        # Names are unique per run, every object carries the run id, and the pods are owned by the ConfigMap.
        pods = {name: pod for name, pod in self.cluster.runner.seen.items() if name.startswith(run_id)}
        assert sorted(pods) == [f"{run_id}-rank-0", f"{run_id}-rank-1"]
        owners = {pod["metadata"]["ownerReferences"][0]["uid"] for pod in pods.values()}
        assert len(owners) == 1 and owners != {"00000000-0000-0000-0000-000000000000"}
        assert all(pod["metadata"]["labels"]["launcher/run-id"] == run_id for pod in pods.values())
        # A pod's log is read as it grows through one follow stream (a second only if the first ended
        # early), and once whole to gather it: not again and again while the run is watched.
        for name in pods:
            reads = self.cluster.log_requests(name)
            follows = [uri for uri in reads if "follow=true" in uri]
            assert 1 <= len(follows) <= 2 and len(reads) - len(follows) == 1, reads


BACKENDS = {cls.name: cls for cls in (Local, Ssh, K8s)}


@pytest.fixture(params=list(BACKENDS))
def backend(request, tmp_path):
    chosen = BACKENDS[request.param](tmp_path)
    try:
        chosen.open()
        yield chosen
    finally:
        chosen.close()


def assert_nothing_left(backend: Backend, run_id: str) -> None:
    left = wait_until(lambda: backend.leftovers(run_id), timeout=15)
    assert not left, "left of the run:\n" + "\n".join(left)


def manifest_problems(run_dir: Path) -> list[str]:
    """manifest.json checked here, file by file (size and sha256), without the launcher's code."""
    files = json.loads((run_dir / "manifest.json").read_text())["files"]
    problems = []
    for rel, meta in files.items():
        path = run_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != meta["size"] or hashlib.sha256(path.read_bytes()).hexdigest() != meta["sha256"]:
            problems.append(f"{rel}: differs")
    return problems


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def wait_for_ranks(backend: Backend, proc: subprocess.Popen) -> Path:
    """The run directory, once both ranks have started training (their MindFormers logs exist)."""
    deadline = time.monotonic() + 180
    while len(backend.rank_logs()) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.5)
    return only_run(backend.tmp_path)


def test_the_outside_check_finds_a_process_that_lost_its_markers(backend):
    run_id = "tiny-lora-20000101-000000"
    stray = backend.spawn_unmarked(run_id)
    wait_until(lambda: not [line for line in backend.processes(run_id) if line.endswith(": sleep 300")])
    found = [line for line in backend.processes(run_id) if line.endswith(": sleep 300")]
    assert len(found) == 1, backend.processes(run_id)
    backend.check_unmarked(found[0])
    if stray is not None:
        os.killpg(stray.pid, signal.SIGKILL)
        stray.wait()
    else:  # deleting the pod from the API is what stops it
        backend.cluster.runner.core.delete_namespaced_pod(f"{run_id}-stray", "default")
    assert_nothing_left(backend, run_id)


TRAINS = [(cls.name, launch) for cls in BACKENDS.values() for launch in cls.launches]


@pytest.mark.parametrize("backend, launch", TRAINS, indirect=["backend"], ids=[f"{b}-{m}" for b, m in TRAINS])
def test_a_run_trains_and_is_gathered_and_verified(backend, launch, tiny_dataset):
    result = backend.up(backend.job(tiny_dataset, launch=launch, env=backend.job_env))
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run(backend.tmp_path)
    run_id = run_dir.name
    assert_lora_checkpoints(run_dir, world=2)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "succeeded" and record(run_dir)["state"] == "succeeded"
    for rank in ("0", "1"):
        r = summary["ranks"][rank]
        assert r["steps"] == STEPS and r["total_steps"] == STEPS
        assert r["losses_finite"] is True and math.isfinite(r["last_loss"])
        assert r["tokens_per_s"] > 0
        assert (run_dir / "ranks" / f"rank_{rank}" / "console.log").is_file()
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert (run_dir / "plan" / "plan.json").is_file()
    manifest = json.loads((run_dir / "manifest.json").read_text())["files"]
    assert manifest_problems(run_dir) == []
    for rank in (0, 1):
        assert any(k.startswith(f"ranks/rank_{rank}/checkpoint/") and k.endswith(".ckpt") for k in manifest)
    backend.check_success(run_dir)
    backend.check_connected(run_dir)
    assert_nothing_left(backend, run_id)

    if launch != backend.launches[0]:
        return  # what follows does not depend on the launch mode
    # A new process reaches the finished run.
    status = backend.cli("status", run_id)
    assert status.returncode == 0 and f"run {run_id}: succeeded" in status.stdout and "16/16" in status.stdout, status
    logs = backend.cli("logs", run_id, "--rank", "1")
    assert logs.returncode == 0 and "loss" in logs.stdout, logs
    again = backend.cli("gather", run_id)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"verified {len(manifest)} files" in again.stdout
    # A damaged file is reported, not hidden.
    info = run_dir / "ranks" / "rank_0" / "log" / "info.log"
    info.write_text(info.read_text() + "tampered\n")
    damaged = backend.cli("gather", run_id)
    assert damaged.returncode == 1
    assert "ranks/rank_0/log/info.log: content differs from the manifest" in damaged.stderr
    assert_nothing_left(backend, run_id)


def test_a_failing_rank_is_named_and_the_other_stopped(backend, tiny_dataset):
    result = backend.up(backend.job(tiny_dataset, env=FAULT))
    assert result.returncode == 1, result.stdout + result.stderr
    run_dir = only_run(backend.tmp_path)
    assert backend.rank_failed(run_dir.name) in result.stderr
    assert "LAUNCHER_FAULT: rank 1 fails at step 3" in result.stderr  # from the tail of its log
    assert record(run_dir)["state"] == "failed" and record(run_dir)["failed_rank"] == 1
    for rank in (0, 1):  # gathered although the run failed
        assert (run_dir / "ranks" / f"rank_{rank}" / "log" / "info.log").is_file()
        assert (run_dir / "ranks" / f"rank_{rank}" / "console.log").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed_rank"] == 1
    assert summary["ranks"]["1"]["steps"] < STEPS and summary["ranks"]["0"]["steps"] < STEPS
    assert manifest_problems(run_dir) == []
    backend.check_failure(run_dir)
    assert_nothing_left(backend, run_dir.name)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_launcher_leaves_nothing(backend, tiny_dataset, sig):
    proc = backend.start("up", backend.job(tiny_dataset, long=True), *backend.up_options())
    run_dir = wait_for_ranks(backend, proc)
    backend.assert_seen_running(run_dir.name)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert f"interrupted: every rank of {run_dir.name} was stopped" in stderr
    assert record(run_dir)["state"] == "interrupted"
    assert (run_dir / "manifest.json").is_file() and manifest_problems(run_dir) == []
    assert_nothing_left(backend, run_dir.name)


def test_new_processes_reach_a_run_whose_launcher_died(backend, tiny_dataset):
    job = backend.job(tiny_dataset, launch=backend.launch_of_the_reconnect_run, env=backend.job_env, long=True)
    proc = backend.start("up", job, *backend.up_options())
    run_dir = wait_for_ranks(backend, proc)
    run_id = run_dir.name
    backend.check_connected(run_dir)
    proc.kill()  # the launcher dies (a closed laptop) and stops nothing; the ranks keep training
    proc.wait()
    backend.assert_seen_running(run_id)

    status = backend.cli("status", run_id)
    assert status.returncode == 0, status.stderr
    backend.assert_running(run_id, status.stdout)
    followed = backend.tmp_path / "follow.out"
    with followed.open("w") as out:
        follow = backend.start("logs", run_id, "-f", stdout=out)
    wait_until(lambda: "[rank 0] " not in followed.read_text() or "[rank 1] " not in followed.read_text(), timeout=60)
    assert "[rank 0] " in followed.read_text() and "[rank 1] " in followed.read_text()

    down = backend.cli("down", run_id)
    assert down.returncode == 0, down.stdout + down.stderr
    assert backend.down_says(run_id) in down.stdout
    try:
        follow.communicate(timeout=20 if backend.follow_ends_after_down else 5)  # follows until the run ends
    except subprocess.TimeoutExpired:
        follow.kill()
        follow.communicate()
    assert_nothing_left(backend, run_id)

    gathered = backend.cli("gather", run_id)
    assert gathered.returncode == 0, gathered.stdout + gathered.stderr
    files = len(json.loads((run_dir / "manifest.json").read_text())["files"])
    assert f"verified {files} files" in gathered.stdout
    for rank in (0, 1):
        assert (run_dir / "ranks" / f"rank_{rank}" / "log" / "info.log").is_file()
        assert (run_dir / "ranks" / f"rank_{rank}" / "console.log").is_file() == backend.console_outlives_the_ranks
    assert manifest_problems(run_dir) == []
    backend.check_purge(run_dir)
    assert_nothing_left(backend, run_id)

    ended = follow.returncode == 0
    if not backend.follow_ends_after_down and not ended:
        pytest.xfail("logs -f still followed the run 5 s after down stopped it")
    assert ended, f"logs -f did not end after down (exit {follow.returncode})"
    assert backend.follow_ends_after_down, "logs -f now ends after down: follow_ends_after_down is out of date"


@pytest.mark.parametrize("backend", ["ssh", "k8s"], indirect=True)  # local: test_e2e_resume.py
def test_a_stalled_run_restarts_from_its_last_whole_checkpoint(backend, tiny_dataset):
    """Rank 1 stops making progress at step 10 of the first attempt: the stall watchdog has every rank
    write its stacks and stops the run, and the second attempt resumes from step 8 (on the same nodes,
    or from the claim)."""
    job = backend.job(tiny_dataset, env={"LAUNCHER_FAULT": "1:10:sleep:1"})
    data = yaml.safe_load(job.read_text())
    data.update(checkpoint={"save_steps": 4}, restart={"max_attempts": 2, "backoff_s": 0},
                monitor={"stall_after_s": 10})
    job.write_text(yaml.safe_dump(data))
    result = backend.up(job)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run(backend.tmp_path)
    run = record(run_dir)
    assert run["attempts"] == 2 and run["state"] == "succeeded"
    first = run["attempt_records"][0]
    # Data-parallel ranks wait for each other, so both stop at step 10 and the watchdog blames neither.
    assert first["failure"]["kind"] == "stalled" and "ranks 0, 1 stalled" in first["failure"]["summary"], first
    assert run["attempt_records"][1]["resumed_from"]["step"] == 8
    stacks = (run_dir / "ranks" / "rank_1" / "console.log").read_text()  # faulthandler's, from the node
    assert "most recent call first" in stacks and "in on_train_step_end" in stacks, stacks[-2000:]
    attempt = run_dir / "attempts" / "2"
    from launcher.resume import checkpoint_step

    for rank in (0, 1):
        info = (attempt / "ranks" / f"rank_{rank}" / "log" / "info.log").read_text()
        assert re.findall(r"step:\[\s*(\d+)/", info) == [str(s) for s in range(9, STEPS + 1)]
        steps = [checkpoint_step(p)[0] for p in (attempt / "ranks" / f"rank_{rank}" / "checkpoint").glob("*.ckpt")]
        assert max(steps) == STEPS
    backend.check_resume_staged(f"{run_dir.name}-a2", run["attempt_records"][1]["resumed_from"])
    assert manifest_problems(run_dir) == []
    assert_nothing_left(backend, run_dir.name)
    assert_nothing_left(backend, f"{run_dir.name}-a2")
    if not backend.can_purge:
        return
    # --purge removes the node directories of every attempt.
    purge = backend.cli("down", run_dir.name, "--purge")
    assert purge.returncode == 0 and f"run {run_dir.name}-a2: no process left, node directories removed" in purge.stdout
    for run_id in (run_dir.name, f"{run_dir.name}-a2"):
        assert not any(backend.node_dir(i, run_id).exists() for i in range(2)), run_id

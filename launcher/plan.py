"""job -> LaunchPlan: a pure, deterministic function (same job, byte-identical artifacts).

The plan does not know its run id: the backend passes LAUNCHER_RUN_ID when it starts a node,
so one rendered plan can be run more than once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import yaml

from launcher import helm_values, k8s_ascend, k8s_manifests, mfconfig, ranktable, secret_env
from launcher.errors import ConfigError
from launcher.render import render_template, to_json, to_yaml
from launcher.runs import OUTPUT_DIR
from launcher.models import BIND_CORE_FROM, MODULES_ENV, model_spec, modules_env, release_line
from launcher.spec import Job, mindformers_release, parse_job, runs_in_image

PLAN_FILE = "plan.json"
CONFIG_PATH = "mindformers/run.yaml"
JOB_PATH = "job.yaml"  # the job as it ran: what the file (and any --set) gave, paths resolved
ENV_PATH = "env/job.env"
ENTRYPOINT_PATH = "entrypoint/finetune.py"
RANKTABLE_PATH = "ranktable/hccl.json"
# Where the launcher's own per-rank files go, under the node's work directory.
STATUS_DIR = f"{OUTPUT_DIR}/launcher"
_ENTRYPOINT_SOURCE = Path(__file__).parent / "entrypoints" / "finetune.py"


@dataclass(frozen=True)
class RankSlot:
    rank: int
    node: int  # index into job.cluster.nodes
    host: str
    device: int
    local_rank: int
    console_log: str  # the rank's stdout/stderr, relative to the node's work directory
    info_log: str  # MindFormers' info.log (the live view and the summary parse it)


@dataclass(frozen=True)
class NodeStep:
    index: int  # index into job.cluster.nodes
    host: str
    node_rank: int  # position in the launch order (msrun --node_rank)
    script: str  # artifact path of the node's launch script
    entry: str  # what the node runs: the launch script, or its docker wrapper
    ranks: tuple[int, ...]
    # SSH backend: None means "from ~/.ssh/config or the SSH default".
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    workdir: str = ""


@dataclass(frozen=True)
class SshOptions:
    known_hosts: str | None
    path_prefix: tuple[str, ...]
    connect_timeout: float
    command_timeout: float
    node_lost_after: float
    min_free_mb: int
    jump: str | None = None  # [user@]host[:port] the nodes are reached through
    identity_file: str | None = None  # cluster.ssh's, also offered to the jump host


@dataclass(frozen=True)
class LaunchPlan:
    job_name: str
    backend: str
    device: str
    launch: str
    master_addr: str
    master_port: int
    seq_length: int
    batch_size: int
    ranks: tuple[RankSlot, ...]
    nodes: tuple[NodeStep, ...]
    artifacts: Mapping[str, str] = field(repr=False)
    ssh: SshOptions | None = None

    def job(self) -> Job | None:
        """The job as it ran (JOB_PATH); None for a plan rendered before it was kept, or one this
        launcher no longer accepts."""
        text = self.artifacts.get(JOB_PATH)
        if not text:
            return None
        try:
            return parse_job(yaml.safe_load(text), source=JOB_PATH)
        except (ConfigError, ValueError, yaml.YAMLError):
            return None

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def collect_sources(self, rank: int) -> list[str]:
        """Globs, relative to the node's work directory, of what gather copies for one rank."""
        slot = self.ranks[rank]
        return [
            f"output/log/rank_{rank}/*",
            slot.console_log,
            f"output/checkpoint/rank_{rank}/*",
            # MindFormers names them ckpt_strategy_rank_N.ckpt; the dot keeps rank 1 from taking rank 10's.
            f"output/strategy/*rank_{rank}.*",
            # TensorBoard event files (monitor.tensorboard): mfconfig.TENSORBOARD_OUTPUT plus MindFormers' rank_N.
            f"output/tensorboard/rank_{rank}/*",
            # What the rank runs with (python, mindspore, mindformers, CANN, driver): entrypoints/finetune.py.
            f"{STATUS_DIR}/rank_{rank}.versions.json",
        ]

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "artifacts"}
        data["ranks"] = [asdict(r) for r in self.ranks]
        data["nodes"] = [asdict(n) for n in self.nodes]
        data["ssh"] = asdict(self.ssh) if self.ssh else None
        return to_json(data)

    def write(self, directory: Path) -> None:
        """Write every artifact and plan.json. Built in a temporary folder and renamed into place,
        so a failure never leaves half a plan; an earlier plan in `directory` is replaced."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.") as tmp:
            staged = Path(tmp) / "plan"
            for rel, text in self.artifacts.items():
                target = staged / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
                if rel.endswith(".sh"):
                    target.chmod(0o755)
            (staged / PLAN_FILE).write_text(self.to_json())
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(staged, directory)

    @classmethod
    def read(cls, directory: Path) -> LaunchPlan:
        """A plan written by `launcher render` (or kept in a run directory)."""
        try:
            data = json.loads((directory / PLAN_FILE).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{directory}: no {PLAN_FILE}; render the job first with 'launcher render'") from None
        artifacts = {
            str(p.relative_to(directory)): p.read_text()
            for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != PLAN_FILE
        }
        ssh = data.pop("ssh", None)
        return cls(
            **{k: v for k, v in data.items() if k not in ("ranks", "nodes")},
            ranks=tuple(RankSlot(**r) for r in data["ranks"]),
            nodes=tuple(NodeStep(**{**n, "ranks": tuple(n["ranks"])}) for n in data["nodes"]),
            artifacts=MappingProxyType(artifacts),
            ssh=SshOptions(**{**ssh, "path_prefix": tuple(ssh["path_prefix"])}) if ssh else None,
        )


def visible_devices(job: Job, node_index: int) -> list[int]:
    """The device ids the node's processes use. Inside a container the NPUs it was given are numbered
    0..n-1 whichever host devices they are (mindformers r1.0 mindformers/tools/hccl_tools.py,
    --visible_devices help: in docker a table for devices [4,8) must say [0,4)); on the host, the job's."""
    devices = job.cluster.nodes[node_index].devices
    return list(range(len(devices))) if runs_in_image(job) else list(devices)


def _rank_table_servers(job: Job) -> list[ranktable.ServerDevices] | None:
    nodes = job.cluster.nodes
    if not all(n.device_ips and n.rank_table_server_id for n in nodes):
        return None
    return [
        ranktable.ServerDevices(n.rank_table_server_id, tuple(visible_devices(job, i)), tuple(n.device_ips))
        for i, n in enumerate(nodes)
    ]


def launch_order(job: Job) -> list[int]:
    """Node indices in global-rank order: the job's node order, which is also the server order of the
    merged rank table (as merge_hccl.py keeps its arguments' order), so RANK_ID follows the table."""
    return list(range(len(job.cluster.nodes)))


def assign_ranks(job: Job) -> list[RankSlot]:
    slots, rank = [], 0
    msrun = job.cluster.launch == "msrun"
    for node_index in launch_order(job):
        node = job.cluster.nodes[node_index]
        for local_rank, device in enumerate(node.devices):
            console = f"output/msrun_log/worker_{rank}.log" if msrun else f"output/rank_log/rank_{rank}.log"
            slots.append(
                RankSlot(
                    rank=rank,
                    node=node_index,
                    host=node.host,
                    device=device,
                    local_rank=local_rank,
                    console_log=console,
                    info_log=f"output/log/rank_{rank}/info.log",
                )
            )
            rank += 1
    return slots


# Path variables that the job's env adds to (in front, as msrun_launcher.sh does with PYTHONPATH) instead
# of replacing: CANN's set_env.sh and the images put te/tbe, the toolkit's libraries and tools on them.
PATH_VARIABLES = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH")


def job_environment(job: Job) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1", "GLOG_v": "2"}
    if job.cluster.device == "ascend":
        env.update(HCCL_CONNECT_TIMEOUT="1200", HCCL_EXEC_TIMEOUT="1800")
    if model_spec(job.model).research:
        env[MODULES_ENV] = modules_env(job.model, job.mindformers.source)
    env.update(job.env)
    return env


def build_plan(job: Job) -> LaunchPlan:
    cfg = mfconfig.build(job)
    seq_length, batch_size = mfconfig.train_shape(cfg)
    slots = assign_ranks(job)
    order = launch_order(job)
    cluster = job.cluster
    master = cluster.nodes[order[0]]
    if cluster.backend == "local":
        master_addr = "127.0.0.1"
    elif cluster.backend == "k8s":
        master_addr = k8s_manifests.service_host(job)  # node hosts are placeholders; pods meet by DNS
    else:
        master_addr = master.rank_table_server_id or master.host

    artifacts: dict[str, str] = {
        CONFIG_PATH: to_yaml(cfg),
        ENV_PATH: render_template("job.env.j2", env=job_environment(job), path_variables=PATH_VARIABLES,
                                  secret_names=list(job.secret_env)),
        ENTRYPOINT_PATH: _ENTRYPOINT_SOURCE.read_text(),
    }
    servers = _rank_table_servers(job)
    if servers:
        merged = ranktable.merge_servers(servers)
        artifacts[RANKTABLE_PATH] = to_json(merged)
        for i, server in enumerate(servers):
            first = next(s.rank for s in slots if s.node == i)
            artifacts[f"ranktable/node-{i}.json"] = to_json(ranktable.single_node_table(server, first))

    steps = []
    for node_rank, node_index in enumerate(order):
        node_slots = [s for s in slots if s.node == node_index]
        script = f"nodes/node-{node_index}/launch.sh"
        context = dict(
            job=job,
            node_index=node_index,
            node_rank=node_rank,
            slots=node_slots,
            world_size=len(slots),
            master_addr=master_addr,
            master_port=cluster.master_port,
            cluster_time_out=cluster.cluster_time_out,
            config_path=CONFIG_PATH,
            env_path=ENV_PATH,
            entrypoint_path=ENTRYPOINT_PATH,
            ranktable_path=RANKTABLE_PATH if servers else None,
            status_dir=STATUS_DIR,
            devices=visible_devices(job, node_index),
            in_container=runs_in_image(job),
            bind_core=_bind_core(job),
            scheduler=cluster.device == "cpu" and node_rank == 0,
        )
        template = "launch_msrun.sh.j2" if cluster.launch == "msrun" else "launch_ranktable.sh.j2"
        artifacts[script] = render_template(template, **context)
        entry = script
        if cluster.runtime == "docker":
            entry = f"nodes/node-{node_index}/docker-run.sh"
            artifacts[entry] = render_template("docker_run.sh.j2", **context, script=script,
                                               image=job.image.reference)
        node = cluster.nodes[node_index]
        ssh = cluster.ssh
        steps.append(NodeStep(
            index=node_index, host=node.host, node_rank=node_rank, script=script, entry=entry,
            ranks=tuple(s.rank for s in node_slots),
            user=node.user or ssh.user, port=node.port, identity_file=node.identity_file or ssh.identity_file,
            workdir=node.workdir or ssh.workdir,
        ))

    if cluster.backend == "k8s":
        artifacts.update(_k8s_artifacts(job, artifacts, slots, steps, master_addr))
    # Where the secret values come from (never the values), for the backends; the pods do not read it.
    artifacts.update(secret_env.sources_artifact(job.secret_env))
    # For review and `launcher compare`; added after the pods' files were chosen, since no rank reads it.
    artifacts[JOB_PATH] = to_yaml(job.model_dump(mode="json", exclude_unset=True))

    return LaunchPlan(
        job_name=job.name,
        backend=cluster.backend,
        device=cluster.device,
        launch=cluster.launch,
        master_addr=master_addr,
        master_port=cluster.master_port,
        seq_length=seq_length,
        batch_size=batch_size,
        ranks=tuple(slots),
        nodes=tuple(steps),
        artifacts=MappingProxyType(dict(sorted(artifacts.items()))),
        ssh=_ssh_options(job) if cluster.backend == "ssh" else None,
    )


def _k8s_artifacts(job: Job, artifacts: dict[str, str], slots, steps, master_addr: str) -> dict[str, str]:
    """The pods' scripts, the manifests that carry every file the pods read, and the Helm values."""
    context = dict(job=job, env_path=ENV_PATH, entrypoint_path=ENTRYPOINT_PATH, config_path=CONFIG_PATH,
                   status_dir=STATUS_DIR, cluster_time_out=job.cluster.cluster_time_out,
                   cluster_rank_table=k8s_ascend.cluster_rank_table(job),
                   wait_ranktable_script=k8s_ascend.WAIT_RANKTABLE_SCRIPT)
    pod_files = dict(artifacts)
    if k8s_ascend.cluster_rank_table(job):
        pod_files[k8s_ascend.WAIT_RANKTABLE_SCRIPT] = ranktable.wait_script(
            k8s_ascend.RANKTABLE_FILE, timeout_s=job.cluster.cluster_time_out)
    if job.cluster.k8s.kind == "ascend-job":
        pod_files[k8s_manifests.ACJOB_WORKER_SCRIPT] = render_template("k8s_acjob_worker.sh.j2", **context)
    if job.cluster.k8s.kind == "ascend-job" or job.cluster.k8s.pods == "per-rank":
        pod_files[k8s_manifests.RANK_SCRIPT] = render_template("k8s_rank.sh.j2", **context)
    pod_files = dict(sorted(pod_files.items()))
    out = {path: text for path, text in pod_files.items() if path not in artifacts}
    objects = k8s_manifests.manifests(job, pod_files, slots, steps)
    out.update({path: to_yaml(obj) for path, obj in objects.items()})
    if helm_values.applies(job):
        out[helm_values.HELM_VALUES_PATH] = to_yaml(helm_values.values(job, pod_files, slots))
    return out


def _bind_core(job: Job) -> bool:
    """msrun --bind_core=True on Ascend, as msrun_launcher.sh does from MindFormers 1.6 on."""
    version, _ = mindformers_release(job)
    return job.cluster.device == "ascend" and (version is None or release_line(version) >= release_line(BIND_CORE_FROM))


def _ssh_options(job: Job) -> SshOptions:
    ssh = job.cluster.ssh
    return SshOptions(
        known_hosts=ssh.known_hosts, path_prefix=tuple(ssh.path_prefix), connect_timeout=ssh.connect_timeout,
        command_timeout=ssh.command_timeout, node_lost_after=ssh.node_lost_after, min_free_mb=ssh.min_free_mb,
        jump=ssh.jump, identity_file=ssh.identity_file,
    )

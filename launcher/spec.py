"""The job file: the Job, loading it, and the checks that span several of its sections.

The sections themselves are in launcher/job_sections.py. Everything here is pure except `load_job`
(reads the file); what a local run needs from this machine is checked by the local backend.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from launcher.image import matrix as images
from launcher.errors import ConfigError
from launcher.inputs import ENV_NAME_RE, read_yaml_file
from launcher import secret_env
from launcher.job_overrides import apply_overrides, blame, parse_override
from launcher.job_sections import (
    Checkpoint,
    Cluster,
    Data,
    Dataset,
    Image,
    Lora,
    MindFormers,
    Monitor,
    Notify,
    Output,
    Parallel,
    Restart,
    SecretSource,
)
from launcher.models import MODELS, MSRUN_FROM, model_spec, release_line
from launcher.weights.imported import is_imported
from launcher.schema import FieldProblem, Strict, did_you_mean, first_error


_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


class Job(Strict):
    name: str
    model: str
    method: Literal["lora", "full"]
    dataset: Dataset = Dataset()
    data: Data | None = None
    checkpoint: Checkpoint = Checkpoint()
    parallel: Parallel = Parallel()
    lora: Lora = Lora()
    mindformers: MindFormers = MindFormers()
    cluster: Cluster
    image: Image = Image()
    output: Output = Output()
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for every rank")
    secret_env: dict[str, SecretSource] = Field(default_factory=dict, description="environment for every rank "
                                                "whose values are secret: read when the ranks start, never written")
    monitor: Monitor = Monitor()
    notify: Notify = Notify()
    restart: Restart = Restart()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("use lowercase letters, digits and '-', at most 40 characters (it names pods and runs)")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v not in MODELS and not is_imported(v):
            raise ValueError(f"unknown model '{v}'{did_you_mean(v, MODELS)}; choose one of {', '.join(MODELS)}, "
                             "or the directory of a 'launcher model import'")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not ENV_NAME_RE.match(key):
                raise ValueError(f"'{key}' is not a valid environment variable name")
            if "\0" in value or "\n" in value or "\r" in value:
                raise ValueError(f"the value of {key} holds a NUL byte or a line break; give it on one line")
        return v

    @field_validator("secret_env")
    @classmethod
    def _secret_env(cls, v: dict[str, SecretSource]) -> dict[str, SecretSource]:
        for key in v:
            if not ENV_NAME_RE.match(key):
                raise ValueError(f"'{key}' is not a valid environment variable name")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> Job:
        check_job(self)
        return self

    @property
    def world_size(self) -> int:
        return sum(len(n.devices) for n in self.cluster.nodes)


def check_job(job: Job) -> None:
    """Checks that span several fields. Raises FieldProblem naming the field to fix."""
    cluster = job.cluster
    if job.method not in model_spec(job.model).methods:
        methods = " or ".join(model_spec(job.model).methods)
        raise FieldProblem("method", f"{job.model} ships a base config for {methods} only")
    if job.method == "full" and "lora" in job.model_fields_set:
        raise FieldProblem("lora", "a lora section only applies with method: lora")
    _check_model_support(job)

    if job.data is None and not job.dataset.path:
        raise FieldProblem("dataset.path", "is required: give the MindRecord to train on, or a data: section to prepare it")
    if job.data is not None and job.dataset.path:
        raise FieldProblem("dataset.path", "give either dataset.path or a data: section (which prepares the dataset "
                           "and trains on it), not both")

    hosts: set[str] = set()
    for i, node in enumerate(cluster.nodes):
        where = f"cluster.nodes[{i}]"
        if node.host in hosts:
            raise FieldProblem(f"{where}.host", f"host '{node.host}' is listed twice; each node appears once")
        hosts.add(node.host)
        if not node.devices:
            raise FieldProblem(f"{where}.devices", "give at least one device")
        seen: set[int] = set()
        for d in node.devices:
            if d in seen:
                raise FieldProblem(f"{where}.devices", f"device {d} is listed twice")
            seen.add(d)
            if not 0 <= d < cluster.devices_per_node:
                n = cluster.devices_per_node
                hint = f"; did you mean [0,{n})?" if d == n else f"; devices are numbered 0-{n - 1}"
                article = "an" if str(n).startswith("8") or n in (11, 18) else "a"
                raise FieldProblem(
                    f"{where}.devices", f"device {d} is outside 0-{n - 1} on {article} {n}-device node{hint}"
                )
        if node.device_ips is not None and len(node.device_ips) != len(node.devices):
            raise FieldProblem(
                f"{where}.device_ips",
                f"{len(node.device_ips)} device_ips for {len(node.devices)} devices; give one per device, in order",
            )
        if cluster.device == "ascend" and cluster.launch == "ranktable":
            # Over SSH the launcher reads missing device IPs from the nodes before it plans; on Kubernetes
            # MindCluster writes the table from the NPUs the device plugin gave each pod.
            if node.device_ips is None and cluster.backend == "local":
                raise FieldProblem(
                    f"{where}.device_ips",
                    "launch: ranktable on Ascend needs the device IPs of every device "
                    "(read them with 'hccn_tool -i N -ip -g' or /etc/hccn.conf)",
                )
            if node.rank_table_server_id is None:
                raise FieldProblem(f"{where}.server_ip", f"host '{node.host}' is not an IP; set server_ip")
    if cluster.launch == "msrun":
        counts = {len(n.devices) for n in cluster.nodes}
        if len(counts) > 1:
            raise FieldProblem("cluster.nodes", "msrun needs the same number of devices on every node")

    all_ips = [ip for n in cluster.nodes for ip in (n.device_ips or [])]
    if len(all_ips) != len(set(all_ips)):
        dup = next(ip for ip in all_ips if all_ips.count(ip) > 1)
        raise FieldProblem("cluster.nodes", f"device_ip {dup} appears more than once; every device IP must be unique")

    world = job.world_size
    p = job.parallel
    if p.product != world:
        raise FieldProblem(
            "parallel",
            f"data_parallel × model_parallel × pipeline_stage = {p.data_parallel}×{p.model_parallel}×"
            f"{p.pipeline_stage} = {p.product}, but the cluster has {world} ranks; make them equal",
        )
    if cluster.device == "cpu" and (p.model_parallel > 1 or p.pipeline_stage > 1):
        raise FieldProblem(
            "parallel", "MindSpore on CPU runs data parallel only; set model_parallel and pipeline_stage to 1"
        )
    if cluster.device == "cpu" and job.checkpoint.auto_trans:
        # Transforming a checkpoint has one rank write while the others wait at a barrier: no CPU kernel.
        raise FieldProblem("checkpoint.auto_trans", "needs Ascend; on the CPU load a whole (merged) checkpoint")
    if job.checkpoint.auto_trans and len(cluster.nodes) > 1 and not output_is_shared(job):
        # MindFormers' transform_checkpoint.py (r1.8.0) waits until the local strategy folder holds every
        # rank's strategy file and gives up after 7200 s; r1.3.0 docs/feature_cards/Transform_Ckpt.md says
        # transforming across servers needs a shared disk.
        raise FieldProblem(
            "checkpoint.auto_trans",
            "across nodes needs an output/ that every node shares (each node waits for all ranks' strategy files "
            "and fails after 2 hours); set output.shared: true if it is on a shared disk (on Kubernetes: "
            "cluster.k8s.output_pvc, a ReadWriteMany claim), or transform the checkpoint for this layout before "
            "the run (mindspore.transform_checkpoints; 'launcher ckpt merge' makes a whole one) and set auto_trans: false",
        )
    if p.pipeline_stage > 1 and p.micro_batch_num < p.pipeline_stage:
        raise FieldProblem("parallel.micro_batch_num", "must be at least pipeline_stage to fill the pipeline")
    if cluster.backend == "k8s":
        _check_k8s(job)
    elif "k8s" in cluster.model_fields_set:
        raise FieldProblem("cluster.k8s", "a k8s section only applies with backend: k8s")
    if cluster.backend == "local" and len(cluster.nodes) != 1:
        raise FieldProblem("cluster.nodes", "the local backend runs one node; use backend ssh or k8s for more")
    for name, source in job.secret_env.items():
        if name in job.env:
            raise FieldProblem(f"secret_env.{name}", f"{name} is also set in env; give it in env or in secret_env, "
                               "not both")
        if source.secret is not None and cluster.backend != "k8s":
            raise FieldProblem(f"secret_env.{name}", f"a Kubernetes Secret reference needs backend: k8s; on "
                               f"{cluster.backend} give the value with from_env or from_file")
        if source.secret == secret_env.secret_name(job.name):
            raise FieldProblem(f"secret_env.{name}", f"'{source.secret}' is the name of the Secret the launcher "
                               "creates for each run; name your Secret otherwise")


def output_is_shared(job: Job) -> bool:
    """Whether every node writes into one output/: said by the job, or an output claim on Kubernetes."""
    return job.output.shared or (job.cluster.backend == "k8s" and job.cluster.k8s.output_pvc is not None)


def runs_in_image(job: Job) -> bool:
    return job.cluster.backend == "k8s" or job.cluster.runtime == "docker"


def mindformers_release(job: Job) -> tuple[str | None, str]:
    """(the MindFormers release the ranks run, the field that says so), where the job tells it."""
    if job.mindformers.version:
        return job.mindformers.version, "mindformers.version"
    if runs_in_image(job) and job.image.name is None and job.image.entry:
        return matrix_entry(job.image.entry).mindformers.version, "image.entry"
    return None, "mindformers.version"


@functools.cache
def _shipped_matrix() -> dict:
    """The shipped image matrix, read and validated once: every plan of a job looks entries up in it."""
    return images.load_matrix()


def matrix_entry(entry_id: str):
    entries = _shipped_matrix()
    if entry_id not in entries:
        raise FieldProblem("image.entry", f"no image '{entry_id}' in the matrix{did_you_mean(entry_id, entries)}; "
                           "see 'launcher image list'")
    return entries[entry_id]


def _check_model_support(job: Job) -> None:
    """The model must be one the ranks' MindFormers carries; a research model needs its source tree."""
    model = model_spec(job.model)
    if "entry" in job.image.model_fields_set and job.image.entry:
        matrix_entry(job.image.entry)
    version, field = mindformers_release(job)
    if version is not None and not model.carried_by(version):
        able = [e.id for e in _shipped_matrix().values() if model.carried_by(e.mindformers.version)]
        hint = f" (images with one: {', '.join(able)})" if able else ""
        raise FieldProblem(field, f"{job.model} runs on {model.releases}, not on MindFormers {version}{hint}")
    if version is not None and job.cluster.launch == "msrun" and release_line(version) < release_line(MSRUN_FROM):
        raise FieldProblem("cluster.launch", f"MindFormers {version} has no msrun launch (MindFormers' "
                           f"msrun_launcher.sh arrived in {MSRUN_FROM}); use launch: ranktable")
    if model.research is None:
        return
    if version is None:
        raise FieldProblem("mindformers.version", f"{job.model} lives in MindFormers' {model.research}, which only "
                           f"{model.releases} has; say which release the ranks run (image.entry or mindformers.version)")
    if not job.mindformers.source:
        raise FieldProblem("mindformers.source", f"{job.model}'s classes are in {model.research} of the MindFormers "
                           f"source tree (no wheel ships it); give the path of a MindFormers {version} checkout on "
                           "the nodes (or in the image)")


def _check_k8s(job: Job) -> None:
    k8s = job.cluster.k8s
    if job.data is not None and not k8s.output_pvc:
        raise FieldProblem("data", "on Kubernetes the prepared dataset goes on the job's claim, where every pod "
                           "reads it; set cluster.k8s.output_pvc")
    if job.cluster.runtime == "docker":
        raise FieldProblem("cluster.runtime", "on Kubernetes every pod already runs in the image; remove runtime: docker")
    if k8s.kind == "ascend-job":
        if job.cluster.launch != "msrun" or k8s.pods != "per-node":
            raise FieldProblem(
                "cluster.k8s.kind",
                "an AscendJob runs one Worker pod per node under MindSpore's dynamic cluster; "
                "set cluster.launch: msrun and cluster.k8s.pods: per-node",
            )
    if k8s.anti_affinity and k8s.pods == "per-rank" and k8s.kind != "ascend-job":
        if any(len(n.devices) > 1 for n in job.cluster.nodes):
            raise FieldProblem(
                "cluster.k8s.anti_affinity",
                "one pod per host cannot place several per-rank pods on a node; use pods: per-node",
            )
    scheduler = k8s.scheduler_for(job.cluster.device)
    if "queue" in k8s.model_fields_set and scheduler != "volcano" and k8s.kind == "pods":
        raise FieldProblem("cluster.k8s.queue", "a queue only applies with scheduler: volcano")
    if job.cluster.device != "ascend":
        return
    if scheduler == "default" and k8s.kind != "volcano-job" and k8s.device_plugin == "volcano":
        raise FieldProblem(
            "cluster.k8s.scheduler",
            "MindCluster's device plugin in Volcano mode gives NPUs only to pods Volcano scheduled; use "
            "scheduler: volcano, or set cluster.k8s.device_plugin: default if yours runs without -volcanoType=true",
        )
    if job.cluster.launch == "ranktable":
        # MindCluster writes the rank table into rings-config-<job> for Volcano Jobs, not for bare pods,
        # one server entry per pod; each pod finds its entry by its own IP.
        if k8s.kind != "volcano-job" or k8s.pods != "per-rank":
            raise FieldProblem(
                "cluster.k8s.kind",
                "on Kubernetes MindCluster writes the rank table, for a Volcano Job of one pod per rank; "
                "set kind: volcano-job and pods: per-rank, or use cluster.launch: msrun",
            )
        if k8s.host_network and any(len(n.devices) > 1 for n in job.cluster.nodes):
            raise FieldProblem(
                "cluster.k8s.host_network",
                "a rank-table pod finds its entry by its pod IP, which host networking shares between the "
                "pods of a node; turn host_network off",
            )


def parse_job(data: Any, source: str = "job", overrides: Sequence[str] = ()) -> Job:
    """The job of a parsed job file, with each `--set key=value` of overrides made before it is validated."""
    sets = [parse_override(text, Job) for text in overrides]
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the job file must be a YAML mapping of sections (name, model, cluster, ...)")
    if sets:
        data = apply_overrides(data, sets)
    try:
        return Job.model_validate(data)
    except ValidationError as err:
        # A field that a --set gave is reported as that --set's.
        culprit = blame(err, sets)
        where = f"--set {culprit.text}" if culprit else f"{source} (with --set)" if sets else source
        raise ConfigError(f"{where}: {first_error(err, 'job', root=Job)}") from None


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> Job:
    return parse_job(read_yaml_file(path, "job file"), str(path), overrides)


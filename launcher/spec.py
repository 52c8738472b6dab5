"""The job file: pydantic models, loading, and the checks that span several fields.

Everything here is pure except `load_job` (reads the file) and `check_local_host`
(looks at this machine: dataset on disk, port free), which the CLI calls for local runs.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import ipaddress
import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from launcher import images
from launcher.errors import ConfigError
from launcher.inputs import ENV_NAME_RE, read_yaml_file
from launcher.models import MODELS, MSRUN_FROM, release_line


_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


class Strict(BaseModel):
    # strict: YAML already gives numbers and booleans their types, so `alpha: true` or `epochs: "3"`
    # is a mistake to report, not a value to convert.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Dataset(Strict):
    path: str | None = Field(None, description="MindRecord file or directory the ranks read (on the nodes for "
                             "remote backends); leave it out when a data: section prepares it")
    shuffle: bool = Field(True, description="every MindFormers fine-tune config shuffles its training data")


class Data(Strict):
    """A dataset to prepare on this machine before the ranks start (`launcher data prepare`).

    The tokenized MindRecord directory is cached under cache_dir by a hash of the source and tokenizer
    bytes, the format, the record length and the template version; `up` then trains on it, so
    dataset.path is not given. Relative paths are relative to the current directory.
    """

    source: str = Field(description="input file: a JSON array or JSON lines")
    format: Literal["alpaca", "belle", "novelset", "conversation"]
    tokenizer: str = Field(description="a sentencepiece tokenizer.model, or a directory with tokenizer.model "
                           "or vocab.json + merges.txt")
    seq_length: int | None = Field(None, ge=8, description="default: the model's seq_length; records hold one more")
    workers: int | None = Field(None, ge=1, description="tokenizing processes; default: the CPU count")
    strict: bool = Field(False, description="a bad row is an error instead of being skipped and reported")
    cache_dir: str = Field("data/cache", description="where prepared datasets are kept")


class Checkpoint(Strict):
    load: str = ""
    auto_trans: bool = False


class Parallel(Strict):
    data_parallel: int = Field(1, ge=1)
    model_parallel: int = Field(1, ge=1)
    pipeline_stage: int = Field(1, ge=1)
    micro_batch_num: int = Field(1, ge=1)

    @property
    def product(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage


class Lora(Strict):
    rank: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str = ".*wq|.*wk|.*wv|.*wo"


class MindFormers(Strict):
    base: str | None = Field(None, description="base config path; default: the shipped one for model/method")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value")
    version: str | None = Field(None, description="the MindFormers release the ranks run, e.g. 1.0.2; default: "
                                "the image entry's, or the installed one for local runs")
    source: str | None = Field(None, description="a MindFormers source checkout of that release on the nodes; "
                               "research models (baichuan2_7b) import their classes from its research/ folder")

    @field_validator("version")
    @classmethod
    def _version(cls, v: str | None) -> str | None:
        if v is not None:
            release_line(v)
        return v


def parse_devices(value: Any) -> list[int]:
    """Accept [0, 1, 2], "0-7" (inclusive) or "[0,8)" (half-open, as run_singlenode writes it)."""
    if isinstance(value, list):
        return value
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        text = value.replace(" ", "")
        if m := re.fullmatch(r"(\d+)-(\d+)", text):
            lo, hi = int(m[1]), int(m[2]) + 1
        elif m := re.fullmatch(r"\[(\d+),(\d+)\)", text):
            lo, hi = int(m[1]), int(m[2])
        else:
            raise ValueError(f"'{value}' is not a device list; write [0, 1], '0-7' or '[0,8)'")
        if hi <= lo:
            raise ValueError(f"'{value}' is an empty device range")
        return list(range(lo, hi))
    raise ValueError("write devices as a list such as [0, 1], or a range such as '0-7'")


class Node(Strict):
    host: str = Field(description="address to reach the node (SSH) and, without server_ip, for cluster traffic")
    devices: list[int]
    server_ip: str | None = Field(None, description="server_id in the rank table; default: host if it is an IP")
    device_ips: list[str] | None = None
    # SSH backend; unset values come from cluster.ssh, then from ~/.ssh/config.
    user: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    identity_file: str | None = None
    workdir: str | None = Field(None, description="where runs are staged on this node; default cluster.ssh.workdir")

    _parse_devices = field_validator("devices", mode="before")(parse_devices)

    @field_validator("server_ip")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        if v is not None:
            ipaddress.ip_address(v)
        return v

    @field_validator("device_ips")
    @classmethod
    def _ips(cls, v: list[str] | None) -> list[str] | None:
        for ip in v or []:
            ipaddress.ip_address(ip)
        return v

    @property
    def rank_table_server_id(self) -> str | None:
        if self.server_ip:
            return self.server_ip
        try:
            ipaddress.ip_address(self.host)
            return self.host
        except ValueError:
            return None


class Ssh(Strict):
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = Field(None, description="default ~/.ssh/known_hosts; host keys are always checked")
    workdir: str = Field("launcher-runs", description="on each node; relative paths are under the SSH user's home")
    path_prefix: list[str] = Field(default_factory=list, description="prepended to PATH on the nodes (python, msrun)")
    connect_timeout: float = Field(15, gt=0)
    command_timeout: float = Field(120, gt=0)
    node_lost_after: float = Field(30, gt=0, description="seconds without an answer before a node counts as lost")
    min_free_mb: int = Field(1024, ge=0)


_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class K8s(Strict):
    """Where and how the pods of a `backend: k8s` job run. Secrets are named here, never given."""

    namespace: str = "default"
    pods: Literal["per-rank", "per-node"] = Field("per-rank", description="one pod per rank, or one per node")
    kind: Literal["pods", "volcano-job", "ascend-job"] = Field("pods", description="plain pods, or a job controller")
    scheduler: Literal["default", "volcano"] | None = Field(
        None, description="volcano: gang-schedule the pods; default: volcano for Ascend jobs, else default")
    device_plugin: Literal["volcano", "default"] = Field(
        "volcano", description="mode of the cluster's Ascend device plugin (-volcanoType=true is volcano)")
    queue: str = Field("default", description="Volcano queue")
    resource_name: str = Field("huawei.com/Ascend910", description="extended resource of one NPU")
    # Values of ascend-for-volcano (Ascend/mind-cluster component/ascend-for-volcano/common/util/constants.go):
    # the accelerator-type node label picks its scheduling handler, which falls back to the 910A one
    # without it; ring-controller.atlas names the chip family to MindCluster's controllers.
    accelerator_type: Literal["module", "half", "card", "module-910b-8", "module-910b-16", "module-a3-16",
                              "module-a3-8-super-pod", "module-a3-16-super-pod"] = Field(
        "module-910b-8", description="accelerator-type node label of the NPU servers (Ascend pods' nodeSelector)")
    host_arch: Literal["huawei-arm", "huawei-x86"] | None = Field(
        None, description="host-arch node label of the NPU servers; unset: any architecture")
    ring_controller: Literal["ascend-910", "ascend-910b"] = Field(
        "ascend-910b", description="ring-controller.atlas label: ascend-910 for Atlas 800 (910A), ascend-910b for A2")
    host_network: bool = False
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    anti_affinity: bool = Field(False, description="at most one of the job's pods per host")
    image_pull_secrets: list[str] = Field(default_factory=list, description="names of existing Secrets")
    output_pvc: str | None = Field(None, description="existing ReadWriteMany claim mounted at the MindFormers output")
    service_account: str | None = None

    def scheduler_for(self, device: str) -> str:
        """The scheduler of the pods. NPU pods default to Volcano: MindCluster's device plugin in Volcano
        mode gives NPUs only to pods Volcano placed."""
        if self.scheduler is not None:
            return self.scheduler
        return "volcano" if device == "ascend" else "default"

    @field_validator("namespace", "queue")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if not _DNS_LABEL_RE.match(v):
            raise ValueError(f"'{v}' is not a DNS label: lowercase letters, digits and '-', at most 63 characters")
        return v

    @field_validator("output_pvc", "service_account")
    @classmethod
    def _object_name(cls, v: str | None) -> str | None:
        if v is not None and not _DNS_SUBDOMAIN_RE.match(v):
            raise ValueError(f"'{v}' is not a Kubernetes object name (lowercase letters, digits, '-' and '.')")
        return v

    @field_validator("image_pull_secrets")
    @classmethod
    def _secret_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _DNS_SUBDOMAIN_RE.match(name):
                raise ValueError(f"'{name}' is not a Secret name; give the names of existing Secrets, not their content")
        return v

    @field_validator("resource_name")
    @classmethod
    def _resource(cls, v: str) -> str:
        prefix, _, name = v.partition("/")
        if not name or not _DNS_SUBDOMAIN_RE.match(prefix) or not _LABEL_VALUE_RE.match(name):
            raise ValueError(f"'{v}' is not an extended resource name such as huawei.com/Ascend910")
        return v

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _LABEL_VALUE_RE.match(value):
                raise ValueError(f"'{value}' (for '{key}') is not a label value: at most 63 letters, digits, '-_.'")
        return v

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        allowed = {"key", "operator", "value", "effect", "tolerationSeconds"}
        for i, tol in enumerate(v):
            unknown = sorted(set(tol) - allowed)
            if unknown:
                raise ValueError(f"toleration {i}: unknown key '{unknown[0]}'; allowed keys: {', '.join(sorted(allowed))}")
            if tol.get("operator", "Equal") not in ("Equal", "Exists"):
                raise ValueError(f"toleration {i}: operator must be Equal or Exists")
            if tol.get("effect", "NoSchedule") not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
                raise ValueError(f"toleration {i}: effect must be NoSchedule, PreferNoSchedule or NoExecute")
        return v


class AscendEnv(Strict):
    """CANN's environment scripts, sourced by every Ascend launch script before the job's env.

    SSH ranks run in a non-login shell and a pod's command replaces the image ENTRYPOINT that sources
    them, so without this LD_LIBRARY_PATH, ASCEND_OPP_PATH and the te/tbe PYTHONPATH are missing (the
    Ascend/mindxdl-deploy train_start.sh samples source the toolkit's set_env.sh the same way).
    """

    toolkit: str = Field("/usr/local/Ascend/ascend-toolkit/set_env.sh",
                         description="the toolkit's set_env.sh; a rank refuses to start without it")
    optional: list[str] = Field(default_factory=lambda: ["/usr/local/Ascend/nnal/atb/set_env.sh"],
                                description="further set_env.sh files (NNAL), sourced where present")


class Cluster(Strict):
    backend: Literal["local", "ssh", "k8s"] = "local"
    device: Literal["cpu", "ascend"] = "cpu"
    launch: Literal["msrun", "ranktable"] = "msrun"
    runtime: Literal["host", "docker"] = Field("host", description="docker: run each node script in the job's image")
    ssh: Ssh = Ssh()
    k8s: K8s = K8s()
    devices_per_node: int = Field(8, ge=1, le=16)
    master_port: int = Field(8118, ge=1024, le=65535)
    # 7200 s as MindFormers' scripts/msrun_launcher.sh uses from r1.3.0 on: one node may still be pulling a
    # multi-gigabyte image while the others wait.
    cluster_time_out: int = Field(7200, ge=30, description="msrun --cluster_time_out, seconds")
    ascend_env: AscendEnv = AscendEnv()
    nodes: list[Node] = Field(min_length=1)


# The image matrix entry of MindFormers 1.8.0 / MindSpore 2.7.2 / CANN 8.5.0 (mindformers r1.8.0 README
# version map: MindFormers 1.8.0 -> MindSpore 2.7.2 -> CANN 8.5.0 -> driver 25.5.0).
DEFAULT_IMAGE_ENTRY = "ms2.7.2-mf1.8.0-cann8.5.0-py3.11-910b"


class Image(Strict):
    """The container image of docker and Kubernetes runs: an entry of images/matrix.yaml (built by
    `launcher image build ENTRY`, which tags it ascend-mindformers:ENTRY), or an image of your own."""

    entry: str | None = Field(DEFAULT_IMAGE_ENTRY, description="an id of 'launcher image list'; its versions "
                              "are known, so the job is checked against them")
    name: str | None = Field(None, description="an image of your own instead of a matrix entry")
    tag: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Image:
        if (self.name is None) != (self.tag is None):
            raise ValueError("give both name and tag of your own image")
        return self

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.tag}" if self.name else f"ascend-mindformers:{self.entry}"


class Output(Strict):
    runs_dir: str = "runs"
    shared: bool = Field(False, description="every node sees the same output/ (a shared disk); multi-node "
                         "checkpoint.auto_trans needs it")


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

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("use lowercase letters, digits and '-', at most 40 characters (it names pods and runs)")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v not in MODELS:
            raise ValueError(f"unknown model '{v}'{_did_you_mean(v, MODELS)}; choose one of {', '.join(MODELS)}")
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

    @model_validator(mode="after")
    def _cross_field(self) -> Job:
        check_job(self)
        return self

    @property
    def world_size(self) -> int:
        return sum(len(n.devices) for n in self.cluster.nodes)


class _FieldProblem(ValueError):
    """A cross-field problem that belongs to one field path."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(message)


def check_job(job: Job) -> None:
    """Checks that span several fields. Raises _FieldProblem naming the field to fix."""
    cluster = job.cluster
    if job.method not in MODELS[job.model].methods:
        methods = " or ".join(MODELS[job.model].methods)
        raise _FieldProblem("method", f"{job.model} ships a base config for {methods} only")
    if job.method == "full" and "lora" in job.model_fields_set:
        raise _FieldProblem("lora", "a lora section only applies with method: lora")
    _check_model_support(job)

    if job.data is None and not job.dataset.path:
        raise _FieldProblem("dataset.path", "is required: give the MindRecord to train on, or a data: section to prepare it")
    if job.data is not None and job.dataset.path:
        raise _FieldProblem("dataset.path", "give either dataset.path or a data: section (which prepares the dataset "
                            "and trains on it), not both")

    hosts: set[str] = set()
    for i, node in enumerate(cluster.nodes):
        where = f"cluster.nodes[{i}]"
        if node.host in hosts:
            raise _FieldProblem(f"{where}.host", f"host '{node.host}' is listed twice; each node appears once")
        hosts.add(node.host)
        if not node.devices:
            raise _FieldProblem(f"{where}.devices", "give at least one device")
        seen: set[int] = set()
        for d in node.devices:
            if d in seen:
                raise _FieldProblem(f"{where}.devices", f"device {d} is listed twice")
            seen.add(d)
            if not 0 <= d < cluster.devices_per_node:
                n = cluster.devices_per_node
                hint = f"; did you mean [0,{n})?" if d == n else f"; devices are numbered 0-{n - 1}"
                article = "an" if str(n).startswith("8") or n in (11, 18) else "a"
                raise _FieldProblem(
                    f"{where}.devices", f"device {d} is outside 0-{n - 1} on {article} {n}-device node{hint}"
                )
        if node.device_ips is not None and len(node.device_ips) != len(node.devices):
            raise _FieldProblem(
                f"{where}.device_ips",
                f"{len(node.device_ips)} device_ips for {len(node.devices)} devices; give one per device, in order",
            )
        if cluster.device == "ascend" and cluster.launch == "ranktable":
            # Over SSH the launcher reads missing device IPs from the nodes before it plans; on Kubernetes
            # MindCluster writes the table from the NPUs the device plugin gave each pod.
            if node.device_ips is None and cluster.backend == "local":
                raise _FieldProblem(
                    f"{where}.device_ips",
                    "launch: ranktable on Ascend needs the device IPs of every device "
                    "(read them with 'hccn_tool -i N -ip -g' or /etc/hccn.conf)",
                )
            if node.rank_table_server_id is None:
                raise _FieldProblem(f"{where}.server_ip", f"host '{node.host}' is not an IP; set server_ip")
    if cluster.launch == "msrun":
        counts = {len(n.devices) for n in cluster.nodes}
        if len(counts) > 1:
            raise _FieldProblem("cluster.nodes", "msrun needs the same number of devices on every node")

    all_ips = [ip for n in cluster.nodes for ip in (n.device_ips or [])]
    if len(all_ips) != len(set(all_ips)):
        dup = next(ip for ip in all_ips if all_ips.count(ip) > 1)
        raise _FieldProblem("cluster.nodes", f"device_ip {dup} appears more than once; every device IP must be unique")

    world = job.world_size
    p = job.parallel
    if p.product != world:
        raise _FieldProblem(
            "parallel",
            f"data_parallel × model_parallel × pipeline_stage = {p.data_parallel}×{p.model_parallel}×"
            f"{p.pipeline_stage} = {p.product}, but the cluster has {world} ranks; make them equal",
        )
    if cluster.device == "cpu" and (p.model_parallel > 1 or p.pipeline_stage > 1):
        raise _FieldProblem(
            "parallel", "MindSpore on CPU runs data parallel only; set model_parallel and pipeline_stage to 1"
        )
    if cluster.device == "cpu" and job.checkpoint.auto_trans:
        # Transforming a checkpoint has one rank write while the others wait at a barrier: no CPU kernel.
        raise _FieldProblem("checkpoint.auto_trans", "needs Ascend; on the CPU load a whole (merged) checkpoint")
    if job.checkpoint.auto_trans and len(cluster.nodes) > 1 and not output_is_shared(job):
        # MindFormers' transform_checkpoint.py (r1.8.0) waits until the local strategy folder holds every
        # rank's strategy file and gives up after 7200 s; r1.3.0 docs/feature_cards/Transform_Ckpt.md says
        # transforming across servers needs a shared disk.
        raise _FieldProblem(
            "checkpoint.auto_trans",
            "across nodes needs an output/ that every node shares (each node waits for all ranks' strategy files "
            "and fails after 2 hours); set output.shared: true if it is on a shared disk (on Kubernetes: "
            "cluster.k8s.output_pvc, a ReadWriteMany claim), or transform the checkpoint for this layout before "
            "the run (mindspore.transform_checkpoints; 'launcher ckpt merge' makes a whole one) and set auto_trans: false",
        )
    if p.pipeline_stage > 1 and p.micro_batch_num < p.pipeline_stage:
        raise _FieldProblem("parallel.micro_batch_num", "must be at least pipeline_stage to fill the pipeline")
    if cluster.backend == "k8s":
        _check_k8s(job)
    elif "k8s" in cluster.model_fields_set:
        raise _FieldProblem("cluster.k8s", "a k8s section only applies with backend: k8s")
    if cluster.backend == "local" and len(cluster.nodes) != 1:
        raise _FieldProblem("cluster.nodes", "the local backend runs one node; use backend ssh or k8s for more")


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


def matrix_entry(entry_id: str):
    entries = images.load_matrix()
    if entry_id not in entries:
        raise _FieldProblem("image.entry", f"no image '{entry_id}' in the matrix{_did_you_mean(entry_id, entries)}; "
                            "see 'launcher image list'")
    return entries[entry_id]


def _check_model_support(job: Job) -> None:
    """The model must be one the ranks' MindFormers carries; a research model needs its source tree."""
    model = MODELS[job.model]
    if "entry" in job.image.model_fields_set and job.image.entry:
        matrix_entry(job.image.entry)
    version, field = mindformers_release(job)
    if version is not None and not model.carried_by(version):
        able = [e.id for e in images.load_matrix().values() if model.carried_by(e.mindformers.version)]
        hint = f" (images with one: {', '.join(able)})" if able else ""
        raise _FieldProblem(field, f"{job.model} runs on {model.releases}, not on MindFormers {version}{hint}")
    if version is not None and job.cluster.launch == "msrun" and release_line(version) < release_line(MSRUN_FROM):
        raise _FieldProblem("cluster.launch", f"MindFormers {version} has no msrun launch (MindFormers' "
                            f"msrun_launcher.sh arrived in {MSRUN_FROM}); use launch: ranktable")
    if model.research is None:
        return
    if version is None:
        raise _FieldProblem("mindformers.version", f"{job.model} lives in MindFormers' {model.research}, which only "
                            f"{model.releases} has; say which release the ranks run (image.entry or mindformers.version)")
    if not job.mindformers.source:
        raise _FieldProblem("mindformers.source", f"{job.model}'s classes are in {model.research} of the MindFormers "
                            f"source tree (no wheel ships it); give the path of a MindFormers {version} checkout on "
                            "the nodes (or in the image)")


def _check_k8s(job: Job) -> None:
    k8s = job.cluster.k8s
    if job.data is not None and not k8s.output_pvc:
        raise _FieldProblem("data", "on Kubernetes the prepared dataset goes on the job's claim, where every pod "
                            "reads it; set cluster.k8s.output_pvc")
    if job.cluster.runtime == "docker":
        raise _FieldProblem("cluster.runtime", "on Kubernetes every pod already runs in the image; remove runtime: docker")
    if k8s.kind == "ascend-job":
        if job.cluster.launch != "msrun" or k8s.pods != "per-node":
            raise _FieldProblem(
                "cluster.k8s.kind",
                "an AscendJob runs one Worker pod per node under MindSpore's dynamic cluster; "
                "set cluster.launch: msrun and cluster.k8s.pods: per-node",
            )
        if job.cluster.device != "ascend":
            raise _FieldProblem("cluster.k8s.kind", "an AscendJob needs Ascend NPUs; set cluster.device: ascend")
    if k8s.anti_affinity and k8s.pods == "per-rank" and k8s.kind != "ascend-job":
        if any(len(n.devices) > 1 for n in job.cluster.nodes):
            raise _FieldProblem(
                "cluster.k8s.anti_affinity",
                "one pod per host cannot place several per-rank pods on a node; use pods: per-node",
            )
    scheduler = k8s.scheduler_for(job.cluster.device)
    if "queue" in k8s.model_fields_set and scheduler != "volcano" and k8s.kind == "pods":
        raise _FieldProblem("cluster.k8s.queue", "a queue only applies with scheduler: volcano")
    if job.cluster.device != "ascend":
        return
    if scheduler == "default" and k8s.kind != "volcano-job" and k8s.device_plugin == "volcano":
        raise _FieldProblem(
            "cluster.k8s.scheduler",
            "MindCluster's device plugin in Volcano mode gives NPUs only to pods Volcano scheduled; use "
            "scheduler: volcano, or set cluster.k8s.device_plugin: default if yours runs without -volcanoType=true",
        )
    if job.cluster.launch == "ranktable":
        # MindCluster writes the rank table into rings-config-<job> for Volcano Jobs, not for bare pods,
        # one server entry per pod; each pod finds its entry by its own IP.
        if k8s.kind != "volcano-job" or k8s.pods != "per-rank":
            raise _FieldProblem(
                "cluster.k8s.kind",
                "on Kubernetes MindCluster writes the rank table, for a Volcano Job of one pod per rank; "
                "set kind: volcano-job and pods: per-rank, or use cluster.launch: msrun",
            )
        if k8s.host_network and any(len(n.devices) > 1 for n in job.cluster.nodes):
            raise _FieldProblem(
                "cluster.k8s.host_network",
                "a rank-table pod finds its entry by its pod IP, which host networking shares between the "
                "pods of a node; turn host_network off",
            )


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _format_loc(loc: tuple) -> str:
    """('cluster', 'nodes', 1, 'devices') -> 'cluster.nodes[1].devices'."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the location (for 'did you mean' on unknown keys)."""
    model: Any = Job
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return model
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        nxt = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            return model
        model = nxt
    return model


def _first_error(err: ValidationError) -> str:
    e = err.errors(include_url=False)[0]
    loc = e["loc"]
    if e["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1])
        key = str(loc[-1])
        hint = _did_you_mean(key, owner.model_fields) if owner else ""
        allowed = ", ".join(owner.model_fields) if owner else ""
        return f"{_format_loc(loc)}: unknown key '{key}'{hint or f'; allowed keys: {allowed}'}"
    ctx_err = e.get("ctx", {}).get("error")
    if isinstance(ctx_err, _FieldProblem):
        return f"{ctx_err.path}: {ctx_err}"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "missing":
        msg = "is required"
    given = e.get("input")
    if e["type"] == "literal_error" and isinstance(given, str):
        msg += _did_you_mean(given, re.findall(r"'([^']*)'", e.get("ctx", {}).get("expected", "")))
    if e["type"].endswith(("_type", "_parsing")) and not isinstance(given, (dict, list)):
        msg += f" (got {given!r})"
    return f"{_format_loc(loc) or 'job'}: {msg}"


def parse_job(data: Any, source: str = "job") -> Job:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the job file must be a YAML mapping of sections (name, model, cluster, ...)")
    try:
        return Job.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_first_error(err)}") from None


def load_job(path: str | Path) -> Job:
    return parse_job(read_yaml_file(path, "job file"), str(path))


def resolve_local_paths(job: Job, base: Path) -> Job:
    """For the local backend, relative dataset/checkpoint paths are relative to the working directory."""

    def absolute(p: str) -> str:
        return p if not p or Path(p).is_absolute() else str((base / p).resolve())

    return job.model_copy(
        update={
            "dataset": job.dataset.model_copy(update={"path": absolute(job.dataset.path)}),
            "checkpoint": job.checkpoint.model_copy(update={"load": absolute(job.checkpoint.load)}),
        }
    )


def installed_mindformers() -> str | None:
    """The MindFormers release installed beside the launcher (which local runs use), if any."""
    try:
        return importlib.metadata.version("mindformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_local_host(job: Job) -> None:
    """What a local run needs from this machine, checked before anything is written or started."""
    if not Path(job.dataset.path).exists():
        raise ConfigError(
            f"dataset.path: {job.dataset.path} does not exist; "
            "make the demo dataset with 'launcher dataset tiny PATH' or point to your MindRecord file"
        )
    if job.checkpoint.load and not Path(job.checkpoint.load).exists():
        raise ConfigError(f"checkpoint.load: {job.checkpoint.load} does not exist")
    installed = installed_mindformers()
    model = MODELS[job.model]
    if job.mindformers.version is None and installed and not model.carried_by(installed):
        raise ConfigError(f"model: {job.model} runs on {model.releases}; this machine has MindFormers {installed}")
    if not port_is_free(job.cluster.master_port):
        raise ConfigError(
            f"cluster.master_port: port {job.cluster.master_port} is in use on this machine; "
            "pick a free port (or stop what holds it)"
        )

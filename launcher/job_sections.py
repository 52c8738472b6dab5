"""The sections of a job file (dataset, data, checkpoint, parallel, lora, mindformers, cluster, image,
output), each a strict pydantic model with the checks that need only its own fields.

launcher/spec.py puts them together into the Job and checks what spans several sections.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from launcher.models import release_line
from launcher.schema import Strict


class Dataset(Strict):
    path: str | None = Field(None, description="MindRecord file or directory the ranks read (on the nodes for "
                             "remote backends); leave it out when a data: section prepares it")
    shuffle: bool = Field(True, description="every MindFormers fine-tune config shuffles its training data")


class Data(Strict):
    """A dataset to prepare on this machine before the ranks start (`launcher data prepare`).

    The tokenized MindRecord directory is cached under cache_dir by a hash of the source and tokenizer
    bytes, the format, the record length and the template (and its version); `up` then trains on it, so
    dataset.path is not given. Relative paths are relative to the current directory.
    """

    source: str = Field(description="input file: a JSON array or JSON lines")
    format: Literal["alpaca", "belle", "novelset", "conversation"]
    tokenizer: str = Field(description="a sentencepiece tokenizer.model, or a directory with tokenizer.json + "
                           "tokenizer_config.json (Hugging Face), tokenizer.model, or vocab.json + merges.txt")
    template: Literal["vicuna", "chatml"] = Field("vicuna", description="the chat layout: vicuna (MindFormers' "
                                                  "Llama data) or chatml (<|im_start|>role ... <|im_end|>: Qwen, SmolLM2)")
    seq_length: int | None = Field(None, ge=8, description="default: the model's seq_length; records hold one more")
    workers: int | None = Field(None, ge=1, description="tokenizing processes; default: the CPU count")
    strict: bool = Field(False, description="a bad row is an error instead of being skipped and reported")
    cache_dir: str = Field("data/cache", description="where prepared datasets are kept")


class Checkpoint(Strict):
    load: str = ""
    auto_trans: bool = False
    save_steps: int | None = Field(None, ge=1, description="every rank saves a checkpoint every this many steps "
                                   "(MindFormers' save_checkpoint_steps); default: the base config's")
    keep: int | None = Field(None, ge=1, description="how many of its newest checkpoints each rank keeps "
                             "(keep_checkpoint_max); default: the base config's, else MindFormers' 5")
    resume: str | None = Field(None, description="resume training (step, optimizer state, data position) from "
                               "this rank-0 checkpoint file name, found for each rank N as load/rank_N/<name with "
                               "rank_N>; restarts and `launcher resume` set it")

    @model_validator(mode="after")
    def _resume_needs_load(self):
        if self.resume is not None and not self.load:
            raise ValueError("resume names a file under load's rank_N/ folders: give load too")
        if self.resume is not None and not re.match(r"^[^/]*_rank_0-\d+_\d+\.ckpt$", self.resume):
            raise ValueError(f"resume: '{self.resume}' is not a rank-0 checkpoint name like name_rank_0-1_8.ckpt")
        return self


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


_JUMP_RE = re.compile(r"^([^@\s,]+@)?[^@:\s,]+(:\d{1,5})?$")


class Ssh(Strict):
    user: str | None = None
    jump: str | None = Field(None, description="[user@]host[:port] of a login node every node is reached through "
                                               "(SSH tunnelling); default: ProxyJump from ~/.ssh/config")
    identity_file: str | None = None
    known_hosts: str | None = Field(None, description="default ~/.ssh/known_hosts; host keys are always checked")
    workdir: str = Field("launcher-runs", description="on each node; relative paths are under the SSH user's home")
    path_prefix: list[str] = Field(default_factory=list, description="prepended to PATH on the nodes (python, msrun)")
    connect_timeout: float = Field(15, gt=0)
    command_timeout: float = Field(120, gt=0)
    node_lost_after: float = Field(30, gt=0, description="seconds without an answer before a node counts as lost")
    min_free_mb: int = Field(1024, ge=0)

    @field_validator("jump")
    @classmethod
    def _jump(cls, v: str | None) -> str | None:
        if v is not None and not _JUMP_RE.match(v):
            raise ValueError("write the jump host as user@host or user@host:port")
        return v


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


class SecretSource(Strict):
    """Where one secret environment value comes from. Its value is read when the ranks start and is
    never written into the plan, the rendered artifacts, run.json or anything gathered."""

    from_env: str | None = Field(None, description="a variable of the launcher's own environment")
    from_file: str | None = Field(None, description="a file on this machine holding the value (~ is expanded; "
                                  "one trailing line break is dropped)")
    secret: str | None = Field(None, description="k8s: the name of an existing Secret in the namespace")
    key: str | None = Field(None, description="k8s: the key of that Secret")

    @model_validator(mode="after")
    def _one_source(self) -> SecretSource:
        given = [name for name in ("from_env", "from_file", "secret") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of from_env, from_file, or secret (with key)")
        if (self.secret is None) != (self.key is None):
            raise ValueError("a Kubernetes Secret reference needs both secret and key")
        if self.from_env is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.from_env):
            raise ValueError(f"from_env: '{self.from_env}' is not an environment variable name")
        if self.secret is not None and not _DNS_SUBDOMAIN_RE.match(self.secret):
            raise ValueError(f"secret: '{self.secret}' is not a Secret name")
        return self


class Monitor(Strict):
    tensorboard: bool = Field(False, description="MindFormers writes TensorBoard event files; they are gathered "
                              "into runs/<id>/tensorboard/rank_N/")
    stall_after_s: float | None = Field(None, gt=0, description="a rank with no new step for this long has "
                                        "stalled; default: derived from the run's own step times")
    first_step_within_s: float = Field(3600, gt=0, description="a rank with no first step (graph compile, "
                                       "checkpoint load) after this long has stalled")


# What a restart may follow: the failure kinds of launcher/diagnose.py. A Python exception or bad data
# fails the same way again, so they are not in the default.
RESTART_KINDS = ("python_exception", "out_of_memory", "hccl_timeout", "node_lost", "stalled", "pod_evicted",
                 "pod_unschedulable", "bad_data", "unknown")


class Restart(Strict):
    max_attempts: int = Field(1, ge=1, le=100, description="attempts in all; 1 never restarts")
    on: list[Literal[RESTART_KINDS]] = Field(  # type: ignore[valid-type]
        ["out_of_memory", "hccl_timeout", "node_lost", "stalled", "pod_evicted", "unknown"],
        description="the failure kinds that start another attempt")
    backoff_s: float = Field(10, ge=0, description="wait before the next attempt, doubled after each one")


class Notify(Strict):
    webhook: str | None = Field(None, description="an http(s) URL that gets a JSON POST when the run starts, "
                                "fails, restarts and ends; a failed post is only a warning")

    @field_validator("webhook")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"'{v}' is not an http:// or https:// URL")
        return v

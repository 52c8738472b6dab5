"""What MindCluster (Ascend Operator, the Ascend device plugin) and its Volcano plugin expect of the
pods of an Ascend job, beyond plain Kubernetes. Used by k8s_manifests and helm_values.

Sources (Ascend/mind-cluster and Ascend/mindxdl-deploy):
- the rank table: ascend-operator builds it from the device plugin's pod annotation
  `ascend.kubectl.kubernetes.io/ascend-910-configuration`, one server entry per pod, and writes it into
  the existing ConfigMap `rings-config-<job>` (key hccl.json) of a Volcano Job labelled
  `ring-controller.atlas` (pkg/ranktable/plugins.go, pkg/ranktable/common/common.go, pkg/controllers/v1);
- the mount point /user/serverid/devindex/config and the initial `{"status":"initializing"}`:
  the vcjob samples under samples/train/basic-training/ranktable/yaml/;
- the node labels accelerator-type and host-arch, and ASCEND_VISIBLE_DEVICES from the annotation the
  Volcano plugin writes under the resource name: the same samples and the AscendJob samples.
"""

from __future__ import annotations

from launcher.spec import Job

RING_CONTROLLER_LABEL = "ring-controller.atlas"
RANKTABLE_DIR = "/user/serverid/devindex/config"
RANKTABLE_FILE = f"{RANKTABLE_DIR}/hccl.json"
RANKTABLE_VOLUME = "ascend-910-config"  # not "ranktable": that name asks the operator for a host-path file
WAIT_RANKTABLE_SCRIPT = "k8s/wait-ranktable.sh"
# As the samples create it; the operator replaces it with the table, status "completed" once full.
INITIAL_RANKTABLE = '{\n    "status":"initializing"\n}\n'


def cluster_rank_table(job: Job) -> bool:
    """Whether the pods read the rank table MindCluster writes (the device plugin picks the NPUs, so a
    table the plan wrote beforehand would name the wrong devices)."""
    cluster = job.cluster
    return cluster.backend == "k8s" and cluster.device == "ascend" and cluster.launch == "ranktable"


def uses_volcano(job: Job) -> bool:
    """Whether Volcano schedules the job's pods (a Volcano Job's always)."""
    k8s = job.cluster.k8s
    return k8s.kind == "volcano-job" or k8s.scheduler_for(job.cluster.device) == "volcano"


def rings_config_name(job_name: str) -> str:
    return f"rings-config-{job_name}"  # the operator looks the ConfigMap up by the job's name


def node_selector(job: Job) -> dict[str, str]:
    """The labels of the nodes the pods may run on. Ascend pods go to NPU servers of the job's
    accelerator type, which also chooses the Volcano plugin's handler; the job's own node_selector wins."""
    k8s = job.cluster.k8s
    selector = {}
    if job.cluster.device == "ascend":
        selector["accelerator-type"] = k8s.accelerator_type
        if k8s.host_arch:
            selector["host-arch"] = k8s.host_arch
    return {**selector, **k8s.node_selector}


def visible_devices_env(job: Job) -> dict:
    """ASCEND_VISIBLE_DEVICES from the annotation the Volcano plugin writes under the resource name
    (the device plugin reconciles its allocations with it). Ascend Operator adds it to AscendJob pods."""
    path = f"metadata.annotations['{job.cluster.k8s.resource_name}']"
    return {"name": "ASCEND_VISIBLE_DEVICES", "valueFrom": {"fieldRef": {"fieldPath": path}}}


def wants_visible_devices(job: Job, npus: int) -> bool:
    return job.cluster.device == "ascend" and npus > 0 and job.cluster.k8s.kind != "ascend-job" and uses_volcano(job)


def worker_anti_affinity(job: Job) -> dict:
    """At most one Worker per host, matched by the labels Ascend Operator gives its pods (kubeflow/common
    job-name and replica-type), so the Scheduler pod may still share a Worker's host."""
    expressions = [
        {"key": "job-name", "operator": "In", "values": [job.name]},
        {"key": "replica-type", "operator": "In", "values": ["worker"]},
    ]
    return {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchExpressions": expressions}, "topologyKey": "kubernetes.io/hostname"}
            ]
        }
    }


def rings_configmap(job: Job, metadata: dict) -> dict:
    metadata["labels"][RING_CONTROLLER_LABEL] = job.cluster.k8s.ring_controller
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {"hccl.json": INITIAL_RANKTABLE}}


def rank_table_env() -> list[dict]:
    """The pod's own IP identifies its entry in the table (the operator's container_ip is status.podIP)."""
    return [
        {"name": "RANK_TABLE_FILE", "value": RANKTABLE_FILE},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]


def rank_table_volume(job: Job) -> dict:
    return {"name": RANKTABLE_VOLUME, "configMap": {"name": rings_config_name(job.name)}}


def rank_table_mount() -> dict:
    return {"name": RANKTABLE_VOLUME, "mountPath": RANKTABLE_DIR, "readOnly": True}


def acjob_sched_host(job: Job) -> str:
    """The Service Ascend Operator makes in front of the Scheduler pod: <job>-scheduler-0."""
    return f"{job.name}-scheduler-0.{job.cluster.k8s.namespace}.svc"


def acjob_cpu_env(job: Job, steps, port: int) -> tuple[list[dict], list[dict]]:
    """The MindSpore variables of a CPU AscendJob's Scheduler and Workers. Ascend Operator injects them only
    when the Worker asks for NPUs (Ascend/mind-cluster component/ascend-operator/pkg/controllers/v1/pod.go
    setEnv, env.go setMindSporeEnv), so here the templates carry the values it would give: the Scheduler's
    own IP, the Service <job>-scheduler-0, Worker <i> as node rank <i> (its replica-index label), the
    workers per pod and in all."""
    def _env(name: str, value) -> dict:
        return {"name": name, "value": str(value)}

    def _field_env(name: str, path: str) -> dict:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    world = sum(len(step.ranks) for step in steps)
    common = [_env("MS_SCHED_PORT", port), _env("MS_WORKER_NUM", world)]
    sched = [_field_env("MS_SCHED_HOST", "status.podIP"), *common, _env("MS_ROLE", "MS_SCHED"),
             _env("MS_TOPO_TIMEOUT", job.cluster.cluster_time_out)]
    worker = [_env("MS_SCHED_HOST", acjob_sched_host(job)), *common, _env("MS_LOCAL_WORKER", len(steps[0].ranks)),
              _field_env("MS_NODE_RANK", "metadata.labels['replica-index']"), _env("MS_ROLE", "MS_WORKER")]
    return sched, worker

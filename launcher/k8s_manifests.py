"""The Kubernetes objects of a `backend: k8s` job, built as plain dicts (dumped with to_yaml by the plan).

Pure like the plan: the same job gives the same objects. Two values are not known until the k8s
backend creates the objects, and are rendered as placeholders it replaces:
- the run id: a rendered plan can run many times, so the `launcher/run-id` label carries the job name;
- the owner's uid: every object is owned by the job's ConfigMap (deleting it deletes the rest), and an
  ownerReference needs the uid the API server gives the ConfigMap when it is created.
Secrets (image pull secrets, storage keys, secret_env) are referenced by name only; nothing secret is
rendered. The job's from_env/from_file values go into a Secret that the k8s backend creates for each run:
`<job>-secret-env` here (renamed per run like the rest), one key per variable; whoever applies these
manifests with kubectl creates it.
The labels and owner every object carries, and the run-wide ConfigMap, Service and PodGroup, are in
k8s_objects.py; the pods and job controllers are built here.
"""

from __future__ import annotations

from launcher import k8s_ascend, k8s_objects, secret_env
from launcher.k8s_objects import RUN_LABEL, configmap_key
from launcher.runs import RUN_DATA_DIR  # on the output claim: the prepared datasets
from launcher.spec import Job

PLAN_MOUNT = "/launcher/plan"  # the ConfigMap, with the plan's files at their relative paths
WORK_DIR = "/launcher/work"  # the pod's working directory; MindFormers writes ./output under it
CLAIM_RUNS_DIR = "runs"  # on the output claim: runs/<run id>/ is mounted at each pod's output/
RANK_LABEL = "launcher/rank"  # per-rank pods: the rank the pod runs
NODE_LABEL = "launcher/node"  # per-node pods and AscendJob Workers: the index of the job's node
RUN_ID_VAR = "LAUNCHER_RUN_ID"
RANK_SCRIPT = "k8s/rank.sh"
ACJOB_WORKER_SCRIPT = "k8s/acjob-worker.sh"
SCHEDULER_LOG = "output/rank_log/scheduler.log"
# Ascend Operator's default port of the Scheduler service ("ascendjob-port", 2222), see
# hiascend.com MindCluster docs "Ascend Operator environment variables" (MS_SCHED_PORT).
ACJOB_PORT = 2222
_ASCEND_HOST_FILES = (
    ("ascend-driver", "/usr/local/Ascend/driver", "Directory"),
    ("npu-smi", "/usr/local/bin/npu-smi", "File"),
    ("ascend-install-info", "/etc/ascend_install.info", "File"),
)


def service_host(job: Job) -> str:
    """DNS name of the headless Service in front of the pod that runs MindSpore's scheduler."""
    return f"{job.name}-sched.{job.cluster.k8s.namespace}.svc"


def manifests(job: Job, plan_files: dict[str, str], slots, steps) -> dict[str, dict]:
    """Artifact path -> object. `plan_files` are the plan files the pods read (they go in the ConfigMap)."""
    k8s = job.cluster.k8s
    if k8s_ascend.cluster_rank_table(job):  # the pods read MindCluster's table, not the plan's
        plan_files = {path: text for path, text in plan_files.items() if not path.startswith("ranktable/")}
    objects = {"k8s/00-configmap.yaml": k8s_objects.configmap(job, plan_files)}
    if k8s_ascend.cluster_rank_table(job):
        objects["k8s/00-rings-config.yaml"] = k8s_ascend.rings_configmap(
            job, k8s_objects.metadata(job, k8s_ascend.rings_config_name(job.name)))
    if dynamic_cluster(job):
        objects["k8s/01-service.yaml"] = k8s_objects.service(job)
    if k8s.kind == "ascend-job":
        objects["k8s/ascend-job.yaml"] = _ascend_job(job, plan_files, steps)
        return objects
    pods = _rank_pods(job, plan_files, slots) if k8s.pods == "per-rank" else _node_pods(job, plan_files, steps)
    if k8s.kind == "volcano-job":
        objects["k8s/volcano-job.yaml"] = _volcano_job(job, pods)
        return objects
    if k8s_ascend.uses_volcano(job):
        objects["k8s/02-podgroup.yaml"] = k8s_objects.podgroup(job, len(pods))
    for name, pod in pods.items():
        objects[f"k8s/{name.removeprefix(job.name + '-')}.yaml"] = pod
    return objects


def dynamic_cluster(job: Job) -> bool:
    """MindSpore's dynamic cluster (an MS_SCHED process the workers dial) is used by msrun, and by
    rank-table mode on the CPU, which has no HCCL rank table. An AscendJob's operator makes its own Service."""
    if job.cluster.k8s.kind == "ascend-job":
        return False
    return job.cluster.launch == "msrun" or job.cluster.device == "cpu"


def _env(name: str, value) -> dict:
    return {"name": name, "value": str(value)}


def _field_env(name: str, field_path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def secret_env_vars(job: Job) -> list[dict]:
    """The job's secret_env as references, never values. Kubernetes API (kubernetes/api core/v1
    types.go): EnvVar.valueFrom is an EnvVarSource, whose secretKeyRef is a SecretKeySelector, the
    Secret's name (LocalObjectReference) and key; the Secret must be in the pod's namespace."""
    out = []
    for name, source in job.secret_env.items():
        ref = ({"name": source.secret, "key": source.key} if source.secret is not None
               else {"name": secret_env.secret_name(job.name), "key": name})
        out.append({"name": name, "valueFrom": {"secretKeyRef": ref}})
    return out


def _container(job: Job, name: str, command: list[str], env: list[dict], npus: int, ports=()) -> dict:
    ascend = job.cluster.device == "ascend"
    # Every container runs the job's entrypoint, as every process does under msrun on the other backends.
    env = [*env, *secret_env_vars(job)]
    if job.cluster.k8s.host_network:
        # HCCL's host NIC: the node's address, which the pod shares with host networking.
        env = [*env, _field_env("HCCL_IF_IP", "status.hostIP")]
    if k8s_ascend.wants_visible_devices(job, npus):
        env = [*env, k8s_ascend.visible_devices_env(job)]
    container = {
        "name": name,
        "image": job.image.reference,
        "command": command,
        "workingDir": WORK_DIR,
        "env": env,
        "volumeMounts": [
            {"name": "plan", "mountPath": PLAN_MOUNT, "readOnly": True},
            {"name": "work", "mountPath": WORK_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    if job.cluster.k8s.output_pvc:
        # Each run writes to its own folder on the claim, runs/<run id> (the pod's launcher/run-id label,
        # expanded by the kubelet: VolumeMount.subPathExpr, kubernetes/api core/v1 types.go), so a second
        # run of the job never meets or gathers the first one's files. A prepared dataset is read from
        # the claim's data/ folder, mounted read-only inside it.
        container["env"].append(_field_env(RUN_ID_VAR, f"metadata.labels['{RUN_LABEL}']"))
        container["volumeMounts"].append({"name": "output", "mountPath": f"{WORK_DIR}/output",
                                          "subPathExpr": f"{CLAIM_RUNS_DIR}/$({RUN_ID_VAR})"})
        if job.data is not None:
            container["volumeMounts"].append({"name": "output", "mountPath": f"{WORK_DIR}/output/{RUN_DATA_DIR}",
                                              "subPath": RUN_DATA_DIR, "readOnly": True})
    if ascend:
        container["volumeMounts"] += [
            {"name": vol, "mountPath": path, "readOnly": True} for vol, path, _ in _ASCEND_HOST_FILES
        ]
    if k8s_ascend.cluster_rank_table(job) and npus:
        container["volumeMounts"].append(k8s_ascend.rank_table_mount())
    if ascend and npus:
        amount = {job.cluster.k8s.resource_name: str(npus)}
        container["resources"] = {"requests": amount, "limits": dict(amount)}
    if ports:
        container["ports"] = [dict(p) for p in ports]
    return container


def pod_reads(path: str, own_script: str | None = None) -> bool:
    """Whether a pod mounts this plan file: the shared files, and of the per-node ones only its own script.
    Mounting every node's files in every pod would make the manifests grow with nodes × pods."""
    per_node = path.startswith("nodes/") or path.startswith("ranktable/node-")
    return not per_node or path == own_script


def _volumes(job: Job, plan_files: dict[str, str], own_script: str | None) -> list[dict]:
    volumes = [
        {
            "name": "plan",
            "configMap": {
                "name": f"{job.name}-plan",
                "items": [{"key": configmap_key(path), "path": path} for path in plan_files
                          if pod_reads(path, own_script)],
            },
        },
        {"name": "work", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    if job.cluster.k8s.output_pvc:
        volumes.append({"name": "output", "persistentVolumeClaim": {"claimName": job.cluster.k8s.output_pvc}})
    if job.cluster.device == "ascend":
        volumes += [{"name": vol, "hostPath": {"path": path, "type": kind}} for vol, path, kind in _ASCEND_HOST_FILES]
    if k8s_ascend.cluster_rank_table(job):
        volumes.append(k8s_ascend.rank_table_volume(job))
    return volumes


def _pod_spec(job: Job, plan_files: dict[str, str], containers: list[dict], volcano: bool,
              own_script: str | None = None) -> dict:
    k8s = job.cluster.k8s
    spec: dict = {"restartPolicy": "Never"}
    if volcano:
        spec["schedulerName"] = "volcano"
    if k8s.service_account:
        spec["serviceAccountName"] = k8s.service_account
    if k8s.host_network:
        # Host networking would otherwise resolve with the node's DNS, which cannot see the Service.
        spec["hostNetwork"] = True
        spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    selector = k8s_ascend.node_selector(job)
    if selector:
        spec["nodeSelector"] = selector
    if k8s.tolerations:
        spec["tolerations"] = [dict(t) for t in k8s.tolerations]
    if k8s.anti_affinity:
        spec["affinity"] = {
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/name": job.name}},
                        "topologyKey": "kubernetes.io/hostname",
                    }
                ]
            }
        }
    if k8s.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in k8s.image_pull_secrets]
    spec["containers"] = containers
    spec["volumes"] = _volumes(job, plan_files, own_script)
    return spec


def _pod(job: Job, name: str, spec: dict, scheduler: bool, **labels: str) -> dict:
    meta = k8s_objects.metadata(job, name, **labels)
    if scheduler:
        meta["labels"]["launcher/scheduler"] = "true"
    if k8s_ascend.cluster_rank_table(job):
        meta["labels"][k8s_ascend.RING_CONTROLLER_LABEL] = job.cluster.k8s.ring_controller
    if k8s_ascend.uses_volcano(job) and job.cluster.k8s.kind == "pods":
        meta["annotations"] = {"scheduling.k8s.io/group-name": job.name}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def _rank_pods(job: Job, plan_files: dict[str, str], slots) -> dict[str, dict]:
    """One pod per rank, each with one NPU, running k8s/rank.sh with the rank in its environment.

    Per-rank pods do not use msrun: msrun only sets MindSpore's dynamic-cluster variables and starts
    processes, and here each pod is one process. The dynamic cluster needs one MS_SCHED process the
    workers reach at MS_SCHED_HOST:MS_SCHED_PORT, and MS_WORKER_NUM workers with MS_ROLE=MS_WORKER and
    MS_NODE_ID=<rank>. The scheduler runs as a second container in rank 0's pod: it starts and ends with
    the job, needs no NPU, and the headless Service selects that pod. It binds to the pod's own IP.
    """
    cluster = job.cluster
    world = len(slots)
    volcano = k8s_ascend.uses_volcano(job)
    script = f"{PLAN_MOUNT}/{RANK_SCRIPT}"
    dynamic = dynamic_cluster(job)
    sched_env = [
        _env("MS_SCHED_PORT", cluster.master_port),
        _env("MS_WORKER_NUM", world),
        _env("MS_TOPO_TIMEOUT", cluster.cluster_time_out),
    ]
    pods = {}
    for slot in slots:
        env = []
        if dynamic:
            env += [
                _env("MS_SCHED_HOST", service_host(job)),
                *sched_env,
                _env("MS_ROLE", "MS_WORKER"),
                _env("MS_NODE_ID", slot.rank),
            ]
            if cluster.device == "ascend" and cluster.launch == "msrun":
                # The pod sees only its own NPU, as device 0; otherwise MindSpore would pick the local rank.
                env.append(_env("DEVICE_ID", 0))
        if k8s_ascend.cluster_rank_table(job):
            env += k8s_ascend.rank_table_env()  # the rank and device come from the table the pod gets
        elif cluster.launch == "ranktable":
            if "ranktable/hccl.json" in plan_files:
                env.append(_env("RANK_TABLE_FILE", f"{PLAN_MOUNT}/ranktable/hccl.json"))
            env += [_env("RANK_ID", slot.rank), _env("DEVICE_ID", slot.device), _env("RANK_SIZE", world)]
        containers = [_container(job, "ascend", ["bash", script, slot.console_log], env, npus=1)]
        scheduler = dynamic and slot.rank == 0
        if scheduler:
            env = [_field_env("MS_SCHED_HOST", "status.podIP"), *sched_env, _env("MS_ROLE", "MS_SCHED")]
            containers.append(_container(job, "scheduler", ["bash", script, SCHEDULER_LOG], env, npus=0))
        name = f"{job.name}-rank-{slot.rank}"
        spec = _pod_spec(job, plan_files, containers, volcano)
        pods[name] = _pod(job, name, spec, scheduler, **{RANK_LABEL: str(slot.rank)})
    return pods


def _node_pods(job: Job, plan_files: dict[str, str], steps) -> dict[str, dict]:
    """One pod per node with all its NPUs, running the node's launch script. msrun (or the rank-table
    script) sets every process's MS_*/RANK_* variables itself; msrun on node_rank 0 starts the scheduler,
    so that pod is the one behind the Service."""
    volcano = k8s_ascend.uses_volcano(job)
    pods = {}
    for step in steps:
        command = ["bash", f"{PLAN_MOUNT}/{step.script}"]
        # The script dials the scheduler here: a value renamed with the run, as a script's text is not.
        env = [_env("MS_SCHED_HOST", service_host(job))] if dynamic_cluster(job) else []
        containers = [_container(job, "ascend", command, env, npus=len(step.ranks))]
        name = f"{job.name}-node-{step.index}"
        scheduler = dynamic_cluster(job) and step.node_rank == 0
        spec = _pod_spec(job, plan_files, containers, volcano, own_script=step.script)
        pods[name] = _pod(job, name, spec, scheduler, **{NODE_LABEL: str(step.index)})
    return pods


def _volcano_job(job: Job, pods: dict[str, dict]) -> dict:
    """A Volcano Job (batch.volcano.sh/v1alpha1) with one task of one replica per pod, since each pod's
    environment differs. Volcano makes the PodGroup itself (minAvailable = all pods), and the
    PodFailed policy ends the whole job when one rank fails.
    Fields from Volcano's CRD config/crd/volcano/bases/batch.volcano.sh_jobs.yaml."""
    tasks = []
    for name, pod in pods.items():
        labels = {k: v for k, v in pod["metadata"]["labels"].items()}
        tasks.append({
            "name": name.removeprefix(job.name + "-"),
            "replicas": 1,
            "template": {"metadata": {"labels": labels}, "spec": pod["spec"]},
        })
    meta = k8s_objects.metadata(job, job.name)
    if k8s_ascend.cluster_rank_table(job):  # asks Ascend Operator for the job's rank table
        meta["labels"][k8s_ascend.RING_CONTROLLER_LABEL] = job.cluster.k8s.ring_controller
    return {
        "apiVersion": "batch.volcano.sh/v1alpha1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "schedulerName": "volcano",
            "queue": job.cluster.k8s.queue,
            "minAvailable": len(tasks),
            "maxRetry": 0,
            "policies": [{"event": "PodFailed", "action": "TerminateJob"}],
            "tasks": tasks,
        },
    }


def _ascend_job(job: Job, plan_files: dict[str, str], steps) -> dict:
    """MindCluster's AscendJob (mindxdl.gitee.com/v1) for MindSpore: one `Scheduler` replica (the MS_SCHED
    process, no NPU) and one `Worker` replica per node. Ascend Operator creates the Service and gives every
    pod MS_SCHED_HOST, MS_SCHED_PORT, MS_ROLE, MS_WORKER_NUM, MS_LOCAL_WORKER and MS_NODE_RANK.
    Sources: hiascend.com MindCluster "Ascend Job" API page and "Ascend Operator environment variables";
    Ascend/mindxdl-deploy samples/train/basic-training/without-ranktable/mindspore/
    mindspore_multinodes_acjob_910b.yaml (container name `ascend`, port name `ascendjob-port`, labels
    framework / ring-controller.atlas, nodeSelector on both replicas, anti-affinity among Workers only)."""
    k8s = job.cluster.k8s
    ring = {k8s_ascend.RING_CONTROLLER_LABEL: k8s.ring_controller}
    port = {"name": "ascendjob-port", "containerPort": ACJOB_PORT}
    npus = len(steps[0].ranks)
    sched_env, worker_env = k8s_ascend.acjob_cpu_env(job, steps, ACJOB_PORT) if job.cluster.device == "cpu" else ([], [])
    sched = _container(job, "ascend", ["bash", f"{PLAN_MOUNT}/{RANK_SCRIPT}", SCHEDULER_LOG], sched_env, 0, [port])
    worker = _container(job, "ascend", ["bash", f"{PLAN_MOUNT}/{ACJOB_WORKER_SCRIPT}"], worker_env, npus, [port])

    def replica(count: int, container: dict) -> dict:
        spec = _pod_spec(job, plan_files, [container], volcano=False)
        del spec["restartPolicy"]  # given per replica type
        if "affinity" in spec and container is worker:
            # Required anti-affinity is symmetric: matching only Workers lets the Scheduler share a host.
            spec["affinity"] = k8s_ascend.worker_anti_affinity(job)
        elif "affinity" in spec:
            del spec["affinity"]
        return {
            "replicas": count,
            "restartPolicy": "Never",
            "template": {"metadata": {"labels": k8s_objects.labels(job, **ring)}, "spec": spec},
        }

    meta = k8s_objects.metadata(job, job.name, framework="mindspore", **ring)
    spec: dict = {}
    if k8s_ascend.uses_volcano(job):
        spec["schedulerName"] = "volcano"
        spec["runPolicy"] = {"schedulingPolicy": {"minAvailable": len(steps) + 1, "queue": k8s.queue}}
    spec["successPolicy"] = "AllWorkers"
    spec["replicaSpecs"] = {"Scheduler": replica(1, sched), "Worker": replica(len(steps), worker)}
    return {"apiVersion": "mindxdl.gitee.com/v1", "kind": "AscendJob", "metadata": meta, "spec": spec}


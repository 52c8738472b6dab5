"""Values for charts/launcher-job: the same per-rank job as the launcher's own manifests (k8s_manifests).

The chart covers per-rank pods (`kind: pods`); the other layouts are rendered as manifests only.
"""

from __future__ import annotations

from launcher import k8s_ascend
from launcher import k8s_manifests as km
from launcher import k8s_objects
from launcher.spec import Job

HELM_VALUES_PATH = "helm/values.yaml"


def applies(job: Job) -> bool:
    k8s = job.cluster.k8s
    return job.cluster.backend == "k8s" and k8s.pods == "per-rank" and k8s.kind == "pods"


def values(job: Job, pod_files: dict[str, str], slots) -> dict:
    cluster, k8s = job.cluster, job.cluster.k8s
    ranktable = cluster.launch == "ranktable"
    return {
        "name": job.name,
        "namespace": k8s.namespace,
        "runId": job.name,  # placeholders, as in the manifests: the backend sets both
        "ownerUid": k8s_objects.OWNER_UID,
        "image": job.image.reference,
        "ascend": cluster.device == "ascend",
        "resourceName": k8s.resource_name,
        "volcano": k8s_ascend.uses_volcano(job),
        "visibleDevices": k8s_ascend.wants_visible_devices(job, npus=1),
        "queue": k8s.queue,
        "dynamicCluster": km.dynamic_cluster(job),
        "schedHost": km.service_host(job),
        "schedPort": cluster.master_port,
        "topoTimeout": cluster.cluster_time_out,
        "deviceIdZero": cluster.device == "ascend" and cluster.launch == "msrun",
        "rankTable": ranktable,
        "rankTableFile": f"{km.PLAN_MOUNT}/ranktable/hccl.json" if "ranktable/hccl.json" in pod_files else "",
        "hostNetwork": k8s.host_network,
        "nodeSelector": k8s_ascend.node_selector(job),
        "tolerations": [dict(t) for t in k8s.tolerations],
        "antiAffinity": k8s.anti_affinity,
        "imagePullSecrets": list(k8s.image_pull_secrets),
        "secretEnv": [{"name": e["name"], "secret": e["valueFrom"]["secretKeyRef"]["name"],
                       "key": e["valueFrom"]["secretKeyRef"]["key"]} for e in km.secret_env_vars(job)],
        "serviceAccount": k8s.service_account or "",
        "outputPvc": k8s.output_pvc or "",
        "preparedData": job.data is not None,
        "planMount": km.PLAN_MOUNT,
        "workDir": km.WORK_DIR,
        "schedulerLog": km.SCHEDULER_LOG,
        "files": [{"key": km.configmap_key(p), "path": p, "content": t, "mount": km.pod_reads(p)}
                  for p, t in pod_files.items()],
        "ranks": [{"rank": s.rank, "device": s.device, "consoleLog": s.console_log} for s in slots],
    }

"""What every Kubernetes object of a job carries (labels, the owner placeholder) and the objects a run has
once (the plan's ConfigMap, the scheduler's Service, Volcano's PodGroup). The pods and job controllers
that use them are built in k8s_manifests.py.
"""

from __future__ import annotations

from launcher.spec import Job

RUN_LABEL = "launcher/run-id"
# The owner's uid placeholder: the k8s backend puts the uid the API server gives the ConfigMap here.
OWNER_UID = "00000000-0000-0000-0000-000000000000"


def configmap_key(path: str) -> str:
    """A plan path as a ConfigMap key (letters, digits, '-', '_', '.'): nodes/node-0/launch.sh -> nodes__node-0__launch.sh."""
    return path.replace("/", "__")


def labels(job: Job, **extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": "launcher",
        "app.kubernetes.io/name": job.name,
        RUN_LABEL: job.name,  # placeholder: the backend sets the run id here
        **extra,
    }


def metadata(job: Job, name: str, **extra_labels: str) -> dict:
    return {
        "name": name,
        "namespace": job.cluster.k8s.namespace,
        "labels": labels(job, **extra_labels),
        "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": f"{job.name}-plan", "uid": OWNER_UID}
        ],
    }


def configmap(job: Job, plan_files: dict[str, str]) -> dict:
    meta = metadata(job, f"{job.name}-plan")
    del meta["ownerReferences"]  # the owner of everything else
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {configmap_key(path): text for path, text in plan_files.items()},
    }


def service(job: Job) -> dict:
    # Headless, and publishing pods before they are ready: the workers dial the scheduler while it starts.
    port = job.cluster.master_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(job, f"{job.name}-sched"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"app.kubernetes.io/name": job.name, "launcher/scheduler": "true"},
            "ports": [{"name": "ms-sched", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def podgroup(job: Job, members: int) -> dict:
    # Fields from Volcano's CRD scheduling.volcano.sh_podgroups.yaml (v1beta1): spec.minMember, spec.queue.
    return {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": metadata(job, job.name),
        "spec": {"minMember": members, "queue": job.cluster.k8s.queue},
    }

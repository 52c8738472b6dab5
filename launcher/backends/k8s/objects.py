"""The plan's rendered Kubernetes objects, made into one run's objects, and the pods the run will have.

The plan renders the job name where a run needs its own values (see k8s_manifests.py): here every
name becomes `<job>-<short run id>`, the `launcher/run-id` label the run id, and references between
the objects (owner, ConfigMap volume, Service selector and DNS name, PodGroup, the rank table's
ConfigMap) follow the new names. The pod templates of a Volcano Job or an AscendJob are renamed like pods.
The owner's uid is filled in later, once the API server has created the ConfigMap.
The run's Secret (the secret_env values the launcher read) is made here, never rendered: the plan
only names it, in the pods' secretKeyRef.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from launcher import k8s_ascend, k8s_objects, secret_env
from launcher.errors import ConfigError
from launcher.k8s_manifests import NODE_LABEL, RANK_LABEL
from launcher.k8s_objects import RUN_LABEL
from launcher.plan import LaunchPlan

# What `launcher up` creates, in dependency order: the owner first, the pods (or the job that makes them) last.
KINDS = ("ConfigMap", "Secret", "Service", "PodGroup", "Job", "AscendJob", "Pod")
# The custom resources among them: kind -> (group, version, plural), from the CRDs of Volcano
# (installer/helm/chart/volcano/crd/bases) and MindCluster's Ascend Operator.
CUSTOM = {
    "PodGroup": ("scheduling.volcano.sh", "v1beta1", "podgroups"),
    "Job": ("batch.volcano.sh", "v1alpha1", "jobs"),
    "AscendJob": ("mindxdl.gitee.com", "v1", "ascendjobs"),
}
_MAX_LABEL = 63  # label values and Service names are DNS labels


@dataclass(frozen=True)
class RunPod:
    """One pod of the run, made by the launcher or by the controller of its Volcano Job or AscendJob."""

    name: str
    ranks: tuple[int, ...]  # the ranks it runs: one (per-rank pod), a node's, or none (a scheduler)
    node: int | None = None  # the job's node it runs (per-node pods and AscendJob Workers)

    @property
    def own_console(self) -> bool:
        """Whether its log is its one rank's console; a node's pod runs msrun, whose workers write
        their consoles to output/ (the claim)."""
        return self.node is None and len(self.ranks) == 1

    def describe(self) -> str:
        if not self.ranks:
            return "scheduler"
        if len(self.ranks) == 1:
            return f"rank {self.ranks[0]}"
        return f"ranks {self.ranks[0]}-{self.ranks[-1]}"


def short_id(run_id: str, job_name: str) -> str:
    """The run id without the job name: its time stamp (and counter), unique per runs directory."""
    return run_id.removeprefix(f"{job_name}-")


def run_objects(plan: LaunchPlan, run_id: str, namespace: str | None = None,
                secrets: Mapping[str, str] | None = None) -> list[dict]:
    """The run's objects in creation order. Raises ConfigError for kinds the backend does not start.
    secrets: the secret_env values the launcher read, which become the run's Secret."""
    rendered = [yaml.safe_load(text) for path, text in sorted(plan.artifacts.items())
                if path.startswith("k8s/") and path.endswith(".yaml")]
    if not rendered:
        raise ConfigError("this plan has no Kubernetes objects; render it with cluster.backend: k8s")
    other = sorted({o["kind"] for o in rendered} - set(KINDS))
    if other:
        raise ConfigError(f"launcher up does not start {', '.join(other)} objects; "
                          "apply the rendered objects under k8s/ with kubectl")
    if len(run_id) > _MAX_LABEL:
        raise ConfigError(f"run id {run_id!r} is longer than {_MAX_LABEL} characters, the limit of a label value; "
                          "use a shorter job name")
    old, new = plan.job_name, f"{plan.job_name}-{short_id(run_id, plan.job_name)}"
    ns = namespace or rendered[0]["metadata"]["namespace"]
    rendered_ns = rendered[0]["metadata"]["namespace"]
    # The schedulers' Services by DNS name in the pods' env: the launcher's, and Ascend Operator's.
    hosts = {f"{old}{suffix}.{rendered_ns}.svc": f"{new}{suffix}.{ns}.svc" for suffix in ("-sched", "-scheduler-0")}

    def rename(name: str) -> str:
        if name == k8s_ascend.rings_config_name(old):  # the operator finds it by the job's name
            return k8s_ascend.rings_config_name(new)
        return new + name[len(old):] if name.startswith(old) else name

    if secrets:
        owner = next(o for o in rendered if o["kind"] == "ConfigMap" and "ownerReferences" not in o["metadata"])
        rendered.append(_secret(owner, secret_env.secret_name(old), secrets))
    objects = []
    for obj in sorted(rendered, key=lambda o: KINDS.index(o["kind"])):
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta["name"], meta["namespace"] = rename(meta["name"]), ns
        meta["labels"][RUN_LABEL] = run_id
        for ref in meta.get("ownerReferences", []):
            ref["name"] = rename(ref["name"])
        if "scheduling.k8s.io/group-name" in meta.get("annotations", {}):
            meta["annotations"]["scheduling.k8s.io/group-name"] = rename(meta["annotations"]["scheduling.k8s.io/group-name"])
        if obj["kind"] == "Service":
            if len(meta["name"]) > _MAX_LABEL:
                raise ConfigError(f"Service name {meta['name']!r} is longer than {_MAX_LABEL} characters; "
                                  "use a shorter job name")
            obj["spec"]["selector"][RUN_LABEL] = run_id  # not the pods of another run of the same job
        if obj["kind"] == "Pod":
            _rename_pod(obj["spec"], rename, hosts, secret_env.secret_name(old))
        for template in _templates(obj):
            template["metadata"]["labels"][RUN_LABEL] = run_id
            _rename_pod(template["spec"], rename, hosts, secret_env.secret_name(old))
            _rename_job_affinity(template["spec"], old, new)
        objects.append(obj)
    return objects


def _templates(obj: dict) -> list[dict]:
    """The pod templates of a Volcano Job (spec.tasks) or an AscendJob (spec.replicaSpecs)."""
    if obj["kind"] == "Job":
        return [task["template"] for task in obj["spec"]["tasks"]]
    if obj["kind"] == "AscendJob":
        return [replica["template"] for replica in obj["spec"]["replicaSpecs"].values()]
    return []


def _rename_job_affinity(spec: dict, old: str, new: str) -> None:
    """The AscendJob Workers' anti-affinity matches the operator's job-name label, the job's own name."""
    terms = spec.get("affinity", {}).get("podAntiAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", [])
    for term in terms:
        for expression in term.get("labelSelector", {}).get("matchExpressions", []):
            if expression["key"] == "job-name":
                expression["values"] = [new if v == old else v for v in expression["values"]]


def run_pods(plan: LaunchPlan, objects: list[dict]) -> list[RunPod]:
    """The pods the run will have, by the names they get: the launcher's own, or a controller's.
    Volcano names a task's pods <job>-<task>-<index> (volcano v1.14.1 pkg/controllers/job/helpers/helpers.go
    MakePodName); Ascend Operator names a replica's pods <job>-<replica type, lower case>-<index>
    (kubeflow/common's GenGeneralName) and Worker <i> is the job's node with node_rank i."""
    pods = []
    for obj in objects:
        name = obj["metadata"]["name"]
        if obj["kind"] == "Pod":
            pods.append(_run_pod(plan, name, obj["metadata"]["labels"]))
        elif obj["kind"] == "Job":
            for task in obj["spec"]["tasks"]:
                labels = task["template"]["metadata"]["labels"]
                pods += [_run_pod(plan, f"{name}-{task['name']}-{i}", labels) for i in range(task.get("replicas", 1))]
        elif obj["kind"] == "AscendJob":
            pods.append(RunPod(f"{name}-scheduler-0", ()))
            for step in sorted(plan.nodes, key=lambda s: s.node_rank):
                pods.append(RunPod(f"{name}-worker-{step.node_rank}", step.ranks, step.index))
    return pods


def _run_pod(plan: LaunchPlan, name: str, labels: Mapping[str, str]) -> RunPod:
    if RANK_LABEL in labels:
        return RunPod(name, (int(labels[RANK_LABEL]),))
    step = next(s for s in plan.nodes if s.index == int(labels[NODE_LABEL]))
    return RunPod(name, step.ranks, step.index)


def _secret(configmap: dict, name: str, values: Mapping[str, str]) -> dict:
    """The run's Secret: one key per variable, owned by the ConfigMap like the job's other objects.
    Kubernetes API (kubernetes/api core/v1 types.go, Secret): data holds base64 bytes, type Opaque."""
    meta = copy.deepcopy(configmap["metadata"])  # its labels; named for the run with the rest
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": meta["name"], "uid": k8s_objects.OWNER_UID}
    meta.update(name=name, ownerReferences=[owner])
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "immutable": True,
            "data": {key: base64.b64encode(value.encode()).decode() for key, value in values.items()}}


def _rename_pod(spec: dict, rename, hosts: Mapping[str, str], own_secret: str) -> None:
    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            volume["configMap"]["name"] = rename(volume["configMap"]["name"])
    for container in spec["containers"]:
        for env in container.get("env", []):
            if env.get("value") in hosts:
                env["value"] = hosts[env["value"]]
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["name"] == own_secret:  # not a Secret of the user's that starts with the job name
                ref["name"] = rename(ref["name"])


def set_owner(obj: dict, owner_uid: str) -> None:
    for ref in obj["metadata"].get("ownerReferences", []):
        if ref["uid"] == k8s_objects.OWNER_UID:
            ref["uid"] = owner_uid


def output_claim(objects: list[dict]) -> str | None:
    """The claim the pods mount at output/, if the job has one."""
    specs = [o["spec"] for o in objects if o["kind"] == "Pod"] + [t["spec"] for o in objects for t in _templates(o)]
    for spec in specs:
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                return volume["persistentVolumeClaim"]["claimName"]
    return None

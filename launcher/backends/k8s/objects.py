"""The plan's rendered Kubernetes objects, made into one run's objects.

The plan renders the job name where a run needs its own values (see k8s_manifests.py): here every
name becomes `<job>-<short run id>`, the `launcher/run-id` label the run id, and references between
the objects (owner, ConfigMap volume, Service selector and DNS name, PodGroup) follow the new names.
The owner's uid is filled in later, once the API server has created the ConfigMap.
The run's Secret (the secret_env values the launcher read) is made here, never rendered: the plan
only names it, in the pods' secretKeyRef.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Mapping

import yaml

from launcher import k8s_manifests, secret_env
from launcher.errors import ConfigError
from launcher.plan import LaunchPlan

RUN_LABEL = k8s_manifests.RUN_LABEL
RANK_LABEL = "launcher/rank"
# What `launcher up` creates, in dependency order: the owner first, the pods last.
KINDS = ("ConfigMap", "Secret", "Service", "PodGroup", "Pod")
_MAX_LABEL = 63  # label values and Service names are DNS labels


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
        raise ConfigError(f"cluster.k8s.kind: launcher up starts `kind: pods` jobs only, not {', '.join(other)}; "
                          "apply the rendered objects under k8s/ with kubectl")
    if len(run_id) > _MAX_LABEL:
        raise ConfigError(f"run id {run_id!r} is longer than {_MAX_LABEL} characters, the limit of a label value; "
                          "use a shorter job name")
    old, new = plan.job_name, f"{plan.job_name}-{short_id(run_id, plan.job_name)}"
    ns = namespace or rendered[0]["metadata"]["namespace"]
    old_host, new_host = f"{old}-sched.{rendered[0]['metadata']['namespace']}.svc", f"{new}-sched.{ns}.svc"

    def rename(name: str) -> str:
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
            _rename_pod(obj["spec"], rename, old_host, new_host, secret_env.secret_name(old))
        objects.append(obj)
    return objects


def _secret(configmap: dict, name: str, values: Mapping[str, str]) -> dict:
    """The run's Secret: one key per variable, owned by the ConfigMap like the job's other objects.
    Kubernetes API (kubernetes/api core/v1 types.go, Secret): data holds base64 bytes, type Opaque."""
    meta = copy.deepcopy(configmap["metadata"])  # its labels; named for the run with the rest
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": meta["name"], "uid": k8s_manifests.OWNER_UID}
    meta.update(name=name, ownerReferences=[owner])
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "immutable": True,
            "data": {key: base64.b64encode(value.encode()).decode() for key, value in values.items()}}


def _rename_pod(spec: dict, rename, old_host: str, new_host: str, own_secret: str) -> None:
    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            volume["configMap"]["name"] = rename(volume["configMap"]["name"])
    for container in spec["containers"]:
        for env in container.get("env", []):
            if env.get("value") == old_host:
                env["value"] = new_host
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["name"] == own_secret:  # not a Secret of the user's that starts with the job name
                ref["name"] = rename(ref["name"])


def set_owner(obj: dict, owner_uid: str) -> None:
    for ref in obj["metadata"].get("ownerReferences", []):
        if ref["uid"] == k8s_manifests.OWNER_UID:
            ref["uid"] = owner_uid


def output_claim(objects: list[dict]) -> str | None:
    """The claim the pods mount at output/, if the job has one."""
    for obj in objects:
        for volume in obj["spec"].get("volumes", []) if obj["kind"] == "Pod" else []:
            if "persistentVolumeClaim" in volume:
                return volume["persistentVolumeClaim"]["claimName"]
    return None

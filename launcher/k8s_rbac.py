"""The least privilege the Kubernetes backend needs in a namespace, as a Role and its RoleBinding.

Each rule lists the calls of backends/k8s/cluster.py that need it; a call outside these rules is refused by the
API with a 403 that names the verb and the resource (shown as the API's message).
Kubernetes RBAC (kubernetes/api rbac/v1 types.go): PolicyRule apiGroups/resources/verbs; a
subresource is written `<resource>/<subresource>`.
"""

from __future__ import annotations

RULES = [
    # create_all (the owner first), delete_all and `down` (deleted by name, found by label).
    {"apiGroups": [""], "resources": ["configmaps", "services"], "verbs": ["create", "delete", "list"]},
    # The run's Secret, for jobs with secret_env read on this machine.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "delete", "list"]},
    # The ranks: created, watched (list + watch streams), deleted.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "delete", "list", "watch"]},
    # The live view, ranks/rank_N/console.log and `logs`.
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    # Why pods are still Pending (FailedScheduling).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
    # The gang of a Volcano-scheduled job.
    {"apiGroups": ["scheduling.volcano.sh"], "resources": ["podgroups"], "verbs": ["create", "delete", "list"]},
    # kind: volcano-job and kind: ascend-job, whose controllers make the pods.
    {"apiGroups": ["batch.volcano.sh"], "resources": ["jobs"], "verbs": ["create", "delete", "list"]},
    {"apiGroups": ["mindxdl.gitee.com"], "resources": ["ascendjobs"], "verbs": ["create", "delete", "list"]},
]


def role_objects(namespace: str, service_account: str, name: str = "launcher") -> list[dict]:
    """The Role with RULES, and the RoleBinding that grants it to the service account."""
    meta = {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/managed-by": "launcher"}}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
            "rules": [dict(rule) for rule in RULES]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": dict(meta),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
               "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]}
    return [role, binding]

"""Reaching the Kubernetes API, and reading a pod's state from what it returns."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher.errors import BackendError
from launcher.k8s_manifests import CLAIM_RUNS_DIR
from launcher.runs import TARGET_FILE

RANK_CONTAINER = "ascend"  # the container that runs the rank (k8s_manifests._rank_pods)


@dataclass
class Target:
    """How to reach the cluster, like kubectl: kubeconfig (or $KUBECONFIG, or in-cluster), context, namespace."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None
    pvc_dir: str | None = None  # where the job's output PVC is mounted on this machine

    def claim_folder(self, run_id: str) -> Path | None:
        """The run's own folder on the claim as mounted here (the pods' output/), with --pvc-dir."""
        return Path(self.pvc_dir) / CLAIM_RUNS_DIR / run_id if self.pvc_dir else None

    def save(self, run_dir: Path) -> None:
        (run_dir / TARGET_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> Target:
        path = run_dir / TARGET_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()


def api_client(target: Target):
    from kubernetes import client, config

    try:
        return config.new_client_from_config(config_file=target.kubeconfig, context=target.context)
    except (config.ConfigException, FileNotFoundError) as exc:
        if target.kubeconfig or target.context or "KUBERNETES_SERVICE_HOST" not in os.environ:
            raise BackendError(f"no usable kubeconfig ({exc}); set KUBECONFIG or pass --kubeconfig") from None
    configuration = client.Configuration()
    config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def api_message(exc) -> str:
    """The API server's own message from an ApiException, else the exception."""
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(getattr(exc, "reason", None) or exc)


def phase(pod) -> str | None:
    return pod.status.phase if pod.status else None


def finished_at(pod) -> float:
    for status in (pod.status.container_statuses or []) if pod.status else []:
        if status.name == RANK_CONTAINER and status.state and status.state.terminated:
            when = status.state.terminated.finished_at
            return when.timestamp() if when else float("inf")
    return float("inf")


def exit_code(pod) -> int | None:
    for status in (pod.status.container_statuses or []) if pod.status else []:
        if status.name == RANK_CONTAINER and status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None

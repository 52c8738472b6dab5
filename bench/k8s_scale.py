"""Kubernetes scale: plan, render and validate a per-rank job of 256 nodes × 8 devices (2048 pods) and of
32 nodes, and count the API requests `up` makes per pod to create the run, against the tests' real
control plane (k8s_control_plane.py), read from the apiserver's audit log.

Prints the time of each size and the ratio 256 / 32 (goal: 9 or less, i.e. linear), and requests per
pod for 32 and 256 nodes (goal: the same constant for both).

    .venv/bin/python bench/k8s_scale.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import k8s_control_plane  # noqa: E402  (the real control plane of the end-to-end tests)

from launcher.backends.k8s.api import Target  # noqa: E402
from launcher.backends.k8s.cluster import KubeRun  # noqa: E402
from launcher.plan import build_plan  # noqa: E402
from launcher.runs import RunRecord  # noqa: E402
from launcher.spec import parse_job  # noqa: E402


def job(nodes: int) -> dict:
    data = yaml.safe_load((REPO / "configs/examples/llama2-7b-lora-1x8-k8s.yaml").read_text())
    data["name"] = "scale"
    data["parallel"] = {"data_parallel": nodes * 8}
    data["cluster"]["nodes"] = [{"host": f"node-{i}", "devices": "0-7",
                                 "device_ips": [f"10.{i // 250}.{i % 250}.{d}" for d in range(8)]}
                                for i in range(nodes)]
    return data


def plan_render_validate(nodes: int):
    start = time.perf_counter()
    plan = build_plan(parse_job(job(nodes)))
    objects = [doc for rel, text in plan.artifacts.items() if rel.startswith("k8s/") and rel.endswith(".yaml") and rel.endswith(".yaml")
               for doc in yaml.safe_load_all(text) if doc]
    for obj in objects:
        if obj["apiVersion"] in ("v1",):
            kubernetes_validate.validate(obj, "1.33.0", strict=True)
    return plan, len(objects), time.perf_counter() - start


def requests_per_pod(plan, root: Path, plane) -> float:
    """API requests of the launcher's user per pod for creating the run (the audit log counts them)."""
    kubeconfig = plane.kubeconfig("admin")
    start = plane.audit_log.stat().st_size
    record = RunRecord(f"scale-{len(plan.ranks)}", plan.job_name, "k8s", "starting", time.time())
    run = KubeRun(plan, root, record, Target(kubeconfig=str(kubeconfig), namespace="default"))
    run.create_all(replace=False)
    pods = sum(1 for o in run.objects if o["kind"] == "Pod")
    made = plane.requests(since=start)
    run.delete_all()
    return len(made) / pods


def main() -> None:
    results = {}
    plane = k8s_control_plane.shared()
    plane.start_volcano()  # the example's pods are gang-scheduled: its PodGroup needs Volcano's CRDs
    for nodes in (32, 256):
        plan, count, seconds = plan_render_validate(nodes)
        results[nodes] = seconds
        with tempfile.TemporaryDirectory() as tmp:
            per_pod = requests_per_pod(plan, Path(tmp), plane)
        print(f"{nodes} nodes × 8: {count} objects planned, rendered and validated in {seconds:.2f}s; "
              f"up made {per_pod:.2f} API requests per pod")
    print(f"ratio 256 / 32: {results[256] / results[32]:.2f}  (goal: 9 or less)")


if __name__ == "__main__":
    main()

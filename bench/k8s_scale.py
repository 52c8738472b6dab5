"""Kubernetes scale: the API requests of a whole `launcher up` per pod, and the time to plan, render and
validate a per-rank job of 32 and 256 nodes × 8 devices.

1. Render: configs/examples/llama2-7b-lora-1x8-k8s.yaml widened to 32 and 256 nodes × 8 (256 and 2048
   pods): build the plan, parse its rendered objects and validate each one that has a Kubernetes
   schema with kubernetes_validate (strict). One untimed run of each size first, then the median of 3,
   in CPU time of this process.
   Goal: linear, (t256 / t32) / 8 ≤ 1.1.
2. Requests: configs/examples/tiny-lora-k8s.yaml (CPU, one pod per rank) with 8, 32 and 128 ranks, run
   by the Kubernetes backend's execute() (create, watch, logs, gather, delete) against the tests' real
   control plane (tests/k8s_control_plane.py), the node agent playing the kubelet
   (tests/k8s_node_agent.py). The pods run a stand-in for k8s/rank.sh that prints a few MindFormers
   step lines over ~3 s: 128 MindSpore ranks cannot run on this machine, and the launcher's requests
   do not depend on what the ranks compute. Every request of the launcher's user between the start and
   the end of execute() is read from the apiserver's audit log, and printed per pod and by kind.
   Goal: requests per pod constant as pods grow, (per pod at 128) / (per pod at 8) ≤ 1; the run's fixed
   requests (its ConfigMap, Service, the watch) make that ratio fall, so the requests each added pod
   costs (8 → 32, 32 → 128) are printed too, and should be the same.

    .venv/bin/python bench/k8s_scale.py
"""

from __future__ import annotations

import dataclasses
import io
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import kubernetes_validate
import yaml
from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import k8scluster  # noqa: E402  (the end-to-end tests' control plane and node agent)
from k8s_node_agent import NODE_ALLOCATABLE  # noqa: E402

from launcher.backends.k8s.api import Target  # noqa: E402
from launcher.backends.k8s.cluster import execute  # noqa: E402
from launcher.backends.k8s.objects import CUSTOM  # noqa: E402
from launcher.k8s_manifests import RANK_SCRIPT, configmap_key  # noqa: E402
from launcher.plan import build_plan  # noqa: E402
from launcher.runs import RunRecord, new_run_id  # noqa: E402
from launcher.spec import parse_job  # noqa: E402

K8S_VERSION = "1.33.0"  # the newest version tests/test_k8s_render.py validates against
CLAIM = "launcher-output"
KINDS = ("create", "watch pods", "list", "log follow", "log read", "delete", "other")

# What the pods run instead of MindSpore: a rank prints step lines on its log (the live view parses
# them) over ~3 s, so the watch and the log reads span several polls, and leaves a placeholder
# checkpoint on the claim for gather. Rank 0's pod also has the scheduler container: it only waits.
STAND_IN = """#!/usr/bin/env bash
set -eu
if [ -z "${MS_NODE_ID:-}" ]; then sleep 3; exit 0; fi
for step in 1 2 3 4 5 6; do
  echo "{ Epoch:[  1/  1], step:[    ${step}/    6], loss:[5.548754/5.545023], per_step_time: 500ms, lr: 0.0001 }"
  sleep 0.5
done
mkdir -p "output/checkpoint/rank_${MS_NODE_ID}"
echo stand-in > "output/checkpoint/rank_${MS_NODE_ID}/stand-in.ckpt"
"""


# --- plan + render + validate ------------------------------------------------------------------


def llama_job(nodes: int) -> dict:
    data = yaml.safe_load((REPO / "configs/examples/llama2-7b-lora-1x8-k8s.yaml").read_text())
    data["name"] = "scale"
    data["parallel"] = {"data_parallel": nodes * 8}
    data["cluster"]["nodes"] = [{"host": f"node-{i}", "devices": "0-7",
                                 "device_ips": [f"10.{i // 250}.{i % 250}.{d}" for d in range(8)]}
                                for i in range(nodes)]
    return data


def plan_render_validate(nodes: int) -> tuple[float, Counter, Counter]:
    """CPU seconds of this process, and the kinds validated and skipped. CPU time, not wall time: on a
    machine of two shared cores the wall time of a minute of work swings with whatever else runs."""
    start = time.process_time()
    plan = build_plan(parse_job(llama_job(nodes)))
    validated, skipped = Counter(), Counter()
    for rel, text in plan.artifacts.items():
        if not (rel.startswith("k8s/") and rel.endswith(".yaml")):
            continue
        # libyaml's parser: PyYAML's pure-Python one takes longer than the plan; the bench times the launcher.
        for obj in filter(None, yaml.load_all(text, Loader=yaml.CSafeLoader)):
            # kubernetes_validate has schemas of the built-in API groups only (and drops an apiVersion's
            # domain, so a custom kind could meet a built-in schema): the custom kinds (Volcano's PodGroup
            # here) are skipped. Every other kind must have a schema: SchemaNotFoundError stops the bench.
            if obj["kind"] in CUSTOM:
                skipped[obj["kind"]] += 1
                continue
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            validated[obj["kind"]] += 1
    return time.process_time() - start, validated, skipped


def bench_render() -> None:
    times = {}
    for nodes in (32, 256):
        plan_render_validate(nodes)  # warm: imports, templates, schema files
        runs = [plan_render_validate(nodes) for _ in range(3)]
        times[nodes] = statistics.median(seconds for seconds, _, _ in runs)
        _, validated, skipped = runs[0]
        print(f"{nodes:>4} nodes × 8: plan + render + validate {times[nodes]:6.2f} CPU s (median of 3); validated "
              f"{dict(validated)}, skipped (no schema) {dict(skipped)}", flush=True)
    print(f"(t256 / t32) / 8 = {times[256] / times[32] / 8:.2f}   (goal: 1.1 or less, linear)\n", flush=True)


# --- API requests of a whole up ----------------------------------------------------------------


def tiny_plan(ranks: int):
    """The tiny CPU job with one pod per rank, whose pods run STAND_IN instead of k8s/rank.sh."""
    data = yaml.safe_load((REPO / "configs/examples/tiny-lora-k8s.yaml").read_text())
    data["name"] = "scale"
    data["parallel"] = {"data_parallel": ranks}
    data["cluster"]["nodes"] = [{"host": f"node-{i}", "devices": "0-7"} for i in range(ranks // 8)]
    data["cluster"]["k8s"]["output_pvc"] = CLAIM
    plan = build_plan(parse_job(data))
    # The pods read the script from the plan's ConfigMap, rendered already: replace it there too.
    artifacts = dict(plan.artifacts)
    artifacts[RANK_SCRIPT] = STAND_IN
    configmap = yaml.safe_load(artifacts["k8s/00-configmap.yaml"])
    configmap["data"][configmap_key(RANK_SCRIPT)] = STAND_IN
    artifacts["k8s/00-configmap.yaml"] = yaml.safe_dump(configmap)
    pods = [yaml.safe_load(t) for rel, t in artifacts.items() if rel.startswith("k8s/rank-")]
    # CPU pods request no cpu or memory (only NPUs are asked for), so only the nodes' pods limit them.
    assert not any(c.get("resources") for pod in pods for c in pod["spec"]["containers"]), "pods request resources"
    return dataclasses.replace(plan, artifacts=artifacts)


def kind_of(event: dict) -> str:
    ref = event.get("objectRef") or {}
    verb = event["verb"]
    if ref.get("subresource") == "log":  # a stream while the run is watched, or a whole read (gather)
        return "log follow" if "follow=true" in event["requestURI"] else "log read"
    if verb == "create":
        return "create"
    if verb in ("delete", "deletecollection"):
        return "delete"
    if verb == "watch" and ref.get("resource") == "pods":
        return "watch pods"
    if verb == "list":  # any kind: the pods once, and the deletion's polls until the run's objects are gone
        return "list"
    return "other"


def admin_requests(plane, since: int) -> Counter:
    """The kind of every request the launcher's user (admin) made, from byte offset since on."""
    events = plane.audit_events(since)
    # One request has a ResponseStarted event if it streams (watch, log follow) and a ResponseComplete
    # one when it ends: count it once, by its audit ID, even if its stream is still closing.
    found = {e["auditID"]: kind_of(e) for e in events
             if e["user"]["username"] == "admin" and e["stage"] in ("ResponseStarted", "ResponseComplete", "Panic")}
    return Counter(found.values())


def one_up(cluster, runs: Path, ranks: int) -> tuple[float, Counter]:
    plan = tiny_plan(ranks)
    run_id = new_run_id(plan.job_name, runs)
    run_dir = runs / run_id
    run_dir.mkdir(parents=True)
    record = RunRecord(run_id, plan.job_name, "k8s", "starting", time.time())
    target = Target(kubeconfig=str(cluster.kubeconfig), namespace="default",
                    pvc_dir=str(cluster.runner.pvc_dir(CLAIM)))
    since = cluster.plane.audit_log.stat().st_size
    start = time.perf_counter()
    record, problems = execute(plan, run_dir, record, Console(file=io.StringIO()), target, replace=False,
                               pending_timeout=300)
    seconds = time.perf_counter() - start
    if record.state != "succeeded" or problems:
        raise SystemExit(f"{ranks} pods: the run {record.state}: {record.message} {problems[:3]}")
    return seconds, admin_requests(cluster.plane, since)


def bench_requests() -> None:
    sizes = (8, 32, 128)
    print("API requests of one `up` (create, watch, logs, gather, delete) by the launcher's user, per pod:")
    print(f"{'pods':>5} {'wall':>7} {'requests':>9} {'per pod':>8} | " + " ".join(f"{k:>10}" for k in KINDS),
          flush=True)
    per_pod, totals = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        # 110 pods fit a node (NODE_ALLOCATABLE); the largest run needs this many.
        nodes = math.ceil(max(sizes) / int(NODE_ALLOCATABLE["pods"]))
        cluster = k8scluster.Cluster(Path(tmp) / "cluster", nodes=nodes, npus=0)
        try:
            for pods in sizes:
                seconds, counts = one_up(cluster, Path(tmp) / "runs", pods)
                totals[pods] = sum(counts.values())
                per_pod[pods] = totals[pods] / pods
                print(f"{pods:>5} {seconds:6.1f}s {totals[pods]:>9} {per_pod[pods]:8.2f} | "
                      + " ".join(f"{counts[k] / pods:10.2f}" for k in KINDS), flush=True)
            if cluster.runner.errors:
                print(f"node agent errors: {cluster.runner.errors[:5]}")
        finally:
            cluster.stop()
    print(f"per pod at 128 / per pod at 8 = {per_pod[128] / per_pod[8]:.2f}   (goal: 1.0 or less, constant per pod)")
    added = [(totals[b] - totals[a]) / (b - a) for a, b in zip(sizes, sizes[1:])]
    print(f"requests per added pod: 8 → 32 {added[0]:.2f}, 32 → 128 {added[1]:.2f}   (goal: the same)")


def main() -> None:
    bench_render()  # first, while no control plane competes for the cores
    bench_requests()


if __name__ == "__main__":
    main()

"""End-to-end on Kubernetes: the launcher's official-client backend against a real control plane
(etcd, kube-apiserver, kube-controller-manager, kube-scheduler), with a node agent playing the kubelet
(the one test double, see k8s_node_agent.py); the ranks are real MindSpore/MindFormers processes.

What every backend does (train and gather, a failing rank, Ctrl-C and SIGTERM, status/logs/gather/down
from new processes) is in test_backend_contract.py; here is what only the Kubernetes backend has.
"""

import json
import os
import re
import subprocess
import time

import pytest
import yaml

import k8scluster
from conftest import (
    EXAMPLES,
    LAUNCHER,
    assert_lora_checkpoints,
    free_port,
    only_run,
    run_launcher,
    use_prepared_data,
)
from launcher.runs import RunRecord

pytestmark = [pytest.mark.e2e, pytest.mark.k8s]
CLAIM = "launcher-output"


@pytest.fixture
def cluster(tmp_path):
    """Two nodes without NPUs: a pod that asks for huawei.com/Ascend910 stays Pending. Volcano, since
    Ascend pods are gang-scheduled by it."""
    built = k8scluster.Cluster(tmp_path / "cluster", npus=0, volcano=True)
    yield built
    built.stop()


def write_job(tmp_path, dataset, env=None, **k8s):
    data = yaml.safe_load((EXAMPLES / "tiny-lora-k8s.yaml").read_text())
    data["dataset"]["path"] = str(dataset)
    data["cluster"]["master_port"] = free_port()
    data["cluster"]["k8s"].update(output_pvc=CLAIM, **k8s)
    if env:
        data["env"] = env
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def launcher_env(cluster):
    return {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}


def up(tmp_path, cluster, job, *extra, timeout=600):
    return run_launcher("up", job, "--pvc-dir", cluster.runner.pvc_dir(CLAIM), *extra, cwd=tmp_path,
                        env=launcher_env(cluster), timeout=timeout)


def assert_nothing_left(cluster, run_id):
    deadline = time.monotonic() + 15
    while (cluster.runner.alive() or cluster.objects(f"launcher/run-id={run_id}")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.objects(f"launcher/run-id={run_id}") == []
    assert cluster.runner.alive() == []
    assert cluster.runner.errors == []


def test_prepared_dataset_is_read_from_the_claim(tmp_path, cluster, tiny_sp_tokenizer):
    """A data: section is tokenized here onto the claim (--pvc-dir); the pods read it at output/data/."""
    job = write_job(tmp_path, "unused")
    job.write_text(yaml.safe_dump(use_prepared_data(yaml.safe_load(job.read_text()), tmp_path, tiny_sp_tokenizer)))
    refused = run_launcher("up", job, cwd=tmp_path, env=launcher_env(cluster))
    assert refused.returncode == 2 and "pass --pvc-dir" in refused.stderr
    assert cluster.objects("app.kubernetes.io/name=tiny-lora-k8s") == [] and not (tmp_path / "runs").exists()

    result = up(tmp_path, cluster, job)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run(tmp_path)
    assert_lora_checkpoints(run_dir, world=2)
    [prepared] = (cluster.runner.pvc_dir(CLAIM) / "data").iterdir()
    assert (prepared / "part-00000.mindrecord").is_file()
    run_yaml = yaml.safe_load((run_dir / "plan" / "mindformers" / "run.yaml").read_text())
    assert run_yaml["train_dataset"]["data_loader"]["dataset_dir"] == f"output/data/{prepared.name}"
    assert not list((run_dir / "ranks").rglob("*.mindrecord"))  # the dataset is not gathered as output
    assert_nothing_left(cluster, run_dir.name)

    # A second run of the job on the same claim writes to its own folder and gathers only that. Files
    # the first run left (and a checkpoint in the claim's old, shared layout) must not reach it.
    claim = cluster.runner.pvc_dir(CLAIM)
    first = claim / "runs" / run_dir.name
    assert sorted(p.name for p in (first / "checkpoint" / "rank_0").glob("*.ckpt")) == sorted(
        p.name for p in (run_dir / "ranks" / "rank_0" / "checkpoint").glob("*.ckpt"))
    for stray in (first / "checkpoint" / "rank_0" / "stray_rank_0-9_99.ckpt",
                  claim / "checkpoint" / "rank_0" / "shared_rank_0-9_99.ckpt"):
        stray.parent.mkdir(parents=True, exist_ok=True)
        stray.write_bytes(b"not this run's")
    time.sleep(1)  # a new run id (its time stamp has seconds)
    again = up(tmp_path, cluster, job)
    assert again.returncode == 0, again.stdout + again.stderr
    [second] = [d for d in (tmp_path / "runs").iterdir() if d.name != run_dir.name]
    assert (claim / "runs" / second.name / "checkpoint" / "rank_0").is_dir()
    gathered = sorted(p.name for p in (second / "ranks").rglob("*.ckpt"))
    assert gathered and not [name for name in gathered if "99" in name], gathered
    manifest = yaml.safe_load((second / "manifest.json").read_text())["files"]
    assert not [path for path in manifest if "stray" in path or "shared" in path]
    assert_nothing_left(cluster, second.name)


def ascend_job(tmp_path, dataset):
    """The same job on Ascend: its pods request huawei.com/Ascend910, which the test nodes do not have."""
    job = write_job(tmp_path, dataset)
    job.write_text(job.read_text().replace("device: cpu", "device: ascend"))
    return job


def test_unschedulable_pods_are_reported_and_deleted(tmp_path, cluster, tiny_dataset):
    result = up(tmp_path, cluster, ascend_job(tmp_path, tiny_dataset), "--pending-timeout", "3", timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 pods still Pending after 3s" in result.stderr
    # The real vc-scheduler's words: its gang plugin's "pod group is not ready" (volcano.sh/apis v1.14.0
    # pkg/apis/scheduling/v1beta1/types.go PodGroupNotReady), with the counts it appends.
    assert "FailedScheduling: pod group is not ready, 2 Pending, 2 minAvailable; Pending: 2 Unschedulable" \
        in result.stderr
    assert "every object of the run was deleted" in result.stderr
    failure = json.loads((only_run(tmp_path) / "run.json").read_text())["failure"]
    assert failure["kind"] == "pod_unschedulable", failure
    assert_nothing_left(cluster, only_run(tmp_path).name)


def test_existing_object_is_refused_unless_replaced(tmp_path, cluster, tiny_dataset):
    # The names carry the run id's time stamp: take every name of the next 30 seconds.
    now = time.time()
    for second in range(30):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now + second))
        cluster.runner.core.create_namespaced_config_map("default", {"metadata": {"name": f"tiny-lora-k8s-{stamp}-plan"}})
    job = ascend_job(tmp_path, tiny_dataset)
    refused = up(tmp_path, cluster, job, timeout=120)
    assert refused.returncode == 1
    assert "ConfigMap default/tiny-lora-k8s-" in refused.stderr and "already exists" in refused.stderr
    assert "--replace" in refused.stderr
    assert not list((tmp_path / "runs").iterdir())  # nothing started, no run left
    assert cluster.objects("app.kubernetes.io/name=tiny-lora-k8s") == []
    replaced = up(tmp_path, cluster, job, "--replace", "--pending-timeout", "2", timeout=120)
    assert "2 pods still Pending" in replaced.stderr, replaced.stdout + replaced.stderr
    assert_nothing_left(cluster, only_run(tmp_path).name)


def test_status_and_down_reach_a_running_run(tmp_path, cluster, tiny_dataset):
    job = ascend_job(tmp_path, tiny_dataset)  # its pods stay Pending: the run waits until it is deleted
    proc = subprocess.Popen([LAUNCHER, "up", str(job)], cwd=tmp_path, env=launcher_env(cluster),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "runs").glob("*/run.json")) or RunRecord.load(only_run(tmp_path)).state != "running":
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.5)
    run_id = only_run(tmp_path).name
    status = run_launcher("status", run_id, cwd=tmp_path, env=launcher_env(cluster))
    assert status.returncode == 0, status.stderr
    assert f"pod tiny-lora-k8s-{run_id.removeprefix('tiny-lora-k8s-')}-rank-1 (rank 1): Pending" in status.stdout
    down = run_launcher("down", run_id, cwd=tmp_path, env=launcher_env(cluster))
    assert down.returncode == 0, down.stderr
    assert f"every object with label launcher/run-id={run_id} is deleted" in down.stdout
    assert cluster.objects(f"launcher/run-id={run_id}") == []
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "pods deleted while the job ran" in stderr
    assert_nothing_left(cluster, run_id)


def test_deleting_the_owner_deletes_the_run_through_the_garbage_collector(tmp_path, cluster, tiny_dataset):
    """The ConfigMap owns the run's other objects (their ownerReferences): deleting it alone, as a user
    might with kubectl, has kube-controller-manager's garbage collector delete the Service and the
    running pods, and the node stops their processes."""
    job = write_job(tmp_path, tiny_dataset, env={"LAUNCHER_FAULT": "1:3:sleep"})  # rank 1 sleeps at step 3
    proc = subprocess.Popen([LAUNCHER, "up", str(job), "--pvc-dir", str(cluster.runner.pvc_dir(CLAIM))],
                            cwd=tmp_path, env=launcher_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 180
    while len(cluster.runner.alive()) < 2 or not list(cluster.runner.pvc_dir(CLAIM).glob("runs/*/log/rank_1/info.log")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.5)
    run_id = only_run(tmp_path).name
    owned = cluster.objects(f"launcher/run-id={run_id}")
    assert {o.split("/")[0] for o in owned} == {"ConfigMap", "Service", "Pod"}, owned
    cluster.runner.core.delete_namespaced_config_map(f"{run_id}-plan", "default", propagation_policy="Background")
    deadline = time.monotonic() + 90
    while cluster.objects(f"launcher/run-id={run_id}") or cluster.runner.alive():
        assert time.monotonic() < deadline, cluster.objects(f"launcher/run-id={run_id}")
        time.sleep(0.5)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert "pods deleted while the job ran" in stderr
    assert_nothing_left(cluster, run_id)


def test_a_dropped_watch_resumes_and_misses_no_failure(tmp_path, cluster, tiny_dataset):
    """The launcher's link to the API is cut while rank 1 fails and its pod is deleted. When the link is
    back, the watch resumes from the resourceVersion it had reached and still names rank 1's failure: a
    fresh list could not, since the failed pod is gone by then (it would say the pod was deleted)."""
    link = k8scluster.CuttableLink(cluster.plane)
    job = write_job(tmp_path, tiny_dataset, env={"LAUNCHER_FAULT": "1:4"})
    proc = subprocess.Popen([LAUNCHER, "up", str(job), "--pvc-dir", str(cluster.runner.pvc_dir(CLAIM))],
                            cwd=tmp_path, env={**os.environ, "KUBECONFIG": str(link.kubeconfig())},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    core = cluster.runner.core  # the test's own way to the API, not through the link

    def rank_pods():
        return {p.metadata.name: p for p in core.list_namespaced_pod("default", label_selector="launcher/rank").items}

    deadline = time.monotonic() + 120
    while sorted(p.status.phase for p in rank_pods().values()) != ["Running", "Running"]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    run_id = only_run(tmp_path).name
    link.cut()
    deadline = time.monotonic() + 180
    while rank_pods()[f"{run_id}-rank-1"].status.phase != "Failed":
        assert time.monotonic() < deadline, "rank 1 did not fail"
        time.sleep(0.2)
    core.delete_namespaced_pod(f"{run_id}-rank-1", "default")
    while f"{run_id}-rank-1" in rank_pods():
        assert time.monotonic() < deadline, "rank 1's pod was not deleted"
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()  # the launcher waited for the API to come back
    link.mend()
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 1, stderr
    assert f"rank 1 failed (pod {run_id}-rank-1)" in stderr, stderr
    assert "deleted while the job ran" not in stderr, stderr
    assert_nothing_left(cluster, run_id)


def test_refused_object_is_named_and_the_rest_deleted(tmp_path, cluster, tiny_dataset):
    """A ResourceQuota of one pod: the apiserver's quota admission refuses rank 1's pod."""
    core = cluster.runner.core
    core.create_namespaced_resource_quota("default", {"metadata": {"name": "npu"}, "spec": {"hard": {"pods": "1"}}})
    deadline = time.monotonic() + 30  # admission needs the usage the quota controller computes first
    while not (core.read_namespaced_resource_quota("npu", "default").status.used or {}):
        assert time.monotonic() < deadline, "the quota controller did not fill in the quota's usage"
        time.sleep(0.3)
    result = up(tmp_path, cluster, write_job(tmp_path, tiny_dataset), timeout=120)
    assert result.returncode == 1
    assert "Pod default/tiny-lora-k8s-" in result.stderr and "-rank-1: the API refused it (403): pods" in result.stderr
    assert "is forbidden: exceeded quota: npu" in result.stderr
    assert "the 3 objects created before it were deleted" in result.stderr  # ConfigMap, Service, rank 0's pod
    assert not list((tmp_path / "runs").iterdir())
    assert cluster.objects("app.kubernetes.io/name=tiny-lora-k8s") == []
    deadline = time.monotonic() + 15
    while cluster.runner.alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.runner.alive() == []


def test_no_kubeconfig_starts_nothing(tmp_path, tiny_dataset):
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env.update(KUBECONFIG=str(tmp_path / "missing"), HOME=str(tmp_path))
    result = run_launcher("up", write_job(tmp_path, tiny_dataset), cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 1
    assert "no usable kubeconfig" in result.stderr and "Traceback" not in result.stderr
    assert not list((tmp_path / "runs").iterdir())


def test_a_service_account_with_just_the_printed_role_runs_the_job(tmp_path, cluster, tiny_dataset):
    """`launcher k8s role` is enough for up, logs, gather and down, and a verb taken out of it is a
    403 that names the verb and the resource, with nothing left behind."""
    from kubernetes import client

    core, rbac = cluster.runner.core, client.RbacAuthorizationV1Api(cluster.plane.client())
    core.create_namespaced_service_account("default", {"metadata": {"name": "launcher"}})
    printed = run_launcher("k8s", "role", "--namespace", "default", "--service-account", "launcher")
    assert printed.returncode == 0, printed.stderr
    role, binding = list(yaml.safe_load_all(printed.stdout))
    rbac.create_namespaced_role("default", role)
    rbac.create_namespaced_role_binding("default", binding)
    token = core.create_namespaced_service_account_token("launcher", "default", {"spec": {}}).status.token
    kubeconfig = cluster.plane.kubeconfig("system:serviceaccount:default:launcher", token=token, name="sa-launcher")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    job = write_job(tmp_path, tiny_dataset)

    result = run_launcher("up", job, "--pvc-dir", cluster.runner.pvc_dir(CLAIM), cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = only_run(tmp_path).name
    for command in (["logs", run_id, "--rank", "1"], ["gather", run_id], ["down", run_id]):
        done = run_launcher(*command, cwd=tmp_path, env=env)
        assert done.returncode == 0, (command, done.stdout + done.stderr)
    assert "loss" in run_launcher("logs", run_id, cwd=tmp_path, env=env).stdout
    assert_nothing_left(cluster, run_id)

    # The same Role without `create` on services.
    role["rules"] = [{**rule, "resources": [r for r in rule["resources"] if r != "services"]} for rule in role["rules"]]
    role["rules"].append({"apiGroups": [""], "resources": ["services"], "verbs": ["delete", "list"]})
    rbac.replace_namespaced_role("launcher", "default", role)
    time.sleep(1)  # a new run id
    refused = run_launcher("up", job, "--pvc-dir", cluster.runner.pvc_dir(CLAIM), cwd=tmp_path, env=env, timeout=120)
    assert refused.returncode == 1
    # The apiserver's RBAC denial (kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/endpoints/handlers/
    # responsewriters/errors.go, ForbiddenStatusError).
    assert ('the API refused it (403): services is forbidden: User "system:serviceaccount:default:launcher" '
            'cannot create resource "services" in API group "" in the namespace "default"') in refused.stderr
    assert "the object created before it was deleted" in refused.stderr  # the ConfigMap
    assert cluster.objects("app.kubernetes.io/name=tiny-lora-k8s") == []


def test_an_object_the_api_finds_invalid_is_named_with_its_message_and_nothing_is_left(tmp_path, cluster, tiny_dataset):
    """A toleration with operator Exists and a value passes the job's checks but not the apiserver's
    validation (kubernetes/kubernetes pkg/apis/core/validation/validation.go, validateTolerations)."""
    job = write_job(tmp_path, tiny_dataset, tolerations=[{"key": "huawei.com/Ascend910", "operator": "Exists",
                                                           "value": "yes", "effect": "NoSchedule"}])
    result = up(tmp_path, cluster, job, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "-rank-0: the API refused it (422): Pod " in result.stderr, result.stderr
    assert "is invalid: spec.tolerations[0].operator: Invalid value: \"yes\": value must be empty when " \
           "`operator` is 'Exists'" in result.stderr, result.stderr
    assert "the 2 objects created before it were deleted" in result.stderr  # the ConfigMap and the Service
    assert not list((tmp_path / "runs").iterdir())
    assert cluster.objects("app.kubernetes.io/name=tiny-lora-k8s") == []



def controlled_pods(cluster, run_id: str) -> dict[str, dict]:
    """The pods the node agent saw for the run, by name."""
    return {name: pod for name, pod in cluster.runner.seen.items() if name.startswith(run_id)}


def custom_objects(cluster, group: str, version: str, plural: str) -> list[str]:
    from kubernetes.client import CustomObjectsApi

    found = CustomObjectsApi(cluster.plane.client()).list_namespaced_custom_object(group, version, "default", plural)
    return [o["metadata"]["name"] for o in found["items"]]


def volcano_jobs(cluster) -> list[str]:
    return custom_objects(cluster, "batch.volcano.sh", "v1alpha1", "jobs")


def test_a_volcano_job_trains_through_the_volcano_controller(tmp_path, cluster, tiny_dataset):
    """kind: volcano-job: the launcher creates a batch.volcano.sh Job, and the real vc-controller-manager
    makes the pods, which the real vc-scheduler places."""
    since = cluster.plane.audit_log.stat().st_size
    result = up(tmp_path, cluster, write_job(tmp_path, tiny_dataset, kind="volcano-job"))
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run(tmp_path)
    run_id = run_dir.name
    assert_lora_checkpoints(run_dir, world=2)
    for rank in (0, 1):
        assert "loss" in (run_dir / "ranks" / f"rank_{rank}" / "console.log").read_text()  # the pod's log
    pods = controlled_pods(cluster, run_id)
    # Volcano names a task's pods <job>-<task>-<index> (volcano v1.14.1 pkg/controllers/job/helpers/
    # helpers.go MakePodName, "%s-%s-%d"), makes the Job their controller (job_controller_util.go
    # createJobPod) and gives them its PodGroup (annotation scheduling.k8s.io/group-name).
    assert sorted(pods) == [f"{run_id}-rank-0-0", f"{run_id}-rank-1-0"]
    for pod in pods.values():
        [owner] = pod["metadata"]["ownerReferences"]
        assert (owner["apiVersion"], owner["kind"], owner["name"], owner["controller"]) == \
            ("batch.volcano.sh/v1alpha1", "Job", run_id, True)
        assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"].startswith(run_id)
        assert pod["spec"]["schedulerName"] == "volcano"
    # The launcher deletes the Job itself, before the pods, so that its controller makes no new ones
    # (not left to the garbage collector, which would also delete it as the ConfigMap's dependent).
    deletes = [resource for verb, resource in cluster.plane.requests(since) if verb == "delete"]
    assert "jobs" in deletes and deletes.index("jobs") < deletes.index("pods"), deletes
    assert volcano_jobs(cluster) == []
    assert_nothing_left(cluster, run_id)

    # A failing rank: Volcano's PodFailed policy (TerminateJob) ends the job, the launcher names the
    # rank and its pod, gathers and deletes the Job; status and logs reach the run from new processes.
    time.sleep(1)  # a new run id
    failed = up(tmp_path, cluster, write_job(tmp_path, tiny_dataset, kind="volcano-job", env={"LAUNCHER_FAULT": "1:3"}))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    [run_id] = [d.name for d in (tmp_path / "runs").iterdir() if d.name != run_dir.name]
    assert f"rank 1 failed (pod {run_id}-rank-1-0)" in failed.stderr, failed.stderr
    assert "LAUNCHER_FAULT: rank 1 fails at step 3" in failed.stderr
    status = run_launcher("status", run_id, cwd=tmp_path, env=launcher_env(cluster))
    assert status.returncode == 0 and f"pod {run_id}-rank-1-0 (rank 1): not in the cluster" in status.stdout, status
    logs = run_launcher("logs", run_id, "--rank", "1", cwd=tmp_path, env=launcher_env(cluster))
    assert "LAUNCHER_FAULT: rank 1 fails at step 3" in logs.stdout, logs.stdout + logs.stderr
    assert volcano_jobs(cluster) == []
    assert_nothing_left(cluster, run_id)


def per_node_job(tmp_path, dataset, env=None, **k8s):
    """Two nodes of one rank each, one pod per node running its msrun, at most one per Kubernetes node
    (cluster.k8s.anti_affinity): CPU pods ask for no NPU that would keep two of them apart."""
    job = write_job(tmp_path, dataset, env=env, pods="per-node", anti_affinity=True, **k8s)
    data = yaml.safe_load(job.read_text())
    data["cluster"]["nodes"] = [{"host": "node-0", "devices": [0]}, {"host": "node-1", "devices": [1]}]
    job.write_text(yaml.safe_dump(data))
    return job


# The pods each kind's controller makes (see the Volcano Job and AscendJob tests below for the sources).
CONTROLLED = {"volcano-job": ("rank-0-0", "rank-1-0"), "ascend-job": ("scheduler-0", "worker-0", "worker-1")}


@pytest.mark.parametrize("kind", list(CONTROLLED))
def test_a_job_restarts_from_the_claim_and_its_controller_starts_no_pod_again(tmp_path, cluster, tiny_dataset, kind):
    """Rank 1 is killed (SIGKILL, as the OOM killer does) at step 10 of the first attempt. Neither Volcano
    (maxRetry 0) nor the Ascend Operator (restartPolicy Never, no rescheduling label) starts a pod again:
    the launcher does, as attempt 2 of the same run, whose pods load the step-8 checkpoint that the
    launcher copied onto the claim and go on with steps 9..16. The AscendJob goes through the operator
    stand-in (k8s_ascend_operator.py), with per-node msrun pods."""
    from k8s_ascend_operator import AscendOperator

    operator = AscendOperator(cluster.plane) if kind == "ascend-job" else None
    if operator is not None:
        operator.install_crd()
        operator.start()
    try:
        since = cluster.plane.audit_log.stat().st_size
        env = {"LAUNCHER_FAULT": "1:10:kill:1"}
        job = (per_node_job(tmp_path, tiny_dataset, env=env, kind=kind) if operator is not None
               else write_job(tmp_path, tiny_dataset, env=env, kind=kind))
        data = yaml.safe_load(job.read_text())
        data.update(checkpoint={"save_steps": 4}, restart={"max_attempts": 2, "backoff_s": 0})
        job.write_text(yaml.safe_dump(data))
        result = up(tmp_path, cluster, job)
    finally:
        if operator is not None:
            operator.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run(tmp_path)
    run_id = run_dir.name
    run = json.loads((run_dir / "run.json").read_text())
    assert (run["attempts"], run["state"]) == (2, "succeeded"), run
    first, second = run["attempt_records"]
    assert first["state"] == "failed" and first["failed_rank"] == 1, first
    assert first["failure"]["kind"] == "out_of_memory", first  # exit 137: SIGKILL, as the OOM killer sends
    assert second["resumed_from"]["step"] == 8, second
    for rank in (0, 1):
        info = (run_dir / "attempts" / "2" / "ranks" / f"rank_{rank}" / "log" / "info.log").read_text()
        assert re.findall(r"step:\[\s*(\d+)/", info) == [str(s) for s in range(9, 17)]
    # Each pod was made once, by its controller, for its attempt: one uid per name in all the API stored.
    uids: dict[str, set] = {}
    for _, obj in cluster.plane.stored(since):
        if obj.get("kind") == "Pod" and obj["metadata"]["name"].startswith(run_id):
            uids.setdefault(obj["metadata"]["name"], set()).add(obj["metadata"]["uid"])
    assert sorted(uids) == sorted(f"{attempt}-{pod}" for attempt in (run_id, f"{run_id}-a2")
                                  for pod in CONTROLLED[kind]), uids
    assert all(len(made) == 1 for made in uids.values()), uids
    assert_nothing_left(cluster, run_id)
    assert_nothing_left(cluster, f"{run_id}-a2")


def test_per_node_pods_run_msrun_and_their_workers_consoles_come_from_the_claim(tmp_path, cluster, tiny_dataset):
    result = up(tmp_path, cluster, per_node_job(tmp_path, tiny_dataset))
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run(tmp_path)
    run_id = run_dir.name
    assert_lora_checkpoints(run_dir, world=2)
    assert sorted(controlled_pods(cluster, run_id)) == [f"{run_id}-node-0", f"{run_id}-node-1"]
    assert {pod["spec"]["nodeName"] for pod in controlled_pods(cluster, run_id).values()} == {"node-1", "node-2"}
    for rank in (0, 1):
        # msrun's worker log (output/msrun_log/worker_N.log on the claim), not the pod's log
        assert "loss" in (run_dir / "ranks" / f"rank_{rank}" / "console.log").read_text()
    for node in (0, 1):  # the pod's own log is msrun's
        assert (run_dir / "nodes" / f"node-{node}" / "node.log").is_file()
    logs = run_launcher("logs", run_id, "--rank", "1", cwd=tmp_path, env=launcher_env(cluster))
    assert logs.returncode == 0 and "loss" in logs.stdout, logs.stdout + logs.stderr
    assert_nothing_left(cluster, run_id)


def test_an_ascend_job_trains_in_the_pods_its_operator_makes(tmp_path, cluster, tiny_dataset):
    """kind: ascend-job through the AscendJob stand-in (k8s_ascend_operator.py: the real Ascend Operator
    cannot be built here). On the CPU the operator injects no MindSpore variables (its pod.go setEnv
    stops before setMindSporeEnv without NPUs), so the launcher's own template env drives the ranks."""
    from k8s_ascend_operator import AscendOperator

    operator = AscendOperator(cluster.plane)
    operator.install_crd()
    operator.start()
    try:
        result = up(tmp_path, cluster, per_node_job(tmp_path, tiny_dataset, kind="ascend-job"))
        assert result.returncode == 0, result.stdout + result.stderr
        run_dir = only_run(tmp_path)
        run_id = run_dir.name
        assert_lora_checkpoints(run_dir, world=2)
        pods = controlled_pods(cluster, run_id)
        # The operator's names, <job>-<replica type>-<index> (kubeflow/common GenGeneralName).
        assert sorted(pods) == [f"{run_id}-scheduler-0", f"{run_id}-worker-0", f"{run_id}-worker-1"]
        for pod in pods.values():
            [owner] = pod["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"], owner["controller"]) == ("AscendJob", run_id, True)
        for rank in (0, 1):
            assert "loss" in (run_dir / "ranks" / f"rank_{rank}" / "console.log").read_text()
        assert (run_dir / "nodes" / "scheduler.log").is_file()
        assert custom_objects(cluster, "mindxdl.gitee.com", "v1", "ascendjobs") == []
        assert_nothing_left(cluster, run_id)

        time.sleep(1)  # a new run id
        failed = up(tmp_path, cluster, per_node_job(tmp_path, tiny_dataset, kind="ascend-job",
                                                    env={"LAUNCHER_FAULT": "1:3"}))
        assert failed.returncode == 1, failed.stdout + failed.stderr
        [run_id] = [d.name for d in (tmp_path / "runs").iterdir() if d.name != run_dir.name]
        assert f"rank 1 failed (pod {run_id}-worker-1)" in failed.stderr, failed.stderr
        assert "LAUNCHER_FAULT: rank 1 fails at step 3" in failed.stderr
        assert_nothing_left(cluster, run_id)
    finally:
        operator.stop()
    assert operator.errors == []


def test_kubeconfig_context_and_namespace_options_choose_the_cluster(tmp_path, cluster, tiny_dataset):
    """--kubeconfig (over $KUBECONFIG), --context (over the file's current-context) and --namespace
    (over cluster.k8s.namespace) each decide where the run goes; status reaches it again from k8s.json."""
    core = cluster.runner.core
    core.create_namespace({"metadata": {"name": "team"}})
    try:
        config = yaml.safe_load(cluster.kubeconfig.read_text())
        # The file's own context leads nowhere: only --context reaches the cluster.
        config["clusters"].append({"name": "nowhere", "cluster": {"server": "https://127.0.0.1:1"}})
        config["contexts"].append({"name": "broken", "context": {"cluster": "nowhere", "user": config["users"][0]["name"]}})
        config["current-context"] = "broken"
        kubeconfig = tmp_path / "kubeconfig.yaml"
        kubeconfig.write_text(yaml.safe_dump(config))
        env = {**os.environ, "KUBECONFIG": str(tmp_path / "missing")}
        job = write_job(tmp_path, tiny_dataset)
        claim = cluster.runner.pvc_dir(CLAIM, ns="team")
        refused = run_launcher("up", job, "--kubeconfig", kubeconfig, "--namespace", "team", "--pvc-dir", claim,
                               cwd=tmp_path, env=env, timeout=120)
        assert refused.returncode == 1 and "127.0.0.1:1" in refused.stderr, refused.stdout + refused.stderr
        time.sleep(1)  # a new run id
        result = run_launcher("up", job, "--kubeconfig", kubeconfig, "--context", "test", "--namespace", "team",
                              "--pvc-dir", claim, cwd=tmp_path, env=env, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        [run_id] = [d.name for d in (tmp_path / "runs").iterdir()
                    if RunRecord.load(d).state == "succeeded"]
        pods = controlled_pods(cluster, run_id)
        assert sorted(pods) == [f"{run_id}-rank-0", f"{run_id}-rank-1"]
        assert {pod["metadata"]["namespace"] for pod in pods.values()} == {"team"}
        status = run_launcher("status", run_id, cwd=tmp_path, env=env)
        assert status.returncode == 0 and f"pod {run_id}-rank-0 (rank 0): not in the cluster" in status.stdout, \
            status.stdout + status.stderr
        assert core.list_namespaced_pod("team", label_selector=f"launcher/run-id={run_id}").items == []
    finally:
        core.delete_namespace("team")


def bindings(cluster) -> dict[str, str]:
    """Pod name -> node of every binding vc-scheduler made since the cluster was made (the audit log)."""
    return {e["objectRef"]["name"]: e["requestObject"]["target"]["name"]
            for e in cluster.plane.audit_events(cluster._audit_start) if e.get("stage") == "ResponseComplete" and e["user"]["username"] == "volcano"
            and (e.get("objectRef") or {}).get("subresource") == "binding" and e["responseStatus"]["code"] < 300}


def test_volcano_gang_schedules_all_of_the_job_or_none(tmp_path, tiny_dataset):
    """Three one-NPU pods on two one-NPU nodes: the real vc-scheduler binds none of them (the kube-scheduler
    would bind two); once a third node joins, it binds all three. The pods then end at once (this machine
    has no CANN to source), which the run reports."""
    cluster = k8scluster.Cluster(tmp_path / "cluster", nodes=2, npus=1, volcano=True)
    try:
        job = ascend_job(tmp_path, tiny_dataset)
        data = yaml.safe_load(job.read_text())
        data["parallel"]["data_parallel"] = 3
        data["cluster"]["nodes"] = [{"host": "node-0", "devices": [0, 1, 2]}]
        job.write_text(yaml.safe_dump(data))
        proc = subprocess.Popen([LAUNCHER, "up", str(job), "--pvc-dir", str(cluster.runner.pvc_dir(CLAIM)),
                                 "--pending-timeout", "300"], cwd=tmp_path, env=launcher_env(cluster),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def bound() -> dict[str, str | None]:
            return {p.metadata.name: p.spec.node_name
                    for p in cluster.runner.core.list_namespaced_pod("default", label_selector="app.kubernetes.io/name=tiny-lora-k8s").items}

        deadline = time.monotonic() + 60
        while len(bound()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.5)
        time.sleep(10)  # vc-scheduler runs every 200 ms: time enough to bind the two that fit, were it not a gang
        assert set(bound().values()) == {None} and bindings(cluster) == {}, (bound(), bindings(cluster))
        cluster.runner.add_node("node-3", npus=1)
        deadline = time.monotonic() + 60
        while None in bound().values() and bound():
            assert time.monotonic() < deadline, bound()
            time.sleep(0.2)
        # Each bind as the apiserver recorded it: vc-scheduler's create of pods/binding, and the node named.
        assert sorted(bindings(cluster).values()) == ["node-1", "node-2", "node-3"], bindings(cluster)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1 and "failed (pod tiny-lora-k8s-" in stderr, stderr
        assert_nothing_left(cluster, only_run(tmp_path).name)
    finally:
        cluster.stop()

"""End-to-end on Kubernetes: the launcher's official-client backend against a real control plane
(etcd, kube-apiserver, kube-controller-manager, kube-scheduler), with a node agent playing the kubelet
(the one test double, see k8s_node_agent.py); the ranks are real MindSpore/MindFormers processes.

What every backend does (train and gather, a failing rank, Ctrl-C and SIGTERM, status/logs/gather/down
from new processes) is in test_backend_contract.py; here is what only the Kubernetes backend has.
"""

import os
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

pytestmark = pytest.mark.e2e
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


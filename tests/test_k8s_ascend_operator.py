"""The AscendJob stand-in (k8s_ascend_operator.py) against the real control plane, with the node agent
running the pods: what it creates, the env, the status, the end of a job and its deletion.

Expected values are written from the operator's source, Ascend/mind-cluster @
22bb3d987bc0208c3eb7395e222b661276133c58 component/ascend-operator/pkg/controllers/v1 (named per check),
and kubeflow/common @ v0.4.3.
"""

import time

import pytest
from kubernetes.client import CustomObjectsApi

import k8scluster
from k8s_ascend_operator import GROUP, PLURAL, VERSION, AscendOperator

pytestmark = [pytest.mark.e2e, pytest.mark.k8s]
NPU = "huawei.com/Ascend910"
POD_NAME = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}


@pytest.fixture
def make(tmp_path):
    """make(**Cluster kwargs) -> (cluster, operator); the operator stops before the cluster cleans up."""
    made = []

    def build(**kwargs):
        cluster = k8scluster.Cluster(tmp_path / "cluster", **{"npus": 0, **kwargs})
        operator = AscendOperator(cluster.plane)
        made.append((cluster, operator))
        operator.install_crd()
        operator.start()
        return cluster, operator

    yield build
    for cluster, operator in made:
        operator.stop()
        cluster.stop()
        assert operator.errors == [] and cluster.runner.errors == []


def ascend_job(name, worker_cmd, scheduler_cmd="echo $REPLICA_TYPE $POD_NAME", workers=2, npus=0, **spec):
    def replica(count, command, npus):
        container = {"name": "ascend", "image": "mindspore:test", "command": ["sh", "-c", command], "env": [POD_NAME]}
        if npus:
            container["resources"] = {"requests": {NPU: str(npus)}, "limits": {NPU: str(npus)}}
        return {"replicas": count, "restartPolicy": "Never",
                "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [container]}}}

    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AscendJob",
            "metadata": {"name": name, "labels": {"framework": "mindspore"}},
            "spec": {"successPolicy": "AllWorkers", **spec,
                     "replicaSpecs": {"Scheduler": replica(1, scheduler_cmd, 0),
                                      "Worker": replica(workers, worker_cmd, npus)}}}


def wait_for(check, what, timeout=90):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.2)
    return value


def submit(cluster, job):
    custom = CustomObjectsApi(cluster.plane.client())
    created = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, job)
    return custom, created["metadata"]["uid"]


def read(custom, name):
    return custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, name)


def conditions(job) -> dict:
    return {c["type"]: (c["status"], c["reason"], c["message"])
            for c in (job.get("status") or {}).get("conditions", [])}


def finished(custom, name, condition):
    return lambda: conditions(read(custom, name)).get(condition, ("",))[0] == "True" and read(custom, name)


def pods(cluster, job_name) -> dict:
    return {p.metadata.name: p for p in cluster.runner.core.list_namespaced_pod(
        "default", label_selector=f"training.kubeflow.org/job-name={job_name}").items}


def three_pods(cluster, job_name) -> dict:
    return wait_for(lambda: len(found := pods(cluster, job_name)) == 3 and found, lambda: pods(cluster, job_name))


def env(pod) -> dict:
    container = next(c for c in pod.spec.containers if c.name == "ascend")
    return {e.name: e.value if e.value_from is None else e.value_from.field_ref.field_path for e in container.env}


def log(cluster, pod_name) -> str:
    return (cluster.runner.root / "pods" / "default" / pod_name / "logs" / "ascend.log").read_text()


def test_cpu_job_pods_service_and_success(make):
    cluster, operator = make()
    custom, uid = submit(cluster, ascend_job("ms-cpu", "echo $REPLICA_TYPE $POD_NAME"))
    names = ["ms-cpu-scheduler-0", "ms-cpu-worker-0", "ms-cpu-worker-1"]  # kubeflow GenGeneralName
    found = three_pods(cluster, "ms-cpu")
    assert sorted(found) == names
    worker, scheduler = found["ms-cpu-worker-1"], found["ms-cpu-scheduler-0"]
    # labels.go setPodLabels: the template's, kubeflow GenLabels, replica type/index, version; job-role on the Scheduler
    assert worker.metadata.labels == {
        "app": "ms-cpu", "version": "0", "group-name": GROUP, "job-name": "ms-cpu", "replica-type": "worker",
        "replica-index": "1", "training.kubeflow.org/operator-name": "ascendjob-controller",
        "training.kubeflow.org/job-name": "ms-cpu", "training.kubeflow.org/replica-type": "worker",
        "training.kubeflow.org/replica-index": "1"}
    assert scheduler.metadata.labels["training.kubeflow.org/job-role"] == "master"
    assert worker.metadata.annotations == {"hccl/rankIndex": "1"}  # annotation.go setHcclRankIndex
    owner = worker.metadata.owner_references[0]  # kubeflow GenOwnerReference
    assert (owner.api_version, owner.kind, owner.name, owner.uid, owner.controller, owner.block_owner_deletion) == (
        f"{GROUP}/{VERSION}", "AscendJob", "ms-cpu", uid, True, True)
    assert worker.spec.restart_policy == "Never"
    # defaults.go setDefaultPort: the Scheduler's ascend container gets ascendjob-port 2222, a Worker none
    assert [(p.name, p.container_port) for p in scheduler.spec.containers[0].ports] == [("ascendjob-port", 2222)]
    assert worker.spec.containers[0].ports is None
    # env.go setCommonEnv only: pod.go setEnv returns before setMindSporeEnv when the Worker requests no NPU
    assert env(worker) == {"POD_NAME": "metadata.name", "MINDX_TASK_ID": uid,
                           "MINDX_SERVER_IP": "clusterd-grpc-svc.mindx-dl.svc.cluster.local",
                           "MINDX_SERVER_DOMAIN": "clusterd-grpc-svc.mindx-dl.svc.cluster.local",
                           "HostNetwork": "false", "REPLICA_TYPE": "Worker"}
    assert env(scheduler)["REPLICA_TYPE"] == "Scheduler" and not any(k.startswith("MS_") for k in env(scheduler))
    # service.go genService: <job>-scheduler-0, selecting the Scheduler by the operator's labels
    svc = cluster.runner.core.read_namespaced_service("ms-cpu-scheduler-0", "default")
    assert svc.spec.selector == {k: v for k, v in scheduler.metadata.labels.items()
                                 if k not in ("app", "version", "training.kubeflow.org/job-role")}
    assert [(p.name, p.port) for p in svc.spec.ports] == [("ascendjob-port", 2222)]
    assert svc.metadata.owner_references[0].uid == uid
    job = wait_for(finished(custom, "ms-cpu", "Succeeded"), lambda: read(custom, "ms-cpu").get("status"))
    # job.go checkSpecStatus: Succeeded carries reason JobRunning; kubeflow setCondition turns Running False
    assert conditions(job)["Succeeded"] == ("True", "JobRunning", "Job<default-ms-cpu> successfully completed.")
    assert conditions(job)["Created"] == ("True", "JobCreated", "Job ms-cpu is create.")
    assert conditions(job).get("Running", ("False",))[0] == "False"
    assert job["status"]["replicaStatuses"] == {"Scheduler": {"succeeded": 1}, "Worker": {"succeeded": 2}}
    assert job["status"]["startTime"] and job["status"]["completionTime"]
    assert log(cluster, "ms-cpu-worker-1") == "Worker ms-cpu-worker-1\n"
    assert operator.errors == []


def test_npu_job_gets_the_mindspore_env(make):
    cluster, _ = make(npus=8)
    line = "echo $MS_ROLE $MS_NODE_RANK $MS_SCHED_HOST:$MS_SCHED_PORT $MS_WORKER_NUM $MS_LOCAL_WORKER"
    custom, uid = submit(cluster, ascend_job("ms-npu", line, scheduler_cmd=line, npus=2))
    found = three_pods(cluster, "ms-npu")
    common = {"POD_NAME": "metadata.name", "MINDX_TASK_ID": uid,
              "MINDX_SERVER_IP": "clusterd-grpc-svc.mindx-dl.svc.cluster.local",
              "MINDX_SERVER_DOMAIN": "clusterd-grpc-svc.mindx-dl.svc.cluster.local", "HostNetwork": "false"}
    # env.go setMindSporeEnv: MS_LOCAL_WORKER = the Worker's NPU request, MS_WORKER_NUM = that x Worker replicas,
    # MS_NODE_RANK = the index; the Scheduler's MS_SCHED_HOST is its status.podIP; a Worker's is the Service
    # (its ClusterIP in the real operator, its DNS name here); NPU_POD whether this replica requests NPUs.
    assert env(found["ms-npu-worker-1"]) == {
        **common, "ASCEND_VISIBLE_DEVICES": f"metadata.annotations['{NPU}']", "HCCL_LOGIC_SUPERPOD_ID": "0",
        "REPLICA_TYPE": "Worker", "MS_SCHED_HOST": "ms-npu-scheduler-0.default.svc", "MS_LOCAL_WORKER": "2",
        "MS_WORKER_NUM": "4", "MS_NODE_RANK": "1", "MS_SCHED_PORT": "2222", "MS_SERVER_NUM": "0",
        "MS_ROLE": "MS_WORKER", "NPU_POD": "true"}
    assert env(found["ms-npu-scheduler-0"]) == {
        **common, "REPLICA_TYPE": "Scheduler", "MS_SCHED_HOST": "status.podIP", "MS_LOCAL_WORKER": "2",
        "MS_WORKER_NUM": "4", "MS_NODE_RANK": "0", "MS_SCHED_PORT": "2222", "MS_SERVER_NUM": "0",
        "MS_ROLE": "MS_SCHED", "NPU_POD": "false"}
    wait_for(finished(custom, "ms-npu", "Succeeded"), lambda: read(custom, "ms-npu").get("status"))
    # Both name the Scheduler pod's own address (the node agent's: the Service leads to that pod).
    address = cluster.runner.pod_ip(cluster.runner.seen["ms-npu-scheduler-0"])
    assert log(cluster, "ms-npu-worker-1") == f"MS_WORKER 1 {address}:2222 4 2\n"
    assert log(cluster, "ms-npu-scheduler-0") == f"MS_SCHED 0 {address}:2222 4 2\n"


@pytest.mark.parametrize("policy", [None, "Running"])
def test_a_failed_worker_fails_the_job(make, policy):
    """restartPolicy Never: one failed pod fails the job (job.go checkSpecStatus). cleanPodPolicy defaults to
    None (defaults.go): the other Worker keeps running; Running has it deleted (kubeflow DeletePodsAndServices)."""
    cluster, _ = make()
    run_policy = {"runPolicy": {"cleanPodPolicy": policy}} if policy else {}
    # The Scheduler runs on (as MindSpore's does): one that ended first would, with no Worker running
    # yet, make the job Succeeded by the operator's rule.
    job = ascend_job("ms-fail", 'case "$POD_NAME" in *-1) sleep 2; exit 1;; *) exec sleep 60;; esac',
                     scheduler_cmd="exec sleep 60", **run_policy)
    custom, _ = submit(cluster, job)
    job = wait_for(finished(custom, "ms-fail", "Failed"), lambda: read(custom, "ms-fail").get("status"))
    assert conditions(job)["Failed"] == (
        "True", "JobFailed", "Job <default/ms-fail> has failed because has pod failed.")
    assert job["status"]["replicaStatuses"]["Worker"]["failed"] == 1
    if policy is None:
        time.sleep(2)
        assert pods(cluster, "ms-fail")["ms-fail-worker-0"].status.phase == "Running"
    else:
        wait_for(lambda: "ms-fail-worker-0" not in pods(cluster, "ms-fail"), lambda: pods(cluster, "ms-fail"))
        assert pods(cluster, "ms-fail")["ms-fail-worker-1"].status.phase == "Failed"


def test_deleting_the_job_deletes_its_pods_through_the_garbage_collector(make):
    cluster, _ = make()
    custom, _ = submit(cluster, ascend_job("ms-del", "exec sleep 60", scheduler_cmd="exec sleep 60"))
    wait_for(lambda: len(cluster.runner.alive()) == 3, lambda: pods(cluster, "ms-del"))
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "ms-del")
    def gone():  # the pods, their processes and the Service
        return not pods(cluster, "ms-del") and not cluster.runner.alive() and not cluster.objects("job-name=ms-del")

    wait_for(gone, lambda: cluster.objects("job-name=ms-del"))
    time.sleep(2)  # the operator does not bring them back
    assert gone()


def test_gang_scheduling_makes_a_pod_group(make):
    cluster, _ = make(volcano=True)
    # Volcano's proportion plugin enqueues a PodGroup that has minResources (the operator always sets them,
    # `{}` at least: kubeflow CalcPGMinResources) only into an Open queue. vc-controller-manager's queue
    # controller opens `default`, but runs only if none of its controllers waits for a missing CRD: set here
    # as it would, so that this test does not hang on the plane's controller set.
    CustomObjectsApi(cluster.plane.client()).patch_cluster_custom_object_status(
        "scheduling.volcano.sh", "v1beta1", "queues", "default", {"status": {"state": "Open"}})
    spec = {"schedulerName": "volcano", "runPolicy": {"schedulingPolicy": {"minAvailable": 3, "queue": "default"}}}
    custom, uid = submit(cluster, ascend_job("ms-gang", "echo $REPLICA_TYPE $POD_NAME", **spec))
    volcano = ("scheduling.volcano.sh", "v1beta1", "default", "podgroups", f"ms-gang-{uid}")  # job.go createPodGroup
    group = wait_for(lambda: custom.list_namespaced_custom_object(*volcano[:4])["items"], "no PodGroup")[0]
    assert group["metadata"]["name"] == volcano[4]
    assert (group["spec"]["minMember"], group["spec"]["queue"], group["spec"]["minTaskMember"]) == (
        3, "default", {"scheduler": 1, "worker": 2})
    assert group["metadata"]["ownerReferences"][0]["uid"] == uid
    found = three_pods(cluster, "ms-gang")
    worker = found["ms-gang-worker-0"]  # pod.go setGangScheduleInfo
    assert worker.spec.scheduler_name == "volcano"
    assert worker.metadata.annotations == {"hccl/rankIndex": "0", "scheduling.k8s.io/group-name": f"ms-gang-{uid}",
                                           "volcano.sh/task-spec": "worker"}
    wait_for(finished(custom, "ms-gang", "Succeeded"), lambda: read(custom, "ms-gang").get("status"))
    # job.go handleFinishedJob deletes the PodGroup of a finished job
    wait_for(lambda: not custom.list_namespaced_custom_object(*volcano[:4])["items"], "the PodGroup is still there")

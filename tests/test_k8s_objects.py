"""The rendered objects made into one run's objects (launcher/backends/k8s_objects.py)."""

import dataclasses

import pytest
import yaml

from conftest import EXAMPLES
from launcher.backends.k8s.objects import run_objects, run_pods, set_owner
from launcher.errors import ConfigError
from launcher.k8s_objects import OWNER_UID
from launcher.plan import build_plan
from launcher.spec import load_job, parse_job

RUN = "tiny-lora-k8s-20260101-120000"


def test_names_labels_and_references_follow_the_run():
    objects = run_objects(build_plan(load_job(EXAMPLES / "tiny-lora-k8s.yaml")), RUN, namespace="train")
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("ConfigMap", f"{RUN}-plan"), ("Service", f"{RUN}-sched"), ("Pod", f"{RUN}-rank-0"), ("Pod", f"{RUN}-rank-1")]
    assert {o["metadata"]["namespace"] for o in objects} == {"train"}
    assert {o["metadata"]["labels"]["launcher/run-id"] for o in objects} == {RUN}
    assert objects[1]["spec"]["selector"]["launcher/run-id"] == RUN
    for pod in objects[2:]:
        assert pod["metadata"]["ownerReferences"][0]["name"] == f"{RUN}-plan"
        assert next(v for v in pod["spec"]["volumes"] if v["name"] == "plan")["configMap"]["name"] == f"{RUN}-plan"
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["MS_SCHED_HOST"] == f"{RUN}-sched.train.svc"
        set_owner(pod, "1234")
        assert pod["metadata"]["ownerReferences"][0]["uid"] == "1234"
    # The plan itself is not changed: another run starts from the same objects.
    again = run_objects(build_plan(load_job(EXAMPLES / "tiny-lora-k8s.yaml")), RUN)
    assert again[2]["metadata"]["ownerReferences"][0]["uid"] == OWNER_UID


def test_a_volcano_jobs_templates_follow_the_run_and_name_the_pods_volcano_makes():
    run = "qwen1-5-7b-full-vcjob-20260101-120000"
    plan = build_plan(load_job(EXAMPLES / "qwen1_5-7b-full-2x8-k8s-vcjob.yaml"))
    objects = run_objects(plan, run)
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("ConfigMap", f"{run}-plan"), ("Service", f"{run}-sched"), ("Job", run)]
    templates = [task["template"] for task in objects[2]["spec"]["tasks"]]
    assert {t["metadata"]["labels"]["launcher/run-id"] for t in templates} == {run}
    for template in templates:
        plan_volume = next(v for v in template["spec"]["volumes"] if v["name"] == "plan")
        assert plan_volume["configMap"]["name"] == f"{run}-plan"
    # Volcano names a task's pods "%s-%s-%d" % (job, task, index) (volcano v1.14.1
    # pkg/controllers/job/helpers/helpers.go MakePodName); each task runs one node's eight ranks.
    assert [(p.name, p.ranks, p.node) for p in run_pods(plan, objects)] == [
        (f"{run}-node-0-0", tuple(range(8)), 0), (f"{run}-node-1-0", tuple(range(8, 16)), 1)]


def test_an_ascend_jobs_pods_and_rank_table_follow_the_run():
    run = "qwen1-5-7b-full-acjob-20260101-120000"
    plan = build_plan(load_job(EXAMPLES / "qwen1_5-7b-full-2x8-ascendjob.yaml"))
    objects = run_objects(plan, run)
    [job] = [o for o in objects if o["kind"] == "AscendJob"]
    assert job["metadata"]["name"] == run
    worker = job["spec"]["replicaSpecs"]["Worker"]["template"]
    [term] = worker["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert {"key": "job-name", "operator": "In", "values": [run]} in term["labelSelector"]["matchExpressions"]
    # Ascend Operator names a replica's pods <job>-<replica type in lower case>-<index>; Worker i is the
    # node of node_rank i (its MS_NODE_RANK).
    assert [(p.name, p.ranks) for p in run_pods(plan, objects)] == [
        (f"{run}-scheduler-0", ()), (f"{run}-worker-0", tuple(range(8))), (f"{run}-worker-1", tuple(range(8, 16)))]


def test_the_rank_tables_configmap_keeps_the_name_the_operator_looks_up():
    """Ascend Operator fills the ConfigMap rings-config-<job name> (k8s_ascend.py): renamed with the job."""
    data = yaml.safe_load((EXAMPLES / "llama2-7b-lora-1x8-ranktable.yaml").read_text())
    data["cluster"].update(backend="k8s", k8s={"kind": "volcano-job", "pods": "per-rank"})
    run = f"{data['name']}-20260101-120000"
    objects = run_objects(build_plan(parse_job(data)), run)
    names = [o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"]
    assert f"rings-config-{run}" in names
    volumes = [v for t in objects[-1]["spec"]["tasks"] for v in t["template"]["spec"]["volumes"]]
    assert {v["configMap"]["name"] for v in volumes if v["name"] == "ascend-910-config"} == {f"rings-config-{run}"}


def test_a_kind_up_does_not_start_is_refused():
    plan = build_plan(load_job(EXAMPLES / "tiny-lora-k8s.yaml"))
    extra = "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: x, namespace: default}\n"
    plan = dataclasses.replace(plan, artifacts={**plan.artifacts, "k8s/zz-extra.yaml": extra})
    with pytest.raises(ConfigError, match="launcher up does not start CronJob objects"):
        run_objects(plan, "tiny-lora-k8s-20260101-120000")


# MindCluster's own restart switches: the job and PodGroup labels fault-scheduling (grace, force, off),
# fault-retry-times, pod-rescheduling and process-recover-enable (hiascend.com MindCluster 7.3.0
# "PodGroup" and "Pod" label tables, dlug_api_024 / dlug_api_173; Volcano and Ascend Operator read them).
MINDCLUSTER_RESTARTS = ("fault-scheduling", "fault-retry-times", "pod-rescheduling", "process-recover-enable")


@pytest.mark.parametrize("example", ["tiny-lora-k8s.yaml", "qwen1_5-7b-full-2x8-k8s-vcjob.yaml",
                                     "qwen1_5-7b-full-2x8-ascendjob.yaml"])
def test_no_controller_restarts_a_run_behind_the_launchers_back(example):
    """The launcher owns restarts (restart:, launcher resume): a Volcano Job never retries (maxRetry 0,
    and PodFailed terminates the job: volcano.sh/apis batch/v1alpha1 job.go, JobSpec.MaxRetry and the
    LifecyclePolicy actions), every pod and replica has restartPolicy Never, and nothing asks MindCluster
    to reschedule."""
    plan = build_plan(load_job(EXAMPLES / example))
    objects = run_objects(plan, RUN)
    templates = []
    for obj in objects:
        assert not set(MINDCLUSTER_RESTARTS) & set(obj["metadata"].get("labels", {})), obj["metadata"]
        if obj["kind"] == "Pod":
            templates.append(obj)
        elif obj["kind"] == "Job":
            assert obj["spec"]["maxRetry"] == 0
            assert obj["spec"]["policies"] == [{"event": "PodFailed", "action": "TerminateJob"}]
            templates += [task["template"] for task in obj["spec"]["tasks"]]
        elif obj["kind"] == "AscendJob":
            for replica in obj["spec"]["replicaSpecs"].values():
                assert replica["restartPolicy"] == "Never"
                templates.append(replica["template"])
    assert templates
    for template in templates:
        assert not set(MINDCLUSTER_RESTARTS) & set(template["metadata"].get("labels", {}))
        assert template["spec"].get("restartPolicy", "Never") == "Never"

"""The Kubernetes manifests of k8s jobs: valid for the Kubernetes API of 1.28 to 1.33, and the
custom resources carry what their controllers require."""

import copy
import subprocess

import kubernetes_validate
import pytest
import yaml
from conftest import EXAMPLES, require_tool

from launcher.k8s_manifests import PLAN_MOUNT, configmap_key
from launcher.plan import build_plan
from launcher.spec import ConfigError, load_job, parse_job

K8S_EXAMPLES = [
    "llama2-7b-lora-1x8-k8s.yaml",
    "qwen1_5-7b-full-2x8-k8s-volcano.yaml",
    "qwen1_5-7b-full-2x8-k8s-vcjob.yaml",
    "qwen1_5-7b-full-2x8-ascendjob.yaml",
    "tiny-lora-k8s.yaml",
    "ranktable-vcjob",
]
VERSIONS = ["1.28.0", "1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"]
CORE_KINDS = {("v1", "ConfigMap"), ("v1", "Service"), ("v1", "Pod")}


def k8s_job(example: str):
    if example == "ranktable-vcjob":  # rank-table mode, with MindCluster's rank table
        data = yaml.safe_load((EXAMPLES / "llama2-7b-lora-1x8-ranktable.yaml").read_text())
        data["cluster"].update(backend="k8s", k8s={"kind": "volcano-job", "host_arch": "huawei-x86"})
        return parse_job(data)
    if example == "secret-env":  # references to the run's own Secret and to one of the user's
        data = yaml.safe_load((EXAMPLES / "llama2-7b-lora-1x8-k8s.yaml").read_text())
        data["secret_env"] = {"HF_TOKEN": {"from_env": "HF_TOKEN"}, "WANDB_API_KEY": {"secret": "wandb", "key": "k"}}
        return parse_job(data)
    return load_job(EXAMPLES / example)


def objects(example: str) -> dict[str, dict]:
    plan = build_plan(k8s_job(example))
    return {p: yaml.safe_load(t) for p, t in plan.artifacts.items() if p.startswith("k8s/") and p.endswith(".yaml")}


def pod_specs(obj: dict) -> list[dict]:
    """Every pod spec inside an object: a Pod's, a Volcano Job's tasks', an AscendJob's replicas'."""
    if obj["kind"] == "Pod":
        return [obj["spec"]]
    if obj["kind"] == "Job":
        return [t["template"]["spec"] for t in obj["spec"]["tasks"]]
    if obj["kind"] == "AscendJob":
        return [r["template"]["spec"] for r in obj["spec"]["replicaSpecs"].values()]
    return []


@pytest.mark.parametrize("example", K8S_EXAMPLES)
@pytest.mark.parametrize("version", VERSIONS)
def test_core_objects_match_the_kubernetes_schema(example, version):
    for path, obj in objects(example).items():
        if (obj["apiVersion"], obj["kind"]) in CORE_KINDS:
            kubernetes_validate.validate(obj, version, strict=True)
        for spec in pod_specs(obj):
            if obj["kind"] != "Pod":  # a controller's pod template is a core PodSpec too
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": spec}
                kubernetes_validate.validate(pod, version, strict=True)


def test_the_schema_check_can_fail():
    pod = next(o for o in objects("tiny-lora-k8s.yaml").values() if o["kind"] == "Pod")
    bad = copy.deepcopy(pod)
    bad["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.33.0", strict=True)


def test_podgroup_gang_schedules_every_pod():
    # Volcano's CRD scheduling.volcano.sh_podgroups.yaml (v1beta1): spec.minMember, spec.queue.
    objs = objects("qwen1_5-7b-full-2x8-k8s-volcano.yaml")
    group = objs["k8s/02-podgroup.yaml"]
    pods = [o for o in objs.values() if o["kind"] == "Pod"]
    assert group["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    assert group["spec"] == {"minMember": len(pods), "queue": "training"} and len(pods) == 2
    for pod in pods:
        assert pod["spec"]["schedulerName"] == "volcano"
        assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == group["metadata"]["name"]


def test_volcano_job_has_what_volcano_requires():
    # Volcano's admission webhook and CRD batch.volcano.sh_jobs.yaml: tasks with unique DNS-label names,
    # each with replicas and a pod template; minAvailable at most the sum of the replicas.
    job = objects("qwen1_5-7b-full-2x8-k8s-vcjob.yaml")["k8s/volcano-job.yaml"]
    assert (job["apiVersion"], job["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    spec = job["spec"]
    names = [t["name"] for t in spec["tasks"]]
    assert names == ["node-0", "node-1"] and len(set(names)) == len(names)
    assert spec["minAvailable"] == sum(t["replicas"] for t in spec["tasks"])
    assert spec["schedulerName"] == "volcano" and spec["queue"] == "training"
    assert all(t["template"]["spec"]["containers"] for t in spec["tasks"])


def test_ascend_job_has_what_ascend_operator_requires():
    # MindCluster "Ascend Job" API page and Ascend/mindxdl-deploy samples/train/basic-training/
    # without-ranktable/mindspore/mindspore_multinodes_acjob_910b.yaml @7803c2b: label framework=mindspore and ring-controller.atlas on the job and its pod templates, replica
    # types Scheduler (1) and Worker, container named "ascend", port named "ascendjob-port".
    job = objects("qwen1_5-7b-full-2x8-ascendjob.yaml")["k8s/ascend-job.yaml"]
    assert (job["apiVersion"], job["kind"]) == ("mindxdl.gitee.com/v1", "AscendJob")
    assert job["metadata"]["labels"]["framework"] == "mindspore"
    assert job["metadata"]["labels"]["ring-controller.atlas"] == "ascend-910b"
    replicas = job["spec"]["replicaSpecs"]
    assert sorted(replicas) == ["Scheduler", "Worker"]
    assert replicas["Scheduler"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 3, "queue": "training"}
    for kind, replica in replicas.items():
        assert replica["restartPolicy"] == "Never"
        assert replica["template"]["metadata"]["labels"]["ring-controller.atlas"] == "ascend-910b"
        (container,) = replica["template"]["spec"]["containers"]
        assert container["name"] == "ascend"
        assert container["ports"] == [{"name": "ascendjob-port", "containerPort": 2222}]
    worker = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"] == {"huawei.com/Ascend910": "8"}


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_per_rank_pods_ascend():
    objs = objects("llama2-7b-lora-1x8-k8s.yaml")
    pods = {p: o for p, o in objs.items() if o["kind"] == "Pod"}
    assert sorted(pods) == [f"k8s/rank-{r}.yaml" for r in range(8)]
    service = objs["k8s/01-service.yaml"]
    assert service["spec"]["clusterIP"] == "None"
    for rank in range(8):
        pod = pods[f"k8s/rank-{rank}.yaml"]
        spec = pod["spec"]
        worker = spec["containers"][0]
        assert worker["name"] == "ascend" and spec["restartPolicy"] == "Never"
        assert worker["resources"]["requests"] == worker["resources"]["limits"] == {"huawei.com/Ascend910": "1"}
        env = _env(worker)
        assert env["MS_ROLE"] == "MS_WORKER" and env["MS_NODE_ID"] == str(rank) and env["MS_WORKER_NUM"] == "8"
        assert env["MS_SCHED_HOST"] == "llama2-7b-lora-k8s-sched.llm.svc" and env["MS_SCHED_PORT"] == "8118"
        assert env["HCCL_IF_IP"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
        assert worker["command"] == ["bash", f"{PLAN_MOUNT}/k8s/rank.sh", f"output/msrun_log/worker_{rank}.log"]
        host_paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
        assert host_paths == {"/usr/local/Ascend/driver", "/usr/local/bin/npu-smi", "/etc/ascend_install.info"}
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in spec["volumes"]
        assert spec["imagePullSecrets"] == [{"name": "swr-pull"}]
        assert {"name": "output", "mountPath": "/launcher/work/output", "subPathExpr": "runs/$(LAUNCHER_RUN_ID)"} \
            in worker["volumeMounts"]
        # Only rank 0's pod runs the scheduler, and only it is behind the Service.
        selected = all(pod["metadata"]["labels"].get(k) == v for k, v in service["spec"]["selector"].items())
        assert selected == (rank == 0)
        assert [c["name"] for c in spec["containers"]] == (["ascend", "scheduler"] if rank == 0 else ["ascend"])
    scheduler = pods["k8s/rank-0.yaml"]["spec"]["containers"][1]
    assert _env(scheduler)["MS_ROLE"] == "MS_SCHED" and "resources" not in scheduler


def test_configmap_carries_the_plan_files_the_pods_read():
    plan = build_plan(load_job(EXAMPLES / "llama2-7b-lora-1x8-k8s.yaml"))
    configmap = yaml.safe_load(plan.artifacts["k8s/00-configmap.yaml"])
    pod = yaml.safe_load(plan.artifacts["k8s/rank-3.yaml"])
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "plan"]
    for item in volume["configMap"]["items"]:
        assert configmap["data"][item["key"]] == plan.artifacts[item["path"]]
        assert item["key"] == configmap_key(item["path"])
    assert {i["path"] for i in volume["configMap"]["items"]} >= {"k8s/rank.sh", "mindformers/run.yaml", "env/job.env"}
    assert not any(k.startswith("k8s__") and k.endswith(".yaml") for k in configmap["data"])


def test_every_object_is_labelled_and_owned_by_the_configmap():
    for example in K8S_EXAMPLES:
        objs = objects(example)
        owner = objs["k8s/00-configmap.yaml"]["metadata"]["name"]
        for path, obj in objs.items():
            labels = obj["metadata"]["labels"]
            assert labels["app.kubernetes.io/managed-by"] == "launcher" and labels["launcher/run-id"]
            if path != "k8s/00-configmap.yaml":
                (ref,) = obj["metadata"]["ownerReferences"]
                assert (ref["kind"], ref["name"]) == ("ConfigMap", owner)


def test_per_node_rank_table_pods_use_the_node_scripts():
    data = yaml.safe_load((EXAMPLES / "tiny-lora-k8s.yaml").read_text())
    data["cluster"].update(launch="ranktable", k8s={"pods": "per-node"})
    plan = build_plan(parse_job(data))
    pods = [yaml.safe_load(t) for p, t in plan.artifacts.items() if p.startswith("k8s/node-")]
    assert len(pods) == 1
    container = pods[0]["spec"]["containers"][0]
    assert container["command"] == ["bash", f"{PLAN_MOUNT}/nodes/node-0/launch.sh"]
    assert "resources" not in container


@pytest.mark.parametrize(
    ("k8s", "message"),
    [
        ({"pods": "per-pod"}, "cluster.k8s.pods"),
        ({"namespace": "Team_A"}, "cluster.k8s.namespace: 'Team_A' is not a DNS label"),
        ({"image_pull_secrets": ["{\"auths\": {}}"]}, "not a Secret name"),
        ({"resource_name": "Ascend910"}, "not an extended resource name"),
        ({"tolerations": [{"key": "a", "operator": "In"}]}, "operator must be Equal or Exists"),
        ({"kind": "ascend-job"}, "cluster.k8s.kind: an AscendJob runs one Worker pod per node"),
        ({"anti_affinity": True}, "cluster.k8s.anti_affinity"),
        ({"queue": "q1", "scheduler": "default"}, "cluster.k8s.queue: a queue only applies with scheduler: volcano"),
        ({"nodeSelector": {}}, "did you mean 'node_selector'"),
    ],
)
def test_bad_k8s_section(k8s, message):
    data = yaml.safe_load((EXAMPLES / "llama2-7b-lora-1x8-k8s.yaml").read_text())
    data["cluster"]["k8s"] = k8s
    with pytest.raises(ConfigError, match=None) as err:
        parse_job(data)
    assert message in str(err.value)


def test_k8s_section_needs_the_k8s_backend():
    data = yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text())
    data["cluster"]["k8s"] = {"namespace": "x"}
    with pytest.raises(ConfigError, match="a k8s section only applies with backend: k8s"):
        parse_job(data)


CHART = EXAMPLES.parent.parent / "charts" / "launcher-job"
HELM_EXAMPLES = ["llama2-7b-lora-1x8-k8s.yaml", "tiny-lora-k8s.yaml", "volcano-per-rank", "secret-env"]


def helm_job(example: str):
    if example == "volcano-per-rank":  # the chart's rank-table branch, and Volcano for CPU pods
        data = yaml.safe_load((EXAMPLES / "tiny-lora-k8s.yaml").read_text())
        data["cluster"].update(launch="ranktable", k8s={"scheduler": "volcano", "queue": "q1", "service_account": "sa"})
        return parse_job(data)
    return k8s_job(example)


def test_helm_lint():
    helm = require_tool("helm")
    result = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("example", HELM_EXAMPLES)
def test_helm_chart_renders_the_same_objects(example, tmp_path):
    helm = require_tool("helm")
    plan = build_plan(helm_job(example))
    values = tmp_path / "values.yaml"
    values.write_text(plan.artifacts["helm/values.yaml"])
    result = subprocess.run([helm, "template", "job", str(CHART), "-f", str(values)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    from_helm = [o for o in yaml.safe_load_all(result.stdout) if o]
    ours = [yaml.safe_load(t) for p, t in plan.artifacts.items() if p.startswith("k8s/") and p.endswith(".yaml")]

    def key(obj):
        return obj["kind"], obj["metadata"]["name"]

    # Dicts compare without regard to key order; lists (env, volumes, containers) keep theirs.
    assert sorted(map(key, from_helm)) == sorted(map(key, ours))
    by_key = {key(o): o for o in from_helm}
    for obj in ours:
        assert by_key[key(obj)] == obj, f"{key(obj)} differs between the chart and the launcher"

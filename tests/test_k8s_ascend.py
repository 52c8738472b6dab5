"""What MindCluster and Volcano expect of an Ascend job's Kubernetes objects (launcher/k8s_ascend.py).

Every expected value is written from the anchor cited next to it:
- Ascend/mindxdl-deploy @7803c2b (samples/train/basic-training/...),
- Ascend/mind-cluster @22bb3d98 (component/ascend-operator, ascend-for-volcano, ascend-device-plugin),
- kubeflow/common v0.4.3 (the labels Ascend Operator puts on its pods),
- the installed mindspore 2.7.2 wheel.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLES

from launcher.plan import build_plan
from launcher.render import render_template
from launcher.spec import ConfigError, load_job, parse_job

# Ascend/mindxdl-deploy samples/train/basic-training/ranktable/yaml/910b/a800_mindspore_vcjob.yaml and
# ranktable/rank_table.sh @7803c2b: the ConfigMap volume's mount point and the table's path in it.
TABLE_DIR = "/user/serverid/devindex/config"
TABLE_FILE = "/user/serverid/devindex/config/hccl.json"


def _k8s_objects(plan) -> dict[str, dict]:
    return {p: yaml.safe_load(t) for p, t in plan.artifacts.items() if p.startswith("k8s/") and p.endswith(".yaml")}


def ranktable_vcjob(**k8s) -> dict:
    """llama2 LoRA in rank-table mode as a Volcano Job of 8 one-NPU pods. (The job check still asks for
    device_ips in rank-table mode; on Kubernetes the pods do not use them.)"""
    data = yaml.safe_load((EXAMPLES / "llama2-7b-lora-1x8-ranktable.yaml").read_text())
    data["cluster"].update(backend="k8s", k8s={"namespace": "llm", "kind": "volcano-job", "pods": "per-rank", **k8s})
    return data


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _tasks(vcjob: dict) -> list[dict]:
    return [t["template"] for t in vcjob["spec"]["tasks"]]


# --- F4: the rank table MindCluster writes ---------------------------------------------------------

def test_rank_table_configmap_label_and_mount_follow_the_vcjob_sample():
    plan = build_plan(parse_job(ranktable_vcjob()))
    objs = _k8s_objects(plan)
    name = "llama2-7b-lora"
    # a800_mindspore_vcjob.yaml (910b) @7803c2b: ConfigMap rings-config-<job>, label
    # ring-controller.atlas: ascend-910b, data hccl.json = {"status":"initializing"}.
    rings = objs["k8s/00-rings-config.yaml"]
    assert (rings["kind"], rings["metadata"]["name"]) == ("ConfigMap", f"rings-config-{name}")
    assert rings["metadata"]["labels"]["ring-controller.atlas"] == "ascend-910b"
    assert json.loads(rings["data"]["hccl.json"]) == {"status": "initializing"}
    # mind-cluster component/ascend-operator/pkg/ranktable/plugins.go @22bb3d98: a Volcano Job gets a
    # table when it carries the ring-controller.atlas label (api.AtlasTaskLabel); the sample labels the
    # pod template too.
    vcjob = objs["k8s/volcano-job.yaml"]
    assert vcjob["metadata"]["labels"]["ring-controller.atlas"] == "ascend-910b"
    templates = _tasks(vcjob)
    assert len(templates) == 8
    for template in templates:
        assert template["metadata"]["labels"]["ring-controller.atlas"] == "ascend-910b"
        (container,) = template["spec"]["containers"]
        volume = next(v for v in template["spec"]["volumes"] if v.get("configMap", {}).get("name") == f"rings-config-{name}")
        assert {"name": volume["name"], "mountPath": TABLE_DIR, "readOnly": True} in container["volumeMounts"]
        env = _env(container)
        # rank_table.sh @7803c2b: RANK_TABLE_FILE=/user/serverid/devindex/config/hccl.json.
        assert env["RANK_TABLE_FILE"] == TABLE_FILE
        # ascend-operator pkg/ranktable/common/common.go buildServerInfo @22bb3d98: container_ip is
        # the pod's status.podIP, so the pod needs its own IP to find its entry.
        assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        # The device plugin picks the NPU: no rank or device from the plan.
        assert not {"RANK_ID", "DEVICE_ID", "RANK_SIZE"} & set(env)
    plan_items = next(v for v in templates[0]["spec"]["volumes"] if v["name"] == "plan")["configMap"]["items"]
    assert not [i for i in plan_items if i["path"].startswith("ranktable/")]
    assert "k8s/wait-ranktable.sh" in {i["path"] for i in plan_items}


def test_ring_controller_follows_the_job():
    # mind-cluster component/ascend-for-volcano/common/util/constants.go @22bb3d98: JobKind910Value
    # "ascend-910" (the 910 samples of mindxdl-deploy use it), JobKind910BValue "ascend-910b".
    objs = _k8s_objects(build_plan(parse_job(ranktable_vcjob(ring_controller="ascend-910"))))
    assert objs["k8s/00-rings-config.yaml"]["metadata"]["labels"]["ring-controller.atlas"] == "ascend-910"
    assert objs["k8s/volcano-job.yaml"]["metadata"]["labels"]["ring-controller.atlas"] == "ascend-910"


def _run_rank_script(tmp_path: Path, table: dict, pod_ip: str) -> subprocess.CompletedProcess:
    """Run k8s/rank.sh of a rank-table pod against a table, with `python` standing in for MindSpore."""
    toolkit = tmp_path / "set_env.sh"
    toolkit.write_text("export CANN_SOURCED=yes\n")
    data = ranktable_vcjob()
    data["cluster"]["ascend_env"] = {"toolkit": str(toolkit), "optional": []}
    table_dir = tmp_path / "devindex"
    table_dir.mkdir()
    (table_dir / "hccl.json").write_text(json.dumps(table))
    plan_dir = tmp_path / "plan"
    for path, text in build_plan(parse_job(data)).artifacts.items():
        (plan_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (plan_dir / path).write_text(text.replace(TABLE_DIR, str(table_dir)))  # the pod's mount, here
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/sh\necho "ranks: $RANK_ID $DEVICE_ID $RANK_SIZE $RANK_TABLE_FILE $CANN_SOURCED"\n')
    (bin_dir / "python").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "POD_IP": pod_ip,
           "RANK_TABLE_FILE": str(table_dir / "hccl.json")}
    return subprocess.run(["bash", str(plan_dir / "k8s/rank.sh"), "output/rank_log/rank_0.log"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=60)


# The shape ascend-operator writes (pkg/ranktable/common/common.go, server.go, v1 @22bb3d98): one server
# per pod with server_id, host_ip, container_ip and its devices (device_id, device_ip, rank_id = the pod's
# rank index times its device count plus the device's index), all values strings; status completed.
TABLE = {
    "status": "completed",
    "server_list": [
        {"device": [{"device_id": "5", "device_ip": "192.168.1.5", "rank_id": "0"}],
         "server_id": "10.0.0.11", "host_ip": "10.0.0.11", "container_ip": "172.16.0.8"},
        {"device": [{"device_id": "2", "device_ip": "192.168.1.2", "rank_id": "1"}],
         "server_id": "10.0.0.11", "host_ip": "10.0.0.11", "container_ip": "172.16.0.9"},
    ],
    "server_count": "2",
    "version": "1.0",
}


def test_rank_pod_takes_rank_and_device_from_the_table(tmp_path):
    result = _run_rank_script(tmp_path, TABLE, "172.16.0.9")
    assert result.returncode == 0, result.stderr
    # The pod at 172.16.0.9 is rank 1 of 2. Inside the container its one NPU is device 0, whatever the
    # host device (mindxdl-deploy ranktable/train_start.sh @7803c2b: DEVICE_ID=${i}, 0..n-1 per server).
    # CANN's set_env.sh is sourced first (ranktable/utils.sh set_env @7803c2b).
    assert f"ranks: 1 0 2 {tmp_path}/devindex/hccl.json yes" in result.stdout


def test_rank_pod_without_its_entry_stops(tmp_path):
    result = _run_rank_script(tmp_path, TABLE, "172.16.0.10")
    assert result.returncode != 0
    assert "0 entries for pod IP 172.16.0.10" in result.stderr
    assert "ranks:" not in result.stdout


@pytest.mark.parametrize(
    ("k8s", "message"),
    [
        ({"kind": "pods"}, "cluster.k8s.kind: on Kubernetes MindCluster writes the rank table"),
        ({"pods": "per-node"}, "cluster.k8s.kind: on Kubernetes MindCluster writes the rank table"),
        ({"host_network": True}, "cluster.k8s.host_network: a rank-table pod finds its entry by its pod IP"),
    ],
)
def test_rank_table_layouts_mindcluster_cannot_serve(k8s, message):
    # ascend-operator pkg/ranktable/plugins.go @22bb3d98 writes tables for Volcano Jobs, Deployments,
    # StatefulSets and AscendJobs, never for bare pods.
    with pytest.raises(ConfigError) as err:
        parse_job(ranktable_vcjob(**k8s))
    assert message in str(err.value)


# --- F6: NPU pods and the scheduler ----------------------------------------------------------------

def test_ascend_pods_default_to_volcano_and_cpu_pods_do_not():
    # mind-cluster component/ascend-device-plugin/build/ascendplugin-volcano.yaml @22bb3d98 runs
    # -volcanoType=true; pkg/server/plugin.go doWithVolcanoSchedule refuses ("not get valid pod") a pod
    # Volcano did not place.
    objs = _k8s_objects(build_plan(load_job(EXAMPLES / "llama2-7b-lora-1x8-k8s.yaml")))
    pods = [o for o in objs.values() if o["kind"] == "Pod"]
    assert {p["spec"].get("schedulerName") for p in pods} == {"volcano"}
    assert objs["k8s/02-podgroup.yaml"]["spec"]["minMember"] == len(pods) == 8
    cpu = _k8s_objects(build_plan(load_job(EXAMPLES / "tiny-lora-k8s.yaml")))
    assert not [o for o in cpu.values() if o["kind"] == "PodGroup" or "schedulerName" in o.get("spec", {})]


def _llama_k8s(**k8s):
    data = yaml.safe_load((EXAMPLES / "llama2-7b-lora-1x8-k8s.yaml").read_text())
    data["cluster"]["k8s"].update(k8s)
    return data


def test_default_scheduler_for_npu_pods_needs_a_default_mode_device_plugin():
    with pytest.raises(ConfigError) as err:
        parse_job(_llama_k8s(scheduler="default"))
    assert "cluster.k8s.scheduler: MindCluster's device plugin in Volcano mode" in str(err.value)
    assert "cluster.k8s.device_plugin: default" in str(err.value)
    objs = _k8s_objects(build_plan(parse_job(_llama_k8s(scheduler="default", device_plugin="default"))))
    pods = [o for o in objs.values() if o["kind"] == "Pod"]
    assert pods and not [p for p in pods if "schedulerName" in p["spec"]] and "k8s/02-podgroup.yaml" not in objs
    # Without Volcano there is no annotation to read the devices from (the sample's comment: delete
    # ASCEND_VISIBLE_DEVICES "without volcano").
    assert "ASCEND_VISIBLE_DEVICES" not in _env(pods[0]["spec"]["containers"][0])


# --- F8 and M5: placement --------------------------------------------------------------------------

def test_ascend_job_placement_follows_the_acjob_sample():
    job = _k8s_objects(build_plan(load_job(EXAMPLES / "qwen1_5-7b-full-2x8-ascendjob.yaml")))["k8s/ascend-job.yaml"]
    replicas = job["spec"]["replicaSpecs"]
    # mindxdl-deploy samples/train/basic-training/without-ranktable/mindspore/
    # mindspore_multinodes_acjob_910b.yaml @7803c2b: Worker anti-affinity on job-name and
    # replica-type=worker, none on the Scheduler. Ascend Operator sets both labels on its pods
    # (mind-cluster pkg/controllers/v1/labels.go @22bb3d98, lower-cased replica type, through
    # kubeflow/common v0.4.3 job_controller.go GenLabels "job-name" and labels.go SetReplicaType "replica-type").
    assert replicas["Worker"]["template"]["spec"]["affinity"] == {"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchExpressions": [
                {"key": "job-name", "operator": "In", "values": ["qwen1-5-7b-full-acjob"]},
                {"key": "replica-type", "operator": "In", "values": ["worker"]},
            ]},
            "topologyKey": "kubernetes.io/hostname",
        }]}}
    assert "affinity" not in replicas["Scheduler"]["template"]["spec"]
    # Same sample: both replicas select NPU servers by accelerator-type (and host-arch when given).
    for replica in replicas.values():
        assert replica["template"]["spec"]["nodeSelector"] == {"accelerator-type": "module-910b-8"}
        # ascend-operator pkg/controllers/v1/env.go setAscendVisibleDevicesEnv @22bb3d98 adds it itself.
        assert "ASCEND_VISIBLE_DEVICES" not in _env(replica["template"]["spec"]["containers"][0])


def test_node_selectors_and_visible_devices_on_volcano_pods():
    data = yaml.safe_load((EXAMPLES / "qwen1_5-7b-full-2x8-k8s-vcjob.yaml").read_text())
    data["cluster"]["k8s"].update(host_arch="huawei-arm", resource_name="huawei.com/Ascend910b")
    vcjob = _k8s_objects(build_plan(parse_job(data)))["k8s/volcano-job.yaml"]
    for template in _tasks(vcjob):
        # ranktable/yaml/910b/a800_mindspore_vcjob.yaml @7803c2b: nodeSelector host-arch and
        # accelerator-type; mind-cluster ascend-for-volcano common/util/constants.go @22bb3d98:
        # Module910bx8AcceleratorType "module-910b-8", the default here (without the label,
        # internal/npu/factory.go get910CardHandlerName falls back to the 910A "module" handler).
        assert template["spec"]["nodeSelector"] == {"accelerator-type": "module-910b-8", "host-arch": "huawei-arm"}
        # Same sample: ASCEND_VISIBLE_DEVICES from the annotation named like the requested resource.
        env = _env(template["spec"]["containers"][0])
        assert env["ASCEND_VISIBLE_DEVICES"] == {"fieldRef": {"fieldPath": "metadata.annotations['huawei.com/Ascend910b']"}}


def test_per_rank_pods_carry_hints_but_the_scheduler_container_no_devices():
    objs = _k8s_objects(build_plan(load_job(EXAMPLES / "llama2-7b-lora-1x8-k8s.yaml")))
    rank0 = objs["k8s/rank-0.yaml"]["spec"]
    # The job's own node_selector (accelerator-type: module-910b-8 in the example) agrees.
    assert rank0["nodeSelector"] == {"accelerator-type": "module-910b-8"}
    worker, scheduler = rank0["containers"]
    assert _env(worker)["ASCEND_VISIBLE_DEVICES"] == {"fieldRef": {"fieldPath": "metadata.annotations['huawei.com/Ascend910']"}}
    assert "ASCEND_VISIBLE_DEVICES" not in _env(scheduler)
    cpu = _k8s_objects(build_plan(load_job(EXAMPLES / "tiny-lora-k8s.yaml")))["k8s/rank-0.yaml"]["spec"]
    assert "nodeSelector" not in cpu


def test_unknown_accelerator_type_is_refused():
    with pytest.raises(ConfigError) as err:
        parse_job(_llama_k8s(accelerator_type="910b"))
    assert "cluster.k8s.accelerator_type" in str(err.value) and "module-910b-8" in str(err.value)


# --- M6: the scheduler's name must resolve before MindSpore starts ---------------------------------

def test_mindspore_resolves_the_master_address_once():
    # The anchor itself: mindspore 2.7.2 parallel/cluster/process_entity/_utils.py::_convert_addr_to_ip.
    from mindspore.parallel.cluster.process_entity._utils import _convert_addr_to_ip

    with pytest.raises(RuntimeError, match="DNS resolution has failed"):
        _convert_addr_to_ip("no-such-host.invalid")


@pytest.mark.parametrize(("host", "code"), [("localhost", 0), ("no-such-host.invalid", 1)])
def test_wait_dns_waits_then_gives_up(host, code):
    script = render_template("wait_dns.sh.j2", dns_host='"${HOST}"', cluster_time_out=2)
    result = subprocess.run(["bash", "-c", f"set -euo pipefail\n{script}\necho resolved"], env={**os.environ, "HOST": host},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == code, result.stderr
    if code:
        assert "no-such-host.invalid does not resolve after 2s" in result.stderr
    else:
        assert result.stdout.strip() == "resolved"


def test_k8s_msrun_pods_wait_for_the_scheduler_name():
    per_node = build_plan(load_job(EXAMPLES / "qwen1_5-7b-full-2x8-k8s-volcano.yaml")).artifacts["nodes/node-1/launch.sh"]
    assert per_node.index("socket.getaddrinfo") < per_node.index("exec msrun")
    per_rank = build_plan(load_job(EXAMPLES / "llama2-7b-lora-1x8-k8s.yaml")).artifacts["k8s/rank.sh"]
    assert per_rank.index("socket.getaddrinfo") < per_rank.index('python "${plan_dir}/"')
    ssh = build_plan(load_job(EXAMPLES / "qwen1_5-7b-full-2x8-msrun.yaml")).artifacts["nodes/node-1/launch.sh"]
    assert "socket.getaddrinfo" not in ssh

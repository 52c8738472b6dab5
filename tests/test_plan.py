"""job -> plan: rank numbering, launch scripts' environment, MindFormers config fill-in, determinism."""

import copy
import json

import pytest
import yaml
from conftest import EXAMPLES

from launcher.errors import ConfigError
from launcher.plan import LaunchPlan, build_plan
from launcher.spec import parse_job


def load(name):
    return yaml.safe_load((EXAMPLES / name).read_text())


def ascend_2x8(launch):
    data = load("qwen1_5-7b-full-2x8-msrun.yaml")
    data["cluster"]["launch"] = launch
    data["cluster"]["nodes"] = [
        {"host": "10.0.0.9", "devices": "[0,8)", "device_ips": [f"192.168.{i}.9" for i in range(8)]},
        {"host": "10.0.0.10", "devices": "[0,8)", "device_ips": [f"192.168.{i}.10" for i in range(8)]},
    ]
    return parse_job(data)


def test_ranktable_ranks_follow_the_merged_table_order():
    plan = build_plan(ascend_2x8("ranktable"))
    # The merged table keeps the job's node order (as merge_hccl.py keeps its arguments'), so the first
    # node, 10.0.0.9, holds ranks 0-7 and 10.0.0.10 holds 8-15: RANK_ID is the table's rank_id.
    assert [(s.rank, s.host, s.device) for s in plan.ranks[:2]] == [(0, "10.0.0.9", 0), (1, "10.0.0.9", 1)]
    second = [s for s in plan.ranks if s.host == "10.0.0.10"]
    assert [s.rank for s in second] == list(range(8, 16))
    assert [s.device for s in second] == list(range(8))
    table = json.loads(plan.artifacts["ranktable/hccl.json"])
    assert [s["server_id"] for s in table["server_list"]] == ["10.0.0.9", "10.0.0.10"]
    script = plan.artifacts["nodes/node-1/launch.sh"]  # node-1 is 10.0.0.10
    assert "RANK_ID=8 DEVICE_ID=0" in script and "RANK_ID=15 DEVICE_ID=7" in script
    ranks_in_table = {(s["server_id"], d["device_id"]): d["rank_id"] for s in table["server_list"] for d in s["device"]}
    assert ranks_in_table[("10.0.0.10", "0")] == "8" and ranks_in_table[("10.0.0.10", "7")] == "15"
    assert 'export RANK_TABLE_FILE="${plan_dir}/"ranktable/hccl.json' in script
    assert "export RANK_SIZE=16" in script
    assert "MS_ROLE" not in script  # Ascend rank-table mode meets through HCCL, not a scheduler
    node_table = json.loads(plan.artifacts["ranktable/node-1.json"])
    assert node_table["server_list"][0]["device"][0]["rank_id"] == "8"


def test_msrun_2x8_scripts():
    plan = build_plan(ascend_2x8("msrun"))
    first, second = plan.artifacts["nodes/node-0/launch.sh"], plan.artifacts["nodes/node-1/launch.sh"]
    for script in (first, second):
        assert "--worker_num=16 \\" in script
        assert "--local_worker_num=8 \\" in script
        assert "--master_addr=10.0.0.9 \\" in script
        assert "export ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in script
    assert "--node_rank=0 \\" in first and "--node_rank=1 \\" in second
    assert [s.rank for s in plan.ranks if s.host == "10.0.0.10"] == list(range(8, 16))
    assert plan.ranks[9].console_log == "output/msrun_log/worker_9.log"


def test_cpu_ranktable_mode_gets_dynamic_cluster_variables():
    data = load("tiny-lora-local.yaml")
    data["cluster"]["launch"] = "ranktable"
    plan = build_plan(parse_job(data))
    script = plan.artifacts["nodes/node-0/launch.sh"]
    assert "export MS_WORKER_NUM=2" in script
    assert "export MS_SCHED_HOST=127.0.0.1" in script
    assert "MS_ROLE=MS_SCHED RANK_ID=0 python" in script
    assert "MS_ROLE=MS_WORKER MS_NODE_ID=1" in script
    assert "RANK_ID=1 DEVICE_ID=1" in script
    assert "ranktable/hccl.json" not in plan.artifacts


def test_mindformers_config_is_filled_from_the_job():
    data = load("qwen1_5-7b-full-2x8-msrun.yaml")
    cfg = yaml.safe_load(build_plan(parse_job(data)).artifacts["mindformers/run.yaml"])
    assert cfg["parallel_config"]["data_parallel"] == 2
    assert cfg["parallel_config"]["model_parallel"] == 4
    assert cfg["parallel_config"]["pipeline_stage"] == 2
    assert cfg["parallel_config"]["micro_batch_num"] == 8
    assert cfg["parallel"]["parallel_mode"] == 1
    assert cfg["load_checkpoint"] == "/models/qwen1_5_7b/dp2-mp4-pp2/"
    assert cfg["auto_trans_ckpt"] is False
    assert cfg["train_dataset"]["data_loader"]["dataset_dir"] == "/data/alpaca/alpaca-qwen-2048.mindrecord"
    assert cfg["train_dataset_task"]["dataset_config"]["data_loader"]["dataset_dir"] == (
        "/data/alpaca/alpaca-qwen-2048.mindrecord")
    assert "pet_config" not in cfg["model"]["model_config"]
    assert cfg["context"]["device_target"] == "Ascend"


def test_lora_settings_and_overrides():
    data = load("llama2-7b-lora-1x8-ranktable.yaml")
    cfg = yaml.safe_load(build_plan(parse_job(data)).artifacts["mindformers/run.yaml"])
    assert cfg["model"]["model_config"]["pet_config"] == {
        "pet_type": "lora", "lora_rank": 16, "lora_alpha": 16, "lora_dropout": 0.05,
        "target_modules": ".*wq|.*wk|.*wv|.*wo",
    }
    assert cfg["runner_config"]["epochs"] == 2
    # Pure data parallel on Ascend runs semi-auto with full_batch, as the anchors' dp=8 configs do.
    assert cfg["parallel"]["parallel_mode"] == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ({"runner_config.epoch": 2}, "'epoch' is not in the base config; did you mean 'epochs'?"),
        ({"runer_config.epochs": 2}, "'runer_config' is not in the base config; did you mean 'runner_config'?"),
    ],
)
def test_override_typos_are_refused(override, message):
    data = load("tiny-lora-local.yaml")
    data["mindformers"] = {"overrides": override}
    with pytest.raises(ConfigError, match=message):
        build_plan(parse_job(data))


def test_plan_is_deterministic_and_round_trips(tmp_path):
    data = load("llama2-7b-lora-1x8-ranktable.yaml")
    first, second = build_plan(parse_job(data)), build_plan(parse_job(copy.deepcopy(data)))
    assert dict(first.artifacts) == dict(second.artifacts)
    assert first.to_json() == second.to_json()
    first.write(tmp_path / "plan")
    again = LaunchPlan.read(tmp_path / "plan")
    assert again.ranks == first.ranks and again.nodes == first.nodes
    assert dict(again.artifacts) == dict(first.artifacts)


def test_docker_runtime_runs_the_node_script_in_the_image(tmp_path):
    """The docker wrapper's argv, recorded by a stand-in `docker` (no container engine runs here)."""
    plan = build_plan(parse_job(load("baichuan2-7b-lora-4dev-docker.yaml")))
    plan.write(tmp_path / "plan")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done > "$ARGV_FILE"\n')
    (fake / "docker").chmod(0o755)
    work = tmp_path / "work dir"
    work.mkdir()
    import os
    import subprocess

    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "ARGV_FILE": str(tmp_path / "argv"),
           "LAUNCHER_RUN_ID": "r1", "LAUNCHER_JOB": "baichuan2-7b-lora", "LAUNCHER_NODE": "0"}
    subprocess.run(["bash", str(tmp_path / "plan" / plan.nodes[0].entry)], cwd=work, env=env, check=True)
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:3] == ["run", "--rm", "--name"]
    assert argv[3] == "launcher-r1-node-0"
    for flag in ("--ipc=host", "--network=host", "--device=/dev/davinci3", "--device=/dev/davinci_manager",
                 "--device=/dev/devmm_svm", "--device=/dev/hisi_hdc",
                 "--volume=/usr/local/Ascend/driver:/usr/local/Ascend/driver:ro",
                 "--volume=/usr/local/bin/npu-smi:/usr/local/bin/npu-smi:ro",
                 "--volume=/etc/ascend_install.info:/etc/ascend_install.info:ro",
                 # Ascend/mind-cluster component/ascend-docker-runtime/build/scripts/base.list @22bb3d98
                 "--volume=/usr/local/dcmi:/usr/local/dcmi:ro",
                 f"--volume={work}:{work}", f"--workdir={work}", "--env=LAUNCHER_RUN_ID"):
        assert flag in argv
    assert "--device=/dev/davinci4" not in argv
    # The matrix entry's image, as `launcher image build` tags it.
    assert argv[-3:] == ["ascend-mindformers:ms2.2.10-cann7.0.0b1-py3.9-euler2.8.3-910b", "bash",
                         str(tmp_path / "plan" / "nodes" / "node-0" / "launch.sh")]

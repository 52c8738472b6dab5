"""What a real Ascend cluster expects of the rendered job, each expectation written from its source.

Anchors (read at these refs): mindspore-lab/mindformers tags v1.0.2, v1.1.0, v1.2.0, v1.3.2, v1.5.0,
v1.6.0 and branch r1.8.0; the mindspore 2.7.2 wheel; Ascend/mind-cluster @22bb3d98.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import EXAMPLES

from launcher.entrypoints import finetune
from launcher.errors import ConfigError
from launcher.plan import build_plan
from launcher.backends.local import check_local_host
from launcher.spec import parse_job

BAICHUAN = "baichuan2-7b-lora-4dev-docker.yaml"


def load(name):
    return yaml.safe_load((EXAMPLES / name).read_text())


def refused(data, match):
    with pytest.raises(ConfigError, match=match):
        parse_job(data)


def run_yaml(data) -> dict:
    return yaml.safe_load(build_plan(parse_job(data)).artifacts["mindformers/run.yaml"])


# --- 1. Models by MindFormers release --------------------------------------------------------------

def test_baichuan2_is_refused_on_mindformers_1_8_with_the_images_that_can():
    # research/baichuan2 exists in mindformers v1.0.2 .. v1.3.2 and not in v1.5.0 / r1.8.0.
    data = load(BAICHUAN)
    data["image"] = {"entry": "ms2.7.2-mf1.8.0-cann8.5.0-py3.11-910b"}
    refused(data, r"image.entry: baichuan2_7b runs on MindFormers 1.0 up to \(not including\) 1.5, not on "
                  r"MindFormers 1.8.0 \(images with one: ms2.2.10-cann7.0.0b1-py3.9-euler2.8.3-910b, "
                  r"ms2.2.13-mf1.0.2-cann7.0.0b1-py3.9-910a, ms2.4.10-mf1.3.2-cann8.0.0-py3.10-910b\)")
    data["image"] = {"name": "registry.local/mf", "tag": "x"}
    data["mindformers"]["version"] = "1.5.0"
    refused(data, r"mindformers.version: baichuan2_7b runs on MindFormers 1.0 up to")


def test_baichuan2_needs_the_source_tree_and_a_known_release():
    data = load(BAICHUAN)
    del data["mindformers"]["source"]
    refused(data, r"mindformers.source: baichuan2_7b's classes are in research/baichuan2")
    data = load(BAICHUAN)
    data["image"] = {"name": "registry.local/mf", "tag": "x"}
    refused(data, r"mindformers.version: baichuan2_7b lives in MindFormers' research/baichuan2")


def test_mindformers_1_0_has_no_msrun():
    # scripts/msrun_launcher.sh first appears in mindformers v1.1.0 (git ls-tree v1.0.2 scripts/).
    data = load(BAICHUAN)
    data["cluster"]["launch"] = "msrun"
    refused(data, r"cluster.launch: MindFormers 1.0.2 has no msrun launch")


def test_baichuan2_plan_registers_the_research_module_and_names_the_1_0_callback():
    plan = build_plan(parse_job(load(BAICHUAN)))
    env = plan.artifacts["env/job.env"]
    # run_baichuan2.py (v1.0.2) does `import baichuan2_7b` and `from baichuan2_tokenizer import ...`.
    assert "export LAUNCHER_MODEL_MODULES=/opt/mindformers/research/baichuan2:baichuan2_7b,baichuan2_tokenizer" in env
    cfg = yaml.safe_load(plan.artifacts["mindformers/run.yaml"])
    # mindformers/core/callback/callback.py: v1.1.0 defines CheckpointMointor, v1.2.0 CheckpointMonitor.
    assert [c["type"] for c in cfg["callbacks"]] == ["MFLossMonitor", "CheckpointMointor"]
    data = load(BAICHUAN)
    data["image"] = {"entry": "ms2.4.10-mf1.3.2-cann8.0.0-py3.10-910b"}
    assert [c["type"] for c in run_yaml(data)["callbacks"]] == ["MFLossMonitor", "CheckpointMonitor"]


def test_entrypoint_imports_the_research_modules_into_the_mindformers_registry(tmp_path):
    # A research module registers its classes when imported (MindFormerRegister.register decorator).
    folder = tmp_path / "research" / "fakemodel"
    folder.mkdir(parents=True)
    (folder / "fake_7b.py").write_text(
        "from mindformers.tools.register import MindFormerRegister, MindFormerModuleType\n"
        "@MindFormerRegister.register(MindFormerModuleType.MODELS)\n"
        "class LauncherFake7BForCausalLM:\n    pass\n")
    code = (
        "import sys; from launcher.entrypoints import finetune\n"
        "from mindformers.tools.register import MindFormerRegister, MindFormerModuleType as T\n"
        "assert not MindFormerRegister.is_exist(T.MODELS, 'LauncherFake7BForCausalLM')\n"
        f"finetune.register_model_modules({str(folder) + ':fake_7b'!r})\n"
        "print(MindFormerRegister.is_exist(T.MODELS, 'LauncherFake7BForCausalLM'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
    with pytest.raises(SystemExit, match="research folder /nowhere does not exist"):
        finetune.register_model_modules("/nowhere:fake_7b")


def test_local_run_is_checked_against_the_installed_mindformers(tmp_path, monkeypatch):
    data = load("tiny-lora-local.yaml")
    data["dataset"]["path"] = str(tmp_path)
    job = parse_job(data)
    monkeypatch.setattr("launcher.backends.local.installed_mindformers", lambda: "1.3.2")
    # tiny_llama's configs are written for MindFormers 1.8.
    with pytest.raises(ConfigError, match="model: tiny_llama runs on MindFormers 1.8 or newer; this machine has "
                                          "MindFormers 1.3.2"):
        check_local_host(job)


def test_optimizer_is_spelled_for_the_release():
    # mindformers/core/optim: FP32StateAdamWeightDecay (beta1, beta2) up to v1.5.0, AdamW (betas) from v1.2.0.
    data = load("llama2-7b-lora-1x8-ranktable.yaml")
    assert run_yaml(data)["optimizer"]["type"] == "AdamW"
    data["mindformers"]["version"] = "1.0.2"
    data["cluster"]["launch"] = "ranktable"
    optimizer = run_yaml(data)["optimizer"]
    assert (optimizer["type"], optimizer["beta1"], optimizer["beta2"]) == ("FP32StateAdamWeightDecay", 0.9, 0.999)
    assert "betas" not in optimizer


# --- 2. Path variables are added to, never replaced ------------------------------------------------

def test_env_pythonpath_keeps_what_cann_put_there(tmp_path):
    # scripts/msrun_launcher.sh (r1.8.0) prepends: export PYTHONPATH=$MF_SCRIPTS_ROOT/../:$PYTHONPATH.
    data = load("tiny-lora-local.yaml")
    data["env"] = {"PYTHONPATH": "/opt/extra", "LD_LIBRARY_PATH": "/opt/lib", "FOO": "a b"}
    env_file = tmp_path / "job.env"
    env_file.write_text(build_plan(parse_job(data)).artifacts["env/job.env"])
    tbe = "/usr/local/Ascend/ascend-toolkit/latest/opp/built-in/op_impl/ai_core/tbe"
    script = f'set -eu; source {env_file}; echo "$PYTHONPATH|$LD_LIBRARY_PATH|$FOO"'
    out = subprocess.run(["bash", "-c", script], env={"PATH": os.environ["PATH"], "PYTHONPATH": tbe},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"/opt/extra:{tbe}|/opt/lib|a b"


def test_no_example_sets_a_research_pythonpath():
    # research/qwen1_5 is gone from mindformers v1.6.0; Qwen1.5 uses the in-tree LlamaForCausalLM.
    for path in EXAMPLES.glob("*.yaml"):
        assert "research/qwen1_5" not in path.read_text(), path.name


@pytest.mark.parametrize("value", ["a\nb", "a\0b", "a\rb"])
def test_env_values_on_one_line(value):
    data = load("tiny-lora-local.yaml")
    data["env"] = {"X": value}
    refused(data, "env: .*the value of X holds a NUL byte or a line break")


# --- 3. Multi-node auto_trans needs a shared output -----------------------------------------------

def test_multi_node_auto_trans_needs_shared_output():
    # mindformers r1.8.0 mindformers/tools/ckpt_transform/transform_checkpoint.py waits for every rank's
    # strategy file in the local strategy folder (7200 s); r1.3.0 docs/feature_cards/Transform_Ckpt.md:
    # across servers the automatic transform needs a shared disk.
    data = load("qwen1_5-7b-full-2x8-msrun.yaml")
    data["checkpoint"] = {"load": "/models/q.ckpt", "auto_trans": True}
    refused(data, r"checkpoint.auto_trans: across nodes needs an output/ that every node shares")
    data["output"] = {"shared": True}
    assert run_yaml(data)["auto_trans_ckpt"] is True
    one_node = load("qwen1_5-7b-lora-1x8-ssh.yaml")
    one_node["checkpoint"]["auto_trans"] = True
    parse_job(one_node)  # one node: its own strategy folder holds every rank's file
    k8s = load("qwen1_5-7b-full-2x8-k8s-vcjob.yaml")
    assert k8s["checkpoint"]["auto_trans"] is True and k8s["cluster"]["k8s"]["output_pvc"]
    parse_job(k8s)  # the output claim is the shared disk
    del k8s["cluster"]["k8s"]["output_pvc"]
    refused(k8s, r"checkpoint.auto_trans: across nodes")


# --- 5. Devices inside containers are 0..n-1 -------------------------------------------------------

def test_docker_device_subset_is_numbered_from_zero_inside():
    # mindformers r1.0 mindformers/tools/hccl_tools.py --visible_devices: in a docker container the
    # table for host devices [4,8) must say [0,4) (device_id and logic_id differ otherwise).
    data = load(BAICHUAN)
    data["cluster"]["nodes"][0]["devices"] = "[4,8)"
    data["cluster"]["nodes"][0]["device_ips"] = [f"192.168.10{d}.13" for d in range(4)]
    plan = build_plan(parse_job(data))
    docker = plan.artifacts["nodes/node-0/docker-run.sh"]
    assert [f"--device=/dev/davinci{d}" in docker for d in range(8)] == [False] * 4 + [True] * 4
    launch = plan.artifacts["nodes/node-0/launch.sh"]
    assert "ASCEND_RT_VISIBLE_DEVICES" not in launch
    for rank in range(4):
        assert f"RANK_ID={rank} DEVICE_ID={rank} \\" in launch
    table = json.loads(plan.artifacts["ranktable/hccl.json"])
    assert [(d["device_id"], d["device_ip"]) for d in table["server_list"][0]["device"]] == [
        ("0", "192.168.100.13"), ("1", "192.168.101.13"), ("2", "192.168.102.13"), ("3", "192.168.103.13")]


def test_host_device_subset_maps_with_visible_devices():
    data = load("qwen1_5-7b-lora-1x8-ssh.yaml")
    data["cluster"]["nodes"][0]["devices"] = "[4,8)"
    data["parallel"]["data_parallel"] = 4
    launch = build_plan(parse_job(data)).artifacts["nodes/node-0/launch.sh"]
    assert "export ASCEND_RT_VISIBLE_DEVICES=4,5,6,7" in launch


# --- 7 and 11. What every launch script does before the ranks start -------------------------------

def _run_launch_script(tmp_path, data, toolkit_exists=True):
    """Run a rendered msrun node script with a stand-in `msrun` (no NPU here) that records what it got."""
    toolkit = tmp_path / "Ascend" / "ascend-toolkit" / "set_env.sh"
    if toolkit_exists:
        toolkit.parent.mkdir(parents=True)
        # CANN's set_env.sh reads variables that may be unset (it runs under the script's set -u).
        toolkit.write_text('export ASCEND_OPP_PATH=/cann/opp\nexport LD_LIBRARY_PATH=/cann/lib64:${LD_LIBRARY_PATH}\n')
    data = copy.deepcopy(data)
    data["cluster"]["ascend_env"] = {"toolkit": str(toolkit), "optional": [str(tmp_path / "no-nnal.sh")]}
    plan = build_plan(parse_job(data))
    plan.write(tmp_path / "plan")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "msrun").write_text('#!/bin/bash\n{ echo "ulimit=$(ulimit -u)"; echo "opp=${ASCEND_OPP_PATH:-}";'
                                   ' echo "ld=${LD_LIBRARY_PATH:-}"; printf "%s\\n" "$@"; } > msrun.args\n')
    (bin_dir / "msrun").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    work = tmp_path / "work"
    work.mkdir()
    # A low soft limit, so that the test sees the script raise it.
    script = f"ulimit -S -u 500; exec bash {tmp_path / 'plan' / 'nodes' / 'node-0' / 'launch.sh'}"
    out = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    args = (work / "msrun.args").read_text().splitlines() if (work / "msrun.args").exists() else []
    return out, args


def test_ascend_launch_sources_cann_raises_the_process_limit_and_binds_cores(tmp_path):
    out, args = _run_launch_script(tmp_path, load("qwen1_5-7b-lora-1x8-ssh.yaml"))
    assert out.returncode == 0, out.stderr
    # Every anchor launch script runs `ulimit -u unlimited` (msrun_launcher.sh r1.8.0, run_distribute.sh);
    # where the hard limit is lower (as in this sandbox), the script raises the soft limit to it.
    hard = subprocess.run(["bash", "-c", "ulimit -H -u"], capture_output=True, text=True).stdout.strip()
    assert f"ulimit={hard}" in args
    # The mindxdl-deploy train_start.sh samples source the toolkit's set_env.sh.
    assert "opp=/cann/opp" in args and "ld=/cann/lib64:" in args
    # msrun_launcher.sh r1.8.0: msrun --bind_core=True ... --cluster_time_out=7200.
    assert "--bind_core=True" in args and "--cluster_time_out=7200" in args


def test_missing_cann_environment_stops_the_node_with_a_clear_message(tmp_path):
    out, args = _run_launch_script(tmp_path, load("qwen1_5-7b-lora-1x8-ssh.yaml"), toolkit_exists=False)
    assert out.returncode == 2 and args == []
    assert "CANN's set_env.sh is missing at" in out.stderr and "cluster.ascend_env.toolkit" in out.stderr


def test_no_bind_core_before_mindformers_1_6():
    # msrun_launcher.sh has --bind_core=True from v1.6.0 on, not in v1.5.0.
    data = load("qwen1_5-7b-full-2x8-k8s-volcano.yaml")
    data["image"] = {"entry": "ms2.4.10-mf1.3.2-cann8.0.0-py3.10-910b"}
    plan = build_plan(parse_job(data))
    assert "--bind_core" not in plan.artifacts["nodes/node-0/launch.sh"]
    data["image"] = {"entry": "ms2.7.2-mf1.8.0-cann8.5.0-py3.11-910b"}
    assert "--bind_core=True" in build_plan(parse_job(data)).artifacts["nodes/node-0/launch.sh"]


# --- 9. Gradients are averaged over data-parallel ranks -------------------------------------------

def test_parallel_mode_and_gradient_mean_per_device():
    # Ascend: dp=8 as parallel_mode 1 + full_batch True, gradients_mean False (configs/llama2/
    # lora_llama2_7b.yaml r1.0-r1.5.0, research/qwen1_5/finetune_qwen1_5_7b.yaml v1.2.0-v1.3.2).
    ascend = run_yaml(load("llama2-7b-lora-1x8-ranktable.yaml"))["parallel"]
    assert (ascend["parallel_mode"], ascend["full_batch"], ascend["gradients_mean"]) == (1, True, False)
    # CPU: DATA_PARALLEL, whose TrainOneStepCell reduces with mean = gradients_mean.
    cpu = run_yaml(load("tiny-lora-local.yaml"))["parallel"]
    assert (cpu["parallel_mode"], cpu["full_batch"], cpu["gradients_mean"]) == (0, False, True)


# --- 12. Default image ------------------------------------------------------------------------------

def test_default_image_is_mindformers_1_8_on_cann_8_5():
    # mindformers r1.8.0 README: MindFormers 1.8.0 -> MindSpore 2.7.2 -> CANN 8.5.0 -> driver 25.5.0.
    from launcher.image.matrix import load_matrix
    from launcher.job_sections import Image
    entry = load_matrix()[Image().entry]
    assert (entry.mindformers.version, entry.mindspore.version, entry.cann.version) == ("1.8.0", "2.7.2", "8.5.0")


# --- 16. Dataset order ------------------------------------------------------------------------------

def test_training_data_is_shuffled_by_default():
    # Every anchor fine-tune config has train_dataset.data_loader.shuffle: True.
    data = load("llama2-7b-lora-1x8-ranktable.yaml")
    assert run_yaml(data)["train_dataset"]["data_loader"]["shuffle"] is True
    data["dataset"]["shuffle"] = False
    assert run_yaml(data)["train_dataset"]["data_loader"]["shuffle"] is False


# --- Bad values that would reach the cluster ---------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ({"runner_config.epochs": "$(touch x)"}, "the base config has a integer here"),
    ({"runner_config.sink_mode": 1}, "the base config has a boolean here"),
    ({"optimizer.learning_rate": "1e-4"}, "the base config has a number here"),
])
def test_override_of_another_type_is_refused(override, message):
    data = load("tiny-lora-local.yaml")
    data["mindformers"] = {"overrides": override}
    with pytest.raises(ConfigError, match=message):
        build_plan(parse_job(data))


def test_integer_override_for_a_float_is_fine():
    data = load("tiny-lora-local.yaml")
    data["mindformers"] = {"overrides": {"lr_schedule.learning_rate": 1}}
    assert run_yaml(data)["lr_schedule"]["learning_rate"] == 1


@pytest.mark.parametrize("section, key, value", [("lora", "alpha", True), ("parallel", "data_parallel", "2"),
                                                 ("cluster", "master_port", 8118.0)])
def test_no_conversion_of_numbers(section, key, value):
    data = load("tiny-lora-local.yaml")
    data[section][key] = value
    refused(data, rf"{section}.{key}: Input should be a valid integer")

"""Every shipped MindFormers base config builds through the installed MindFormers, as a rank builds it.

For each model and method the installed MindFormers carries, the run config is rendered by the launcher
(mfconfig.build of an example job), loaded with MindFormerConfig, and built piece by piece the way
MindFormers' Trainer does (mindformers/trainer/base_trainer.py: create_network, create_optimizer_scheduler,
create_model_wrapper): the context, every registered class the config names, the model from
model.model_config.type / model.arch.type with the LoRA pet_config applied, the learning-rate schedule,
the optimizer and the training wrapper. The model is shrunk to fit this CPU (1 layer, hidden 64, vocabulary
256, 16 tokens, float32, no Ascend-only kernels); every other key is the config's own. One forward pass
and one training step then run.

Each config is built in its own process (MindFormers' context is a process-wide singleton):
`python tests/test_mf_configs.py RUN_CONFIG.yaml` prints one JSON line.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "configs" / "examples"

# What the CPU needs (Ascend-only kernels off, float32) and what makes the model small.
CPU_MODEL = {
    "num_layers": 1, "hidden_size": 64, "num_heads": 4, "vocab_size": 256, "seq_length": 16, "batch_size": 2,
    "use_flash_attention": False, "use_rope_slice": True, "fused_rms_norm": False,
    "compute_dtype": "float32", "param_init_type": "float32", "layernorm_compute_type": "float32",
    "softmax_compute_type": "float32", "rotary_dtype": "float32",
}
CPU_INTERMEDIATE_SIZE = 128
BATCH, SEQ = CPU_MODEL["batch_size"], CPU_MODEL["seq_length"]

# Where each `type:` of a run config is looked up in MindFormers' registry (MindFormerModuleType values).
REGISTRY_SECTIONS = {
    ("trainer",): "trainer",
    ("runner_wrapper",): "wrapper",
    ("runner_wrapper", "scale_sense"): "wrapper",
    ("optimizer",): "optimizer",
    ("lr_schedule",): "lr",
    ("train_dataset", "data_loader"): "dataset_loader",
    ("train_dataset_task",): "dataset",
    ("model", "model_config"): "config",
    ("model", "arch"): "models",
}


def build_and_step(config_path: str) -> dict:
    """Build the rendered config as a rank does, shrunk for the CPU; one forward pass and one training step."""
    import inspect

    import numpy as np
    import mindspore as ms
    from mindformers import build_context
    from mindformers.core import build_lr, build_optim
    from mindformers.core.parallel_config import build_parallel_config
    from mindformers.models.build_model import build_network
    from mindformers.tools.register import MindFormerConfig, MindFormerRegister
    from mindformers.trainer.optimizer_grouped_parameters import get_optimizer_grouped_parameters
    from mindformers.wrapper import build_wrapper

    from launcher.entrypoints import finetune

    config = MindFormerConfig(config_path)
    raw = yaml.safe_load(Path(config_path).read_text())

    missing = []
    for path, module_type in REGISTRY_SECTIONS.items():
        section = raw
        for key in path:
            section = section.get(key) if isinstance(section, dict) else None
        if isinstance(section, dict) and "type" in section:
            if not MindFormerRegister.is_exist(module_type, section["type"]):
                missing.append(f"{'.'.join(path)}.type {section['type']} (registry '{module_type}')")
    for callback in raw.get("callbacks", []):
        if not MindFormerRegister.is_exist("callback", callback["type"]):
            missing.append(f"callbacks: {callback['type']} (registry 'callback')")

    if missing:
        return {"missing": missing}

    # Keys of model_config its class does not take would be kept as loose attributes and never used.
    config_cls = MindFormerRegister.get_cls("config", raw["model"]["model_config"]["type"])
    known = set(inspect.signature(config_cls.__init__).parameters) | {"type", "pet_config"}
    unknown_model_keys = sorted(set(raw["model"]["model_config"]) - known)

    config.use_parallel = False
    config.context.device_target = "CPU"
    model_config = config.model.model_config
    for key, value in CPU_MODEL.items():
        model_config[key] = value
    if "intermediate_size" in model_config:
        model_config.intermediate_size = CPU_INTERMEDIATE_SIZE
    # A layer per pipeline stage: MindFormers checks that the stages split the layers.
    model_config.num_layers = max(1, int(config.parallel_config.pipeline_stage or 1))
    finetune._use_cpu_overflow_check()  # as the entrypoint does on the CPU
    build_context(config)
    build_parallel_config(config)
    network = build_network(config.model, default_args={"parallel_config": config.parallel_config,
                                                         "moe_config": config.moe_config,
                                                         "dataset_config": config.train_dataset})
    network.set_train(True)
    tokens = ms.Tensor(np.random.default_rng(0).integers(3, 256, (BATCH, SEQ + 1)), ms.int32)
    loss = float(network(tokens).asnumpy().reshape(-1)[0])

    config.lr_schedule.total_steps = 10  # the Trainer sets it from the dataset size
    lr = build_lr(config.lr_schedule)
    params = get_optimizer_grouped_parameters(model=network, weight_decay=config.optimizer.weight_decay,
                                              dynamic_lr_schedule=lr, optimizer_type=config.optimizer.type)
    optimizer = build_optim(config.optimizer, default_args={"params": params, "learning_rate": lr})
    wrapper = build_wrapper(config.runner_wrapper, default_args={"network": network, "optimizer": optimizer,
                                                                 "parallel_config": config.parallel_config})
    wrapper.set_train(True)
    step_loss = float(wrapper(tokens)[0].asnumpy().reshape(-1)[0])
    model = network
    while hasattr(model, "network"):  # PetModel -> LoraModel -> the model (mindformers/pet)
        model = model.network
    return {
        "missing": missing,
        "unknown_model_keys": unknown_model_keys,
        "network": type(network).__name__,
        "model": type(model).__name__,
        "model_config": type(network.config).__name__,
        "trainable": sorted(p.name for p in network.trainable_params()),
        "optimizer": type(optimizer).__name__,
        "wrapper": type(wrapper).__name__,
        "loss": loss,
        "step_loss": step_loss,
    }


def installed_mindformers() -> str:
    import importlib.metadata

    return importlib.metadata.version("mindformers")


def example_job(model: str, method: str):
    """The first shipped example of that model and method that trains on a dataset.path (a data: section is
    resolved only when the job runs), or the tiny LoRA one made a full fine-tune."""
    from launcher import spec

    for path in sorted(EXAMPLES.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if (data["model"], data["method"]) == (model, method) and data.get("dataset", {}).get("path"):
            return spec.parse_job(data, str(path))
    data = yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text())
    assert (data["model"], method) == (model, "full"), f"no example job for {model} {method}"
    data["method"] = "full"
    del data["lora"]
    return spec.parse_job(data, "tiny-full")


def shipped() -> list[tuple[str, str]]:
    return sorted((p.parent.name, p.stem) for p in (REPO / "configs" / "mindformers").glob("*/*.yaml"))


def test_every_shipped_config_is_a_model_and_method_of_the_launcher():
    from launcher.models import MODELS

    assert shipped() == sorted((model, method) for model, m in MODELS.items() for method in m.methods)


@pytest.mark.e2e
@pytest.mark.parametrize("model,method", shipped())
def test_rendered_config_builds_and_trains_a_step(tmp_path, model, method):
    from launcher import mfconfig
    from launcher.models import MODELS

    version = installed_mindformers()
    if not MODELS[model].carried_by(version):
        pytest.skip(f"MindFormers {version} does not carry {model} ({MODELS[model].releases})")
    job = example_job(model, method)
    cfg = mfconfig.build(job)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(cfg))
    result = subprocess.run([sys.executable, __file__, str(run_yaml)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    built = json.loads(result.stdout.strip().splitlines()[-1])

    assert built["missing"] == [], "classes the installed MindFormers does not register"
    assert built["unknown_model_keys"] == [], f"model_config keys {cfg['model']['model_config']['type']} does not take"
    assert built["model"] == cfg["model"]["arch"]["type"]
    assert built["model_config"] == cfg["model"]["model_config"]["type"]
    assert built["optimizer"] == cfg["optimizer"]["type"] and built["wrapper"] == cfg["runner_wrapper"]["type"]
    # A random model over 256 tokens: the cross entropy is near ln(256) = 5.55.
    assert 5.0 < built["loss"] < 6.2 and 5.0 < built["step_loss"] < 6.2, built
    if method == "lora":
        # LoRA A and B matrices on each targeted projection: nothing else trains.
        assert built["network"] == "PetModel"
        assert built["trainable"] and all("mindpet_delta_lora" in name for name in built["trainable"])
        targets = {name.split(".")[-2] for name in built["trainable"]}
        assert targets == {"wq", "wk", "wv", "wo"}, built["trainable"]
    else:
        assert not any("lora" in name for name in built["trainable"])
        assert "model.tok_embeddings.embedding_weight" in built["trainable"]



def test_qwen1_5_full_takes_precision_and_optimizer_from_the_anchor():
    """Expected values written from mindspore-lab/mindformers research/qwen1_5/finetune_qwen1_5_7b.yaml at
    r1.3.0 (f90b5b9c; the same file at r1.2.0, and at r1.5.0 as research/qwen1_5/qwen1_5_7b/)."""
    from launcher import mfconfig, spec

    cfg = mfconfig.build(spec.load_job(EXAMPLES / "qwen1_5-7b-full-2x8-msrun.yaml"))
    model = cfg["model"]["model_config"]
    assert model["compute_dtype"] == "bfloat16"
    assert model["param_init_type"] == "float32"
    assert model["layernorm_compute_type"] == "float32"
    assert cfg["context"]["ascend_config"]["precision_mode"] == "must_keep_origin_dtype"
    wrapper = cfg["runner_wrapper"]
    assert wrapper["type"] == "MFTrainOneStepCell" and wrapper["use_clip_grad"] is True
    assert wrapper["scale_sense"] == {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 4096,
                                      "scale_factor": 2, "scale_window": 1000}
    # The anchor's FP32StateAdamWeightDecay(beta1 0.9, beta2 0.95, eps 1e-8, weight_decay 0.01) is AdamW in
    # MindFormers 1.8 (mindformers/core/optim/__init__.py, r1.8.0: betas, eps, weight_decay).
    optimizer = cfg["optimizer"]
    assert optimizer["type"] == "AdamW"
    assert optimizer["betas"] == [0.9, 0.95]
    assert optimizer["eps"] == 1e-8
    assert optimizer["weight_decay"] == 0.01
    assert optimizer["learning_rate"] == 1e-6
    schedule = cfg["lr_schedule"]
    assert schedule["type"] == "CosineWithWarmUpLR"
    assert schedule["learning_rate"] == 1e-6
    assert schedule["warmup_ratio"] == 0.01
    assert cfg["parallel"]["enable_parallel_optimizer"] is True
    # The anchor trains 4096 tokens; the base keeps 2048, the record length of the example datasets.
    assert model["seq_length"] == 2048



def test_llama2_lora_takes_its_recipe_from_the_r1_0_config():
    """Expected values written from mindspore-lab/mindformers configs/llama2/run_llama2_7b_lora_910b.yaml at
    r1.0 (6a407600), the example job's LoRA settings included."""
    from launcher import mfconfig, spec

    cfg = mfconfig.build(spec.load_job(EXAMPLES / "llama2-7b-lora-1x8-ranktable.yaml"))
    model = cfg["model"]["model_config"]
    assert (model["compute_dtype"], model["param_init_type"], model["layernorm_compute_type"]) == \
        ("float16", "float16", "float32")
    assert (model["seq_length"], model["vocab_size"], model["multiple_of"], model["rms_norm_eps"]) == \
        (2048, 32000, 256, 1e-5)
    assert model["pet_config"] == {"pet_type": "lora", "lora_rank": 16, "lora_alpha": 16, "lora_dropout": 0.05,
                                   "target_modules": ".*wq|.*wk|.*wv|.*wo"}
    wrapper = cfg["runner_wrapper"]
    assert wrapper["use_clip_grad"] is True
    assert wrapper["scale_sense"] == {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 65536,
                                      "scale_factor": 2, "scale_window": 1000}
    # r1.0's FP32StateAdamWeightDecay(beta1 0.9, beta2 0.999, eps 1e-8) is AdamW in MindFormers 1.8.
    assert (cfg["optimizer"]["type"], cfg["optimizer"]["betas"], cfg["optimizer"]["eps"]) == \
        ("AdamW", [0.9, 0.999], 1e-8)
    assert cfg["optimizer"]["weight_decay"] == 0.0
    schedule = cfg["lr_schedule"]
    assert (schedule["type"], schedule["learning_rate"], schedule["lr_end"], schedule["warmup_ratio"]) == \
        ("CosineWithWarmUpLR", 1e-4, 0, 0.03)
    assert cfg["optimizer"]["learning_rate"] == 1e-4


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    outcome = build_and_step(sys.argv[1])
    sys.stdout.flush()
    print(json.dumps(outcome))

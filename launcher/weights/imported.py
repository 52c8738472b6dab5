"""An imported model directory as a job names it (`model: DIR`): read without MindSpore or numpy."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from launcher.errors import ConfigError

MODEL_FILE = "model.json"
CHECKPOINT_FILE = "model.ckpt"
TOKENIZER_DIR = "tokenizer"


def is_imported(model: str) -> bool:
    """A job's `model` names an imported directory (not a shipped model) when it is a path to one."""
    return (Path(model) / MODEL_FILE).is_file()


@lru_cache(maxsize=16)
def read_record(model: str) -> dict:
    path = Path(model) / MODEL_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: {path} does not read ({exc})") from None
    if record.get("format") != "launcher-model/1" or "model_config" not in record:
        raise ConfigError(f"model: {path} is not a model written by 'launcher model import'")
    return record


# Shipped base configs an imported model is trained with: the CPU one (float32, no Ascend kernels) or
# the Ascend one (Qwen1.5's: MindFormers' LlamaForCausalLM with bfloat16 compute and flash attention).
BASE_MODELS = {"cpu": "tiny_llama", "ascend": "qwen1_5_7b"}
# What a record's model_config sets in the base config: the architecture, nothing about the device.
ARCHITECTURE_KEYS = ("hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size", "vocab_size",
                     "rms_norm_eps", "theta", "max_position_embedding", "qkv_has_bias", "bos_token_id",
                     "eos_token_id", "pad_token_id")
CPU_SEQ_LENGTH = 128  # the tiny model's 32 tokens hold no real conversation


def apply_to_base(cfg: dict, model: str, device: str) -> None:
    """Make a shipped base config (BASE_MODELS[device]) the imported model's."""
    record = read_record(model)
    model_config = cfg["model"]["model_config"]
    for key in ARCHITECTURE_KEYS:
        if key in record["model_config"]:
            model_config[key] = record["model_config"][key]
    if device == "cpu":
        model_config["seq_length"] = CPU_SEQ_LENGTH
    prefix = "".join(c if c.isalnum() else "_" for c in Path(model).resolve().name)
    (cfg.get("trainer") or {})["model_name"] = prefix
    for callback in cfg.get("callbacks") or []:
        if isinstance(callback, dict) and "prefix" in callback:
            callback["prefix"] = prefix

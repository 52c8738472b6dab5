"""The MindFormers run config: a shipped base config, filled in from the job, then the user's overrides."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import ConfigError
from launcher.render import data_dir
from launcher.spec import Job

# Where MindFormers writes, relative to each node's work directory.
OUTPUT_DIR = "./output"


def base_config_path(job: Job) -> Path:
    if job.mindformers.base:
        return Path(job.mindformers.base)
    return data_dir("configs") / "mindformers" / job.model / f"{job.method}.yaml"


def load_base(job: Job) -> dict:
    path = base_config_path(job)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"mindformers.base: {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"mindformers.base: {path} is not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or "model" not in data:
        raise ConfigError(f"mindformers.base: {path} is not a MindFormers config (no 'model' section)")
    # Anchors in the base file share objects; copy so that one fill-in changes one place.
    return copy.deepcopy(data)


def build(job: Job) -> dict:
    cfg = load_base(job)
    cluster, par = job.cluster, job.parallel
    world = job.world_size
    cfg["run_mode"] = "finetune"
    cfg["output_dir"] = OUTPUT_DIR
    cfg["use_parallel"] = world > 1
    cfg["load_checkpoint"] = job.checkpoint.load
    cfg["auto_trans_ckpt"] = job.checkpoint.auto_trans
    cfg.setdefault("context", {})["device_target"] = "CPU" if cluster.device == "cpu" else "Ascend"
    # Pure data parallel is MindSpore's DATA_PARALLEL mode (0); anything sharded needs SEMI_AUTO (1).
    semi_auto = par.model_parallel > 1 or par.pipeline_stage > 1
    parallel = cfg.setdefault("parallel", {})
    parallel["parallel_mode"] = 1 if semi_auto else 0
    parallel["full_batch"] = semi_auto
    cfg.setdefault("parallel_config", {}).update(
        data_parallel=par.data_parallel,
        model_parallel=par.model_parallel,
        pipeline_stage=par.pipeline_stage,
        micro_batch_num=par.micro_batch_num,
    )
    loader = cfg["train_dataset"]["data_loader"]
    if job.dataset.path is None:  # a data: section is resolved to its prepared file before planning
        raise ConfigError("dataset.path: not set; the data: section was not resolved (see data_cache.resolve_data)")
    loader["dataset_dir"] = job.dataset.path
    loader["shuffle"] = job.dataset.shuffle
    if "train_dataset_task" in cfg:
        cfg["train_dataset_task"]["dataset_config"] = copy.deepcopy(cfg["train_dataset"])
    model_config = cfg["model"]["model_config"]
    if job.method == "lora":
        model_config["pet_config"] = {
            "pet_type": "lora",
            "lora_rank": job.lora.rank,
            "lora_alpha": job.lora.alpha,
            "lora_dropout": job.lora.dropout,
            "target_modules": job.lora.target_modules,
        }
    else:
        model_config.pop("pet_config", None)
    for dotted, value in job.mindformers.overrides.items():
        apply_override(cfg, dotted, value)
    if job.mindformers.overrides and "train_dataset_task" in cfg:
        cfg["train_dataset_task"]["dataset_config"] = copy.deepcopy(cfg["train_dataset"])
    return cfg


def apply_override(cfg: dict, dotted: str, value: Any) -> None:
    """Set cfg[a][b][c] = value for 'a.b.c'. The parent must exist; a near-miss leaf is refused as a typo."""
    where = f"mindformers.overrides.{dotted}"
    parts = dotted.split(".")
    node: Any = cfg
    for depth, key in enumerate(parts[:-1]):
        if not isinstance(node, dict) or key not in node:
            known = list(node) if isinstance(node, dict) else []
            raise ConfigError(f"{where}: '{'.'.join(parts[: depth + 1])}' is not in the base config{_hint(key, known)}")
        node = node[key]
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: '{'.'.join(parts[:-1])}' is not a section")
    leaf = parts[-1]
    if leaf not in node:
        close = difflib.get_close_matches(leaf, list(node), n=1, cutoff=0.8)
        if close:
            raise ConfigError(f"{where}: '{leaf}' is not in the base config; did you mean '{close[0]}'?")
    node[leaf] = value


def _hint(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def train_shape(cfg: dict) -> tuple[int, int]:
    """(seq_length, per-rank batch size), for the tokens/s figure in the summary."""
    seq = int(cfg["model"]["model_config"]["seq_length"])
    batch = int(cfg.get("runner_config", {}).get("batch_size", 1))
    return seq, batch

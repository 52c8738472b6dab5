"""The MindFormers run config: a shipped base config, filled in from the job, then the user's overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import ConfigError
from launcher.render import data_dir
from launcher import runs
from launcher.models import TARGET_RELEASE, release_line
from launcher.schema import did_you_mean
from launcher.weights import imported
from launcher.spec import Job, mindformers_release

# Where MindFormers writes, relative to each node's work directory.
OUTPUT_DIR = f"./{runs.OUTPUT_DIR}"


def base_config_path(job: Job) -> Path:
    if job.mindformers.base:
        return Path(job.mindformers.base)
    model = imported.BASE_MODELS[job.cluster.device] if imported.is_imported(job.model) else job.model
    return data_dir("configs") / "mindformers" / model / f"{job.method}.yaml"


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
    data = copy.deepcopy(data)
    if imported.is_imported(job.model):
        imported.apply_to_base(data, job.model, job.cluster.device)
    return data


def build(job: Job) -> dict:
    cfg = load_base(job)
    cluster, par = job.cluster, job.parallel
    world = job.world_size
    cfg["run_mode"] = "finetune"
    cfg["output_dir"] = OUTPUT_DIR
    cfg["use_parallel"] = world > 1
    cfg["load_checkpoint"] = job.checkpoint.load
    if job.checkpoint.resume:
        # MindFormers (r1.8.0 trainer/trainer.py finetune, tools/resume_ckpt.py get_resume_checkpoint): a
        # string resume_training names the file, its _rank_0 replaced by each rank's own, under
        # load_checkpoint/rank_N/; the rank loads step_num, epoch_num and loss_scale from it and the
        # dataset skips the steps done (base_trainer.py: dataset.set_init_step unless ignore_data_skip).
        # True instead would pick the step from meta.json behind a barrier that has no CPU kernel.
        cfg["resume_training"] = job.checkpoint.resume
    cfg["auto_trans_ckpt"] = job.checkpoint.auto_trans
    cfg.setdefault("context", {})["device_target"] = "CPU" if cluster.device == "cpu" else "Ascend"
    parallel = cfg.setdefault("parallel", {})
    parallel.update(parallel_settings(job))
    cfg.setdefault("parallel_config", {}).update(
        data_parallel=par.data_parallel,
        model_parallel=par.model_parallel,
        pipeline_stage=par.pipeline_stage,
        micro_batch_num=par.micro_batch_num,
    )
    loader = cfg["train_dataset"]["data_loader"]
    if job.dataset.path is None:  # a data: section is resolved to its prepared file before planning
        raise ConfigError("dataset.path: not set; the data: section was not resolved (see runner.load)")
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
    if job.monitor.tensorboard:
        cfg["tensorboard"] = tensorboard_section(job)
    if (job.checkpoint.save_steps or job.checkpoint.keep) and not checkpoint_callbacks(cfg):
        raise ConfigError("checkpoint.save_steps/keep: the base config has no CheckpointMonitor callback to set")
    for callback in checkpoint_callbacks(cfg):
        # CheckpointMonitor's own names (mindformers r1.8.0 core/callback/callback.py __init__).
        if job.checkpoint.save_steps is not None:
            callback["save_checkpoint_steps"] = job.checkpoint.save_steps
        if job.checkpoint.keep is not None:
            callback["keep_checkpoint_max"] = job.checkpoint.keep
    for dotted, value in job.mindformers.overrides.items():
        apply_override(cfg, dotted, value)
    fit_to_release(cfg, mindformers_release(job)[0] or TARGET_RELEASE)
    if job.mindformers.overrides and "train_dataset_task" in cfg:
        cfg["train_dataset_task"]["dataset_config"] = copy.deepcopy(cfg["train_dataset"])
    return cfg


# Where the ranks write TensorBoard events, relative to the node's work directory; MindFormers adds rank_N.
TENSORBOARD_OUTPUT = f"{OUTPUT_DIR}/tensorboard"
# The first release with TensorBoard output (mindformers/utils/tensorboard.py appears in v1.4.0-beta1).
_TENSORBOARD_FROM = (1, 4)


def tensorboard_section(job: Job) -> dict:
    """MindFormers' tensorboard section (mindformers r1.8.0). trainer/base_trainer.py, training_process:
    `if config.tensorboard.tensorboard_dir` is a string, it becomes
    os.path.join(tensorboard_dir, f"rank_{get_real_rank()}") and utils/tensorboard.py _set_tensorboard_writer
    opens a tensorboardX SummaryWriter there (max_queue=tensorboard_queue_size, default 10); the
    MFLossMonitor (core/callback/callback.py, print_output_info) then adds the scalar 'loss' (and
    'grad-norm', 'batch-size', 'learning-rate') at each logged global step. Each rank writes its own
    directory, output/tensorboard/rank_N, which gather copies to runs/<id>/tensorboard/rank_N.
    tensorboard_queue_size is written out because utils/tensorboard.py _handle_tensorboard reads it.
    The ranks log "Some configs in yaml are useless for finetune: ['tensorboard']": tools/register/template.py
    leaves the section out of its template but keeps it in the config, and the trainer reads it there."""
    version, where = mindformers_release(job)
    if release_line(version or TARGET_RELEASE) < _TENSORBOARD_FROM:
        raise ConfigError(f"monitor.tensorboard: MindFormers {version} ({where}) writes no TensorBoard events; "
                          "it came with MindFormers 1.4. Run a newer release or set monitor.tensorboard: false")
    return {"tensorboard_dir": TENSORBOARD_OUTPUT, "tensorboard_queue_size": 10}


# The checkpoint callback's registered name: CheckpointMointor (sic) up to MindFormers 1.1, CheckpointMonitor
# from 1.2 on (mindspore-lab/mindformers mindformers/core/callback/callback.py at v1.1.0 and v1.2.0).
_CHECKPOINT_CALLBACKS = ("CheckpointMointor", "CheckpointMonitor")


def checkpoint_callbacks(cfg: dict) -> list[dict]:
    return [c for c in cfg.get("callbacks") or [] if isinstance(c, dict) and c.get("type") in _CHECKPOINT_CALLBACKS]


def fit_to_release(cfg: dict, version: str) -> None:
    """Spell what MindFormers renamed between releases the way the ranks' release registers it."""
    line = release_line(version)
    name = _CHECKPOINT_CALLBACKS[line >= (1, 2)]
    for callback in checkpoint_callbacks(cfg):
        callback["type"] = name
    optimizer = cfg.get("optimizer")
    if line >= (1, 6) and isinstance(optimizer, dict) and optimizer.get("type") == "FP32StateAdamWeightDecay":
        # FP32StateAdamWeightDecay (mindformers/core/optim/optim.py up to v1.5.0) is gone from v1.6.0 on;
        # AdamW (mindformers/core/optim/adamw.py, r1.8.0: betas, eps, weight_decay) keeps its moments in
        # float32 the same way.
        optimizer["type"] = "AdamW"
        optimizer["betas"] = [optimizer.pop("beta1", 0.9), optimizer.pop("beta2", 0.999)]
    elif line < (1, 2) and isinstance(optimizer, dict) and optimizer.get("type") == "AdamW":
        # AdamW first appears in v1.2.0; 1.0 and 1.1 have FP32StateAdamWeightDecay (beta1, beta2).
        optimizer["type"] = "FP32StateAdamWeightDecay"
        optimizer["beta1"], optimizer["beta2"] = optimizer.pop("betas", [0.9, 0.999])


def parallel_settings(job: Job) -> dict:
    """parallel_mode, full_batch and gradients_mean for the job's device.

    Ascend runs every layout, pure data parallel included, as SEMI_AUTO_PARALLEL (1) with full_batch,
    as every anchor config does (mindformers configs/llama2/lora_llama2_7b.yaml r1.0-r1.5.0,
    research/baichuan2/finetune_baichuan2_7b_lora.yaml r1.3.0, research/qwen1_5/finetune_qwen1_5_7b.yaml
    r1.2-r1.5): the loss is then the mean over the global batch, so the gradients need no extra mean and
    the anchors keep gradients_mean False.
    The CPU cannot compile SEMI_AUTO (MindSpore 2.7.2: "Invalid backend: CPU", even for pure data
    parallel), so it runs DATA_PARALLEL (0): each rank's loss is the mean over its own batch and the
    gradients must be averaged over the ranks (gradients_mean True), or they are summed and the step
    size and clipping change with the number of ranks.
    """
    if job.cluster.device == "ascend":
        return {"parallel_mode": 1, "full_batch": True, "gradients_mean": False}
    return {"parallel_mode": 0, "full_batch": False, "gradients_mean": True}


def apply_override(cfg: dict, dotted: str, value: Any) -> None:
    """Set cfg[a][b][c] = value for 'a.b.c'. The parent must exist; a near-miss leaf is refused as a typo."""
    where = f"mindformers.overrides.{dotted}"
    parts = dotted.split(".")
    node: Any = cfg
    for depth, key in enumerate(parts[:-1]):
        if not isinstance(node, dict) or key not in node:
            known = list(node) if isinstance(node, dict) else []
            raise ConfigError(f"{where}: '{'.'.join(parts[: depth + 1])}' is not in the base config"
                              f"{did_you_mean(key, known)}")
        node = node[key]
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: '{'.'.join(parts[:-1])}' is not a section")
    leaf = parts[-1]
    if leaf not in node:
        if hint := did_you_mean(leaf, node, cutoff=0.8):
            raise ConfigError(f"{where}: '{leaf}' is not in the base config{hint}")
    elif not _same_kind(node[leaf], value):
        # Caught here, once, instead of by MindFormers on every node.
        raise ConfigError(f"{where}: the base config has a {_kind(node[leaf])} here ({node[leaf]!r}), "
                          f"not a {_kind(value)} ({value!r})")
    node[leaf] = value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", list: "list", dict: "section"}.get(
        type(value), type(value).__name__)


def _same_kind(base: Any, value: Any) -> bool:
    """An override keeps the base value's kind; an integer may stand for a float. A null base takes anything."""
    if base is None or _kind(base) == _kind(value):
        return True
    return _kind(base) == "number" and _kind(value) == "integer"


def train_shape(cfg: dict) -> tuple[int, int]:
    """(seq_length, per-rank batch size), for the tokens/s figure in the summary."""
    seq = int(cfg["model"]["model_config"]["seq_length"])
    batch = int(cfg.get("runner_config", {}).get("batch_size", 1))
    return seq, batch

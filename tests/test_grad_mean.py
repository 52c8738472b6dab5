"""Data parallel on the CPU averages the gradients: one step of 2 ranks with batch b trains the same weights
as one step of 1 rank with batch 2b over the same 2b samples.

Real MindFormers runs through `launcher up` (local backend, msrun). Everything that could hide a factor of
two in the step is off: plain SGD (the step is -lr * gradient), no gradient clipping, loss scale 1, no
weight decay, no shuffle, every sample the same number of tokens with a loss on each (the byte dataset has
no padding). Both runs start from one saved base checkpoint.
"""

import json

import mindspore as ms
import numpy as np
import pytest
import yaml
from conftest import EXAMPLES, REPO, free_port, only_run, run_launcher

from launcher.data import mindrecord as dataset

pytestmark = pytest.mark.e2e

PER_RANK_BATCH = 2
SEQ_LENGTH = 32
LEARNING_RATE = 0.5


def sgd_base_config(path):
    """The shipped tiny full fine-tune config with a step proportional to the gradient."""
    cfg = yaml.safe_load((REPO / "configs" / "mindformers" / "tiny_llama" / "full.yaml").read_text())
    # mindspore.nn.SGD with momentum 0 and no weight decay: param -= lr * grad.
    cfg["optimizer"] = {"type": "SGD", "learning_rate": LEARNING_RATE, "momentum": 0.0, "weight_decay": 0.0}
    cfg["lr_schedule"] = {"type": "ConstantWarmUpLR", "learning_rate": LEARNING_RATE, "warmup_steps": 0,
                          "total_steps": -1}
    cfg["runner_wrapper"] = {"type": "MFTrainOneStepCell", "scale_sense": 1.0, "use_clip_grad": False}
    cfg["model"]["model_config"]["seq_length"] = SEQ_LENGTH
    path.write_text(yaml.safe_dump(cfg))
    return path


def base_checkpoint(path):
    """A seeded tiny Llama, saved once: both runs load it."""
    from mindformers import LlamaConfig, LlamaForCausalLM

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    ms.set_seed(7)
    cfg = yaml.safe_load((REPO / "configs" / "mindformers" / "tiny_llama" / "full.yaml").read_text())
    settings = dict(cfg["model"]["model_config"], seq_length=SEQ_LENGTH)
    settings.pop("type")
    ms.save_checkpoint(LlamaForCausalLM(LlamaConfig(**settings)), str(path))
    return path


def train_one_step(tmp_path, name, ranks, batch, base_cfg, data, ckpt):
    """Run one training step through the launcher; the trained weights of each rank's checkpoint."""
    job = yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text())
    job.update(name=name, method="full")
    del job["lora"]
    job["dataset"] = {"path": str(data), "shuffle": False}
    job["checkpoint"] = {"load": str(ckpt)}
    job["parallel"] = {"data_parallel": ranks}
    job["cluster"]["nodes"] = [{"host": "localhost", "devices": list(range(ranks))}]
    job["cluster"]["master_port"] = free_port()
    job["mindformers"] = {"base": str(base_cfg), "overrides": {
        "runner_config.batch_size": batch, "train_dataset.batch_size": batch,
        "model.model_config.batch_size": batch}}
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / "job.yaml").write_text(yaml.safe_dump(job))
    result = run_launcher("up", "job.yaml", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run(workdir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [summary["ranks"][str(r)]["steps"] for r in range(ranks)] == [1] * ranks
    weights = []
    for rank in range(ranks):
        [path] = (run_dir / "ranks" / f"rank_{rank}" / "checkpoint").glob("*.ckpt")
        weights.append({k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()})
    return weights, [summary["ranks"][str(r)]["last_loss"] for r in range(ranks)]


def test_two_ranks_with_batch_b_step_like_one_rank_with_batch_2b(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "four.mindrecord"
    # Exactly 2b samples: one step of either run reads all of them, however msrun shards them.
    assert dataset.write_tiny(data, seq_length=SEQ_LENGTH, records=2 * PER_RANK_BATCH) == 2 * PER_RANK_BATCH
    base_cfg = sgd_base_config(tmp_path / "sgd.yaml")
    ckpt = base_checkpoint(tmp_path / "base.ckpt")
    base = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(ckpt)).items()}

    [single], _ = train_one_step(tmp_path, "one-rank", 1, 2 * PER_RANK_BATCH, base_cfg, data, ckpt)
    (rank0, rank1), losses = train_one_step(tmp_path, "two-ranks", 2, PER_RANK_BATCH, base_cfg, data, ckpt)

    assert losses[0] != losses[1], "both ranks read the same samples"
    for name in base:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
    step = max(np.abs(single[k] - base[k]).max() for k in base)
    assert step > 1e-2, "the step is too small to tell a mean of the gradients from their sum"
    ratio = max(np.abs(rank0[k] - base[k]).max() for k in base) / step
    diff = max(np.abs(rank0[k] - single[k]).max() for k in base)
    print(f"largest step {step:.3e}; 2 ranks / 1 rank step {ratio:.4f}; largest weight difference {diff:.3e}")
    assert diff <= 1e-6, f"2 ranks moved the weights {ratio:.3f} times as far as 1 rank (largest difference {diff:.3e})"

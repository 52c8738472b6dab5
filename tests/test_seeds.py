"""The seed workflows as example jobs: each renders cleanly, and its CPU twin (the same job shrunk to the
tiny model, 2 data-parallel ranks on this machine) trains through `launcher up`. Baichuan2 cannot run on
the installed MindFormers 1.8, so its example is checked against the version gate instead."""

import copy
import json
import subprocess

import pytest
import yaml
from conftest import EXAMPLES, SEQ_LENGTH_FOR_TEMPLATE, conversation_rows, free_port, only_run, require_tool, run_launcher

from launcher.errors import ConfigError
from launcher.plan import build_plan
from launcher.spec import parse_job

pytestmark = pytest.mark.e2e

SEEDS = {
    "llama2-7b-lora-novelset-ssh.yaml": "Llama2-7B LoRA from NovelSet rows through conversation records",
    "llama-7b-lora-belle-ssh.yaml": "LLaMA-7B LoRA on BELLE school math, FP32StateAdamWeightDecay, cosine LR",
    "llama2-7b-lora-alpaca-msrun-autotrans.yaml": "Llama2-7B LoRA on alpaca, msrun on 8 NPUs, auto_trans",
    "qwen1_5-7b-lora-1x8-ssh.yaml": "Qwen1.5-7B LoRA 1x8",
    "qwen1_5-7b-full-2x8-ranktable.yaml": "Qwen1.5-7B full 2x8 from the merged rank table, ranks [0,8) and [8,16)",
}


def rows_in(fmt: str, count: int) -> list[dict]:
    """Rows in the seed's own format, made from the shipped corpus."""
    rows = []
    for row in conversation_rows(count):
        ask, answer = (t["value"] for t in row["conversations"])
        if fmt == "novelset":
            rows.append({"Instruction": ask, "Input": "", "Response": answer})
        elif fmt == "belle":
            rows.append({"instruction": ask, "input": "", "output": answer})
        else:
            rows.append(row)
    return rows


def with_local_data(job: dict, tmp_path, tokenizer) -> dict:
    """The seed's data: section pointed at rows made here and the test tokenizer."""
    if "data" in job:
        source = tmp_path / f"rows-{job['data']['format']}.json"
        source.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows_in(job["data"]["format"], 64)) + "\n]\n")
        job["data"].update(source=str(source), tokenizer=str(tokenizer))
    return job


def cpu_twin(seed: dict, tmp_path, tiny_dataset, tokenizer) -> dict:
    twin = copy.deepcopy(seed)
    twin["name"] = seed["name"][:34] + "-cpu"
    twin["model"] = "tiny_llama"
    for key in ("checkpoint", "image", "env"):
        twin.pop(key, None)
    twin["parallel"] = {"data_parallel": 2}
    launch = seed["cluster"].get("launch", "msrun")
    twin["cluster"] = {"backend": "local", "device": "cpu", "launch": launch, "master_port": free_port(),
                       "nodes": [{"host": "localhost", "devices": [0, 1]}]}
    overrides = {}
    if "data" in twin:
        with_local_data(twin, tmp_path, tokenizer)
        # The alpaca-style prompt of NovelSet and BELLE rows is longer than the conversation template's.
        overrides["model.model_config.seq_length"] = 2 * SEQ_LENGTH_FOR_TEMPLATE
    else:
        twin["dataset"] = {"path": str(tiny_dataset)}
    for key in ("optimizer", "lr_schedule"):  # the seed's own optimizer and schedule, on the tiny model
        if key in seed.get("mindformers", {}).get("overrides", {}):
            overrides[key] = seed["mindformers"]["overrides"][key]
    if "lr_schedule" in overrides:
        overrides["lr_schedule"] = {**overrides["lr_schedule"], "learning_rate": 3.e-3}
    twin["mindformers"] = {"overrides": overrides}
    return twin


@pytest.mark.parametrize("seed", SEEDS)
def test_seed_example_renders(seed, tmp_path, tiny_sp_tokenizer):
    shellcheck = require_tool("shellcheck")
    job = with_local_data(yaml.safe_load((EXAMPLES / seed).read_text()), tmp_path, tiny_sp_tokenizer)
    path = tmp_path / seed
    path.write_text(yaml.safe_dump(job))
    out = tmp_path / "rendered"
    result = run_launcher("render", path, "-o", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scripts = sorted(out.rglob("*.sh"))
    assert scripts
    subprocess.run([shellcheck, "-x", *map(str, scripts)], check=True, capture_output=True)
    run = yaml.safe_load((out / "mindformers" / "run.yaml").read_text())
    assert run["context"]["device_target"] == "Ascend"


@pytest.mark.parametrize("seed", SEEDS)
def test_seed_cpu_twin_trains(seed, tmp_path, tiny_dataset, tiny_sp_tokenizer):
    twin = cpu_twin(yaml.safe_load((EXAMPLES / seed).read_text()), tmp_path, tiny_dataset, tiny_sp_tokenizer)
    path = tmp_path / "twin.yaml"
    path.write_text(yaml.safe_dump(twin))
    result = run_launcher("up", path, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = only_run(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "succeeded"
    for rank in ("0", "1"):
        assert summary["ranks"][rank]["steps"] >= 2
    cfg = yaml.safe_load((run_dir / "plan" / "mindformers" / "run.yaml").read_text())
    if "belle" in seed:
        # MindFormers 1.8 has no FP32StateAdamWeightDecay (mindformers/core/optim at r1.8.0); its AdamW
        # (adamw.py: betas, eps, weight_decay) keeps float32 moments the same way.
        assert cfg["optimizer"] == {"type": "AdamW", "betas": [0.9, 0.999], "eps": 1.e-8, "weight_decay": 0.01}
        assert cfg["lr_schedule"]["type"] == "CosineWithWarmUpLR"


def test_baichuan2_seed_is_gated_by_release():
    seed = yaml.safe_load((EXAMPLES / "baichuan2-7b-lora-4dev-docker.yaml").read_text())
    plan = build_plan(parse_job(seed))  # the ms2.2.10 image carries MindFormers 1.0.2
    assert [n.entry for n in plan.nodes] == ["nodes/node-0/docker-run.sh"]
    twin = copy.deepcopy(seed)
    twin["image"] = {"entry": "ms2.7.2-mf1.8.0-cann8.5.0-py3.11-910b"}
    with pytest.raises(ConfigError, match="baichuan2_7b runs on MindFormers 1.0 up to"):
        parse_job(twin)

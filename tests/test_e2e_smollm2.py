"""A real pretrained model learns: SmolLM2-135M-Instruct, imported from its GGUF, fine-tuned with LoRA on
2 CPU ranks on four facts about a product that does not exist (configs/data/tarnwick_facts.jsonl).

What must hold, each failing if the fine-tune does not work:
- the first loss is that of a model that knows English (a skipped checkpoint.load starts near ln(49152)
  = 10.8; SmolLM2 starts near 3) and the last loss is far below it (measured: 3.1 -> 0.002 per rank in
  15 steps; the bound, a fifth of the first loss, leaves room for the order of the data across ranks);
- every LoRA B matrix moved from zero (mindpet initialises B to zeros, so an untrained adapter is zero);
- the folded model answers held-out phrasings of every question with the taught fact, and the base
  model answers none of them with it (a wrong LoRA scale in merge-lora, or a label mask that learns the
  prompt instead of the answer, loses the facts);
- the exported Hugging Face directory, written as a float32 GGUF by the test, runs in llama.cpp with the
  same logits as the folded checkpoint in MindFormers and answers a held-out question with the fact.
"""

import json
import os

import numpy as np
import pytest
import yaml
from conftest import EXAMPLES, REPO, free_port, run_launcher, smollm2_gguf

pytestmark = pytest.mark.e2e
ms = pytest.importorskip("mindspore")

# Not among the training rows: each asks for one taught fact in words the data does not use.
HELD_OUT = {
    "Who is the author of Tarnwick?": "Mirela Voss",
    "What is the default port number of Tarnwick?": "7411",
    "What animal is Tarnwick's mascot?": "otter",
    "Which file does Tarnwick use for its configuration?": "tarn.yaml",
}


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory):
    work = tmp_path_factory.mktemp("smollm2-run")
    job = yaml.safe_load((EXAMPLES / "smollm2-lora-local.yaml").read_text())
    job["model"] = str(smollm2)
    job["data"].update(source=str(REPO / "configs" / "data" / "tarnwick_facts.jsonl"),
                       tokenizer=str(smollm2 / "tokenizer"), cache_dir=str(work / "cache"))
    job["checkpoint"]["load"] = str(smollm2 / "model.ckpt")
    job["cluster"]["master_port"] = free_port()
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    up = run_launcher("up", work / "job.yaml", cwd=work, timeout=2400)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    (run_dir,) = (work / "runs").iterdir()
    for step in (["ckpt", "merge", run_dir.name], ["ckpt", "merge-lora", run_dir.name, "--base", smollm2 / "model.ckpt"]):
        done = run_launcher(*step, cwd=work, timeout=900)
        assert done.returncode == 0, done.stderr
    return work, run_dir


def answers(work, run_dir, checkpoint=None) -> dict[str, str]:
    args = ["predict", run_dir.name, "--chat", "--max-new-tokens", "16"]
    for question in HELD_OUT:
        args += ["--prompt", question]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    done = run_launcher(*args, cwd=work, timeout=1200)
    assert done.returncode == 0, done.stderr
    result = json.loads((run_dir / "predict" / "result.json").read_text())
    return {q: item["answer"] for q, item in zip(HELD_OUT, result["outputs"])}


def test_loss_falls_from_a_pretrained_start(trained):
    _, run_dir = trained
    summary = json.loads((run_dir / "summary.json").read_text())
    for rank, figures in summary["ranks"].items():
        assert figures["steps"] == figures["total_steps"] == 15, (rank, figures)
        assert figures["first_loss"] < 5.0, (rank, figures)  # a random model starts near 10.8
        assert figures["last_loss"] < figures["first_loss"] / 5, (rank, figures)


def test_every_lora_b_moved_from_zero(trained):
    _, run_dir = trained
    (merged,) = (run_dir / "merged").glob("*.ckpt")
    b = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(merged)).items() if k.endswith("mindpet_delta_lora_b")}
    assert len(b) == 30 * 7  # 30 layers, wq wk wv wo w1 w2 w3
    still = [k for k, v in b.items() if np.abs(v).max() < 1e-4]
    assert not still, still[:5]


def test_the_tuned_model_answers_with_the_facts_and_the_base_does_not(trained, smollm2):
    work, run_dir = trained
    tuned = answers(work, run_dir)
    for question, fact in HELD_OUT.items():
        assert fact.lower() in tuned[question].lower(), (question, tuned[question])
    base = answers(work, run_dir, checkpoint=smollm2 / "model.ckpt")
    for question, fact in HELD_OUT.items():
        assert fact.lower() not in base[question].lower(), (question, base[question])
    print("tuned:", tuned, "\nbase:", base)


def test_the_export_runs_in_llama_cpp_with_the_same_logits(trained, smollm2, tmp_path):
    pytest.importorskip("llama_cpp")
    from gguf_f32 import llama_cpp_logits, write_f32_gguf
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    work, run_dir = trained
    done = run_launcher("ckpt", "export", run_dir.name, "--to", "hf", "-o", tmp_path / "hf", cwd=work, timeout=900)
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    write_f32_gguf(tmp_path / "tuned.gguf", load_file(str(tmp_path / "hf" / "model.safetensors")), config, smollm2_gguf())
    tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    question = "Who is the author of Tarnwick?"
    prompt = (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
              "<|im_start|>assistant\n")
    ids = tok.encode(prompt, add_special_tokens=False).ids
    theirs = llama_cpp_logits(tmp_path / "tuned.gguf", ids)

    from test_model_logits import mindformers_logits

    import yaml as _yaml

    mc = _yaml.safe_load((run_dir / "plan" / "mindformers" / "run.yaml").read_text())["model"]["model_config"]
    (folded,) = (run_dir / "merged-lora").glob("*.ckpt")
    ours = mindformers_logits(mc, folded, [ids], tmp_path)[0]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-3)

    from llama_cpp import Llama

    llm = Llama(model_path=str(tmp_path / "tuned.gguf"), n_ctx=128, verbose=False, n_threads=2)
    out = llm.create_completion(prompt, max_tokens=16, temperature=0.0, stop=["<|im_end|>"])
    assert HELD_OUT[question].lower() in out["choices"][0]["text"].lower(), out["choices"][0]["text"]

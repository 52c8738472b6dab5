"""The whole pipeline around a launch, for real on the CPU: prepare the data with a sentencepiece tokenizer,
fine-tune a LoRA from a base checkpoint on 2 ranks, filter, merge, fold the adapter, and predict."""

import json
import re

import mindspore as ms
import numpy as np
import pytest
import yaml
from conftest import EXAMPLES, conversation_rows, free_port, only_run, run_launcher, use_prepared_data
from test_ckpt import logits, tiny_models

from launcher.data.tokenization import SYSTEM_PROMPT

@pytest.mark.e2e
def test_prepare_train_filter_merge_fold_predict(tmp_path, tiny_sp_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MindFormers writes output/ in the current directory of this process too
    # The "pretrained" model the LoRA starts from: a seeded tiny Llama saved as a plain checkpoint.
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    ms.set_seed(11)
    base_net, _ = tiny_models(lora=False)
    base = tmp_path / "base.ckpt"
    ms.save_checkpoint(base_net, str(base))

    job = use_prepared_data(yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text()), tmp_path,
                            tiny_sp_tokenizer)
    job["checkpoint"] = {"load": str(base)}
    job["cluster"]["master_port"] = free_port()
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))

    up = run_launcher("up", "job.yaml", cwd=tmp_path)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "wrote 64 records" in up.stdout
    run_dir = only_run(tmp_path)
    trained = ms.load_checkpoint(str(next((run_dir / "ranks/rank_0/checkpoint").glob("*.ckpt"))))
    frozen = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(base)).items()}
    for name, value in frozen.items():  # the run started from the base, and LoRA left it untouched
        np.testing.assert_array_equal(trained[name].asnumpy(), value, err_msg=name)

    for step in (["ckpt", "filter", run_dir.name], ["ckpt", "merge", run_dir.name],
                 ["ckpt", "merge-lora", run_dir.name, "--base", base]):
        result = run_launcher(*step, cwd=tmp_path)
        assert result.returncode == 0, f"{step}: {result.stdout}{result.stderr}"
    merged = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(next((run_dir / "merged").glob("*.ckpt")))).items()}
    folded = ms.load_checkpoint(str(next((run_dir / "merged-lora").glob("*.ckpt"))))
    assert sorted(folded) == sorted(frozen)

    # The folded checkpoint in a plain model gives the logits of the LoRA model with base + adapter.
    lora_net, _ = tiny_models(lora=True)
    not_loaded, _ = ms.load_param_into_net(lora_net, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in merged.items()})
    assert not_loaded == []
    plain, _ = tiny_models(lora=False)
    not_loaded, _ = ms.load_param_into_net(plain, folded)
    assert not_loaded == []
    tokens = np.random.default_rng(5).integers(4, 256, (2, 32))
    expected = logits(lora_net, tokens)
    assert np.abs(expected - logits(base_net, tokens)).max() > 1e-4  # the adapter learned something
    np.testing.assert_allclose(logits(plain, tokens), expected, atol=1e-4, rtol=0)

    # predict finds the folded checkpoint and the tokenizer the data was prepared with. The prompt is words
    # of the corpus, which the tiny tokenizer knows (it has no piece for a capital C, say).
    prompt = " ".join(conversation_rows(1)[0]["conversations"][0]["value"].split()[1:]).lower()
    answer = run_launcher("predict", run_dir.name, "--prompt", prompt, "--max-new-tokens", "8", cwd=tmp_path)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "merged-lora" in answer.stderr
    text = answer.stdout.strip()
    assert text.startswith(prompt), text
    result = json.loads((run_dir / "predict" / "result.json").read_text())
    assert result["use_past"] is False and result["outputs"][0]["text"].strip() == text
    # The pipeline ran greedy generation (a tiny model trained 16 steps may well end its answer at once).
    generated = re.findall(r"generated tokens: (\d+) tokens", (run_dir / "predict" / "predict.log").read_text())
    assert generated and 1 <= int(generated[-1]) <= 8
    # --chat asks in the template the data was prepared with; the printed answer is what follows it.
    chat = run_launcher("predict", run_dir.name, "--prompt", prompt, "--chat", "--max-new-tokens", "8", cwd=tmp_path)
    assert chat.returncode == 0, chat.stdout + chat.stderr
    [asked] = json.loads((run_dir / "predict" / "result.json").read_text())["outputs"]
    assert asked["prompt"].startswith(SYSTEM_PROMPT) and asked["prompt"].endswith(f"USER: {prompt} ASSISTANT:")
    assert chat.stdout.strip() == asked["answer"] and prompt not in chat.stdout

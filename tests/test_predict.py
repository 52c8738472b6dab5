"""`launcher predict` on bad input: one line, exit 2, nothing run. The real generation is in test_e2e_pipeline.py."""

import importlib.util
import json
import shutil

import pytest
from conftest import REPO, run_launcher
from test_data_prepare import build_chatml_tokenizer

from launcher.ckpt import predict as ckpt_predict
from launcher.data.tokenization import SYSTEM_PROMPT

CHATML_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\nWhere do checkpoints land?<|im_end|>\n<|im_start|>assistant\n")


def make_run(tmp_path, run_id="tiny-lora-20260101-000000"):
    run_dir = tmp_path / "runs" / run_id
    (run_dir / "plan" / "mindformers").mkdir(parents=True)
    shutil.copy(REPO / "configs" / "mindformers" / "tiny_llama" / "lora.yaml", run_dir / "plan" / "mindformers" / "run.yaml")
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id, "job_name": "tiny-lora", "backend": "local",
                                                  "state": "succeeded", "started": 0}))
    return run_dir


def test_predict_without_a_merged_checkpoint_says_what_to_run(tmp_path):
    make_run(tmp_path)
    result = run_launcher("predict", "tiny-lora", "--prompt", "hello", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "launcher ckpt merge tiny-lora-20260101-000000" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "tiny-lora-20260101-000000" / "predict").exists()


def test_predict_without_a_tokenizer_asks_for_one(tmp_path):
    run_dir = make_run(tmp_path)
    (run_dir / "merged").mkdir()
    (run_dir / "merged" / "model.ckpt").write_bytes(b"not read before the tokenizer is found")
    result = run_launcher("predict", "tiny-lora", "--prompt", "hello", cwd=tmp_path)
    assert result.returncode == 2
    assert "pass --tokenizer" in result.stderr
    result = run_launcher("predict", "tiny-lora", "--prompt", "hello", "--tokenizer", tmp_path / "nope.model",
                          cwd=tmp_path)
    assert result.returncode == 2
    assert "--tokenizer: " in result.stderr and "is neither a sentencepiece tokenizer.model nor a directory" in result.stderr


def test_predict_of_an_unknown_run(tmp_path):
    result = run_launcher("predict", "nothing-here", "--prompt", "hello", cwd=tmp_path)
    assert result.returncode == 2
    assert "no run 'nothing-here'" in result.stderr


def test_predict_reports_a_checkpoint_that_does_not_fit(tmp_path):
    """A real MindSpore checkpoint of the wrong shape: the generation process fails and its log tail is shown."""
    import mindspore as ms
    import numpy as np

    import sentencepiece as spm

    run_dir = make_run(tmp_path)
    (run_dir / "merged").mkdir()
    ms.save_checkpoint([{"name": "unrelated.weight", "data": ms.Tensor(np.zeros((2, 2), np.float32))}],
                       str(run_dir / "merged" / "model.ckpt"))
    spm.SentencePieceTrainer.train(input=str(REPO / "configs" / "data" / "tiny_corpus.txt"),
                                   model_prefix=str(tmp_path / "tok"), vocab_size=128, minloglevel=2)
    result = run_launcher("predict", "tiny-lora", "--prompt", "hello", "--tokenizer", tmp_path / "tok.model",
                          cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "predict failed" in result.stderr and "does not fit the model" in result.stderr


def merged_tiny_run(tmp_path, monkeypatch):
    """A run whose merged checkpoint is a plain tiny Llama with a vocabulary that covers the test tokenizers'."""
    import yaml

    import mindspore as ms
    from mindformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.chdir(tmp_path)  # building a MindFormers model here writes output/ in the current directory
    run_dir = make_run(tmp_path)
    config_path = run_dir / "plan" / "mindformers" / "run.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["model"]["model_config"]["vocab_size"] = 512  # > 400 pieces + Qwen's 3 special tokens
    del config["model"]["model_config"]["pet_config"]
    config_path.write_text(yaml.safe_dump(config))
    settings = {k: v for k, v in config["model"]["model_config"].items() if k != "type"}
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    ms.set_seed(3)
    (run_dir / "merged").mkdir()
    ms.save_checkpoint(LlamaForCausalLM(LlamaConfig(**settings)), str(run_dir / "merged" / "model.ckpt"))
    return run_dir


def test_predict_with_a_byte_level_bpe_tokenizer(tmp_path, tiny_bpe_tokenizer, monkeypatch):
    """The Qwen-style tokenizer directory (vocab.json + merges.txt) through the real generation, on a plain
    tiny model whose vocabulary covers the tokenizer's, loaded from a merged checkpoint."""
    merged_tiny_run(tmp_path, monkeypatch)
    result = run_launcher("predict", "tiny-lora", "--prompt", "the rank table", "--tokenizer", tiny_bpe_tokenizer,
                          "--max-new-tokens", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the rank table") and "merged/model.ckpt" in result.stderr


def test_predict_chat_with_a_tokenizer_json_in_chatml(tmp_path, monkeypatch):
    """A run whose data was prepared in chatml with a tokenizer.json directory: --chat asks in ChatML,
    stops at <|im_end|> and prints the answer alone."""
    run_dir = merged_tiny_run(tmp_path, monkeypatch)
    tokenizer = build_chatml_tokenizer(tmp_path / "tok")
    (run_dir / "data.json").write_text(json.dumps({"tokenizer": str(tokenizer), "template": "chatml"}))
    result = run_launcher("predict", "tiny-lora", "--prompt", "Where do checkpoints land?", "--chat",
                          "--max-new-tokens", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    request = json.loads((run_dir / "predict" / "request.json").read_text())
    assert (request["prompts"], request["stop_ids"], request["bos_id"]) == ([CHATML_PROMPT], [2], None)
    [out] = json.loads((run_dir / "predict" / "result.json").read_text())["outputs"]
    assert out["prompt"] == CHATML_PROMPT and result.stdout.strip() == out["answer"]
    assert "<|im_end|>" not in out["answer"] and "Where do checkpoints land?" not in out["answer"]
    assert out["text"].startswith("system\nYou are a helpful assistant.\nuser\nWhere do checkpoints land?\n")


def entrypoint():
    spec = importlib.util.spec_from_file_location("predict_entrypoint", ckpt_predict.ENTRYPOINT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_mindformers_tokenizer_of_a_tokenizer_json_keeps_special_tokens_whole(tmp_path):
    from launcher.data.tokenizer import load_tokenizer

    path = build_chatml_tokenizer(tmp_path / "tok")
    tokenizer = entrypoint()._tokenizer(str(path))
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.eos_token_id) == ("<|im_end|>", "<|im_end|>", 2)
    ids = tokenizer(CHATML_PROMPT, add_special_tokens=False)["input_ids"]
    assert ids == load_tokenizer(path).encode_batch([CHATML_PROMPT])[0] and ids[0] == 1 and ids.count(2) == 2


def test_the_answer_is_what_follows_the_prompt_up_to_the_stop_token():
    answer_ids = entrypoint().answer_ids
    assert answer_ids([5, 6, 7, 8, 2, 9], 2, [2]) == [7, 8]
    assert answer_ids([5, 6, 7, 8], 2, [2]) == [7, 8]  # max_new_tokens reached first
    assert answer_ids([5, 6, 0, 7], 2, [2, 0]) == []


@pytest.fixture
def fake_generation(monkeypatch):
    """predict() up to the generation process, which is replaced: returns the request it would get."""
    requests = []

    def run(cmd, cwd, **_):
        request = json.loads((cwd / cmd[-1]).read_text())
        requests.append(request)
        outputs = [{"prompt": p, "text": p, "answer": ""} for p in request["prompts"]]
        (cwd / "result.json").write_text(json.dumps({"outputs": outputs, "checkpoint": "", "use_past": False}))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(ckpt_predict.subprocess, "run", run)
    return requests


@pytest.mark.parametrize("record, option, layout", [
    ({"template": "chatml"}, None, "chatml"),
    ({"template": "chatml"}, "vicuna", "vicuna"),
    ({}, None, "vicuna"),  # a run from before data.template
    ({}, "chatml", "chatml"),
])
def test_chat_asks_in_the_template_the_data_was_prepared_with(tmp_path, fake_generation, record, option, layout):
    run_dir = make_run(tmp_path)
    (run_dir / "merged").mkdir()
    (run_dir / "merged" / "model.ckpt").write_bytes(b"")
    tokenizer = build_chatml_tokenizer(tmp_path / "tok")
    (run_dir / "data.json").write_text(json.dumps({"tokenizer": str(tokenizer), **record}))
    ckpt_predict.predict(run_dir, ["Where do checkpoints land?"], None, None, 4, chat=True, template=option)
    [request] = fake_generation
    if layout == "chatml":
        assert request["prompts"] == [CHATML_PROMPT]
    else:
        assert request["prompts"] == [f"{SYSTEM_PROMPT} USER: Where do checkpoints land? ASSISTANT:"]
    assert request["stop_ids"] == [2]  # <|im_end|>, which is also this tokenizer's EOS


def test_chatml_needs_a_tokenizer_with_its_tokens(tmp_path, tiny_sp_tokenizer):
    run_dir = make_run(tmp_path)
    (run_dir / "merged").mkdir()
    (run_dir / "merged" / "model.ckpt").write_bytes(b"")
    result = run_launcher("predict", "tiny-lora", "--prompt", "hello", "--chat", "--template", "chatml",
                          "--tokenizer", tiny_sp_tokenizer, cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--template: chatml needs <|im_start|> and <|im_end|>" in result.stderr
    result = run_launcher("predict", "tiny-lora", "--prompt", "hello", "--template", "chatml", cwd=tmp_path)
    assert result.returncode == 2 and "add --chat" in result.stderr

"""`launcher predict` on bad input: one line, exit 2, nothing run. The real generation is in test_e2e_pipeline.py."""

import json
import shutil

from conftest import REPO, run_launcher


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
    assert "neither a tokenizer.model nor a directory" in result.stderr


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


def test_predict_with_a_byte_level_bpe_tokenizer(tmp_path, tiny_bpe_tokenizer, monkeypatch):
    """The Qwen-style tokenizer directory (vocab.json + merges.txt) through the real pipeline, on a plain
    tiny model whose vocabulary covers the tokenizer's, loaded from a merged checkpoint."""
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

    result = run_launcher("predict", "tiny-lora", "--prompt", "the rank table", "--tokenizer", tiny_bpe_tokenizer,
                          "--max-new-tokens", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the rank table") and "merged/model.ckpt" in result.stderr

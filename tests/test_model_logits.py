"""The imported SmolLM2 in MindFormers against llama.cpp reading the same GGUF itself (llama-cpp-python).

Two comparisons, both on fixed ChatML and plain-text prompts:
- the tokenizer the importer rebuilt gives llama.cpp's token ids, and MindFormers' logits of the imported
  float32 checkpoint follow llama.cpp's logits of the original Q4_1 file. They cannot be equal: llama.cpp
  multiplies Q4_1 weights with activations rounded to 8-bit blocks (ggml-cpu: the vec_dot_type of Q4_1 is
  Q8_1), which the dequantized float32 model does not. Measured here: correlation >= 0.997 at every
  position and max |difference| <= 0.45 standard deviations of the logits (the bounds leave some room), and
  the top-1 tokens swapped where the two best are close.
- a float32 GGUF written from the imported checkpoint (tests/gguf_f32.py, llama.cpp's own names and q/k
  permutation written by hand) gives llama.cpp logits equal to MindFormers' within 2e-3 absolute: with
  float32 weights llama.cpp rounds nothing, so what is left is summation order (30 layers, float32).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, smollm2_gguf

pytest.importorskip("mindspore")
llama_cpp = pytest.importorskip("llama_cpp")

PROMPTS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
    "<|im_end|>\n<|im_start|>assistant\n",
    "In 1969, 12345 people read café naïve 東京 🚀  spaces\n\ttabs; def f(x): return x**2 + 3.14159",
]


def token_ids(model_dir: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer" / "tokenizer.json"))
    return [tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]


def mindformers_logits(model_config: dict, checkpoint: Path, ids, work: Path) -> np.ndarray:
    (work / "config.json").write_text(json.dumps(model_config))
    (work / "ids.json").write_text(json.dumps(ids))
    result = subprocess.run([sys.executable, str(REPO / "tests" / "mf_logits.py"), work / "config.json", checkpoint,
                             work / "ids.json", work / "logits.npy"], cwd=work, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(work / "logits.npy")


def test_tokenizer_matches_llama_cpp(smollm2):
    llm = llama_cpp.Llama(model_path=str(smollm2_gguf()), vocab_only=True, verbose=False)
    for prompt, ours in zip(PROMPTS, token_ids(smollm2)):
        assert ours == llm.tokenize(prompt.encode(), add_bos=False, special=True), prompt


def test_imported_logits_follow_llama_cpp(smollm2, tmp_path):
    from gguf_f32 import llama_cpp_logits, mf_to_hf, write_f32_gguf

    record = json.loads((smollm2 / "model.json").read_text())
    ids = token_ids(smollm2)
    ours = mindformers_logits(record["model_config"], smollm2 / "model.ckpt", ids, tmp_path)
    for i, prompt_ids in enumerate(ids):
        theirs = llama_cpp_logits(smollm2_gguf(), prompt_ids)
        mine = ours[i, : len(prompt_ids)]
        for pos in range(len(prompt_ids)):
            corr = np.corrcoef(mine[pos], theirs[pos])[0, 1]
            spread = np.abs(mine[pos] - theirs[pos]).max() / theirs[pos].std()
            assert corr >= 0.995 and spread <= 0.6, (i, pos, corr, spread)
        # Where the two best tokens are close, the rounding can swap them: each top-1 is in the other's top 5.
        assert theirs[-1].argmax() in np.argsort(mine[-1])[-5:] and mine[-1].argmax() in np.argsort(theirs[-1])[-5:]

    import mindspore as ms

    tensors = {mf_to_hf(k): v.asnumpy() for k, v in ms.load_checkpoint(str(smollm2 / "model.ckpt")).items()}
    config = dict(record["hf_config"])
    if config.get("tie_word_embeddings"):
        del tensors["lm_head.weight"]
    write_f32_gguf(tmp_path / "f32.gguf", tensors, config, smollm2_gguf())
    del tensors
    for i, prompt_ids in enumerate(ids):
        exact = llama_cpp_logits(tmp_path / "f32.gguf", prompt_ids)
        np.testing.assert_allclose(ours[i, : len(prompt_ids)], exact, rtol=0, atol=2e-3)

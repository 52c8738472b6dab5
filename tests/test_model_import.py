"""`launcher model import` and `launcher ckpt export` on small models made here.

The expected name mapping below is written by hand from its sources, not from the importer's tables:
- MindFormers r1.8.0 mindformers/models/llama/convert_weight.py (HF -> MindFormers): embed_tokens ->
  tok_embeddings.embedding_weight, self_attn.{q,k,v,o}_proj -> attention.w{q,k,v,o}, mlp.gate_proj ->
  feed_forward.w1, mlp.down_proj -> feed_forward.w2, mlp.up_proj -> feed_forward.w3, input_layernorm ->
  attention_norm, post_attention_layernorm -> ffn_norm, model.norm -> model.norm_out; no transpose.
- ggml-org/llama.cpp convert_hf_to_gguf.py, LlamaModel.modify_tensors/permute: q and k rows are permuted
  as reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2) (n_head_kv heads for k) before they are written.
The checkpoints are read back with MindSpore's own load_checkpoint, the exports with safetensors' own reader.
"""

import json
import shutil

import numpy as np
import pytest
from conftest import run_launcher

ms = pytest.importorskip("mindspore")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

HIDDEN, HEADS, KV_HEADS, INTER, VOCAB, LAYERS = 16, 4, 2, 24, 40, 2
HEAD_DIM = HIDDEN // HEADS

HF_TO_MF = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
}
for _l in range(LAYERS):
    for hf, mf in {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                   "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                   "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                   "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                   "post_attention_layernorm": "ffn_norm"}.items():
        HF_TO_MF[f"model.layers.{_l}.{hf}.weight"] = f"model.layers.{_l}.{mf}.weight"


def hf_weights(bias=False, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for l in range(LAYERS):
        p = f"model.layers.{l}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN), p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        })
        if bias:
            shapes.update({p + "self_attn.q_proj.bias": (HEADS * HEAD_DIM,), p + "self_attn.k_proj.bias": (KV_HEADS * HEAD_DIM,),
                           p + "self_attn.v_proj.bias": (KV_HEADS * HEAD_DIM,)})
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def tokenizer_files(directory):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["a small corpus for a tiny tokenizer"] * 4,
                            trainers.BpeTrainer(vocab_size=VOCAB - 3, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:20]))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}))


def hf_dir(tmp_path, arch="LlamaForCausalLM", weights=None, **config):
    d = tmp_path / "hf"
    d.mkdir()
    weights = hf_weights() if weights is None else weights
    safetensors_numpy.save_file(weights, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "architectures": [arch], "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "intermediate_size": INTER, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False, **config}))
    tokenizer_files(d)
    return d, weights


def load(path):
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def test_hf_llama_import_maps_every_tensor(tmp_path):
    src, weights = hf_dir(tmp_path)
    result = run_launcher("model", "import", src, "-o", tmp_path / "m")
    assert result.returncode == 0, result.stderr
    params = load(tmp_path / "m" / "model.ckpt")
    assert set(params) == set(HF_TO_MF.values())
    for hf, mf in HF_TO_MF.items():
        np.testing.assert_array_equal(params[mf], weights[hf], err_msg=hf)
    record = json.loads((tmp_path / "m" / "model.json").read_text())
    assert record["model_config"]["n_kv_heads"] == KV_HEADS and record["family"] == "llama"
    assert (tmp_path / "m" / "tokenizer" / "tokenizer.json").is_file()
    again = run_launcher("model", "import", src, "-o", tmp_path / "m")
    assert again.returncode == 0 and "already imported" in again.stdout


def test_qwen2_biases_and_tied_embeddings(tmp_path):
    weights = hf_weights(bias=True)
    del weights["lm_head.weight"]
    src, _ = hf_dir(tmp_path, "Qwen2ForCausalLM", weights, tie_word_embeddings=True)
    result = run_launcher("model", "import", src, "-o", tmp_path / "m")
    assert result.returncode == 0, result.stderr
    params = load(tmp_path / "m" / "model.ckpt")
    np.testing.assert_array_equal(params["model.layers.1.attention.wk.bias"], weights["model.layers.1.self_attn.k_proj.bias"])
    np.testing.assert_array_equal(params["lm_head.weight"], weights["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "m" / "model.json").read_text())["model_config"]["qkv_has_bias"] is True


def test_baichuan2_w_pack_is_split_into_q_k_v(tmp_path):
    weights = hf_weights()
    for l in range(LAYERS):
        p = f"model.layers.{l}.self_attn."
        # Baichuan2-7B has as many key-value heads as heads; W_pack stacks q, k and v rows.
        q = weights.pop(p + "q_proj.weight")
        k, v = (np.random.default_rng(l).standard_normal((HIDDEN, HIDDEN)).astype(np.float32) for _ in "kv")
        weights.pop(p + "k_proj.weight"), weights.pop(p + "v_proj.weight")
        weights[p + "W_pack.weight"] = np.concatenate([q, k, v])
    src, _ = hf_dir(tmp_path, "BaichuanForCausalLM", weights, num_key_value_heads=HEADS)
    result = run_launcher("model", "import", src, "-o", tmp_path / "m")
    assert result.returncode == 0, result.stderr
    params = load(tmp_path / "m" / "model.ckpt")
    pack = weights["model.layers.1.self_attn.W_pack.weight"]
    np.testing.assert_array_equal(params["model.layers.1.attention.wq.weight"], pack[:HIDDEN])
    np.testing.assert_array_equal(params["model.layers.1.attention.wv.weight"], pack[2 * HIDDEN:])
    # NormHead: Baichuan2 multiplies with unit-length rows of lm_head (modeling_baichuan.py F.normalize).
    head = weights["lm_head.weight"]
    np.testing.assert_allclose(params["lm_head.weight"], head / np.linalg.norm(head, axis=1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("damage, message", [
    ("missing", "does not have: model.layers.1.mlp.up_proj.weight"),
    ("extra", "have no place in the model: model.layers.0.self_attn.rotary.extra"),
    ("shape", "has shape (8, 16), the model config needs (24, 16)"),
    ("arch", "is not one the importer knows"),
    ("truncated", "is truncated"),
])
def test_bad_sources_are_one_line_and_leave_nothing(tmp_path, damage, message):
    weights = hf_weights()
    if damage == "missing":
        del weights["model.layers.1.mlp.up_proj.weight"]
    elif damage == "extra":
        weights["model.layers.0.self_attn.rotary.extra"] = np.zeros(3, np.float32)
    elif damage == "shape":
        weights["model.layers.0.mlp.gate_proj.weight"] = np.zeros((8, HIDDEN), np.float32)
    src, _ = hf_dir(tmp_path, "GPTNeoXForCausalLM" if damage == "arch" else "LlamaForCausalLM", weights)
    if damage == "truncated":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = run_launcher("model", "import", src, "-o", tmp_path / "out" / "m")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    leftovers = list((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert leftovers == []


def write_gguf(path, weights):
    """A float32 GGUF the way llama.cpp's converter writes a Llama: its names and q/k row permutation."""
    import gguf
    from gguf_f32 import add_llama_tensors

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(256)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "ab"] + [chr(97 + i) for i in range(VOCAB - 4)]
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
    w.add_token_merges(["a b"])
    w.add_eos_token_id(2)
    add_llama_tensors(w, weights, HEADS, KV_HEADS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_import_undoes_the_rotary_permutation(tmp_path):
    weights = hf_weights(seed=3)
    write_gguf(tmp_path / "m.gguf", weights)
    result = run_launcher("model", "import", tmp_path / "m.gguf", "-o", tmp_path / "m")
    assert result.returncode == 0, result.stderr
    params = load(tmp_path / "m" / "model.ckpt")
    for hf, mf in HF_TO_MF.items():
        np.testing.assert_array_equal(params[mf], weights[hf], err_msg=hf)
    config = json.loads((tmp_path / "m" / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"


def fake_run(tmp_path, params: dict, bias=False):
    """A run directory as `launcher up` and `ckpt merge-lora` leave it: run.yaml and merged-lora/."""
    import yaml

    run = tmp_path / "runs" / "r-20260101-000000"
    (run / "plan" / "mindformers").mkdir(parents=True)
    mc = {"hidden_size": HIDDEN, "num_layers": LAYERS, "num_heads": HEADS, "n_kv_heads": KV_HEADS,
          "intermediate_size": INTER, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "theta": 10000.0,
          "seq_length": 64, "qkv_has_bias": bias, "bos_token_id": 1, "eos_token_id": 2,
          "pet_config": {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 4}}
    (run / "plan" / "mindformers" / "run.yaml").write_text(yaml.safe_dump(
        {"model": {"model_config": mc, "arch": {"type": "LlamaForCausalLM"}}}))
    (run / "run.json").write_text("{}")
    (run / "merged-lora").mkdir()
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in params.items()],
                       str(run / "merged-lora" / "m-1_4.ckpt"))
    return run


def test_export_is_the_inverse_of_import(tmp_path):
    weights = hf_weights(seed=5)
    mf = {HF_TO_MF[k]: v for k, v in weights.items()}
    run = fake_run(tmp_path, mf)
    tok = tmp_path / "tok"
    tok.mkdir()
    tokenizer_files(tok)
    result = run_launcher("ckpt", "export", run, "--to", "hf", "-o", tmp_path / "hf", "--tokenizer", tok)
    assert result.returncode == 0, result.stderr
    exported = safetensors_numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(exported) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == KV_HEADS
    assert config["tie_word_embeddings"] is False
    transformers = pytest.importorskip("transformers")
    loaded = transformers.LlamaConfig.from_pretrained(str(tmp_path / "hf"))
    assert (loaded.hidden_size, loaded.num_hidden_layers, loaded.intermediate_size) == (HIDDEN, LAYERS, INTER)
    again = run_launcher("model", "import", tmp_path / "hf", "-o", tmp_path / "m")
    assert again.returncode == 0, again.stderr
    reimported = load(tmp_path / "m" / "model.ckpt")
    for name, value in mf.items():
        np.testing.assert_array_equal(reimported[name], value, err_msg=name)


def test_export_ties_an_lm_head_equal_to_the_embedding_and_refuses_lora_keys(tmp_path):
    weights = hf_weights(seed=6)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
    mf = {HF_TO_MF[k]: v for k, v in weights.items()}
    run = fake_run(tmp_path, mf)
    result = run_launcher("ckpt", "export", run, "-o", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert "lm_head.weight" not in safetensors_numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    shutil.rmtree(run)
    mf["model.layers.0.attention.wq.mindpet_delta_lora_a"] = np.zeros((2, HIDDEN), np.float32)
    run = fake_run(tmp_path, mf)
    result = run_launcher("ckpt", "export", run, "-o", tmp_path / "hf2")
    assert result.returncode == 2 and "still holds LoRA weights" in result.stderr
    assert not (tmp_path / "hf2").exists()

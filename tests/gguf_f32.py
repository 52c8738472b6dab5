"""Test helpers for the llama.cpp checks: a float32 GGUF written from Hugging Face-named tensors, and the
logits llama.cpp computes for token ids. llama.cpp (through llama-cpp-python) is the independent reader.

The tensor names and the q/k row permutation are written by hand from ggml-org/llama.cpp
convert_hf_to_gguf.py (LlamaModel.modify_tensors, permute) and gguf-py/gguf/tensor_mapping.py."""

import numpy as np

GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
GGUF_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}
# MindFormers r1.8.0 mindformers/models/llama/convert_weight.py, read in the other direction.
MF_TO_HF_BLOCK = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                  "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                  "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                  "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
                  "ffn_norm": "post_attention_layernorm"}


def mf_to_hf(name: str) -> str:
    if name == "model.tok_embeddings.embedding_weight":
        return "model.embed_tokens.weight"
    if name == "model.norm_out.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return name
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"model.layers.{layer}.{MF_TO_HF_BLOCK[module]}.{kind}"


def _permute(w, heads):
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_llama_tensors(w, tensors, heads: int, kv_heads: int) -> None:
    """Hugging Face-named tensors into a GGUFWriter under llama.cpp's names, q and k rows permuted."""
    for name, array in tensors.items():
        array = np.ascontiguousarray(array, np.float32)
        if name in GGUF_TOP:
            w.add_tensor(GGUF_TOP[name], array)
            continue
        _, _, layer, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        if module == "self_attn.q_proj":
            array = _permute(array, heads)
        elif module == "self_attn.k_proj":
            array = _permute(array, kv_heads)
        w.add_tensor(f"blk.{layer}.{GGUF_BLOCK[module]}.{kind}", array)


def write_f32_gguf(path, tensors, config: dict, vocabulary_from) -> None:
    """A llama GGUF of float32 tensors (Hugging Face names), its vocabulary copied from another GGUF file."""
    import gguf

    source = gguf.GGUFReader(str(vocabulary_from))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config["num_hidden_layers"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_vocab_size(config["vocab_size"])
    w.add_tokenizer_model(source.fields["tokenizer.ggml.model"].contents())
    w.add_tokenizer_pre(source.fields["tokenizer.ggml.pre"].contents())
    w.add_token_list(source.fields["tokenizer.ggml.tokens"].contents())
    w.add_token_types(source.fields["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(source.fields["tokenizer.ggml.merges"].contents())
    w.add_add_bos_token(False)
    w.add_eos_token_id(config["eos_token_id"])
    add_llama_tensors(w, tensors, config["num_attention_heads"], config["num_key_value_heads"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_logits(gguf_path, ids: list[int]) -> np.ndarray:
    """[positions, vocab] logits of llama.cpp for the ids, one thread (deterministic), with a float32 KV
    cache (its default is float16, which would round every key and value)."""
    from llama_cpp import GGML_TYPE_F32, Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=max(64, len(ids)), logits_all=True, verbose=False, n_threads=1,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], np.float32)

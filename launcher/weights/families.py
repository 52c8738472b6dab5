"""The model families the importer knows: Hugging Face names and config keys <-> MindFormers' Llama.

Every family is loaded into MindFormers' in-tree LlamaForCausalLM. Its parameter names were read from
a model built with the installed MindFormers 1.8.0 (mindformers/models/llama/llama.py, llama_layer.py,
llama_transformer.py): model.tok_embeddings.embedding_weight, model.layers.N.attention.w{q,k,v,o}.weight
(+ .bias on w{q,k,v} with qkv_has_bias), model.layers.N.feed_forward.w{1,2,3}.weight (w1 gate, w2 down,
w3 up, as mindformers/models/llama/convert_weight.py maps them), model.layers.N.{attention,ffn}_norm.weight,
model.norm_out.weight, lm_head.weight. Linear weights are [out, in] in both, so no tensor is transposed.

The Hugging Face side (transformers' LlamaForCausalLM / Qwen2ForCausalLM): model.embed_tokens.weight,
model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}, model.layers.N.mlp.{gate,up,down}_proj.weight,
model.layers.N.{input,post_attention}_layernorm.weight, model.norm.weight, lm_head.weight (absent when
tie_word_embeddings). Baichuan2 packs q, k and v into self_attn.W_pack.weight [3·hidden, hidden]
(baichuan-inc/Baichuan2-7B-Base modeling_baichuan.py: `proj.unflatten(-1, (3, hidden)))`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from launcher.errors import ConfigError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Per-layer Hugging Face suffix -> MindFormers suffix.
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "self_attn.q_proj.bias": "attention.wq.bias",
    "self_attn.k_proj.bias": "attention.wk.bias",
    "self_attn.v_proj.bias": "attention.wv.bias",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
}
W_PACK = "self_attn.W_pack.weight"


@dataclass(frozen=True)
class Family:
    name: str
    hf_architecture: str  # config.json "architectures"[0]
    hf_model_type: str
    qkv_bias: bool
    packed_qkv: bool = False
    norm_head: bool = False


FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", "llama", qkv_bias=False),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", "qwen2", qkv_bias=True),
    "baichuan2": Family("baichuan2", "BaichuanForCausalLM", "baichuan", qkv_bias=False, packed_qkv=True,
                        norm_head=True),
}
# config.json architectures -> family (Qwen1.5 ships as Qwen2ForCausalLM).
BY_ARCHITECTURE = {f.hf_architecture: f for f in FAMILIES.values()}


def family_of_hf(config: dict) -> Family:
    names = config.get("architectures") or []
    for name in names:
        if name in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[name]
    known = ", ".join(BY_ARCHITECTURE)
    raise ConfigError(f"architecture {names or config.get('model_type')} is not one the importer knows ({known})")


def mf_name(hf_name: str) -> str | None:
    """The MindFormers name of a Hugging Face parameter, or None if the family has no such parameter."""
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    m = _LAYER.match(hf_name)
    if m and m[2] in LAYER_NAMES:
        return f"model.layers.{m[1]}.{LAYER_NAMES[m[2]]}"
    return None


def hf_name(mf: str) -> str | None:
    for hf, name in TOP_NAMES.items():
        if name == mf:
            return hf
    m = _LAYER.match(mf)
    if m:
        for hf, name in LAYER_NAMES.items():
            if name == m[2]:
                return f"model.layers.{m[1]}.{hf}"
    return None


def expected_mf_names(model_config: dict) -> list[str]:
    """Every parameter MindFormers' LlamaForCausalLM holds for this model config."""
    names = [TOP_NAMES["model.embed_tokens.weight"]]
    bias = model_config.get("qkv_has_bias", False)
    for layer in range(int(model_config["num_layers"])):
        for hf, mf in LAYER_NAMES.items():
            if mf.endswith(".bias") and not bias:
                continue
            names.append(f"model.layers.{layer}.{mf}")
    names += [TOP_NAMES["model.norm.weight"], TOP_NAMES["lm_head.weight"]]
    return names


def mf_model_config(hf: dict, family: Family) -> dict:
    """MindFormers LlamaConfig fields (mindformers/models/llama/llama_config.py, r1.8.0) from config.json."""
    try:
        heads = int(hf["num_attention_heads"])
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        config = {
            "hidden_size": int(hf["hidden_size"]),
            "num_layers": int(hf["num_hidden_layers"]),
            "num_heads": heads,
            "n_kv_heads": kv_heads if kv_heads != heads else None,
            "intermediate_size": int(hf["intermediate_size"]),
            "vocab_size": int(hf["vocab_size"]),
            "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "theta": float(hf.get("rope_theta", 10000.0)),
            "max_position_embedding": int(hf.get("max_position_embeddings", 4096)),
            "qkv_has_bias": family.qkv_bias,
            "bos_token_id": _token_id(hf.get("bos_token_id"), 1),
            "eos_token_id": _token_id(hf.get("eos_token_id"), 2),
            "pad_token_id": _token_id(hf.get("pad_token_id"), _token_id(hf.get("eos_token_id"), 0)),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"config.json: missing or non-numeric {exc}") from None
    if config["hidden_size"] % heads or heads % kv_heads:
        raise ConfigError(f"config.json: hidden_size {config['hidden_size']} / {heads} heads / {kv_heads} "
                          "key-value heads do not divide evenly")
    if family.name == "baichuan2" and config["hidden_size"] == 5120:
        # Baichuan2-13B (hidden 5120, 40 layers) places tokens with ALiBi biases, not rotary embeddings.
        raise ConfigError("config.json: only Baichuan2-7B (rotary positions) is supported; "
                          "Baichuan2-13B uses ALiBi, which MindFormers' Llama does not have")
    if (hf.get("rope_scaling") or {}).get("type", (hf.get("rope_scaling") or {}).get("rope_type")) not in (None, "default"):
        raise ConfigError(f"config.json: rope_scaling {hf['rope_scaling']} is not supported by the importer")
    return config


def hf_config(model_config: dict, family: Family, tied: bool, dtype: str) -> dict:
    """config.json of an exported model: the inverse of mf_model_config."""
    heads = int(model_config["num_heads"])
    config = {
        "architectures": [family.hf_architecture],
        "model_type": family.hf_model_type,
        "hidden_size": int(model_config["hidden_size"]),
        "num_hidden_layers": int(model_config["num_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(model_config.get("n_kv_heads") or heads),
        "intermediate_size": int(model_config["intermediate_size"]),
        "vocab_size": int(model_config["vocab_size"]),
        "rms_norm_eps": float(model_config.get("rms_norm_eps", 1e-5)),
        "rope_theta": float(model_config.get("theta", 10000.0)),
        "max_position_embeddings": int(model_config.get("max_position_embedding") or model_config.get("seq_length", 2048)),
        "hidden_act": "silu",
        "bos_token_id": model_config.get("bos_token_id"),
        "eos_token_id": model_config.get("eos_token_id"),
        "pad_token_id": model_config.get("pad_token_id"),
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "attention_bias": bool(model_config.get("qkv_has_bias", False)) if family.name == "llama" else None,
    }
    return {k: v for k, v in config.items() if v is not None}


def _token_id(value, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)

"""A GGUF file (llama.cpp's format) as a Hugging Face-shaped model: config.json values, tensors under
Hugging Face names in Hugging Face layout, and a `tokenizers` tokenizer.

Facts from ggml-org/llama.cpp (gguf-py/gguf/constants.py, tensor_mapping.py; convert_hf_to_gguf.py):
- tensor names: token_embd, output_norm, output (absent when the embeddings are tied), blk.N.attn_norm,
  blk.N.attn_{q,k,v,output} (+ .bias for qwen2), blk.N.ffn_{gate,up,down}, blk.N.ffn_norm;
- metadata: <arch>.block_count, .embedding_length, .feed_forward_length, .attention.head_count,
  .attention.head_count_kv, .rope.freq_base, .attention.layer_norm_rms_epsilon, .context_length;
- for arch "llama" the converter permutes the rows of q and k so that rotary pairs are adjacent
  (LlamaModel.permute: reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2)); Hugging Face and MindFormers
  rotate halves, so the importer undoes it. qwen2 uses the NEOX rotation and is not permuted;
- the vocabulary: tokenizer.ggml.{model, pre, tokens, token_type, merges, bos/eos/padding_token_id,
  add_bos_token}; token type 3 is CONTROL (a special token), 4 USER_DEFINED;
- pre-tokenizers (src/llama-vocab.cpp): "smollm" splits every digit (\\p{N}) and then applies GPT-2's
  pattern; "qwen2" is Qwen2's pattern; "gpt2" is GPT-2's pattern.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from launcher.errors import ConfigError
from launcher.weights.families import FAMILIES, Family

ARCHITECTURES = {"llama": FAMILIES["llama"], "qwen2": FAMILIES["qwen2"]}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
CONTROL, USER_DEFINED = 3, 4
PRE_TOKENIZERS = ("smollm", "qwen2", "gpt2", "default")


class GgufModel:
    def __init__(self, path: Path):
        import gguf

        try:
            self.reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError, IndexError, KeyError) as exc:
            raise ConfigError(f"{path} is not a readable GGUF file ({exc.__class__.__name__}: {exc})") from None
        self.path = path
        self.arch = self._field("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"{path}: GGUF architecture '{self.arch}' is not one the importer knows "
                              f"({', '.join(ARCHITECTURES)})")
        self.family: Family = ARCHITECTURES[self.arch]
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.config = self._config()

    def _field(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            if default is not None:
                return default
            raise ConfigError(f"{self.path}: the GGUF metadata has no {key}")
        return field.contents()

    def _config(self) -> dict:
        a = self.arch
        vocab = len(self._field("tokenizer.ggml.tokens"))
        heads = int(self._field(f"{a}.attention.head_count"))
        config = {
            "architectures": [self.family.hf_architecture],
            "model_type": self.family.hf_model_type,
            "hidden_size": int(self._field(f"{a}.embedding_length")),
            "num_hidden_layers": int(self._field(f"{a}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._field(f"{a}.attention.head_count_kv", heads)),
            "intermediate_size": int(self._field(f"{a}.feed_forward_length")),
            "vocab_size": int(self._field(f"{a}.vocab_size", vocab)),
            "rms_norm_eps": float(self._field(f"{a}.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self._field(f"{a}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._field(f"{a}.context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
        }
        for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
            field = self.reader.fields.get(f"tokenizer.ggml.{name}_token_id")
            if field is not None:
                config[key] = int(field.contents())
        return config

    def tensor_names(self) -> dict[str, str]:
        """Hugging Face name -> GGUF name of every tensor; a tensor the importer cannot place is an error."""
        names, unknown = {}, []
        for name in self.tensors:
            hf = _TOP.get(name)
            parts = name.split(".")
            if hf is None and len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK:
                hf = f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
            if hf is None:
                unknown.append(name)
            else:
                names[hf] = name
        if unknown:
            raise ConfigError(f"{self.path}: tensors the importer cannot place: {', '.join(unknown[:5])}"
                              f"{' …' if len(unknown) > 5 else ''}")
        return names

    def tensor(self, gguf_name: str) -> np.ndarray:
        """float32 values in Hugging Face layout ([out, in] for linear weights)."""
        import gguf

        t = self.tensors[gguf_name]
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise ConfigError(f"{self.path}: {gguf_name} ({t.tensor_type.name}) cannot be dequantized: {exc}") from None
        values = np.asarray(values, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if self.arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = self.config["num_attention_heads"] if "attn_q" in gguf_name else self.config["num_key_value_heads"]
            values = unpermute_rotary(values, heads)
        return values

    def source_files(self) -> list[Path]:
        return [self.path]

    def write_tokenizer(self, target: Path) -> None:
        """tokenizer.json and tokenizer_config.json rebuilt from the GGUF vocabulary."""
        tok, config = self.tokenizer()
        tok.save(str(target / "tokenizer.json"))
        (target / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def tokenizer(self):
        """(tokenizers.Tokenizer, tokenizer_config dict) rebuilt from the GGUF vocabulary."""
        from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, Regex
        from tokenizers.models import BPE

        from launcher.data.tokenizer import QWEN2_PATTERN

        model = self._field("tokenizer.ggml.model")
        if model != "gpt2":
            raise ConfigError(f"{self.path}: tokenizer model '{model}' is not supported (only byte-level BPE, 'gpt2')")
        pre = self._field("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ConfigError(f"{self.path}: pre-tokenizer '{pre}' is not supported ({', '.join(PRE_TOKENIZERS)})")
        tokens = list(self._field("tokenizer.ggml.tokens"))
        types = list(self._field("tokenizer.ggml.token_type"))
        merges = [tuple(m.split(" ", 1)) for m in self._field("tokenizer.ggml.merges")]
        try:
            tok = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges))
        except Exception as exc:  # the tokenizers library raises plain Exceptions
            raise ConfigError(f"{self.path}: the GGUF vocabulary does not make a BPE tokenizer ({exc})") from None
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "qwen2")
        if pre == "smollm":
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre == "qwen2":
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == USER_DEFINED])
        config = {"add_bos_token": bool(self._field("tokenizer.ggml.add_bos_token", False))}
        for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"), ("unk_token", "unknown")):
            field = self.reader.fields.get(f"tokenizer.ggml.{name}_token_id")
            if field is not None:
                config[key] = tokens[int(field.contents())]
        template = self.reader.fields.get("tokenizer.chat_template")
        if template is not None:
            config["chat_template"] = template.contents()
        return tok, config


def unpermute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute on the rows of a q or k weight (or bias)."""
    head_dim = w.shape[0] // heads
    return w.reshape(heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

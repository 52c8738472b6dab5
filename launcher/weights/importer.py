"""`launcher model import SRC -o DIR`: a GGUF file or a Hugging Face directory to a model the job can name.

DIR, published whole (built in a hidden sibling, then renamed), holds
  model.ckpt        every parameter of MindFormers' LlamaForCausalLM for this model
  tokenizer/        tokenizer.json + tokenizer_config.json (what `data prepare` and `predict` read)
  model.json        family, config.json values, MindFormers model_config, source and its sha256
The import is keyed by the source's bytes and the importer's version: importing the same source into
the same DIR again does nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launcher.ckpt.merge import publishing
from launcher.errors import ConfigError
from launcher.weights import families
from launcher.weights.imported import MODEL_FILE, CHECKPOINT_FILE, TOKENIZER_DIR

IMPORTER_VERSION = "2"
DTYPES = {"float32": np.float32, "float16": np.float16}
# Buffers some Hugging Face checkpoints carry that are no parameters (recomputed by every model).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Imported:
    directory: Path
    family: str
    parameters: int
    values: int
    cached: bool


def open_source(src: Path):
    if src.is_dir():
        from launcher.weights.hf_source import HfModel

        return HfModel(src)
    if not src.is_file():
        raise ConfigError(f"{src} does not exist")
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConfigError(f"{src} is neither a GGUF file nor a Hugging Face model directory")
    from launcher.weights.gguf_source import GgufModel

    return GgufModel(src)


def source_key(files: list[Path], dtype: str, progress=None) -> str:
    digest = hashlib.sha256(f"launcher-model-import/{IMPORTER_VERSION}/{dtype}\n".encode())
    for path in files:
        digest.update(f"{path.name}\n".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                if progress:
                    progress(len(chunk))
    return digest.hexdigest()


def expected_shapes(mc: dict) -> dict[str, tuple[int, ...]]:
    h, heads = mc["hidden_size"], mc["num_heads"]
    kv, hd, inter, vocab = mc["n_kv_heads"] or heads, h // heads, mc["intermediate_size"], mc["vocab_size"]
    per_layer = {
        "attention.wq.weight": (heads * hd, h), "attention.wk.weight": (kv * hd, h),
        "attention.wv.weight": (kv * hd, h), "attention.wo.weight": (h, heads * hd),
        "attention.wq.bias": (heads * hd,), "attention.wk.bias": (kv * hd,), "attention.wv.bias": (kv * hd,),
        "feed_forward.w1.weight": (inter, h), "feed_forward.w2.weight": (h, inter),
        "feed_forward.w3.weight": (inter, h), "attention_norm.weight": (h,), "ffn_norm.weight": (h,),
    }
    shapes = {}
    for name in families.expected_mf_names(mc):
        if name.startswith("model.layers."):
            shapes[name] = per_layer[name.split(".", 3)[3]]
        elif name == "model.norm_out.weight":
            shapes[name] = (h,)
        else:
            shapes[name] = (vocab, h)
    return shapes


def normalized_rows(w: np.ndarray) -> np.ndarray:
    """Baichuan2's NormHead multiplies with its weight's rows scaled to unit length (F.normalize(weight) in
    baichuan-inc/Baichuan2-7B-Base modeling_baichuan.py); a plain lm_head needs them stored that way."""
    norms = np.linalg.norm(w.astype(np.float64), axis=1, keepdims=True)
    return (w / np.maximum(norms, 1e-12)).astype(w.dtype)


def plan_tensors(source, mc: dict) -> list[tuple[str, str, str, slice | None]]:
    """(MindFormers name, Hugging Face name, source name, rows of a packed tensor) for every parameter.

    Every parameter must come from the source and every source tensor must be used, else the error names them.
    """
    names = source.tensor_names()
    hidden = mc["hidden_size"]
    if source.family.packed_qkv:
        for hf in [n for n in names if n.endswith(families.W_PACK)]:
            layer = hf[: -len(families.W_PACK)]
            for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
                names[f"{layer}self_attn.{part}.weight"] = (names[hf], slice(i * hidden, (i + 1) * hidden))
            del names[hf]
    if source.config.get("tie_word_embeddings") and "lm_head.weight" not in names:
        names["lm_head.weight"] = names["model.embed_tokens.weight"]
    planned, missing = [], []
    for mf in families.expected_mf_names(mc):
        hf = families.hf_name(mf)
        if hf not in names:
            missing.append(hf)
            continue
        entry = names.pop(hf)
        src, rows = entry if isinstance(entry, tuple) else (entry, None)
        planned.append((mf, hf, src, rows))
    unused = [n for n in names if not n.endswith(IGNORED_SUFFIXES)]
    if missing:
        raise ConfigError(f"{source.path}: the model needs {len(missing)} tensor(s) the source does not have: "
                          f"{', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
    if unused:
        raise ConfigError(f"{source.path}: {len(unused)} source tensor(s) have no place in the model: "
                          f"{', '.join(unused[:4])}{' …' if len(unused) > 4 else ''}")
    return planned


def choose_pad(mc: dict, tokenizer_dir: Path) -> None:
    """Pick a pad id no conversation holds, and write it to both the model config and tokenizer_config.json.

    MindFormers' Llama masks every key position whose token equals pad_token_id (CausalMask in
    mindformers/models/llama/llama.py, r1.8.0: not_equal(tokens, pad_token_id)). SmolLM2 pads with
    <|im_end|>, which ChatML puts after every turn, so with its own pad id the model would not attend to
    them (the llama.cpp logit check saw it). <|endoftext|> (GPT-2 style vocabularies) is never in a
    conversation; else the source's pad id unless it is the EOS; else 0 (Llama's <unk>).
    """
    files = {f.name: f for f in tokenizer_dir.iterdir()}
    pad_text = None
    if "tokenizer.json" in files:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(files["tokenizer.json"]))
        pad_id = tok.token_to_id("<|endoftext|>")
        if pad_id is not None:
            pad_text = "<|endoftext|>"
    if pad_text is None:
        pad_id = mc["pad_token_id"] if mc["pad_token_id"] != mc["eos_token_id"] else 0
    mc["pad_token_id"] = pad_id
    if pad_text and "tokenizer_config.json" in files:
        config = json.loads(files["tokenizer_config.json"].read_text())
        config["pad_token"] = pad_text
        files["tokenizer_config.json"].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def import_model(src: Path, out: Path, dtype: str = "float32", force: bool = False, progress=None) -> Imported:
    """Import src into out; `progress(kind, done, total)` reports hashing ("hash", bytes) and tensors ("tensor")."""
    from launcher.ckpt.stream import CheckpointWriter

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype} is not one of {', '.join(DTYPES)}")
    source = open_source(Path(src))
    files = source.source_files()
    total = sum(f.stat().st_size for f in files)
    done = [0]

    def hashed(n):
        done[0] += n
        if progress:
            progress("hash", done[0], total)

    key = source_key(files, dtype, hashed)
    record_path = out / MODEL_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("key") == key and not force:
            return Imported(out, record["family"], record["parameters"], record["values"], cached=True)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} already exists and holds another import; pass --force to replace it")
    mc = families.mf_model_config(source.config, source.family)
    shapes = expected_shapes(mc)
    planned = plan_tensors(source, mc)
    with publishing(out) as staging:
        values = 0
        with CheckpointWriter(staging / CHECKPOINT_FILE) as writer:
            for i, (mf, hf, name, rows) in enumerate(planned):
                tensor = source.tensor(name)
                if rows is not None:
                    tensor = tensor[rows]
                if source.family.norm_head and mf == "lm_head.weight":
                    tensor = normalized_rows(tensor)
                if tuple(tensor.shape) != shapes[mf]:
                    raise ConfigError(f"{source.path}: {hf} has shape {tuple(tensor.shape)}, the model config "
                                      f"needs {shapes[mf]}")
                writer.write(mf, np.ascontiguousarray(tensor, DTYPES[dtype]))
                values += tensor.size
                if progress:
                    progress("tensor", i + 1, len(planned))
        (staging / TOKENIZER_DIR).mkdir()
        source.write_tokenizer(staging / TOKENIZER_DIR)
        choose_pad(mc, staging / TOKENIZER_DIR)
        record = {
            "format": "launcher-model/1",
            "family": source.family.name,
            "source": {"path": str(Path(src).resolve()), "kind": "gguf" if source.path.is_file() else "hf"},
            "key": key,
            "dtype": dtype,
            "parameters": len(planned),
            "values": int(values),
            "hf_config": source.config,
            "model_config": mc,
        }
        (staging / MODEL_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return Imported(out, source.family.name, len(planned), int(values), cached=False)

"""`launcher ckpt export RUN --to hf -o DIR`: a run's model-only checkpoint as a Hugging Face directory.

DIR gets config.json (families.hf_config), model.safetensors, generation_config.json and the tokenizer
files the run's data was prepared with. The checkpoint is read twice, one tensor at a time: first for
names, shapes and whether lm_head equals the embedding (then the export is tied and lm_head is left
out, as transformers expects with tie_word_embeddings), then for the bytes; so memory stays about one
tensor whatever the model's size. safetensors' own writers take the whole dict of tensors, so the
file (an 8-byte header length, the JSON header, the raw bytes; huggingface/safetensors docs, "Format")
is written here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np

from launcher.ckpt import merge as ckpt
from launcher.ckpt.lora import MERGED_LORA_DIR, is_lora
from launcher.ckpt.stream import iter_params
from launcher.errors import ConfigError
from launcher.weights import families
from launcher.weights.hf_source import TOKENIZER_FILES

SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
EMBEDDING, LM_HEAD = "model.tok_embeddings.embedding_weight", "lm_head.weight"


def source_checkpoint(run_dir: Path, given: str | None, lora: bool) -> Path:
    if given:
        if not Path(given).is_file():
            raise ConfigError(f"--checkpoint: {given} does not exist")
        return Path(given)
    folded = ckpt.latest_checkpoint(run_dir / MERGED_LORA_DIR)
    if folded is not None:
        return folded
    if lora:
        raise ConfigError(f"{run_dir.name} is a LoRA run with no folded checkpoint; run 'launcher ckpt merge "
                          f"{run_dir.name}' and 'launcher ckpt merge-lora {run_dir.name} --base CKPT' first")
    merged = ckpt.latest_checkpoint(run_dir / ckpt.MERGED_DIR)
    if merged is None:
        raise ConfigError(f"{run_dir.name} has no merged checkpoint; run 'launcher ckpt merge {run_dir.name}' first")
    return merged


def _tokenizer_source(run_dir: Path, given: str | None) -> Path | None:
    if given:
        return Path(given)
    record = run_dir / "data.json"
    return Path(json.loads(record.read_text())["tokenizer"]) if record.is_file() else None


def _model_tensors(path: Path):
    """(MindFormers name, Hugging Face name or None, array in a safetensors dtype) of every model parameter,
    one at a time; training state is skipped and LoRA weights are refused (the export is of a folded model)."""
    for name, array in iter_params(path):
        if ckpt.is_training_state(name):
            continue
        if is_lora(name):
            raise ConfigError(f"{path} still holds LoRA weights ({name}); export the folded checkpoint "
                              "('launcher ckpt merge-lora')")
        if array.dtype not in SAFETENSORS_DTYPES:
            array = array.astype(np.float32)  # bfloat16 comes back from the reader as float32
        yield name, families.hf_name(name), array


def _scan(path: Path, mc: dict) -> tuple[list[tuple[str, str, np.dtype, tuple]], bool]:
    """[(MindFormers name, Hugging Face name, dtype, shape)] and whether lm_head equals the embedding."""
    rows, digests, unknown = [], {}, []
    for name, hf, array in _model_tensors(path):
        if hf is None:
            unknown.append(name)
            continue
        if name in (EMBEDDING, LM_HEAD):
            digests[name] = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
        rows.append((name, hf, array.dtype, tuple(array.shape)))
    if unknown:
        raise ConfigError(f"{path}: parameters a Hugging Face Llama has no place for: {', '.join(unknown[:4])}")
    missing = sorted(set(families.expected_mf_names(mc)) - {r[0] for r in rows})
    if missing:
        raise ConfigError(f"{path} lacks {len(missing)} parameter(s) of the model: {', '.join(missing[:4])}")
    tied = digests.get(EMBEDDING) is not None and digests.get(EMBEDDING) == digests.get(LM_HEAD)
    return rows, tied


def write_safetensors(path: Path, rows, checkpoint: Path, skip: set[str]) -> None:
    header, offset = {}, 0
    for name, hf, dtype, shape in rows:
        if name in skip:
            continue
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[hf] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb", buffering=1 << 22) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, _, array in _model_tensors(checkpoint):
            if name in skip:
                continue  # every other name has its Hugging Face one: _scan refused the rest
            f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def export_run(run_dir: Path, out: Path, checkpoint: str | None = None, tokenizer: str | None = None,
               force: bool = False) -> dict:
    """Write the Hugging Face directory `out`; returns what was written (for the command's report)."""
    cfg = ckpt.run_config(run_dir)
    mc = cfg["model"]["model_config"]
    arch = (cfg["model"].get("arch") or {}).get("type")
    if arch != "LlamaForCausalLM":
        raise ConfigError(f"{run_dir.name} ran {arch}; only MindFormers' LlamaForCausalLM exports to Hugging Face")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    source = source_checkpoint(run_dir, checkpoint, "pet_config" in mc)
    family = families.FAMILIES["qwen2" if mc.get("qkv_has_bias") else "llama"]
    rows, tied = _scan(source, mc)
    tok_source = _tokenizer_source(run_dir, tokenizer)
    with ckpt.publishing(out) as staging:
        write_safetensors(staging / "model.safetensors", rows, source, {LM_HEAD} if tied else set())
        dtype = "float16" if rows[0][2] == np.float16 else "float32"
        config = families.hf_config(mc, family, tied, dtype)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        copied = _copy_tokenizer(tok_source, staging)
    return {"checkpoint": source, "parameters": len(rows) - tied, "tied": tied, "family": family.name,
            "tokenizer": copied}


def _copy_tokenizer(source: Path | None, target: Path) -> list[str]:
    if source is None:
        return []
    files = [source] if source.is_file() else [source / n for n in TOKENIZER_FILES if (source / n).is_file()]
    for f in files:
        if f.name != "generation_config.json":
            shutil.copyfile(f, target / f.name)
    return [f.name for f in files]

"""Fold a run's LoRA adapter into base weights: merged-lora/<name>.ckpt, a plain model checkpoint.

Facts from the installed packages (MindFormers 1.8.0 with mindpet 1.0.4):
- mindformers/pet/tuners/lora_adapter.py swaps each target Linear for mindpet's LoRADense and keeps the
  Linear's `weight` (and matmul) in it, so the base key stays `<layer>.weight`;
- mindpet/delta/lora.py: LoRADense adds `<layer>.mindpet_delta_lora_a` [r, in] and
  `<layer>.mindpet_delta_lora_b` [out, r]; its output is x·Wᵀ + (x·Aᵀ)·Bᵀ·(alpha/r);
- mindformers/modules/layers.py: Linear stores `weight` as [out, in] (transpose_b=True, the default the
  Llama attention uses), so the folded weight is W + (alpha/r)·B·A.
Both checkpoints are streamed (stream.py): memory is about one weight plus the adapter's LoRA tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launcher.ckpt import merge as ckpt
from launcher.ckpt import stream
from launcher.errors import ConfigError, LauncherError
from launcher.runs import MERGED_LORA_DIR

LORA_A = ".mindpet_delta_lora_a"
LORA_B = ".mindpet_delta_lora_b"


@dataclass(frozen=True)
class Folded:
    path: Path
    sha256: str
    adapter: Path
    layers: int
    rank: int
    alpha: float
    base_differs: list[str]  # frozen weights of the run that differ from --base (the run started elsewhere)


def is_lora(name: str) -> bool:
    return name.endswith((LORA_A, LORA_B))


def lora_hyper(run_dir: Path) -> tuple[int, float]:
    """(r, alpha) from the pet_config of the MindFormers config that ran."""
    pet = ((ckpt.run_config(run_dir).get("model") or {}).get("model_config") or {}).get("pet_config")
    if not pet or str(pet.get("pet_type", "")).lower() != "lora":
        raise ConfigError(f"{run_dir.name} is not a LoRA run (no pet_config with pet_type lora in {ckpt.RUN_CONFIG})")
    try:
        rank, alpha = int(pet["lora_rank"]), float(pet["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{run_dir.name}: pet_config needs numeric lora_rank and lora_alpha") from None
    if rank <= 0:
        raise ConfigError(f"{run_dir.name}: pet_config.lora_rank is {rank}; it must be positive")
    return rank, alpha


def default_adapter(run_dir: Path) -> Path:
    found = ckpt.latest_checkpoint(run_dir / ckpt.MERGED_DIR)
    if found is None:
        raise ConfigError(f"{run_dir.name} has no merged checkpoint to take the adapter from; run "
                          f"'launcher ckpt merge {run_dir.name}' first, or pass --adapter")
    return found


# Rows of a weight folded at once: the float64 temporaries stay small next to the weight.
_FOLD_BLOCK = 1 << 18


def lora_weights(adapter: stream.CheckpointReader) -> dict[str, tuple]:
    """<layer> -> (A, B) as stored, read from the adapter alone (they are small)."""
    names = adapter.by_name
    # not the optimizer's adam_m.<layer>... moments an unfiltered --adapter holds as well
    layers = sorted(k[: -len(LORA_A)] for k in names if k.endswith(LORA_A) and not ckpt.is_training_state(k))
    if not layers:
        raise ConfigError("the adapter checkpoint holds no LoRA weights (*.mindpet_delta_lora_a)")
    found = {}
    for layer in layers:
        if layer + LORA_B not in names:
            raise LauncherError(f"the adapter has {layer}{LORA_A} but no {layer}{LORA_B}")
        found[layer] = (adapter.array(names[layer + LORA_A]), adapter.array(names[layer + LORA_B]))
    return found


def check_fold(base: stream.CheckpointReader, lora: dict[str, tuple], rank: int) -> None:
    """Every ConfigError of the fold, from the base's headers, before anything is written."""
    for layer, (a, b) in lora.items():
        w_key = layer + ".weight"
        w = base.by_name.get(w_key)
        if w is None or ckpt.is_training_state(w_key) or is_lora(w_key):
            raise ConfigError(f"the base checkpoint has no {w_key} for the adapter's {layer}; wrong base model?")
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ConfigError(f"{layer}: LoRA A {a.shape} and B {b.shape} do not have rank {rank} of the run config")
        delta_shape = (b.shape[0], a.shape[1])  # B·A is [out, in]
        if w.shape not in (delta_shape, delta_shape[::-1]):
            raise ConfigError(f"{w_key} has shape {w.shape}; the adapter's B·A is {delta_shape}")


def fold_weight(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """W + scale·B·A in float64, rounded through float32 into W's dtype (as MindSpore's cast of it did),
    a block of rows at a time."""
    transposed = w.shape != (b.shape[0], a.shape[1])  # a Linear built with transpose_b=False stores [in, out]
    a, b = a.astype(np.float64), b.astype(np.float64)
    out = np.empty(w.shape, w.dtype)
    rows = max(1, _FOLD_BLOCK // max(1, w.shape[1]))
    for i in range(0, w.shape[0], rows):
        block = a[:, i:i + rows].T @ b.T if transposed else b[i:i + rows] @ a
        block *= scale
        block += w[i:i + rows]  # in float64, in place: the operations of the whole-file fold, in its order
        out[i:i + rows] = block.astype(np.float32)
    return out


def fold_files(base_path: Path, adapter_path: Path, out: Path, rank: int, alpha: float) -> tuple[int, list[str]]:
    """Write out: the base's parameters (training state and LoRA keys dropped) with every adapted weight folded.
    Streams the base a parameter at a time; of the adapter only the LoRA tensors are held.
    Returns (layers folded, the adapter's frozen weights that differ from the base's)."""
    with stream.CheckpointReader(adapter_path) as adapter, stream.CheckpointReader(base_path) as base:
        lora = lora_weights(adapter)
        check_fold(base, lora, rank)
        scale = alpha / rank
        differ = set()
        with stream.CheckpointWriter(out) as writer:
            for entry in base.entries:
                name = entry.name
                if ckpt.is_training_state(name) or is_lora(name):
                    continue
                frozen = adapter.by_name.get(name)
                if frozen is not None and (frozen.shape != entry.shape
                                           or ckpt.entry_diff(adapter, frozen, base, entry) != 0.0):
                    differ.add(name)
                layer = name.removesuffix(".weight")
                if name.endswith(".weight") and layer in lora:
                    folded = fold_weight(base.array(entry), *lora[layer], scale)
                    writer.write(name, folded, tensor_type=entry.tensor_type)
                else:  # the bytes as they are, a piece at a time: every dtype kept exactly
                    writer.copy(base, entry)
        return len(lora), [e.name for e in adapter.entries if e.name in differ]


def merge_lora(run_dir: Path, base_path: Path, adapter_path: Path | None = None, force: bool = False) -> Folded:
    ckpt.check_writable(run_dir, MERGED_LORA_DIR, force)
    if not base_path.is_file():
        raise ConfigError(f"--base: {base_path} does not exist")
    rank, alpha = lora_hyper(run_dir)
    adapter_path = adapter_path or default_adapter(run_dir)
    if not adapter_path.is_file():
        raise ConfigError(f"--adapter: {adapter_path} does not exist")
    with ckpt.publishing(run_dir / MERGED_LORA_DIR) as staging:
        out = staging / adapter_path.name
        layers, base_differs = fold_files(base_path, adapter_path, out, rank, alpha)
        digest = ckpt.write_sha256(out)
    return Folded(run_dir / MERGED_LORA_DIR / out.name, digest, adapter_path, layers, rank, alpha, base_differs)

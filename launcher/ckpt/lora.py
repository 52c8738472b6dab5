"""Fold a run's LoRA adapter into base weights: merged-lora/<name>.ckpt, a plain model checkpoint.

Facts from the installed packages (MindFormers 1.8.0 with mindpet 1.0.4):
- mindformers/pet/tuners/lora_adapter.py swaps each target Linear for mindpet's LoRADense and keeps the
  Linear's `weight` (and matmul) in it, so the base key stays `<layer>.weight`;
- mindpet/delta/lora.py: LoRADense adds `<layer>.mindpet_delta_lora_a` [r, in] and
  `<layer>.mindpet_delta_lora_b` [out, r]; its output is x·Wᵀ + (x·Aᵀ)·Bᵀ·(alpha/r);
- mindformers/modules/layers.py: Linear stores `weight` as [out, in] (transpose_b=True, the default the
  Llama attention uses), so the folded weight is W + (alpha/r)·B·A.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.ckpt import merge as ckpt
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


def fold(base: dict, adapter: dict, rank: int, alpha: float) -> tuple[dict, int]:
    """Base parameters (training state and LoRA keys dropped) with every adapted weight folded in."""
    import mindspore as ms
    import numpy as np

    out = {k: v for k, v in base.items() if not ckpt.is_training_state(k) and not is_lora(k)}
    layers = sorted(k[: -len(LORA_A)] for k in adapter if k.endswith(LORA_A))
    if not layers:
        raise ConfigError("the adapter checkpoint holds no LoRA weights (*.mindpet_delta_lora_a)")
    scale = alpha / rank
    for layer in layers:
        b_key, w_key = layer + LORA_B, layer + ".weight"
        if b_key not in adapter:
            raise LauncherError(f"the adapter has {layer}{LORA_A} but no {b_key}")
        if w_key not in out:
            raise ConfigError(f"the base checkpoint has no {w_key} for the adapter's {layer}; wrong base model?")
        a, b = ckpt.as_numpy(adapter[layer + LORA_A]), ckpt.as_numpy(adapter[b_key])
        w = out[w_key]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ConfigError(f"{layer}: LoRA A {a.shape} and B {b.shape} do not have rank {rank} of the run config")
        delta = (b @ a) * scale  # [out, in]
        if tuple(w.shape) == delta.shape:
            folded = ckpt.as_numpy(w) + delta
        elif tuple(w.shape) == delta.T.shape:  # a Linear built with transpose_b=False stores [in, out]
            folded = ckpt.as_numpy(w) + delta.T
        else:
            raise ConfigError(f"{w_key} has shape {tuple(w.shape)}; the adapter's B·A is {delta.shape}")
        out[w_key] = ms.Tensor(folded.astype(np.float32)).astype(w.dtype)
    return out, len(layers)


def frozen_differences(base: dict, adapter: dict) -> list[str]:
    """Names of the adapter checkpoint's non-LoRA weights that differ from the base's (both present)."""
    import numpy as np

    differ = []
    for name, value in adapter.items():
        if is_lora(name) or ckpt.is_training_state(name) or name not in base:
            continue
        a, b = ckpt.as_numpy(value), ckpt.as_numpy(base[name])
        if a.shape != b.shape or not np.array_equal(a, b):
            differ.append(name)
    return differ


def merge_lora(run_dir: Path, base_path: Path, adapter_path: Path | None = None, force: bool = False) -> Folded:
    ckpt.check_writable(run_dir, MERGED_LORA_DIR, force)
    if not base_path.is_file():
        raise ConfigError(f"--base: {base_path} does not exist")
    rank, alpha = lora_hyper(run_dir)
    adapter_path = adapter_path or default_adapter(run_dir)
    if not adapter_path.is_file():
        raise ConfigError(f"--adapter: {adapter_path} does not exist")
    base, adapter = ckpt.load_params(base_path), ckpt.load_params(adapter_path)
    folded, layers = fold(base, adapter, rank, alpha)
    with ckpt.publishing(run_dir, MERGED_LORA_DIR) as staging:
        out = staging / adapter_path.name
        ckpt.save_params(folded, out)
        digest = ckpt.write_sha256(out)
    return Folded(run_dir / MERGED_LORA_DIR / out.name, digest, adapter_path, layers, rank, alpha,
                  frozen_differences(base, adapter))

"""Peak memory and time of `launcher ckpt filter|merge|merge-lora`, streamed, against whole-file loads.

Synthetic Llama-shaped checkpoints (hidden 2048, float16 [h,h] attention and [4h,h]/[h,4h] MLP weights,
32000-token embedding and head, float32 norms, LoRA A/B on the attention with their adam moments and the
training counters) of about 1, 2 and 4 GiB are made in a temp dir under /tmp (removed at the end):
  rank.ckpt     what a rank saves: model + LoRA + moments + counters      (filter's input)
  model.ckpt    model + LoRA, as filtered, and replica.ckpt, its copy   (merge's 2 data-parallel ranks)
  base.ckpt     the model without LoRA                                  (merge-lora's --base; adapter model.ckpt)
Each tool runs in a fresh process, streamed (launcher.ckpt, what the CLI calls) and as the whole-file
baseline the launcher had before (mindspore.load_checkpoint + save_checkpoint, kept below): warmed once,
then alternating, --repeats times. A run's time is its job only (imports excluded: the baseline imports
MindSpore, the streamed tools do not); its peak is the process's VmHWM, imports included. A baseline that
would not fit in the free memory (its peak/size at the smaller size, else 2, times this size) is skipped, one the
kernel kills (out of memory) is dropped: "(did not fit)".

    .venv/bin/python bench/ckpt_memory.py [--sizes 1 2 4] [--repeats 3] [--tools filter merge merge-lora]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.ckpt import stream  # noqa: E402

HIDDEN, VOCAB, LORA_RANK, LORA_ALPHA = 2048, 32000, 16, 32.0
TOOLS = ("filter", "merge", "merge-lora")
GiB = 1 << 30


def layer_params(i: int) -> dict[str, tuple[tuple[int, ...], str]]:
    h, p = HIDDEN, f"model.layers.{i}"
    shapes = {f"{p}.attention.w{x}.weight": (h, h) for x in "qkvo"}
    shapes |= {f"{p}.feed_forward.w1.weight": (4 * h, h), f"{p}.feed_forward.w2.weight": (h, 4 * h),
               f"{p}.feed_forward.w3.weight": (4 * h, h)}
    out = {k: (s, "fp16") for k, s in shapes.items()}
    out |= {f"{p}.attention_norm.weight": ((h,), "fp32"), f"{p}.ffn_norm.weight": ((h,), "fp32")}
    for x in "qkvo":
        out[f"{p}.attention.w{x}.mindpet_delta_lora_a"] = ((LORA_RANK, h), "lora")
        out[f"{p}.attention.w{x}.mindpet_delta_lora_b"] = ((h, LORA_RANK), "lora")
    return out


def make_checkpoints(root: Path, size: int) -> None:
    """rank/model/replica/base.ckpt of about size bytes (rank.ckpt a little more: the moments)."""
    per_layer = sum(int(np.prod(s)) * (2 if kind == "fp16" else 4) for s, kind in layer_params(0).values())
    layers = max(1, round((size - 2 * VOCAB * HIDDEN * 2) / per_layer))
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(VOCAB * HIDDEN + 4096) * 0.02).astype(np.float16)  # slices of it: fast to make
    params = {"model.tok_embeddings.embedding_weight": ((VOCAB, HIDDEN), "fp16")}
    for i in range(layers):
        params |= layer_params(i)
    params |= {"model.norm_out.weight": ((HIDDEN,), "fp32"), "lm_head.weight": ((VOCAB, HIDDEN), "fp16")}
    with stream.CheckpointWriter(root / "rank.ckpt") as rank, stream.CheckpointWriter(root / "model.ckpt") as model, \
            stream.CheckpointWriter(root / "base.ckpt") as base:
        for name, (shape, kind) in params.items():
            n = int(np.prod(shape))
            if kind == "fp16":
                start = int(rng.integers(0, pool.size - n + 1))
                value = pool[start:start + n].reshape(shape)
            elif kind == "fp32":
                value = np.ones(shape, np.float32)
            else:
                value = rng.normal(0, 0.01, shape).astype(np.float32)
            writers = (rank, model) if kind == "lora" else (rank, model, base)
            for w in writers:
                w.write(name, value)
            if kind == "lora":
                for moment in ("adam_m", "adam_v"):
                    rank.write(f"{moment}.{name}", np.abs(value))
        for name, value in (("global_step", np.array([100], np.int32)), ("epoch_num", np.array(1, np.int64)),
                            ("step_num", np.array(100, np.int64)), ("loss_scale", np.array(1024.0, np.float32)),
                            ("scale_sense", np.array(1024.0, np.float32))):
            rank.write(name, value)
    shutil.copyfile(root / "model.ckpt", root / "replica.ckpt")


# ---- the jobs, run in a child process ----

def streamed(tool: str, root: Path, out: Path) -> None:
    from launcher.ckpt import lora, merge

    if tool == "filter":
        merge.filter_into({0: root / "rank.ckpt"}, out)
    elif tool == "merge":
        merge.compare_ranks({0: root / "model.ckpt", 1: root / "replica.ckpt"}, 0.0)
        shutil.copyfile(root / "model.ckpt", out / "model.ckpt")
        merge.write_sha256(out / "model.ckpt")
    else:
        lora.fold_files(root / "base.ckpt", root / "model.ckpt", out / "model.ckpt", LORA_RANK, LORA_ALPHA)
        merge.write_sha256(out / "model.ckpt")


def baseline(tool: str, root: Path, out: Path) -> None:
    """What the launcher did before streaming (launcher/ckpt/merge.py and lora.py, whole files in memory)."""
    import mindspore as ms

    from launcher.ckpt.lora import LORA_A, LORA_B, is_lora
    from launcher.ckpt.merge import is_training_state, write_sha256

    def as_numpy(value):
        if value.dtype == ms.bfloat16:
            value = value.astype(ms.float32)
        return value.asnumpy().astype(np.float64)

    def save(params: dict, path: Path) -> None:
        ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items()], str(path))

    if tool == "filter":
        params = ms.load_checkpoint(str(root / "rank.ckpt"))
        (out / "rank_0").mkdir()
        save({k: v for k, v in params.items() if not is_training_state(k)}, out / "rank_0" / "rank.ckpt")
    elif tool == "merge":
        reference, other = ms.load_checkpoint(str(root / "model.ckpt")), ms.load_checkpoint(str(root / "replica.ckpt"))
        assert set(reference) == set(other)
        for name, ref in reference.items():
            a, b = as_numpy(ref), as_numpy(other[name])
            assert a.shape == b.shape and float(np.max(np.abs(a - b))) == 0.0
        shutil.copyfile(root / "model.ckpt", out / "model.ckpt")
        write_sha256(out / "model.ckpt")
    else:
        base, adapter = ms.load_checkpoint(str(root / "base.ckpt")), ms.load_checkpoint(str(root / "model.ckpt"))
        folded = {k: v for k, v in base.items() if not is_training_state(k) and not is_lora(k)}
        scale = LORA_ALPHA / LORA_RANK
        for layer in sorted(k[: -len(LORA_A)] for k in adapter if k.endswith(LORA_A)):
            a, b = as_numpy(adapter[layer + LORA_A]), as_numpy(adapter[layer + LORA_B])
            w = folded[layer + ".weight"]
            folded[layer + ".weight"] = ms.Tensor((as_numpy(w) + (b @ a) * scale).astype(np.float32)).astype(w.dtype)
        save(folded, out / "model.ckpt")
        write_sha256(out / "model.ckpt")
        _ = [k for k, v in adapter.items() if not is_lora(k) and k in base
         and not np.array_equal(as_numpy(v), as_numpy(base[k]))]  # frozen_differences


def mem_available() -> int:
    meminfo = Path("/proc/meminfo").read_text()
    return int(next(line for line in meminfo.splitlines() if line.startswith("MemAvailable:")).split()[1]) * 1024


def vm_hwm_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


def child(impl: str, tool: str, root: Path, out: Path) -> None:
    if impl == "baseline":
        import mindspore  # noqa: F401  (imported before the clock starts, as the streamed imports are)
    from launcher.ckpt import lora, merge  # noqa: F401
    before = vm_hwm_kib()
    start = time.perf_counter()
    (streamed if impl == "streamed" else baseline)(tool, root, out)
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux counts the forked parent's RSS into a child's ru_maxrss at exec
    print(json.dumps({"seconds": seconds, "peak_kib": vm_hwm_kib(), "imports_kib": before}))


# ---- the parent ----

def run(impl: str, tool: str, root: Path) -> dict | None:
    """The child's measurements; None when the kernel killed it (out of memory)."""
    out = root / f"out-{impl}-{tool}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    try:
        result = subprocess.run([sys.executable, __file__, "--child", impl, tool, str(root), str(out)],
                                capture_output=True, text=True, cwd=REPO)
        if result.returncode < 0:
            print(f"{impl} {tool}: killed by signal {-result.returncode} (out of memory?)", file=sys.stderr)
            return None
        if result.returncode:
            raise SystemExit(f"{impl} {tool} failed:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 2, 4], help="checkpoint sizes in GiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--child", nargs=4, metavar=("IMPL", "TOOL", "ROOT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, tool, root, out = args.child
        child(impl, tool, Path(root), Path(out))
        return
    header = (f"{'size':>8} {'tool':<11} {'streamed peak':>14} {'/size':>6} {'baseline peak':>14} {'/size':>6} "
              f"{'streamed s':>11} {'baseline s':>11} {'time ratio':>10}")
    # load_checkpoint holds the file's bytes and then its tensors: at least twice the size, until measured
    rows, baseline_per_byte = [], dict.fromkeys(TOOLS, 2.0)
    for size_gib in args.sizes:
        with tempfile.TemporaryDirectory(prefix="ckpt-memory-", dir="/tmp") as tmp:
            root = Path(tmp)
            t = time.perf_counter()
            make_checkpoints(root, int(size_gib * GiB))
            size = (root / "model.ckpt").stat().st_size
            print(f"made {size / GiB:.2f} GiB checkpoints ({(root / 'rank.ckpt').stat().st_size / GiB:.2f} GiB "
                  f"with moments) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            for tool in args.tools:
                runs = {"streamed": [], "baseline": []}
                if baseline_per_byte.get(tool, 0) * size > 0.8 * mem_available():
                    del runs["baseline"]
                for impl in list(runs):  # warm: page cache, lazy imports
                    if run(impl, tool, root) is None:
                        del runs[impl]
                for _ in range(args.repeats):
                    for impl in list(runs):  # alternating: streamed, baseline, streamed, baseline, ...
                        measured = run(impl, tool, root)
                        if measured is None:
                            del runs[impl]
                        else:
                            runs[impl].append(measured)
                if "streamed" not in runs:
                    raise SystemExit(f"the streamed {tool} was killed")
                med = {impl: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for impl, rs in runs.items()}
                s = med["streamed"]
                row = (f"{size / GiB:>7.2f}G {tool:<11} {s['peak_kib'] / 1024:>10,.0f} MiB "
                       f"{s['peak_kib'] * 1024 / size:>6.3f} ")
                if "baseline" in med:
                    b = med["baseline"]
                    baseline_per_byte[tool] = b["peak_kib"] * 1024 / size
                    row += (f"{b['peak_kib'] / 1024:>10,.0f} MiB {b['peak_kib'] * 1024 / size:>6.3f} "
                            f"{s['seconds']:>11.2f} {b['seconds']:>11.2f} {s['seconds'] / b['seconds']:>10.2f}")
                else:
                    row += f"{'(did not fit)':>21} {s['seconds']:>11.2f} {'':>11} {'':>10}"
                rows.append(row)
                print(row, f"(after imports: streamed {s['imports_kib'] / 1024:.0f} MiB"
                      + (f", baseline {med['baseline']['imports_kib'] / 1024:.0f} MiB)" if "baseline" in med else ")"),
                      file=sys.stderr, flush=True)
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

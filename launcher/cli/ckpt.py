"""`launcher ckpt filter|merge|merge-lora RUN`: checkpoint post-processing of a gathered run."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from launcher.cli.console import err, out, reports_errors
from launcher.runs import find_run

_RUNS_DIR = click.option("--runs-dir", default="runs", show_default=True, help="where run directories are")
_FORCE = click.option("--force", is_flag=True, help="replace the output directory if it exists")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.group("ckpt")
def ckpt_cmd() -> None:
    """Post-process a run's checkpoints: filter training state, merge the ranks, fold LoRA.

    \b
    launcher ckpt filter RUN       -> runs/<id>/filtered/rank_N/<name>.ckpt
    launcher ckpt merge RUN        -> runs/<id>/merged/<name>.ckpt + .sha256
    launcher ckpt merge-lora RUN --base CKPT -> runs/<id>/merged-lora/<name>.ckpt + .sha256
    launcher ckpt export RUN -o DIR -> a Hugging Face directory (config.json, model.safetensors)
    """


@ckpt_cmd.command("filter")
@click.argument("run")
@_FORCE
@_RUNS_DIR
@reports_errors
def filter_cmd(run: str, force: bool, runs_dir: str) -> None:
    """Remove optimizer and loss-scale state from each rank's newest checkpoint.

    \b
    Keys containing adam, accu_grads, scale_sense, global_step, loss_scale, epoch_num, step_num,
    current_iterator_step, last_overflow_iterator_step or global_batch_size are dropped.
    Writes runs/<id>/filtered/rank_N/<name>.ckpt and prints each rank's size before and after.
    """
    from launcher.ckpt import merge as ckpt

    run_dir = find_run(run, Path(runs_dir))
    with err.status(f"filtering {run_dir.name}…"):
        rows = ckpt.filter_run(run_dir, force)
    table = Table(title=f"{run_dir.name}: model-only checkpoints in {ckpt.FILTERED_DIR}/")
    for column in ("rank", "checkpoint", "before", "after", "keys dropped"):
        table.add_column(column)
    for r in rows:
        table.add_row(str(r.rank), r.source.name, _size(r.size_before), _size(r.size_after), str(r.dropped))
    table.add_row("all", "", _size(sum(r.size_before for r in rows)), _size(sum(r.size_after for r in rows)), "")
    out.print(table)


@ckpt_cmd.command("merge")
@click.argument("run")
@click.option("--atol", type=click.FloatRange(0), default=0.0, show_default=True,
              help="data parallel: largest difference allowed between a rank's parameter and rank 0's")
@_FORCE
@_RUNS_DIR
@reports_errors
def merge_cmd(run: str, atol: float, force: bool, runs_dir: str) -> None:
    """Merge the ranks' checkpoints into one complete model-only checkpoint.

    \b
    Model or pipeline parallel: mindspore.transform_checkpoints with the strategy files gathered
    in ranks/rank_N/strategy/ (pipeline stages' files merged first). Pure data parallel: every
    rank's parameters must equal rank 0's, which is taken. Reads filtered/ if it is there,
    else filters on the fly. Writes runs/<id>/merged/<name>.ckpt and <name>.ckpt.sha256.
    """
    from launcher.ckpt import merge as ckpt

    run_dir = find_run(run, Path(runs_dir))
    with err.status(f"merging {run_dir.name}…"):
        merged = ckpt.merge_run(run_dir, force, atol)
    source = "filtered/" if merged.from_filtered else "the ranks' checkpoints, filtered on the fly"
    out.print(f"merged {source} ({merged.how})")
    out.print(f"wrote {merged.path} ({merged.params} parameters, {_size(merged.path.stat().st_size)})")
    out.print(f"sha256 {merged.sha256}")


@ckpt_cmd.command("merge-lora")
@click.argument("run")
@click.option("--base", "base", required=True, type=click.Path(dir_okay=False),
              help="the pretrained model checkpoint the LoRA was trained on")
@click.option("--adapter", type=click.Path(dir_okay=False),
              help="checkpoint with the LoRA A/B weights (default: the run's merged/<name>.ckpt)")
@_FORCE
@_RUNS_DIR
@reports_errors
def merge_lora_cmd(run: str, base: str, adapter: str | None, force: bool, runs_dir: str) -> None:
    """Fold the LoRA weights into the base weights: W + B·A·alpha/r.

    \b
    r and alpha come from the run's plan/mindformers/run.yaml (pet_config). The result holds the
    base checkpoint's parameters with every adapted weight folded, no LoRA and no optimizer keys:
    a plain model checkpoint. Writes runs/<id>/merged-lora/<name>.ckpt and <name>.ckpt.sha256.
    """
    from launcher.ckpt import lora as ckpt_lora

    run_dir = find_run(run, Path(runs_dir))
    with err.status(f"folding the LoRA of {run_dir.name}…"):
        folded = ckpt_lora.merge_lora(run_dir, Path(base), Path(adapter) if adapter else None, force)
    if folded.base_differs:
        err.print(f"warning: {len(folded.base_differs)} frozen weight(s) of the run differ from --base "
                  f"(e.g. {folded.base_differs[0]}); was the run started from another checkpoint?")
    out.print(f"folded {folded.layers} LoRA layers of {folded.adapter} (r={folded.rank}, alpha={folded.alpha:g}, "
              f"scale {folded.alpha / folded.rank:g})")
    out.print(f"wrote {folded.path} ({_size(folded.path.stat().st_size)})")
    out.print(f"sha256 {folded.sha256}")


@ckpt_cmd.command("export")
@click.argument("run")
@click.option("--to", "fmt", type=click.Choice(["hf"]), default="hf", show_default=True,
              help="the format to write: a Hugging Face model directory")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="the directory to write")
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="the model checkpoint to export (default: merged-lora/, else merged/ of a full run)")
@click.option("--tokenizer", type=click.Path(), help="tokenizer files to add (default: the run's data tokenizer)")
@_FORCE
@_RUNS_DIR
@reports_errors
def export_cmd(run: str, fmt: str, output: str, checkpoint: str | None, tokenizer: str | None, force: bool,
               runs_dir: str) -> None:
    """Write a run's model as a Hugging Face directory: config.json, model.safetensors, tokenizer.

    \b
    The inverse of 'launcher model import': MindFormers' LlamaForCausalLM names become
    transformers' Llama (or Qwen2 with q/k/v biases) names; lm_head is left out and
    tie_word_embeddings set when it equals the embedding. A LoRA run exports its folded
    checkpoint (merged-lora/). The checkpoint is streamed, one tensor in memory at a time.
    """
    from launcher.weights.export import export_run

    run_dir = find_run(run, Path(runs_dir))
    with err.status(f"exporting {run_dir.name}…"):
        done = export_run(run_dir, Path(output), checkpoint, tokenizer, force)
    tied = ", embeddings tied" if done["tied"] else ""
    out.print(f"exported {done['checkpoint']} ({done['family']}, {done['parameters']} tensors{tied}) to {output}/")
    if not done["tokenizer"]:
        err.print("warning: the run records no tokenizer; pass --tokenizer to add one")

"""`launcher model import SRC -o DIR`: bring a pretrained model in as a MindFormers checkpoint."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from launcher.cli.console import err, out, reports_errors


@click.group("model")
def model_cmd() -> None:
    """Bring pretrained models in (and see 'launcher ckpt export' for the way out)."""


@model_cmd.command("import")
@click.argument("source", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="the model directory to write; a job names it with 'model: DIR'")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="dtype of the checkpoint's weights (the CPU needs float32)")
@click.option("--force", is_flag=True, help="replace DIR even if it holds another import")
@reports_errors
def import_cmd(source: str, output: str, dtype: str, force: bool) -> None:
    """Import a GGUF file or a Hugging Face model directory (config.json, *.safetensors, tokenizer).

    \b
    Families: Llama (Llama2, SmolLM2), Qwen1.5/Qwen2 (q/k/v biases), Baichuan2 (packed W_pack).
    GGUF weights are dequantized; llama.cpp's rotary row order of q and k is undone.
    Writes DIR/model.ckpt (MindFormers LlamaForCausalLM names), DIR/tokenizer/ (tokenizer.json and
    tokenizer_config.json) and DIR/model.json. Every parameter of the model must come from the
    source and every source tensor must be used. Importing the same source again does nothing.
    A job uses it with 'model: DIR', 'checkpoint.load: DIR/model.ckpt' and 'data.tokenizer: DIR/tokenizer'.
    """
    from launcher.weights.importer import import_model

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                  console=err, disable=not err.is_terminal, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(kind: str, done: int, total: int) -> None:
            if kind not in tasks:
                tasks[kind] = bar.add_task("hashing the source" if kind == "hash" else "converting tensors",
                                           total=total)
            bar.update(tasks[kind], completed=done)

        result = import_model(Path(source), Path(output), dtype, force, progress)
    if result.cached:
        out.print(f"{result.directory} is already imported from this source (same bytes); nothing to do")
        return
    out.print(f"imported {source} ({result.family}): {result.parameters} parameters, "
              f"{result.values / 1e6:,.1f} M values, {dtype}, into {result.directory}/")

"""`launcher predict`: a quick generation check of a finished run."""

from __future__ import annotations

from pathlib import Path

import click

from launcher.cli.console import err, out, reports_errors
from launcher.runs import find_run


@click.command("predict")
@click.argument("run")
@click.option("--prompt", "prompts", multiple=True, required=True, help="text to continue (repeat for several)")
@click.option("--checkpoint", help="checkpoint to load (default: the run's merged-lora/, else merged/)")
@click.option("--tokenizer", help="tokenizer.model, or a directory with tokenizer.json + tokenizer_config.json, "
              "tokenizer.model, or vocab.json + merges.txt (default: the one the run's data: section used)")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--chat", is_flag=True, help="ask each prompt as the user turn of the chat template the data was "
              "prepared with, stop at its end token, and print only the answer")
@click.option("--template", type=click.Choice(["vicuna", "chatml"]), help="the chat template of --chat "
              "(default: the run's data.template, recorded in data.json; vicuna for older runs)")
@click.option("--runs-dir", default="runs", show_default=True, help="where run directories are")
@reports_errors
def predict_cmd(run: str, prompts: tuple[str, ...], checkpoint: str | None, tokenizer: str | None,
                max_new_tokens: int, chat: bool, template: str | None, runs_dir: str) -> None:
    """Generate from RUN's merged checkpoint with MindFormers' generate(), greedy.

    \b
    Loads the checkpoint into the run's own model config (use_past on Ascend; on the CPU,
    where incremental decoding has no kernels, each step recomputes the sequence).
    Logs go to runs/<id>/predict/predict.log, the answers to runs/<id>/predict/result.json.
    """
    from launcher.ckpt.predict import predict

    run_dir = find_run(run, Path(runs_dir))
    with err.status(f"loading {run_dir.name} and generating…"):
        result = predict(run_dir, list(prompts), checkpoint, tokenizer, max_new_tokens, chat, template)
    err.print(f"checkpoint {result['checkpoint']} (use_past={result['use_past']})")
    for item in result["outputs"]:
        out.print(item["answer"] if chat else item["text"], markup=False)

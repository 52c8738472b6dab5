"""`launcher data prepare`: tokenize a job's instruction data into the MindRecord it trains on."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from launcher.cli.console import err, out, reports_errors


@contextlib.contextmanager
def progress_bar():
    """A callback(rows_done) that shows rows and rows/s on stderr (silent when stderr is not a terminal)."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed:,.0f} rows"),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=err,
                  disable=not err.is_terminal, transient=True) as bar:
        task = bar.add_task("tokenizing", total=None, rate="")

        def update(done: int) -> None:
            elapsed = bar.tasks[0].elapsed or 0
            rate = f"{done / elapsed:,.0f} rows/s" if elapsed > 0 else ""
            bar.update(task, completed=done, rate=rate)

        yield update


def print_report(report) -> None:
    if report is None:
        return
    rate = report.written / report.seconds if report.seconds else 0
    out.print(f"wrote {report.written} records to {report.output} ({rate:,.0f} records/s); "
              f"skipped {len(report.skipped)}; truncated {report.truncated}", markup=False)
    if report.skipped:
        err.print(f"skipped rows: {report.skipped_lines()}", markup=False)


@click.group("data")
def data_cmd() -> None:
    """Prepare training data."""


@data_cmd.command("prepare")
@click.argument("job_file", metavar="JOB")
@click.option("-o", "--output", help="write the MindRecord here instead of the job's cache "
              "(data.cache_dir/<name>-<hash>/, which 'launcher up' reuses): a directory of MindRecord parts")
@click.option("--force", is_flag=True, help="replace an existing output")
@click.option("--strict", is_flag=True, help="stop at a bad row and write nothing (default: skip and report it)")
@click.option("--workers", type=click.IntRange(1, 256), help="tokenizing processes (default: data.workers, "
              "else the CPU count)")
@reports_errors
def prepare_cmd(job_file: str, output: str | None, force: bool, strict: bool, workers: int | None) -> None:
    """Tokenize the data: section of JOB into a MindRecord of input_ids and labels.

    \b
    Each row (alpaca, belle: instruction/input/output; novelset: Instruction/Input/Response;
    conversation: {"conversations": [{"from": "human"|"assistant", "value"}]}; a JSON array or
    JSON lines) becomes a chat in data.template: vicuna, "<system> USER: ... ASSISTANT: ...</s>",
    or chatml, "<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>", tokenized
    with data.tokenizer and padded or cut to seq_length + 1 tokens. Labels keep the answer tokens
    and their end token and mask everything else with -100.

    Rows with missing keys or an empty answer are skipped and listed with their line numbers
    (--strict: an error). An existing output is only replaced with --force; a cached dataset
    whose inputs have not changed is reused as it is.
    """
    from launcher.data import cache as data_cache
    from launcher.errors import ConfigError
    from launcher.spec import load_job

    job = load_job(job_file)
    if job.data is None:
        raise ConfigError(f"{job_file}: no data: section to prepare; add one with source, format and tokenizer")
    job, cached = data_cache.resolve_data(job, Path.cwd())
    target = Path(output) if output else cached
    if not output and not force and target.is_dir():
        out.print(f"{target} is already prepared from these inputs (cached); nothing to do")
        return
    with progress_bar() as progress:
        report = data_cache.prepare_job(job, target, progress, workers, strict, force)
    print_report(report)

"""A run's life: render, up, status, logs, gather, down (and the demo dataset). They parse, call the
runner, print; none of them knows one backend from another."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from launcher import run_versions, runner
from launcher.cli import data
from launcher.cli.console import err, out, reports_errors
from launcher.errors import ConfigError
from launcher.plan import LaunchPlan
from launcher.runs import REPORT

DEFAULT_RUNS_DIR = "runs"


class _Screen(runner.Events):
    """The runner's events, printed: progress lines on stdout, the data preparation's bar on stderr."""

    console = out

    def info(self, text: str) -> None:
        out.print(text)

    def progress(self):
        return data.progress_bar()

    def data_prepared(self, path: Path, report) -> None:
        if report is None:
            out.print(f"dataset: {path} (prepared earlier from the same inputs)")
        data.print_report(report)


def _rank_table(plan: LaunchPlan) -> Table:
    table = Table(title=f"{plan.job_name}: {plan.world_size} ranks, {plan.launch} on {plan.backend}/{plan.device}")
    for column in ("rank", "node", "host", "device", "log"):
        table.add_column(column)
    for s in plan.ranks:
        table.add_row(str(s.rank), str(s.node), s.host, str(s.device), s.console_log)
    return table


def _render(job_file: str, output: str | None, overrides: tuple[str, ...]) -> None:
    plan, target = runner.render(job_file, output, overrides)
    out.print(_rank_table(plan))
    out.print(f"wrote {len(plan.artifacts)} artifacts to {target}/")


# --set of render and up: one value of the job file changed before it is validated.
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="change one value of the job file before it is validated, as if the file said so (repeatable)")
SET_EXAMPLE = """\b
--set KEY=VALUE{only}:
KEY is a dotted path into the job, [i] picks a list item; VALUE is YAML,
as in the file: 4 is a number, '"4"' a string, [0,1] a list. Everything
after mindformers.overrides. (or env.) is one key. For example:
  launcher {command} --set parallel.data_parallel=4 \\
    --set 'cluster.nodes[1].host=n2' --set lora.rank=16 \\
    --set mindformers.overrides.runner_config.epochs=3
"""


@click.command(epilog=SET_EXAMPLE.format(only="", command="render job.yaml -o rendered/job"))
@click.argument("job_file", metavar="JOB")
@click.option("-o", "--output", required=True, help="directory to write the artifacts into")
@set_option
@reports_errors
def render(job_file: str, output: str, overrides: tuple[str, ...]) -> None:
    """Validate JOB and write every artifact (configs, scripts, rank tables) to a directory."""
    _render(job_file, output, overrides)


@click.command(epilog=SET_EXAMPLE.format(only=" (a job file only)", command="up job.yaml"))
@click.argument("job", metavar="JOB")
@click.option("--dry-run", is_flag=True, help="only validate and render, like 'launcher render'")
@click.option("-o", "--output", help="with --dry-run: where to write (default: rendered/<job-name>)")
@click.option("--runs-dir", default=DEFAULT_RUNS_DIR, show_default=True, help="where run directories go")
@set_option
@click.option("--accept-new-host-keys", is_flag=True,
              help="ssh: trust nodes whose host key is not yet in known_hosts, and record their keys")
@click.option("--kill-stale", is_flag=True, help="ssh: stop processes of earlier runs of this job found on the nodes")
@click.option("--kubeconfig", help="k8s: kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster)")
@click.option("--context", help="k8s: kubeconfig context (default: the current one)")
@click.option("--namespace", help="k8s: namespace (default: cluster.k8s.namespace)")
@click.option("--replace", is_flag=True, help="k8s: replace objects of the same name that already exist")
@click.option("--pending-timeout", type=float, default=600, show_default=True,
              help="k8s: seconds pods may stay Pending before the run is deleted")
@click.option("--pvc-dir", help="k8s: where cluster.k8s.output_pvc is mounted on this machine (gather reads output/ there)")
@reports_errors
def up(job: str, dry_run: bool, output: str | None, runs_dir: str, overrides: tuple[str, ...], **options) -> None:
    """Start JOB (a job file, or a directory written by 'launcher render'), watch it, and gather it.

    Any rank that fails, a lost node, Ctrl-C or SIGTERM stops every rank; what exists is still gathered.
    """
    if dry_run:
        if Path(job).is_dir():
            raise ConfigError("--dry-run takes a job file; a rendered directory is already rendered")
        _render(job, output, overrides)
        return
    _report(runner.up(job, Path(runs_dir), options, _Screen(), overrides))


@click.command("resume")
@click.argument("run", metavar="RUN")
@click.option("--runs-dir", default=DEFAULT_RUNS_DIR, show_default=True, help="where run directories are")
@click.option("--accept-new-host-keys", is_flag=True,
              help="ssh: trust nodes whose host key is not yet in known_hosts, and record their keys")
@reports_errors
def resume(run: str, runs_dir: str, **options) -> None:
    """Start the next attempt of RUN, which ended failed or interrupted.

    It resumes from the newest step of which every rank's checkpoint is in the run's manifest and
    verified (size and sha256, and it reads as a checkpoint), with the step, optimizer state and data
    position MindFormers keeps in it; with none, it starts from the beginning. The attempt goes into
    runs/<run>/attempts/<k>/, and the run's summary, loss curve and manifest cover every attempt.
    """
    _report(runner.resume_run(run, Path(runs_dir), options, _Screen()))


def _report(done: runner.Finished) -> None:
    record = done.run.record
    _print_summary(done.summary)
    for line in _attempt_lines(record):
        out.print(line, markup=False)
    out.print(f"run directory: {done.run.dir}/  (report: {done.run.dir / REPORT})")
    _print_warnings([*done.outcome.problems, *done.notices])
    code = done.exit_code
    if record.state == "interrupted":
        err.print(f"interrupted: every rank of {record.run_id} was stopped; what they wrote is gathered")
    elif record.state != "succeeded" and record.failed_rank is None:
        err.print(f"error: run {record.run_id} failed: {record.message}", markup=False)
    elif record.state != "succeeded":
        where = done.backend.rank_location(done.run, record.failed_rank)
        err.print(f"error: rank {record.failed_rank} failed ({where}); every other rank was stopped. "
                  f"Last lines of its log:", markup=False)
        err.print(done.outcome.tail, markup=False)
    if record.state != "succeeded" and record.failure:
        for line in _failure_lines(record.failure):
            err.print(line, markup=False)
    if code:
        sys.exit(code)


def _attempt_lines(record) -> list[str]:
    """One line per attempt of a restarted run: how it ended, and where it started from."""
    lines = []
    for entry in record.attempt_records:
        kind = (entry.get("failure") or {}).get("kind")
        start = entry.get("resumed_from")
        began = f"resumed from step {start['step']}" if start else "from the start"
        lines.append(f"attempt {entry['attempt']}: {entry['state']}{f' ({kind})' if kind else ''}, {began}")
    return lines


def _failure_lines(failure: dict) -> list[str]:
    """run.json's failure in two lines: what went wrong (and on which rank), and what to do."""
    rank = failure.get("rank")
    where = f" (rank {rank})" if rank is not None else ""
    return [f"failure: {failure.get('kind')}{where}: {failure.get('summary', '')}", f"fix: {failure.get('fix', '')}"]


def _print_warnings(problems) -> None:
    for problem in problems:
        err.print(f"warning: {problem}", markup=False)


def _print_summary(summary: dict) -> None:
    table = Table(title=f"{summary['run_id']}: {summary['state']}")
    for column in ("rank", "steps", "first loss", "last loss", "tokens/s", "checkpoints"):
        table.add_column(column, justify="right")
    for rank, r in summary["ranks"].items():
        fmt = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
        table.add_row(rank, str(r["steps"]), fmt(r["first_loss"]), fmt(r["last_loss"]),
                      "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}", str(len(r["checkpoints"])))
    out.print(table)


runs_option = click.option("--runs-dir", default=DEFAULT_RUNS_DIR, show_default=True, help="where run directories are")


@click.command()
@click.argument("run")
@runs_option
@reports_errors
def status(run: str, runs_dir: str) -> None:
    """Show the state of RUN (a run id or directory) and each rank's progress."""
    found, backend = runner.open_run(run, Path(runs_dir))
    record = found.record
    out.print(f"run {record.run_id}: {record.state}")
    for line in _attempt_lines(runner.run_record(found)):
        out.print(line, markup=False)
    if record.failed_rank is not None:
        out.print(f"failed rank: {record.failed_rank}")
    if record.failure:
        for line in _failure_lines(record.failure):
            out.print(line, markup=False)
    for line in run_versions.summary_lines(record.versions):
        out.print(line, markup=False)
    for line in run_versions.mismatches(record.versions.get("nodes") or {}):
        err.print(f"warning: {line}", markup=False)
    result = runner.status(found, backend)
    for line in result.lines:
        out.print(line, markup=False)
    out.print(result.view.table())


@click.command()
@click.argument("run")
@click.option("--rank", type=int, help="only this rank (default: all, each line prefixed)")
@click.option("-f", "--follow", is_flag=True, help="keep printing as the logs grow, until the run ends")
@runs_option
@reports_errors
def logs(run: str, rank: int | None, follow: bool, runs_dir: str) -> None:
    """Print the console logs of RUN's ranks."""
    found, backend = runner.open_run(run, Path(runs_dir))
    _print_warnings(runner.logs(found, backend, rank, follow, click.echo))


@click.command("gather")
@click.argument("run")
@runs_option
@reports_errors
def gather_cmd(run: str, runs_dir: str) -> None:
    """Gather RUN again: copy what is missing, then verify every file against manifest.json."""
    found, backend = runner.open_run(run, Path(runs_dir))
    summary, problems, files = runner.gather_again(found, backend)
    _print_warnings(problems)
    _print_summary(summary)
    out.print(f"verified {files} files in {found.dir}/  (report: {found.dir / REPORT})")


@click.command()
@click.argument("run")
@click.option("--purge", is_flag=True, help="ssh: also remove the run's directories on the nodes")
@runs_option
@reports_errors
def down(run: str, purge: bool, runs_dir: str) -> None:
    """Stop every process of RUN. Nothing is removed unless --purge is given."""
    found, backend = runner.open_run(run, Path(runs_dir))
    out.print(runner.down(found, backend, purge))


@click.group()
def dataset() -> None:
    """Make datasets."""


@dataset.command("tiny")
@click.argument("path")
@click.option("--force", is_flag=True, help="replace an existing dataset")
@reports_errors
def dataset_tiny(path: str, force: bool) -> None:
    """Write the demo MindRecord for the tiny model to PATH (byte tokens of the shipped text)."""
    from launcher.data.mindrecord import write_tiny

    count = write_tiny(Path(path), force=force)
    out.print(f"wrote {count} records to {path}")

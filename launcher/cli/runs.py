"""`launcher runs` (every run, one line each) and `launcher compare RUN RUN...` (runs side by side).

launcher.compare is imported by the compare command only: `launcher runs` needs none of it, and a
listing should start quickly.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table
from rich.text import Text

from launcher import run_index
from launcher.cli.console import err, out, reports_errors
from launcher.logparse import format_duration
from launcher.runs import find_run

if TYPE_CHECKING:
    from launcher import compare

_RUNS_DIR = click.option("--runs-dir", default="runs", show_default=True, help="where run directories are")

_STATE_STYLES = {"succeeded": "green", "failed": "red", "interrupted": "magenta", "running": "yellow",
                 "starting": "yellow"}
_COLUMNS = ("run", "job", "backend", "state", "attempts", "steps", "last loss", "tokens/s", "started",
            "duration", "manifest")
_RIGHT = {"attempts", "steps", "last loss", "tokens/s", "duration"}


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _speed(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _steps(row: run_index.RunRow) -> str:
    if row.steps is None:
        return "-"
    return f"{row.steps}/{'-' if row.total_steps is None else row.total_steps}"


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def _started(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def _cells(row: run_index.RunRow) -> tuple[str, ...]:
    return (row.run_id, row.job, row.backend, row.state, str(row.attempts), _steps(row), _loss(row.last_loss),
            _speed(row.tokens_per_s), _started(row.started), _duration(row.duration), row.manifest or "-")


def _aligned(rows: list[run_index.RunRow]) -> Text:
    """The listing as aligned columns. Not a rich Table: that lays out every cell on its own and takes
    seconds for a thousand runs; this takes a few hundredths of a second."""
    cells = [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in [_COLUMNS, *cells]) for i in range(len(_COLUMNS))]
    text = Text()

    def line(values, styles) -> None:
        for i, (value, width, style) in enumerate(zip(values, widths, styles)):
            if i:
                text.append("  ")
            if _COLUMNS[i] in _RIGHT:
                value = value.rjust(width)
            elif i < len(widths) - 1:  # the last column gets no trailing blanks
                value = value.ljust(width)
            text.append(value, style)
        text.append("\n")

    line([c.upper() for c in _COLUMNS], ["bold"] * len(_COLUMNS))
    for row, values in zip(rows, cells):
        manifest = "green" if row.manifest == run_index.MANIFEST_OK else "red" if row.manifest else None
        styles = [None] * len(_COLUMNS)
        styles[_COLUMNS.index("state")] = _STATE_STYLES.get(row.state)
        styles[_COLUMNS.index("manifest")] = manifest
        line(values, styles)
    text.rstrip()
    return text


@click.command("runs")
@click.option("--state", "states", multiple=True, metavar="STATE",
              help="only runs in this state (repeat it, or give a comma list): "
                   + ", ".join(run_index.KNOWN_STATES))
@click.option("--job", metavar="GLOB", help="only runs of this job name; * and ? match as in the shell")
@click.option("--since", metavar="WHEN",
              help="only runs started since: an age (30m, 2h, 3d, 1w, 1h30m) or an ISO date or date and "
                   "time (2026-12-01, 2026-12-01T13:00, local time unless it has an offset)")
@click.option("--verify", is_flag=True, help="check every manifest file's sha256 too (reads every byte)")
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="json: a list of objects with the fields named above, for scripts")
@_RUNS_DIR
@reports_errors
def runs_cmd(states: tuple[str, ...], job: str | None, since: str | None, verify: bool, fmt: str,
             runs_dir: str) -> None:
    """List every run under --runs-dir, newest first, one line each.

    \b
    RUN        the run id (what status, logs, compare... take)
    JOB        the job name           BACKEND  local, ssh or k8s
    STATE      starting, running, succeeded, failed or interrupted
    ATTEMPTS   how many times the run was started (1 unless it was restarted)
    STEPS      steps done by the slowest rank / the total (- before it is gathered)
    LAST LOSS  the last logged loss, mean over the ranks
    TOKENS/S   the run's throughput, summed over the ranks
    STARTED    local time             DURATION  start to end; so far, for a live run
    MANIFEST   ok: every file in manifest.json is there with its recorded size (with
               --verify: and its sha256); missing: no manifest.json; differs: a file
               is missing or changed; -: a live run, not gathered yet

    \b
    Reads run.json, summary.json and manifest.json of each run, never a log. A run
    directory whose run.json cannot be read is named on stderr and left out.
    JSON fields: run_id, job, backend, state, attempts, started, finished (epoch
    seconds), duration (seconds), steps, total_steps, first_loss, last_loss,
    tokens_per_s, world_size, manifest, manifest_problems, path.
    """
    now = time.time()
    wanted = run_index.parse_states(states)
    since_time = run_index.parse_since(since, now) if since is not None else None
    index = run_index.read_runs(Path(runs_dir), verify, now)
    rows = run_index.filter_rows(index.rows, wanted, job, since_time)
    for warning in index.warnings:
        err.print(f"warning: {warning}", markup=False)
    if fmt == "json":
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))  # exact text for scripts: not through rich
    elif rows:
        out.print(_aligned(rows))
    else:
        filtered = states or job or since
        out.print(f"no runs{' match' if filtered else ''} in {runs_dir}/", markup=False)


def _shown(value) -> Text:
    """A config value as it reads in YAML, as Text so that brackets in it are not taken for markup."""
    from launcher import compare

    if value is compare.ABSENT:
        return Text("(absent)", style="dim")
    return Text(value if isinstance(value, str) else json.dumps(value))


def _difference_table(title: str, labels: list[str], found: list[compare.Difference]) -> Table | str:
    if not found:
        return f"{title}: none"
    table = Table(title=title, title_justify="left")
    table.add_column("key", no_wrap=True)
    for label in labels:
        table.add_column(label, overflow="fold")
    for difference in found:
        table.add_row(Text(difference.key), *map(_shown, difference.values))
    return table


def _figures_table(compared: compare.Compared) -> Table:
    table = Table(title="figures", title_justify="left")
    table.add_column("")
    for label in compared.labels:
        table.add_column(label, justify="right")
    rows = compared.runs
    for name, cells in (
        ("run", [r.run_id for r in rows]),
        ("state", [r.state for r in rows]),
        ("steps", [_steps(r) for r in rows]),
        ("first loss", [_loss(r.first_loss) for r in rows]),
        ("last loss", [_loss(r.last_loss) for r in rows]),
        ("tokens/s", [_speed(r.tokens_per_s) for r in rows]),
        ("duration", [_duration(r.duration) for r in rows]),
        ("world size", ["-" if r.world_size is None else str(r.world_size) for r in rows]),
    ):
        table.add_row(name, *cells)
    return table


def _as_json(compared: compare.Compared, plot: Path) -> str:
    from launcher import compare

    def listed(found):  # a run without the key is left out of its values
        return [{"key": d.key, "values": {r.run_id: v for r, v in zip(compared.runs, d.values)
                                          if v is not compare.ABSENT}} for d in found]

    return json.dumps({"job_source": compared.job_source, "job": listed(compared.job),
                       "config": listed(compared.config), "runs": [asdict(r) for r in compared.runs],
                       "plot": str(plot)}, indent=2)


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, metavar="RUN RUN...")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="the loss plot to write (default: <runs-dir>/compare-<short ids>.png)")
@click.option("--json", "as_json", is_flag=True, help="print the differences and figures as JSON instead")
@_RUNS_DIR
@reports_errors
def compare_cmd(runs: tuple[str, ...], output: str | None, as_json: bool, runs_dir: str) -> None:
    """Compare two or more runs (run ids, unique prefixes or run directories).

    \b
    job        the keys that differ between the jobs as they ran (plan/job.yaml: the
               job file with its --set changes), dotted (parallel.data_parallel,
               cluster.nodes[1].host), with each run's value; (absent) where a run
               lacks the key. If a run has no plan/job.yaml, plan/plan.json is
               compared instead: the planned ranks, nodes, ports.
    config     the keys that differ between the effective MindFormers configs
               (plan/mindformers/run.yaml), the same way.
               In both, a run's own directory and run id are replaced by <run dir>
               and <run id> first, so values that differ only by them are not shown.
    figures    state, steps (slowest rank / total), first and last loss (mean over the
               ranks), tokens/s (summed over the ranks), duration, world size.
    plot       one PNG with each run's loss curve: the mean over its ranks at each
               step every rank logged (read from ranks/rank_N/log/info.log).
    Columns and lines are named by run id without the job name when every run is of
    one job, else by the whole run ids.
    """
    from launcher import compare

    runs_path = Path(runs_dir)
    found = compare.compare([find_run(run, runs_path) for run in runs])
    curves = [compare.loss_curve(Path(r.path), label) for r, label in zip(found.runs, found.labels)]
    plot = Path(output) if output else compare.default_plot_path(runs_path, found.labels)
    compare.plot_curves(curves, plot)
    if as_json:
        click.echo(_as_json(found, plot))
        return
    out.print(_difference_table(f"job ({found.job_source})", found.labels, found.job))
    out.print(_difference_table(f"config ({compare.CONFIG_SOURCE})", found.labels, found.config))
    out.print(_figures_table(found))
    for curve in curves:
        if not curve.steps:
            err.print(f"warning: {curve.label} logged no steps; it has no line in the plot", markup=False)
    out.print(f"loss curves: {plot}", markup=False)

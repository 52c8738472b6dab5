"""Two or more runs side by side: what differs in their jobs and effective MindFormers configs (as dotted
keys), their figures, and their loss curves overlaid in one PNG.

The run directory keeps the job as it ran in plan/job.yaml; runs made before it was kept compare their
plan/plan.json instead (backend, ranks, nodes, ports and the other planned values).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from launcher import logparse
from launcher.errors import ConfigError
from launcher.plan import CONFIG_PATH, JOB_PATH, PLAN_FILE
from launcher.run_index import RunRow, UnreadableRun, read_run
from launcher.runs import PLAN_DIR, RANKS_DIR

CONFIG_SOURCE = f"{PLAN_DIR}/{CONFIG_PATH}"
JOB_SOURCE = f"{PLAN_DIR}/{JOB_PATH}"
PLAN_SOURCE = f"{PLAN_DIR}/{PLAN_FILE}"
# What a run's own directory and id become before comparing, so that they are never a difference.
RUN_DIR_MARK = "<run dir>"
RUN_ID_MARK = "<run id>"


class _Absent:
    """A key one run has and another has not."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


@dataclass(frozen=True)
class Difference:
    key: str  # dotted: parallel.data_parallel, cluster.nodes[1].host
    values: tuple  # one per run, in the order the runs were given; ABSENT where a run lacks the key


@dataclass(frozen=True)
class Compared:
    runs: list[RunRow]
    labels: list[str]  # a short name per run, for column headers and the legend
    job_source: str  # the file compared as the job: plan/job.yaml, or plan/plan.json
    job: list[Difference]
    config: list[Difference]


def flatten(value, prefix: str = "") -> dict[str, object]:
    """Nested dicts and lists as {dotted key: leaf}: {"a": {"b": [1, 2]}} -> {"a.b[0]": 1, "a.b[1]": 2}.
    An empty dict or list is a leaf, so a key that became empty still shows."""
    if isinstance(value, dict) and value:
        flat = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(value, list) and value:
        flat = {}
        for i, item in enumerate(value):
            flat.update(flatten(item, f"{prefix}[{i}]"))
        return flat
    return {prefix: value}


def differences(flats: list[dict[str, object]]) -> list[Difference]:
    """The keys whose values are not the same in every flattened mapping, in first-seen order."""
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    found = []
    for key in keys:
        values = tuple(flat.get(key, ABSENT) for flat in flats)
        if any(v is ABSENT for v in values) or any(v != values[0] or type(v) is not type(values[0])
                                                    for v in values):
            found.append(Difference(key, values))
    return found


def _load(path: Path):
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing; is {path.parent} a run directory?") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot be parsed ({str(exc).splitlines()[0]})") from None


def job_source(run_dirs: list[Path]) -> str:
    """plan/job.yaml when every run has one, else plan/plan.json (which every run has)."""
    return JOB_SOURCE if all((d / JOB_SOURCE).is_file() for d in run_dirs) else PLAN_SOURCE


def _without_run_names(value, run_dir: Path, run_id: str):
    """value with the run's own directory and id replaced by marks, in every string."""
    if isinstance(value, dict):
        return {k: _without_run_names(v, run_dir, run_id) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_run_names(v, run_dir, run_id) for v in value]
    if isinstance(value, str):
        for path in {str(run_dir), str(run_dir.resolve())}:
            value = value.replace(path, RUN_DIR_MARK)
        return value.replace(run_id, RUN_ID_MARK)
    return value


def short_labels(rows: list[RunRow]) -> list[str]:
    """Runs of one job: each run id without the job name (its start time), unless two would clash.
    Runs of several jobs: the whole run ids."""
    short = [r.run_id.removeprefix(f"{r.job}-") for r in rows]
    same_job = len({r.job for r in rows}) == 1
    return short if same_job and len(set(short)) == len(short) else [r.run_id for r in rows]


def compare(run_dirs: list[Path]) -> Compared:
    """The runs' rows and the differences of their jobs and configs, in the order the runs were given."""
    if len(run_dirs) < 2:
        raise ConfigError("compare takes two or more runs")
    resolved = [d.resolve() for d in run_dirs]
    for i, d in enumerate(resolved):
        if d in resolved[:i]:
            raise ConfigError(f"{run_dirs[i]} is given twice; give two or more different runs")
    rows = []
    for d in run_dirs:
        try:
            rows.append(read_run(d))
        except UnreadableRun as exc:
            raise ConfigError(f"{d}: {exc}; it cannot be compared") from None
    source = job_source(run_dirs)

    def flat(relative: str) -> list[dict]:
        return [flatten(_without_run_names(_load(d / relative), d, row.run_id)) for d, row in zip(run_dirs, rows)]

    return Compared(rows, short_labels(rows), source, differences(flat(source)), differences(flat(CONFIG_SOURCE)))


@dataclass(frozen=True)
class Curve:
    label: str
    steps: list[int]
    losses: list[float]  # the mean over `ranks` ranks at each step
    ranks: int


def loss_curve(run_dir: Path, label: str) -> Curve:
    """The run's loss per step, the mean over its ranks' gathered info.log, at the steps every rank
    logged (a rank that fell behind would otherwise bend the curve at its end)."""
    per_rank = []
    for log in sorted((run_dir / RANKS_DIR).glob("rank_*/log/info.log")):
        records = logparse.parse_text(log.read_text(errors="replace"))
        if records:
            per_rank.append({r.step: r.loss for r in records})  # a step logged twice: the later loss
    if not per_rank:
        return Curve(label, [], [], 0)
    steps = sorted(set.intersection(*(set(losses) for losses in per_rank)))
    return Curve(label, steps, [sum(r[s] for r in per_rank) / len(per_rank) for s in steps], len(per_rank))


def plot_curves(curves: list[Curve], out: Path, title: str = "loss, mean over each run's ranks") -> list[str]:
    """One line per curve that has steps, written to out as a PNG; returns the labels of the lines drawn."""
    # The Figure API with the Agg canvas, as gather.plot_losses: off-screen, without pyplot.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for curve in curves:
        if curve.steps:
            ranks = "1 rank" if curve.ranks == 1 else f"mean of {curve.ranks} ranks"
            ax.plot(curve.steps, curve.losses, marker=".", label=f"{curve.label} ({ranks})")
    drawn = [line.get_label() for line in ax.get_lines()]
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no steps logged", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return drawn


def default_plot_path(runs_dir: Path, labels: list[str]) -> Path:
    return runs_dir / f"compare-{'_'.join(labels)}.png"

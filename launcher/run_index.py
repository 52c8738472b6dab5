"""The runs directory as rows for `launcher runs`: each run's run.json, summary.json and manifest.json,
read without opening a log, then filtered by state, job name and start time.

Pure functions returning data; the command line prints them. A run directory whose run.json cannot be
read becomes a warning, not an error, so one broken run never hides the others.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from launcher.errors import ConfigError
from launcher.checksums import sha256_file
from launcher.runs import MANIFEST, RUN_FILE, SUMMARY

# The states of RunRecord.state; a run in a live state has no end yet.
KNOWN_STATES = ("starting", "running", "succeeded", "failed", "interrupted")
LIVE_STATES = ("starting", "running")
_REQUIRED = {"run_id": str, "job_name": str, "backend": str, "state": str, "started": (int, float)}

# manifest states
MANIFEST_OK = "ok"
MANIFEST_MISSING = "missing"
MANIFEST_DIFFERS = "differs"


class UnreadableRun(Exception):
    """A run directory without a usable run.json; the message says what is wrong with it."""


@dataclass
class RunRow:
    run_id: str
    job: str
    backend: str
    state: str
    attempts: int
    started: float
    finished: float | None
    duration: float | None  # seconds; for a live run, so far
    steps: int | None  # the slowest rank's steps; None without summary.json
    total_steps: int | None
    first_loss: float | None  # mean over the ranks
    last_loss: float | None  # mean over the ranks
    tokens_per_s: float | None  # summed over the ranks: the run's throughput
    world_size: int | None
    manifest: str | None  # ok | missing | differs; None for a live run that has none yet
    manifest_problems: list[str] = field(default_factory=list)
    path: str = ""


@dataclass
class Index:
    rows: list[RunRow]  # newest first
    warnings: list[str]  # one line each: a run that could not be read, a summary that could not be parsed


def read_runs(runs_dir: Path, verify: bool = False, now: float | None = None) -> Index:
    """Every run under runs_dir, newest first. verify: check the sha256 of every file in each manifest
    (slow); by default only that each listed file exists with the recorded size."""
    now = time.time() if now is None else now
    rows, warnings = [], []
    try:
        entries = sorted(os.scandir(runs_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return Index([], [])
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue  # compare-*.png and temporary folders live beside the runs
        try:
            rows.append(read_run(Path(entry.path), verify, now, warnings))
        except UnreadableRun as exc:
            warnings.append(f"{entry.path}: {exc}; not listed")
    rows.sort(key=lambda r: (r.started, r.run_id), reverse=True)
    return Index(rows, warnings)


def read_run(run_dir: Path, verify: bool = False, now: float | None = None,
             warnings: list[str] | None = None) -> RunRow:
    """One run's row. Raises UnreadableRun when run.json is missing or broken; a broken summary.json
    only adds a line to warnings (the row shows no figures)."""
    now = time.time() if now is None else now
    record = read_record(run_dir)
    summary = _read_json(os.path.join(run_dir, SUMMARY))
    problem = "not valid JSON" if summary is _BROKEN else None
    try:
        figures = summary_figures(None if problem else summary)
    except (TypeError, KeyError, AttributeError):  # fields of other types than the launcher writes
        figures, problem = summary_figures(None), "not in the shape the launcher writes"
    if problem and warnings is not None:
        warnings.append(f"{run_dir / SUMMARY}: {problem}; the run is listed without figures")
    live = record["state"] in LIVE_STATES
    manifest, problems = check_manifest(run_dir, verify)
    if manifest == MANIFEST_MISSING and live:
        manifest = None  # gathered at the end: no manifest yet is expected
    return RunRow(
        run_id=record["run_id"], job=record["job_name"], backend=record["backend"], state=record["state"],
        attempts=record.get("attempts", 1), started=record["started"], finished=record.get("finished"),
        duration=run_duration(record, now), **figures, manifest=manifest, manifest_problems=problems,
        path=str(run_dir),
    )


_BROKEN = object()


def _read_json(path: str):
    """The parsed file, None when it does not exist, _BROKEN when it is not JSON."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return _BROKEN


def read_record(run_dir: Path) -> dict:
    """run.json as a dict (read directly, so fields added later, such as attempts, are welcome)."""
    record = _read_json(os.path.join(run_dir, RUN_FILE))
    if record is None:
        raise UnreadableRun(f"no {RUN_FILE}")
    if record is _BROKEN or not isinstance(record, dict):
        raise UnreadableRun(f"{RUN_FILE} is not valid JSON")
    for key, kind in _REQUIRED.items():
        if not isinstance(record.get(key), kind):
            raise UnreadableRun(f"{RUN_FILE} has no valid '{key}'")
    if not isinstance(record.get("attempts", 1), int):
        raise UnreadableRun(f"{RUN_FILE} has no valid 'attempts'")
    return record


def run_duration(record: dict, now: float) -> float | None:
    if record["state"] in LIVE_STATES:
        return max(0.0, now - record["started"])
    finished = record.get("finished")
    return finished - record["started"] if isinstance(finished, (int, float)) else None


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def summary_figures(summary: dict | None) -> dict:
    """The run's figures from summary.json's ranks: the slowest rank's steps, the mean first and last
    loss, the summed tokens/s. All None without a summary."""
    ranks = list((summary or {}).get("ranks", {}).values())
    if not ranks:
        return dict(steps=None, total_steps=None, first_loss=None, last_loss=None, tokens_per_s=None,
                    world_size=(summary or {}).get("world_size"))
    totals = [r["total_steps"] for r in ranks if r.get("total_steps") is not None]
    finite = lambda key: [r[key] for r in ranks if isinstance(r.get(key), (int, float))  # noqa: E731
                          and math.isfinite(r[key])]
    speeds = [r["tokens_per_s"] for r in ranks if r.get("tokens_per_s") is not None]
    return dict(
        steps=min(r.get("steps", 0) for r in ranks),
        total_steps=max(totals) if totals else None,
        first_loss=_mean(finite("first_loss")),
        last_loss=_mean(finite("last_loss")),
        tokens_per_s=round(sum(speeds), 1) if speeds else None,
        world_size=summary.get("world_size", len(ranks)),
    )


def check_manifest(run_dir: Path, full: bool = False) -> tuple[str, list[str]]:
    """(state, problems): every file manifest.json lists must exist with its recorded size; with full,
    also with its recorded sha256 (reads every byte)."""
    manifest = _read_json(os.path.join(run_dir, MANIFEST))
    if manifest is None:
        return MANIFEST_MISSING, [f"{MANIFEST} is missing"]
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return MANIFEST_DIFFERS, [f"{MANIFEST} is not a valid manifest"]
    problems = []
    base = f"{run_dir}/"
    for rel, meta in files.items():
        path = base + rel
        try:
            info = os.stat(path)
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"{rel}: missing")
        elif info.st_size != meta.get("size"):
            problems.append(f"{rel}: size {info.st_size} differs from the manifest's {meta.get('size')}")
        elif full and sha256_file(Path(path)) != meta.get("sha256"):
            problems.append(f"{rel}: content differs from the manifest")
    return (MANIFEST_DIFFERS if problems else MANIFEST_OK), problems


def parse_states(values: tuple[str, ...] | list[str]) -> set[str]:
    """--state given once or more, each a state or a comma list of states."""
    states = {s.strip() for value in values for s in value.split(",") if s.strip()}
    for state in sorted(states):
        if state not in KNOWN_STATES:
            from launcher.schema import did_you_mean  # it brings pydantic: imported for a wrong --state only

            hint = did_you_mean(state, KNOWN_STATES) or f"; the states are {', '.join(KNOWN_STATES)}"
            raise ConfigError(f"--state: unknown state '{state}'{hint}")
    return states


_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_since(text: str, now: float) -> float:
    """--since as a time (epoch seconds): an age before now (30m, 2h, 3d, 1w, 1h30m) or an ISO date or
    date and time (2026-12-01, 2026-12-01T13:00, 2026-12-01 13:00+01:00; local time without an offset)."""
    value = text.strip().lower()
    if _DURATION.fullmatch(value):
        return now - sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(value))
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ConfigError(f"--since: '{text}' is neither an age like 30m, 2h, 3d nor an ISO date/time "
                          f"like 2026-12-01 or 2026-12-01T13:00") from None


def filter_rows(rows: list[RunRow], states: set[str] | None = None, job: str | None = None,
                since: float | None = None) -> list[RunRow]:
    """The rows in one of states, whose job name matches the glob job, started at or after since."""
    return [
        r for r in rows
        if (not states or r.state in states)
        and (job is None or fnmatch.fnmatchcase(r.job, job))
        and (since is None or r.started >= since)
    ]


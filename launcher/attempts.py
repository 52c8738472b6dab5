"""The attempts of one run: attempt 1 is the run directory itself, attempt k >= 2 is attempts/<k>/.

Each attempt is laid out like a run directory (plan/, run.json, ranks/, and for a local run output/);
its processes, remote directories and Kubernetes objects carry the attempt's own run id, <run-id>-a<k>,
so that no attempt meets what an earlier one left. The run's run.json holds the whole story: attempts
(the count) and attempt_records (how each ended and what it resumed from), with the state, exit code and
failure of the last attempt. The run's manifest.json lists every attempt's gathered files, and its
summary.json and loss.png are one curve across attempts, a resumed attempt's steps replacing the steps
an earlier attempt made after the checkpoint it resumed from.
"""

from __future__ import annotations

import time
from pathlib import Path

from launcher import logparse
from launcher.backends.base import Run
from launcher.plan import LaunchPlan, build_plan
from launcher.resume import ResumePoint, stage
from launcher.runs import ATTEMPTS_DIR, PLAN_DIR, RANKS_DIR, RESUME_DIR, RUN_DATA_DIR, RunRecord

ATTEMPT_SUFFIX = "-a"


def attempt_dir(run_dir: Path, attempt: int) -> Path:
    return run_dir if attempt == 1 else run_dir / ATTEMPTS_DIR / str(attempt)


def attempt_dirs(run_dir: Path) -> list[Path]:
    """Every attempt's directory, in order."""
    later = [p for p in (run_dir / ATTEMPTS_DIR).iterdir() if p.name.isdigit()] if (run_dir / ATTEMPTS_DIR).is_dir() else []
    return [run_dir] + sorted(later, key=lambda p: int(p.name))


def top_of(directory: Path) -> Path:
    """The run directory an attempt's directory belongs to (itself for attempt 1)."""
    return directory.parent.parent if directory.parent.name == ATTEMPTS_DIR else directory


def open_attempt(directory: Path) -> Run:
    """An attempt's directory (or a run's) as a Run: its run.json and the plan it ran."""
    return Run(directory, RunRecord.load(directory), LaunchPlan.read(directory / PLAN_DIR))


def latest(run_dir: Path, record: RunRecord) -> Run:
    """The run's newest attempt, as the Run its backend acts on (status, logs, gather, down)."""
    directory = attempt_dir(run_dir, record.attempts)
    if directory == run_dir:
        return Run(run_dir, record, LaunchPlan.read(run_dir / PLAN_DIR))
    return open_attempt(directory)


def earlier(directory: Path) -> list[Run]:
    """The attempts of the run before the one in directory, as Runs."""
    dirs = attempt_dirs(top_of(directory))
    return [open_attempt(d) for d in dirs[:dirs.index(directory)]]


def rank_records(run_dir: Path, rank: int) -> list[logparse.StepRecord]:
    """One rank's steps across attempts: a later attempt's steps replace those from its first step on."""
    records: list[logparse.StepRecord] = []
    for directory in attempt_dirs(run_dir):
        info = directory / RANKS_DIR / f"rank_{rank}" / "log" / "info.log"
        found = logparse.parse_text(info.read_text(errors="replace")) if info.is_file() else []
        if found:
            records = [r for r in records if r.step < found[0].step] + found
    return records


def resumed_plan(plan: LaunchPlan, point: ResumePoint | None, load_dir: str = RESUME_DIR) -> LaunchPlan:
    """The plan of the next attempt: the run's first plan (its job as started), resuming from point, or from
    the start when None; load_dir: where its ranks see the attempt's resume/ folder."""
    job = plan.job()
    if job is None:
        from launcher.errors import ConfigError

        raise ConfigError("this run's plan does not keep its job (rendered by an older launcher); "
                          "start it again with `launcher up JOB_FILE`")
    if point is not None:
        job = job.model_copy(update={"checkpoint": job.checkpoint.model_copy(
            update={"load": load_dir, "resume": point.file_name(0)})})
    return build_plan(job)


def start_attempt(top: Run, attempt: int, plan: LaunchPlan, point: ResumePoint | None) -> Run:
    """attempts/<attempt>/ with its plan, the checkpoint it resumes from, the run's prepared dataset, and its
    own run.json; the run's run.json counts it."""
    directory = attempt_dir(top.dir, attempt)
    directory.mkdir(parents=True)
    plan.write(directory / PLAN_DIR)
    if point is not None:
        stage(point, directory)
    if (top.dir / RUN_DATA_DIR).is_dir():  # staged with the plan to remote nodes
        from launcher.data.cache import link_tree

        link_tree(top.dir / RUN_DATA_DIR, directory / RUN_DATA_DIR)
    record = RunRecord(f"{top.record.run_id}{ATTEMPT_SUFFIX}{attempt}", top.record.job_name, top.record.backend,
                       "starting", time.time(), overrides=top.record.overrides, versions=top.record.versions,
                       attempts=attempt)
    record.save(directory)
    top.record.attempts, top.record.state, top.record.finished = attempt, "running", None
    top.record.exit_code = top.record.failed_rank = top.record.failure = None
    top.record.message = f"attempt {attempt} started"
    top.record.save(top.dir)
    return Run(directory, record, plan)


def end(top: Run, run: Run, attempt: int, point: ResumePoint | None) -> None:
    """Record how an attempt ended in the run's run.json, whose state becomes the attempt's."""
    ended = run.record
    top.record.attempt_records.append({
        "attempt": attempt, "run_id": ended.run_id, "dir": str(run.dir.relative_to(top.dir)),
        "state": ended.state, "exit_code": ended.exit_code, "failed_rank": ended.failed_rank,
        "failure": ended.failure, "started": ended.started, "finished": ended.finished,
        "resumed_from": point.as_record(top.dir) if point is not None else None,
    })
    if run.dir != top.dir:
        for name in ("state", "exit_code", "failed_rank", "failure", "finished", "message"):
            setattr(top.record, name, getattr(ended, name))
    top.record.save(top.dir)

"""The application flow of render, up, status, logs, gather and down, the same for every backend.

It never prints: progress goes to the caller's Events (a line of text, the live view's console, the
data preparation's progress and report), and results come back as values for the CLI to show.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher import attempts, diagnose, gather, notify, resume, run_versions
from launcher.backends import base
from launcher.backends.base import Backend, Outcome, Problem, Run, Status
from launcher.errors import ConfigError, LauncherError
from launcher.plan import LaunchPlan, build_plan
from launcher.runs import PLAN_DIR, RunRecord, find_run, new_run_id
from launcher.spec import Job, load_job


class Events(base.Events):
    """What `up` reports while it works, beyond the backend's lines and live view."""

    def progress(self):
        """A context manager giving a callback(rows_done) while data is prepared."""

    def data_prepared(self, path: Path, report) -> None:
        """report is None when the dataset was found prepared from the same inputs."""


@dataclass
class Finished:
    run: Run
    backend: Backend
    outcome: Outcome
    summary: dict
    notices: list[str] = dataclasses.field(default_factory=list)  # warnings that do not fail the run

    @property
    def exit_code(self) -> int:
        return base.exit_code(self.run.record, self.outcome.problems)


def load(job_file: str, options: dict | None = None,
         overrides: Sequence[str] = ()) -> tuple[Job, Path | None, Backend]:
    """The job (with its --set overrides made) with its paths resolved for its backend, the dataset its
    data: section prepares (None without one), and the backend. dataset.path is set here, before
    planning, so the plan stays pure."""
    job = load_job(job_file, overrides)
    backend = base.get(job.cluster.backend, **(options or {}))
    job = backend.resolve_paths(job, Path.cwd())
    if job.data is None:
        return job, None, backend
    from launcher.data.cache import resolve_data, with_dataset

    job, cached = resolve_data(job, Path.cwd())
    dataset_path, prepared = backend.place_dataset(cached)
    return with_dataset(job, dataset_path), prepared, backend


def render(job_file: str, output: str | None, overrides: Sequence[str] = ()) -> tuple[LaunchPlan, Path]:
    job, _, _ = load(job_file, overrides=overrides)
    plan = build_plan(job)
    target = Path(output or f"rendered/{job.name}")
    if target.exists() and any(target.iterdir()) and not (target / "plan.json").exists():
        raise ConfigError(f"{target} exists and is not a rendered plan; choose an empty or new directory")
    plan.write(target)
    return plan, target


def prepare_data(job_file: str, options: dict, events: Events,
                 overrides: Sequence[str] = ()) -> tuple[Job, Path | None, Backend]:
    """load, and the job's data: section prepared (or found in the cache) before anything starts."""
    job, path, backend = load(job_file, options, overrides)
    if path is None:
        return job, None, backend
    backend.check_data(job)
    from launcher.data.cache import ensure_prepared

    events.data_prepared(path, ensure_prepared(job, path, events.progress))
    return job, path, backend


def up(job: str, runs_dir: Path, options: dict, events: Events, overrides: Sequence[str] = ()) -> Finished:
    """Start JOB (a job file or a rendered plan directory), watch it, stop it, gather and verify it.
    options: the backend's (see each backend's OPTIONS); those of other backends are ignored.
    overrides: `--set key=value` changes to a job file, recorded in run.json."""
    spec, data_path = None, None
    if Path(job).is_dir():
        if overrides:
            raise ConfigError("--set changes a job file; a rendered directory is already rendered")
        plan = LaunchPlan.read(Path(job))
        backend = base.get(plan.backend, **options)
        backend.check_plan(plan)
    else:
        spec, data_path, backend = prepare_data(job, options, events, overrides)
        backend.check_host(spec)
        plan = build_plan(spec)
        completed = backend.complete(spec, plan, runs_dir, events)
        if completed is not spec:
            plan = build_plan(completed)
    kept = plan.job()
    if kept is not None and kept.restart.max_attempts > 1:
        backend.check_restart(plan)
    run = _new_run(plan, runs_dir, backend, events, overrides, job)
    if data_path is not None:
        from launcher.data.cache import record_run_data

        record_run_data(spec, data_path, run.dir)
        backend.stage_dataset(data_path, run.dir)
    notifier = notify.Notifier(notify.webhook_of(plan))
    notifier.send("started", run.record, run.dir)
    try:
        outcome = backend.execute(run, events)
    except LauncherError as err:
        record = RunRecord.load(run.dir)
        notifier.ended(dataclasses.replace(record, state="failed", message=str(err)), run.dir)
        if record.state == "starting":
            shutil.rmtree(run.dir)  # nothing ran anywhere: leave no run behind
        for warning in notifier.warnings:
            events.info(f"warning: {warning}")
        raise
    _diagnose(run)  # before finish, so that report.html and the notification carry it
    summary = gather.finish(plan, run.dir, run.record)
    outcome, summary = _restarts(run, run, backend, events, notifier, outcome, summary)
    notifier.ended(run.record, run.dir)
    return Finished(run, backend, outcome, summary, notifier.warnings)


def resume_run(run_name: str, runs_dir: Path, options: dict, events: Events) -> Finished:
    """Start the next attempt of a run that ended failed or interrupted, from its newest step that every
    rank has a verified checkpoint of; the job's restart policy then goes on as in `up`."""
    top = attempts.open_attempt(find_run(run_name, runs_dir).resolve())  # the node script runs in it
    record = top.record
    if record.state not in ("failed", "interrupted"):
        raise ConfigError(f"run {record.run_id} is {record.state}; only a failed or interrupted run resumes")
    backend = base.get(record.backend, **options)
    backend.check_restart(top.plan)
    current = attempts.latest(top.dir, record)
    notifier = notify.Notifier(notify.webhook_of(top.plan))
    outcome, summary = _restarts(top, current, backend, events, notifier, Outcome(), None, by_hand=True)
    notifier.ended(top.record, top.dir)
    return Finished(top, backend, outcome, summary, notifier.warnings)


def _restarts(top: Run, current: Run, backend: Backend, events: Events, notifier: notify.Notifier,
              outcome: Outcome, summary: dict | None, by_hand: bool = False) -> tuple[Outcome, dict | None]:
    """Further attempts of a failed run while its restart policy allows (one more first, when by_hand)."""
    job = top.plan.job()
    policy = job.restart if job is not None else None
    while by_hand or _restartable(current.record, policy, top.record.attempts):
        attempt = top.record.attempts + 1
        if len(top.record.attempt_records) < top.record.attempts:  # the first attempt, never listed yet
            attempts.end(top, current, top.record.attempts, None)
        backend.check_restart(top.plan)
        point = resume.find_resume_point(top.dir, top.plan.world_size)
        wait = 0.0 if by_hand else policy.backoff_s * 2 ** (attempt - 2)
        _say_restart(events, current.record, attempt, policy, point, wait)
        try:
            time.sleep(wait)
        except KeyboardInterrupt:
            top.record.state, top.record.message = "interrupted", f"stopped by the user before attempt {attempt}"
            top.record.save(top.dir)
            break
        by_hand = False
        current = attempts.start_attempt(top, attempt, attempts.resumed_plan(top.plan, point, backend.resume_dir), point)
        notifier.send("restarted", top.record, top.dir)
        events.info(f"attempt {attempt}: run [bold]{current.record.run_id}[/]")
        try:
            outcome = backend.execute(current, events)
        except LauncherError as err:
            current.record = RunRecord.load(current.dir)
            if current.record.state in ("starting", "running"):
                current.record.state, current.record.message = "failed", str(err)
                current.record.save(current.dir)
            attempts.end(top, current, attempt, point)
            raise
        _diagnose(current)
        gather.finish(current.plan, current.dir, current.record)
        attempts.end(top, current, attempt, point)
        summary = gather.finish(top.plan, top.dir, top.record)
    return outcome, summary


def _restartable(record: RunRecord, policy, attempts_so_far: int) -> bool:
    if policy is None or record.state != "failed" or attempts_so_far >= policy.max_attempts:
        return False
    return (record.failure or {}).get("kind", "unknown") in policy.on


def _say_restart(events: Events, ended: RunRecord, attempt: int, policy, point, wait: float) -> None:
    kind = (ended.failure or {}).get("kind", ended.state)
    of = f" of {policy.max_attempts}" if policy is not None and policy.max_attempts >= attempt else ""
    start = (f"resuming from step {point.step} (every rank's checkpoint verified)" if point is not None
             else "from the start: no step has a verified checkpoint of every rank")
    events.info(f"attempt {attempt - 1} ended {ended.state} ({kind}); attempt {attempt}{of} "
                f"{f'in {wait:.0f}s, ' if wait else ''}{start}")
    for line in point.passed_over if point is not None else ():
        events.info(f"  passed over: {line}")


def _diagnose(run: Run) -> None:
    """run.json's failure, for a run that did not succeed and has none yet, from its gathered files."""
    if run.record.state != "succeeded" and run.record.failure is None:
        run.record.failure = diagnose.diagnose(run.dir, run.record, run.plan)
        if run.record.failure is not None:
            run.record.save(run.dir)


def _new_run(plan: LaunchPlan, runs_dir: Path, backend: Backend, events: Events,
             overrides: Sequence[str] = (), job: str | None = None) -> Run:
    """The run directory with the plan and run.json; job is what up was given (a file or a plan directory)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    run_id = new_run_id(plan.job_name, runs_dir)
    run_dir = (runs_dir / run_id).resolve()
    plan.write(run_dir / PLAN_DIR)
    record = RunRecord(run_id, plan.job_name, plan.backend, "starting", time.time(), overrides=list(overrides),
                       versions=run_versions.at_start(plan, job))
    record.save(run_dir)
    events.info(f"run [bold]{run_id}[/] — {plan.world_size} ranks, {plan.launch} on {backend.where(plan)}")
    return Run(run_dir, record, plan)


def open_run(run: str, runs_dir: Path) -> tuple[Run, Backend]:
    """A run again, from a new process, and its backend (which reaches the nodes from the run's files).
    For a restarted run: its newest attempt."""
    run_dir = find_run(run, runs_dir)
    record = RunRecord.load(run_dir)
    return attempts.latest(run_dir, record), base.get(record.backend)


def run_record(run: Run) -> RunRecord:
    """The record of the whole run an attempt belongs to (the attempt's own, for a first attempt)."""
    top = attempts.top_of(run.dir)
    return run.record if top == run.dir else RunRecord.load(top)


def status(run: Run, backend: Backend) -> Status:
    return backend.status(run)


def logs(run: Run, backend: Backend, rank: int | None, follow: bool, echo) -> list[Problem]:
    world = run.plan.world_size
    if rank is not None and not 0 <= rank < world:
        raise ConfigError(f"--rank: {rank} is not a rank of this run (0-{world - 1})")
    ranks = [rank] if rank is not None else list(range(world))
    return backend.logs(run, ranks, follow, rank is None, echo)


def gather_again(run: Run, backend: Backend) -> tuple[dict, list[Problem], int]:
    """Verify what was gathered, fetch what is missing, verify again: (summary, warnings, files)."""
    if (run.dir / gather.MANIFEST).is_file():
        problems = gather.verify_manifest(run.dir)
        if problems:
            raise LauncherError("gathered files do not match manifest.json: " + "; ".join(problems[:10]))
    problems = backend.gather(run)
    _diagnose(run)
    summary = gather.finish(run.plan, run.dir, run.record)
    if attempts.top_of(run.dir) != run.dir:  # a later attempt: the run's own files go across attempts
        top = attempts.open_attempt(attempts.top_of(run.dir))
        summary = gather.finish(top.plan, top.dir, top.record)
    fatal = [p.text for p in problems if p.fatal]
    if fatal:
        raise LauncherError("; ".join(fatal))
    return summary, problems, len(json.loads((run.dir / gather.MANIFEST).read_text())["files"])


def down(run: Run, backend: Backend, purge: bool) -> str:
    if purge and not backend.can_purge:
        raise ConfigError("--purge removes node directories of ssh runs; a local run's files are all in its run directory")
    said = backend.down(run, purge)
    if purge:  # an earlier attempt of a restarted run left its node directories too
        for earlier in attempts.earlier(run.dir):
            backend.down(earlier, purge)
    return said

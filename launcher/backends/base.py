"""What every backend offers the runner, and the pieces they share.

A backend knows how to do each step of a run on its kind of cluster; the runner (launcher/runner.py)
owns their order. Options (host keys, Kubernetes target, ...) go once into a backend's constructor.
`get(name, **options)` is the one place that maps a backend name to its class.
"""

from __future__ import annotations

import importlib
import signal
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Protocol

from rich.console import Console

from launcher.liveview import LiveView
from launcher.plan import LaunchPlan
from launcher.runs import RESUME_DIR, RunRecord
from launcher.spec import Job

_CLASSES = {"local": "launcher.backends.local:LocalBackend", "ssh": "launcher.backends.ssh.backend:SshBackend",
            "k8s": "launcher.backends.k8s.backend:K8sBackend"}


@dataclass
class Run:
    """One run directory: its record (run.json) and the plan that ran."""

    dir: Path
    record: RunRecord
    plan: LaunchPlan


@dataclass(frozen=True)
class Problem:
    """Something to report about a run that did not stop it. fatal: the command fails because of it."""

    text: str
    fatal: bool = False

    def __str__(self) -> str:
        return self.text


@dataclass
class Outcome:
    """How `execute` ended; the state, exit code and failing rank are in the run's record."""

    problems: list[Problem] = field(default_factory=list)
    tail: str = ""  # the end of the failing rank's console log


@dataclass
class Status:
    lines: list[str]  # per node or per pod
    view: LiveView  # each rank's progress, filled from what the run wrote


class Events(Protocol):
    """Where a backend's progress goes: lines of text, and a console for the live view."""

    console: Console

    def info(self, text: str) -> None: ...


Echo = Callable[[str], None]


class Backend(ABC):
    name: ClassVar[str]
    can_purge: ClassVar[bool] = False  # `down --purge` removes something that only this backend leaves
    # Where a resumed attempt's ranks find the checkpoint the runner staged in its resume/ folder,
    # relative to their working directory.
    resume_dir: ClassVar[str] = RESUME_DIR

    def resolve_paths(self, job: Job, base: Path) -> Job:
        """The job with its paths as the ranks will see them (remote backends: as written)."""
        return job

    def place_dataset(self, prepared: Path) -> tuple[str, Path]:
        """For a dataset prepared on this machine (its cache directory): the dataset.path the ranks
        read, and where it is prepared. Here: the cache directory itself."""
        return str(prepared), prepared

    def check_data(self, job: Job) -> None:
        """What `up` needs to put a prepared dataset where the ranks read it."""

    def stage_dataset(self, prepared: Path, run_dir: Path) -> None:
        """Put the prepared dataset where the run's nodes get it (remote backends stage the run directory)."""

    def check_host(self, job: Job) -> None:
        """What this machine must offer before the run is planned (nothing, for remote backends)."""

    def check_plan(self, plan: LaunchPlan) -> None:
        """The same for a plan rendered earlier."""

    def complete(self, job: Job, plan: LaunchPlan, runs_dir: Path, events: Events) -> Job:
        """The job with what only the nodes can tell (e.g. device IPs), before the final plan."""
        return job

    def check_restart(self, plan: LaunchPlan) -> None:
        """What starting another attempt of a run needs (restart and `launcher resume`)."""

    def where(self, plan: LaunchPlan) -> str:
        """Where the ranks run, in words."""
        return f"{len(plan.nodes)} nodes"

    def rank_location(self, run: Run, rank: int) -> str:
        slot = run.plan.ranks[rank]
        return f"node {slot.node}, {slot.host}"

    @abstractmethod
    def execute(self, run: Run, events: Events) -> Outcome:
        """Start every rank, watch them, always stop them, and fetch their files into the run directory."""

    @abstractmethod
    def status(self, run: Run) -> Status: ...

    @abstractmethod
    def logs(self, run: Run, ranks: list[int], follow: bool, prefix: bool, echo: Echo) -> list[Problem]: ...

    @abstractmethod
    def gather(self, run: Run) -> list[Problem]:
        """Fetch what is missing from the nodes into the run directory (the runner verifies it)."""

    @abstractmethod
    def down(self, run: Run, purge: bool) -> str:
        """Stop every process (or object) of the run; the line to print. Raises if something is left."""


def get(name: str, **options) -> Backend:
    """The backend called `name`, constructed with the options that apply to it."""
    module, _, cls = _CLASSES[name].partition(":")
    backend_class = getattr(importlib.import_module(module), cls)
    return backend_class(**{k: v for k, v in options.items() if k in backend_class.OPTIONS})


def exit_code(record: RunRecord, problems: list[Problem]) -> int:
    """A run's exit code: 0 only when it succeeded with nothing to report, 130 when interrupted."""
    if record.state == "succeeded":
        return 0 if not problems else 1
    return 130 if record.state == "interrupted" else 1


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM gets the same teardown as Ctrl-C."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def teardown_shield():
    """A second Ctrl-C or SIGTERM must not cut a teardown short and leave ranks running."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

"""The stall watchdog: a rank that stops making steps is a failure, found from the run's own step times.

A hung collective, a dead peer that the others wait for, or a deadlocked data loader leave every process
alive and the run silent. The watchdog notices when a rank logs no new step for longer than its budget:
  - before the first step (graph compile, checkpoint load, the first step): monitor.first_step_within_s;
  - after a step: monitor.stall_after_s when the job sets it, else ten times the median of the rank's
    recent step times, and never under MIN_BUDGET_S;
  - after a step that saves a checkpoint (and after the last step, which saves and exits) the budget is
    at least SAVE_BUDGET_S more, because writing a 7B checkpoint takes minutes.
Times are taken when the launcher sees a new step line, so clocks of remote nodes do not matter.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import yaml

from launcher.job_sections import Monitor
from launcher.logparse import RankProgress
from launcher.plan import CONFIG_PATH, LaunchPlan

MIN_BUDGET_S = 120.0
STEP_TIMES_FACTOR = 10
RECENT_STEPS = 20
SAVE_BUDGET_S = 600.0
# Before it stops a stalled run the launcher sends this to every rank (entrypoints/finetune.py registers
# faulthandler on it) and waits this long for their stacks to reach the logs.
STACKS_WAIT_S = 3.0
# Where the launcher cannot signal the ranks (Kubernetes), it asks with this file in the ranks' status
# directory; entrypoints/finetune.py, which imports nothing of the launcher, spells it the same.
STACKS_REQUEST = "dump-stacks"


@dataclass(frozen=True)
class Stall:
    ranks: tuple[int, ...]  # the ranks that got no further than after_step; the first passed its budget
    silent_s: float
    budget_s: float
    after_step: int | None

    @property
    def rank(self) -> int | None:
        """The one rank to blame, when the others went on; ranks that wait for each other (data parallel
        all-reduce) stall together, and only their stacks tell which one hung."""
        return self.ranks[0] if len(self.ranks) == 1 else None

    def message(self) -> str:
        where = f"after step {self.after_step}" if self.after_step else "before the first step"
        who = f"rank {self.ranks[0]}" if len(self.ranks) == 1 else f"ranks {', '.join(map(str, self.ranks))}"
        return (f"{who} stalled: no new step for {self.silent_s:.0f}s {where} (budget {self.budget_s:.0f}s); "
                "every rank's Python stacks are in its console log")


def save_steps(plan: LaunchPlan) -> int | None:
    """The checkpoint callback's save_checkpoint_steps in the run's MindFormers config."""
    try:
        cfg = yaml.safe_load(plan.artifacts.get(CONFIG_PATH, "")) or {}
    except yaml.YAMLError:
        return None
    for callback in cfg.get("callbacks") or []:
        if isinstance(callback, dict) and "save_checkpoint_steps" in callback:
            return int(callback["save_checkpoint_steps"])
    return None


class StallWatch:
    def __init__(self, stall_after_s: float | None, first_step_within_s: float, every_save: int | None,
                 clock=time.monotonic):
        self.stall_after_s, self.first_step_within_s, self.every_save = stall_after_s, first_step_within_s, every_save
        self.clock = clock
        self.started = clock()
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (records seen, when the last one was seen)

    @classmethod
    def for_plan(cls, plan: LaunchPlan) -> StallWatch:
        job = plan.job()
        monitor = job.monitor if job is not None else Monitor()  # a plan from before the job was kept: defaults
        return cls(monitor.stall_after_s, monitor.first_step_within_s, save_steps(plan))

    def budget(self, progress: RankProgress) -> float:
        last = progress.last
        if last is None:
            return self.first_step_within_s
        if self.stall_after_s is not None:
            budget = self.stall_after_s
        else:
            times = [r.step_ms / 1000 for r in progress.records[-RECENT_STEPS:] if r.step_ms is not None]
            budget = max(MIN_BUDGET_S, STEP_TIMES_FACTOR * statistics.median(times)) if times else MIN_BUDGET_S
        saves = last.step == last.total or (self.every_save and last.step % self.every_save == 0)
        return budget + SAVE_BUDGET_S if saves and self.stall_after_s is None else budget

    def check(self, progress: dict[int, RankProgress], done: set[int]) -> Stall | None:
        """The first rank (not in done) silent for longer than its budget, if any."""
        now = self.clock()
        for rank, rank_progress in sorted(progress.items()):
            count = len(rank_progress.records)
            seen, since = self._seen.get(rank, (0, self.started))
            if count != seen:
                self._seen[rank] = (count, now)
                continue
            if rank in done:
                continue
            budget = self.budget(rank_progress)
            if now - since > budget:
                step = _steps_done(rank_progress)
                behind = tuple(r for r, p in sorted(progress.items()) if r not in done and _steps_done(p) <= step)
                return Stall(behind, now - since, budget, step or None)
        return None


def _steps_done(progress: RankProgress) -> int:
    return progress.last.step if progress.last else 0

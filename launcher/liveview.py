"""The live view every backend shows while a job runs: one row per rank, from its growing log."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from launcher.logparse import RankProgress, format_duration, seconds_left
from launcher.plan import STATUS_DIR, LaunchPlan
from launcher.stall import StallWatch


def rank_exit_codes(plan: LaunchPlan, workdir: Path) -> dict[int, int]:
    """Exit codes the ranks recorded in output/launcher/rank_N.exit (written by the entrypoint or script)."""
    codes = {}
    for slot in plan.ranks:
        try:
            codes[slot.rank] = int((workdir / STATUS_DIR / f"rank_{slot.rank}.exit").read_text().strip())
        except (FileNotFoundError, ValueError):
            continue
    return codes


class LiveView:
    """A rich table that refreshes while the job runs; silent when stdout is not a terminal."""

    def __init__(self, plan: LaunchPlan, workdir: Path, console: Console, title: str,
                 watch: StallWatch | None = None):
        """watch: the stall watchdog, for a view that follows a running job (not for `status`)."""
        self.plan, self.workdir, self.console, self.title = plan, workdir, console, title
        self.progress = {s.rank: RankProgress(workdir / s.info_log) for s in plan.ranks}
        self.watch, self.stalled = watch, None
        self.started = time.monotonic()
        self._live = Live(console=console, auto_refresh=False) if console.is_terminal else None

    def __enter__(self) -> LiveView:
        if self._live:
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live:
            self.update()
            self._live.__exit__(*exc)

    def update(self) -> None:
        for progress in self.progress.values():
            progress.poll()
        if self.watch is not None and self.stalled is None:
            self.stalled = self.watch.check(self.progress, set(rank_exit_codes(self.plan, self.workdir)))
        if self._live:
            self._live.update(self.table(), refresh=True)

    def table(self) -> Table:
        codes = rank_exit_codes(self.plan, self.workdir)
        elapsed = time.monotonic() - self.started
        table = Table(title=f"{self.title}  ({elapsed:.0f}s){self.eta_text()}", title_justify="left")
        for column in ("rank", "node", "device", "state", "step", "loss", "step time", "left"):
            table.add_column(column, justify="right" if column != "state" else "left")
        for slot in self.plan.ranks:
            last = self.progress[slot.rank].last
            code = codes.get(slot.rank)
            if code is not None:
                state = "[green]done" if code == 0 else f"[red]failed ({code})"
            else:
                state = "running" if last else "starting"
            table.add_row(
                str(slot.rank),
                f"{slot.node} {slot.host}",
                str(slot.device),
                state,
                f"{last.step}/{last.total}" if last else "-",
                f"{last.loss:.4f}" if last else "-",
                f"{last.step_ms:.0f} ms" if last and last.step_ms is not None else "-",
                self._left(slot.rank) if code is None else "-",
            )
        return table

    def _left(self, rank: int) -> str:
        left = seconds_left(self.progress[rank].records)
        return "-" if left is None else format_duration(left)

    def eta_text(self) -> str:
        """"  steps 12/48, about 3m05s left": the slowest rank's steps, and the longest time left."""
        lasts = [p.last for p in self.progress.values()]
        if not lasts or any(last is None for last in lasts):
            return ""
        slowest = min(lasts, key=lambda r: r.step)
        text = f"  steps {slowest.step}/{slowest.total}"
        lefts = [seconds_left(p.records) for p in self.progress.values()]
        if all(left is not None for left in lefts) and slowest.step < slowest.total:
            text += f", about {format_duration(max(lefts))} left"
        return text

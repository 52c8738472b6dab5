"""Reading MindFormers rank logs: step, loss and step time from MFLossMonitor lines, as the logs grow.

A line looks like:
  ... print_output_info: { Epoch:[  1/  1], step:[    3/   16], loss:[5.548754/5.545023], per_step_time: 26ms, ...
The step counts within the epoch (mindformers/core/callback/callback.py MFLossMonitor, r1.8.0), so the
run's step is (epoch - 1) × steps per epoch + step, of epochs × steps per epoch.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

_STEP_RE = re.compile(
    r"(?:Epoch:\[\s*(?P<epoch>\d+)/\s*(?P<epochs>\d+)\],\s*)?step:\[\s*(?P<step>\d+)/\s*(?P<total>\d+)\],\s*loss:\s*\[?\s*(?P<loss>[-+0-9.eE]+|nan|inf|-inf)"
    r"(?:.*?per_step_time:\s*(?P<ms>\d+(?:\.\d+)?)ms)?",
    re.IGNORECASE,
)


@dataclass
class StepRecord:
    step: int
    total: int
    loss: float
    step_ms: float | None


def parse_line(line: str) -> StepRecord | None:
    m = _STEP_RE.search(line)
    if not m:
        return None
    ms = m["ms"]
    step, total = int(m["step"]), int(m["total"])
    if m["epoch"]:
        step, total = (int(m["epoch"]) - 1) * total + step, int(m["epochs"]) * total
    return StepRecord(step, total, float(m["loss"]), float(ms) if ms else None)


def parse_text(text: str) -> list[StepRecord]:
    return [r for r in map(parse_line, text.splitlines()) if r]


@dataclass
class RankProgress:
    """What the live view shows for one rank, updated from its growing log."""

    path: Path
    offset: int = 0
    partial: str = ""
    records: list[StepRecord] = field(default_factory=list)

    def poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self.offset += len(chunk)
        text = self.partial + chunk.decode("utf-8", errors="replace")
        lines = text.split("\n")
        self.partial = lines.pop()
        self.records.extend(r for r in map(parse_line, lines) if r)

    @property
    def last(self) -> StepRecord | None:
        return self.records[-1] if self.records else None


def summarize(records: list[StepRecord], seq_length: int, batch_size: int) -> dict:
    """Per-rank figures for summary.json. tokens/s = seq_length × batch × steps / summed step time."""
    if not records:
        return {"steps": 0, "first_loss": None, "last_loss": None, "tokens_per_s": None, "losses_finite": None}
    times = [r.step_ms for r in records if r.step_ms is not None]
    seconds = sum(times) / 1000.0
    tokens = seq_length * batch_size * len(times)
    return {
        "steps": records[-1].step,
        "total_steps": records[-1].total,
        "first_loss": records[0].loss,
        "last_loss": records[-1].loss,
        "losses_finite": all(math.isfinite(r.loss) for r in records),
        "train_seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
    }


def seconds_left(records: list[StepRecord], window: int = 10) -> float | None:
    """The time the remaining steps should take: their count × the median of the last `window` step
    times (recent steps, because the first ones include graph compilation). None without step times."""
    if not records:
        return None
    recent = [r.step_ms for r in records[-window:] if r.step_ms is not None]
    if not recent:
        return None
    last = records[-1]
    return max(last.total - last.step, 0) * statistics.median(recent) / 1000.0


def format_duration(seconds: float) -> str:
    """42s, 3m05s, 2h10m, 3d04h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"

"""`launcher status|logs|gather|down RUN` for a Kubernetes run: they reach the cluster again through
the run's k8s.json (kubeconfig, context, namespace, PVC directory)."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from launcher import gather
from launcher.backends.k8s import WATCH_SECONDS, KubeRun, phase, reconnect
from launcher.liveview import LiveView
from launcher.plan import LaunchPlan
from launcher.runs import RunRecord


def status(plan: LaunchPlan, run_dir: Path, record: RunRecord) -> tuple[list[str], LiveView]:
    run = reconnect(plan, run_dir, record)
    pods = run.pods()
    lines = [f"pod {name} (rank {rank}): {phase(pods[name]) or 'Pending'}" if name in pods
             else f"pod {name} (rank {rank}): not in the cluster" for name, rank in run.rank_of.items()]
    run.mirror(pods)
    view = LiveView(plan, run_dir / "mirror", Console(force_terminal=False), record.run_id)
    view.update()
    return lines, view


def logs(plan: LaunchPlan, run_dir: Path, record: RunRecord, ranks: list[int], follow: bool, prefix: bool,
         echo) -> list[str]:
    """Print the ranks' pod logs (the log subresource); with follow, until every pod has ended.
    A pod that is gone is read from its gathered console.log instead."""
    run = reconnect(plan, run_dir, record)
    names = {rank: name for name, rank in run.rank_of.items()}
    offsets = {rank: 0 for rank in ranks}
    problems: list[str] = []
    while True:
        pods = run.pods() if follow else {}
        for rank in ranks:
            text = run.log(names[rank])
            if text is None and names[rank] in pods and phase(pods[names[rank]]) in (None, "Pending"):
                continue  # not started yet: wait for it
            if text is None:
                saved = run_dir / gather.rank_dir(rank) / "console.log"
                if not saved.is_file():
                    problems.append(f"rank {rank}: pod {names[rank]} has no log and none was gathered")
                    continue
                text = saved.read_text(errors="replace")
            complete = text[: text.rfind("\n") + 1] if follow else text
            for line in complete[offsets[rank]:].splitlines():
                echo(f"[rank {rank}] {line}" if prefix else line)
            offsets[rank] = max(offsets[rank], len(complete))
        running = [n for n in (names[r] for r in ranks) if n in pods and phase(pods[n]) in (None, "Pending", "Running")]
        if not follow or not running or problems:
            return list(dict.fromkeys(problems))
        time.sleep(WATCH_SECONDS)


def gather_again(plan: LaunchPlan, run_dir: Path, record: RunRecord) -> list[str]:
    """Logs of pods that still exist, and output/ from the PVC directory."""
    run: KubeRun = reconnect(plan, run_dir, record)
    run.gather_logs()
    return run.gather_outputs(need_checkpoints=record.state == "succeeded")


def down(plan: LaunchPlan, run_dir: Path, record: RunRecord) -> list[str]:
    return reconnect(plan, run_dir, record).delete_all()

"""What a run ran with, recorded in run.json under `versions`.

At the start the launcher records its own version, the job's sha256, the git commit of the job file
(with "+dirty" when the file differs from it) and the image the ranks run in. Each rank writes
output/launcher/rank_N.versions.json when it starts (entrypoints/finetune.py: python, mindspore,
mindformers, hostname, and on Ascend nodes cann and driver); gather copies them to
ranks/rank_N/versions.json and folds them here into one entry per node:

  {"launcher": "0.1.0", "job_sha256": "...", "git_commit": "...", "image": "...",
   "nodes": {"0": {"host": "...", "ranks": [0, 1], "python": "3.11.9", "mindspore": "2.7.2", ...}}}
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
from pathlib import Path

from launcher.checksums import sha256_file
from launcher.plan import PLAN_FILE, LaunchPlan
from launcher.spec import runs_in_image

# What each rank reports, in the order `launcher status` shows it.
NODE_FIELDS = ("python", "mindspore", "mindformers", "cann", "driver")
RANK_FILE = "versions.json"  # ranks/rank_N/versions.json
# The entrypoint also prints its versions on one console line starting with this, for pods whose
# output/ is an emptyDir that goes with them (only their log is gathered then).
CONSOLE_MARK = "launcher-versions: "
_CONSOLE_HEAD = 256 << 10  # the line comes before MindFormers starts: look only at the log's start
GIT_TIMEOUT = 5


def launcher_version() -> str | None:
    try:
        return importlib.metadata.version("launcher")
    except importlib.metadata.PackageNotFoundError:
        return None


def job_source(job: str | Path) -> Path:
    """The file that identifies what `up` was given: the job file, or a rendered directory's plan.json."""
    path = Path(job)
    return path / PLAN_FILE if path.is_dir() else path


def _git(directory: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                                timeout=GIT_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None  # no git, or it hung: the commit is simply not recorded
    return result.stdout if result.returncode == 0 else None


def git_commit(path: Path) -> str | None:
    """HEAD of the git repository holding the file, with "+dirty" when the file differs from HEAD
    (changed, untracked or ignored); None outside a repository or without git."""
    path = path.resolve()
    head = _git(path.parent, "rev-parse", "HEAD")
    if not head:
        return None
    status = _git(path.parent, "status", "--porcelain", "--ignored", "--", path.name)
    # A status that cannot be read counts as dirty: the commit alone may not reproduce the file.
    return head.strip() + ("+dirty" if status is None or status.strip() else "")


def image_of(plan: LaunchPlan) -> str | None:
    """The image the ranks run in, from the job as it ran; None when they run on the hosts."""
    job = plan.job()
    return job.image.reference if job is not None and runs_in_image(job) else None


def at_start(plan: LaunchPlan, job: str | Path | None) -> dict:
    """The versions known before any rank runs; fields that cannot be found are left out."""
    source = job_source(job) if job is not None else None
    found = {
        "launcher": launcher_version(),
        "job_sha256": sha256_file(source) if source is not None and source.is_file() else None,
        "git_commit": git_commit(source) if source is not None and source.is_file() else None,
        "image": image_of(plan),
    }
    return {k: v for k, v in found.items() if v is not None}


def read_rank(rank_dir: Path) -> dict | None:
    """What one gathered rank reported: its versions.json, else the line in its console log."""
    try:
        data = json.loads((rank_dir / RANK_FILE).read_text())
        return data if isinstance(data, dict) else None
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        return None
    try:
        with (rank_dir / "console.log").open("rb") as f:
            head = f.read(_CONSOLE_HEAD).decode(errors="replace")
    except OSError:
        return None
    for line in head.splitlines():
        if line.startswith(CONSOLE_MARK):
            try:
                data = json.loads(line[len(CONSOLE_MARK):])
            except ValueError:
                return None
            return data if isinstance(data, dict) else None
    return None


def fold(per_rank: dict[int, dict], node_of: dict[int, int]) -> dict[str, dict]:
    """One entry per node from its ranks' reports. Ranks of one node share an installation; should
    they still disagree, the node's value lists each one ("2.7.2 / 2.6.0")."""
    nodes: dict[str, dict] = {}
    for rank in sorted(per_rank):
        report, entry = per_rank[rank], nodes.setdefault(str(node_of[rank]), {"ranks": []})
        entry["ranks"].append(rank)
        if report.get("hostname"):
            entry.setdefault("host", str(report["hostname"]))
        for name in NODE_FIELDS:
            if report.get(name) is not None:
                entry.setdefault(name, []).append(str(report[name]))
    for entry in nodes.values():
        for name in NODE_FIELDS:
            if name in entry:
                entry[name] = " / ".join(dict.fromkeys(entry[name]))
    return dict(sorted(nodes.items(), key=lambda item: int(item[0])))


def _node_list(nodes: list[str]) -> str:
    return ("node " if len(nodes) == 1 else "nodes ") + ", ".join(nodes)


def mismatches(nodes: dict[str, dict]) -> list[str]:
    """One line per field whose value differs between nodes, naming the nodes of each value."""
    lines = []
    for name in NODE_FIELDS:
        by_value: dict[str, list[str]] = {}
        for node, entry in nodes.items():
            by_value.setdefault(entry.get(name, "not found"), []).append(node)
        if len(by_value) > 1:
            parts = [f"{value} on {_node_list(where)}" for value, where in by_value.items()]
            lines.append(f"{name} differs between nodes: {', '.join(parts)}")
    return lines


def summary_lines(versions: dict) -> list[str]:
    """versions in one or two lines for `launcher status`: the launcher's side, then the nodes'."""
    lines = []
    commit, _, dirty = (versions.get("git_commit") or "").partition("+")
    start = [f"launcher {versions['launcher']}" if versions.get("launcher") else "",
             f"job sha256 {versions['job_sha256'][:12]}" if versions.get("job_sha256") else "",
             f"git {commit[:12]}{'+' + dirty if dirty else ''}" if commit else "",
             f"image {versions['image']}" if versions.get("image") else ""]
    if any(start):
        lines.append("versions: " + ", ".join(s for s in start if s))
    nodes = versions.get("nodes") or {}
    if nodes:
        fields = []
        for name in NODE_FIELDS:
            values = list(dict.fromkeys(e[name] for e in nodes.values() if name in e))
            if values:
                fields.append(f"{name} {' | '.join(values)}")
        count = f"{len(nodes)} node" + ("s" if len(nodes) != 1 else "")
        lines.append(f"nodes ({count}): " + (", ".join(fields) or "no versions reported"))
    return lines

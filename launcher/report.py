"""runs/<run-id>/report.html: the run on one page to share, readable offline.

One self-contained file: inline CSS, the loss plot embedded as a data: URI, no script and nothing fetched.
It is made from what gather just wrote (summary.json's figures, loss.png) and what the run keeps (run.json,
plan/), so every gather rewrites it; the manifest lists the gathered files it is made from, not the report.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import time
from functools import cache
from pathlib import Path

import jinja2

from launcher.plan import CONFIG_PATH, JOB_PATH, PLAN_FILE, LaunchPlan
from launcher.render import environment
from launcher.runs import PLAN_DIR, REPORT, RUN_FILE, TENSORBOARD_DIR
from launcher.spec import mindformers_release, runs_in_image

TEMPLATE = "report.html.j2"


@cache
def _html_environment() -> jinja2.Environment:
    # The one environment, with every value HTML-escaped: log tails, messages and configs are not ours.
    return environment().overlay(autoescape=True)


def loss_text(value) -> str:
    """A loss as the summary table shows it (launcher up and gather print it the same way)."""
    return "-" if value is None else f"{value:.4f}"


def rate_text(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return None


def _run_info(run_dir: Path, record) -> dict:
    """run.json as written, with the record in hand on top (it may be newer); keys it may gain later,
    such as failure and versions, come through."""
    info = {}
    text = _read(run_dir / RUN_FILE)
    if text:
        try:
            info = json.loads(text)
        except json.JSONDecodeError:
            pass
    # A field the record leaves empty (versions before any rank reported) does not hide run.json's.
    info.update({k: v for k, v in dataclasses.asdict(record).items() if v not in (None, {}, []) or k not in info})
    return info


def _when(seconds) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds)) if seconds else "-"


def _duration(info: dict) -> str:
    started, finished = info.get("started"), info.get("finished")
    if not (started and finished):
        return "-"
    minutes, seconds = divmod(int(round(finished - started)), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def versions(plan: LaunchPlan, info: dict) -> list[tuple[str, str]]:
    """What the run ran with: the backend from plan.json, MindFormers and the image from the job as it
    ran, then whatever run.json records under versions."""
    rows = [("backend", plan.backend), ("device", plan.device), ("launch", plan.launch)]
    job = plan.job()  # None for an older run or one this launcher no longer accepts: the page shows its text
    if job is not None:
        release, where = mindformers_release(job)
        rows.append(("MindFormers", f"{release} ({where})" if release else "not pinned: the nodes' installed one"))
        rows.append(("image", job.image.reference if runs_in_image(job) else "none: the ranks ran on the hosts"))
    recorded = info.get("versions")
    if isinstance(recorded, dict):
        shown = {name for name, _ in rows}  # the image is already there, from the job
        rows += [(str(k), str(v)) for k, v in recorded.items() if k != "nodes" and k not in shown]
        for node, entry in (recorded.get("nodes") or {}).items():  # one row per node (run_versions.py)
            fields = ", ".join(f"{k} {v}" for k, v in entry.items() if k not in ("host", "ranks"))
            rows.append((f"node {node}" + (f" ({entry['host']})" if entry.get("host") else ""), fields))
    return rows


def _rank_rows(summary: dict) -> list[dict]:
    rows = []
    for rank, r in summary["ranks"].items():
        rows.append({
            "rank": rank, "node": r.get("node"), "host": r.get("host"), "device": r.get("device"),
            "steps": r.get("steps"), "total_steps": r.get("total_steps"),
            "first_loss": loss_text(r.get("first_loss")), "last_loss": loss_text(r.get("last_loss")),
            "tokens_per_s": rate_text(r.get("tokens_per_s")), "checkpoints": r.get("checkpoints", []),
        })
    return rows


def _throughput(summary: dict) -> dict:
    """The ranks' tokens/s together and on average, and the tokens one step of all ranks trains on."""
    rates = [r["tokens_per_s"] for r in summary["ranks"].values() if r.get("tokens_per_s")]
    world, batch, seq = summary["world_size"], summary["batch_size"], summary["seq_length"]
    return {
        "total": rate_text(sum(rates)) if rates else "-",
        "per_rank": rate_text(sum(rates) / len(rates)) if rates else "-",
        "tokens_per_step": world * batch * seq, "world_size": world, "batch_size": batch, "seq_length": seq,
    }


def _png_data_uri(path: Path) -> str | None:
    try:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    except FileNotFoundError:
        return None


def _attempt_rows(info: dict) -> list[dict]:
    """One row per attempt of a restarted run (run.json attempt_records)."""
    rows = []
    for entry in info.get("attempt_records") or []:
        failure = entry.get("failure") or {}
        start = entry.get("resumed_from")
        rows.append({"attempt": entry.get("attempt"), "run_id": entry.get("run_id"), "state": entry.get("state"),
                     "failure": f"{failure.get('kind')}: {failure.get('summary', '')}" if failure else "",
                     "start": f"step {start.get('step')}" if start else "the beginning"})
    return rows


def render_report(run_dir: Path, plan: LaunchPlan, record, summary: dict, loss_png: Path, failed_tail: str) -> str:
    info = _run_info(run_dir, record)
    plan_dir = run_dir / PLAN_DIR
    job_text = _read(plan_dir / JOB_PATH)
    # A failure diagnosis (kind, fix, ...) that run.json may carry: every key shown, kind and fix first.
    failure = info.get("failure") if isinstance(info.get("failure"), dict) else {}
    first = {"kind": 0, "fix": 1}
    failure_rows = sorted(((str(k), str(v)) for k, v in failure.items()), key=lambda kv: (first.get(kv[0], 2), kv[0]))
    context = {
        "run_id": info.get("run_id", run_dir.name),
        "job_name": info.get("job_name", plan.job_name),
        "state": info.get("state", "unknown"),
        "exit_code": info.get("exit_code"),
        "started": _when(info.get("started")),
        "finished": _when(info.get("finished")),
        "duration": _duration(info),
        "message": info.get("message") or "",
        "failed_rank": info.get("failed_rank"),
        "failed_tail": failed_tail,
        "failure": failure_rows,
        "overrides": info.get("overrides") or [],
        "ranks": _rank_rows(summary),
        "throughput": _throughput(summary),
        "loss_png": _png_data_uri(loss_png),
        "job_text": job_text,
        "job_path": f"{PLAN_DIR}/{JOB_PATH}",
        "config_text": _read(plan_dir / CONFIG_PATH),
        "config_path": f"{PLAN_DIR}/{CONFIG_PATH}",
        "plan_path": f"{PLAN_DIR}/{PLAN_FILE}",
        "versions": versions(plan, info),
        "tensorboard": f"{TENSORBOARD_DIR}/" if (run_dir / TENSORBOARD_DIR).is_dir() else None,
        "attempts": _attempt_rows(info),
    }
    return _html_environment().get_template(TEMPLATE).render(**context)


def write_report(run_dir: Path, plan: LaunchPlan, record, summary: dict, loss_png: Path, failed_tail: str) -> Path:
    """Write report.html (through a temporary name, so a reader never sees half a page)."""
    out = run_dir / REPORT
    tmp = run_dir / f".{REPORT}.tmp"
    tmp.write_text(render_report(run_dir, plan, record, summary, loss_png, failed_tail))
    os.replace(tmp, out)
    return out

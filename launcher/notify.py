"""Webhook notifications: a small JSON document POSTed when a run starts, restarts and ends.

A notification is a courtesy: a post that fails (no answer, a refusal, an HTTP error) becomes a warning
of the run and never changes how the run ends. Each post waits at most TIMEOUT_S.

The document:
  {"event": "started" | "restarted" | "failed" | "ended", "run_id", "job", "backend", "state",
   "failure_kind": null or a word, "message", "summary": file URI of the run's summary.json, "time": ISO 8601 UTC}
A run that ends failed sends "failed"; any other end ("succeeded", "interrupted") sends "ended".
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from launcher.plan import JOB_PATH, LaunchPlan
from launcher.run_versions import launcher_version

TIMEOUT_S = 5.0
EVENTS = ("started", "restarted", "failed", "ended")


def webhook_of(plan: LaunchPlan) -> str | None:
    """The job's notify.webhook, read from the job the plan keeps (also for a plan rendered earlier)."""
    job = yaml.safe_load(plan.artifacts.get(JOB_PATH, "")) or {}
    return (job.get("notify") or {}).get("webhook")


def _user_agent() -> str:
    found = launcher_version()
    return f"launcher/{found}" if found else "launcher"


def failure_kind(record) -> str | None:
    """A word for why the run did not succeed: the recorded failure's kind when there is one."""
    failure = getattr(record, "failure", None)
    if isinstance(failure, dict) and failure.get("kind"):
        return str(failure["kind"])
    if record.state == "failed":
        return "rank_failed" if record.failed_rank is not None else "failed"
    if record.state == "interrupted":
        return "interrupted"
    return None


def document(event: str, record, run_dir: Path) -> dict:
    return {
        "event": event,
        "run_id": record.run_id,
        "job": record.job_name,
        "backend": record.backend,
        "state": record.state,
        "failure_kind": failure_kind(record),
        "message": record.message,
        "summary": (run_dir / "summary.json").resolve().as_uri(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def post(url: str, body: dict, timeout: float = TIMEOUT_S) -> str | None:
    """POST body as JSON; None when the server took it (2xx), else what went wrong, in one line."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": _user_agent()})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
        return None
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code} {err.reason}"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return str(reason) or type(reason).__name__


class Notifier:
    """Sends a run's events to the job's notify.webhook (nothing without one), keeping the warnings."""

    def __init__(self, url: str | None):
        self.url = url
        self.warnings: list[str] = []

    def send(self, event: str, record, run_dir: Path) -> None:
        if not self.url:
            return
        problem = post(self.url, document(event, record, run_dir))
        if problem:
            self.warnings.append(f"notify: the {event} notification to {self.url} was not delivered: {problem}")

    def ended(self, record, run_dir: Path) -> None:
        self.send("failed" if record.state == "failed" else "ended", record, run_dir)

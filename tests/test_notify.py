"""Webhook notifications, posted to a real HTTP server on this machine."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLES, free_port, only_run, run_launcher, write_tiny_job

from launcher import notify
from launcher.runs import RunRecord


class Hook:
    """A local webhook receiver: keeps every POSTed JSON body; answers with `status`."""

    def __init__(self, status: int = 204):
        self.status = status
        self.posts: list[dict] = []
        self.headers: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.posts.append(json.loads(body))
                hook.headers.append(dict(self.headers))
                self.send_response(hook.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


def record(state="running", failed_rank=None):
    return RunRecord("job-a-20260101-000000", "job-a", "local", state, 0.0, failed_rank=failed_rank)


def test_a_started_and_an_ended_run_post_their_documents(hook, tmp_path):
    sender = notify.Notifier(hook.url)
    sender.send("started", record(), tmp_path)
    sender.ended(record("succeeded"), tmp_path)
    assert [p["event"] for p in hook.posts] == ["started", "ended"]
    first, last = hook.posts
    assert first["run_id"] == "job-a-20260101-000000" and first["job"] == "job-a" and first["state"] == "running"
    assert last["state"] == "succeeded" and last["failure_kind"] is None
    assert last["summary"] == (tmp_path / "summary.json").resolve().as_uri()
    assert hook.headers[0]["Content-Type"] == "application/json"
    assert sender.warnings == []


def test_a_failed_run_posts_failed_with_its_kind(hook, tmp_path):
    sender = notify.Notifier(hook.url)
    sender.ended(record("failed", failed_rank=1), tmp_path)
    assert hook.posts[0]["event"] == "failed" and hook.posts[0]["failure_kind"] == "rank_failed"


@pytest.mark.parametrize("status", [500, 404])
def test_a_refused_post_is_a_warning(tmp_path, status):
    refusing = Hook(status)
    try:
        sender = notify.Notifier(refusing.url)
        sender.send("started", record(), tmp_path)
    finally:
        refusing.close()
    assert len(refusing.posts) == 1
    assert sender.warnings == [f"notify: the started notification to {refusing.url} was not delivered: "
                               f"HTTP {status} {'Internal Server Error' if status == 500 else 'Not Found'}"]


def test_an_unreachable_webhook_is_a_warning(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    sender = notify.Notifier(url)
    sender.send("started", record(), tmp_path)
    assert len(sender.warnings) == 1 and "refused" in sender.warnings[0].lower()


def test_without_a_webhook_nothing_is_sent(tmp_path):
    sender = notify.Notifier(None)
    sender.send("started", record(), tmp_path)
    assert sender.warnings == []


def test_a_webhook_must_be_an_http_url(tmp_path):
    job = yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text())
    job["notify"] = {"webhook": "ftp://example.org/x"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = run_launcher("render", str(path), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {path}: notify.webhook: 'ftp://example.org/x' is not an http:// "
                                     "or https:// URL")


@pytest.mark.e2e
def test_up_notifies_start_and_failure_and_a_dead_webhook_does_not_fail_the_run(hook, tmp_path, tiny_dataset):
    failing = write_tiny_job(tmp_path, tiny_dataset, notify={"webhook": hook.url}, env={"LAUNCHER_FAULT": "1:3"})
    result = run_launcher("up", str(failing), cwd=tmp_path)
    assert result.returncode != 0
    run_dir = only_run(tmp_path)
    assert [p["event"] for p in hook.posts] == ["started", "failed"]
    assert {p["run_id"] for p in hook.posts} == {run_dir.name}
    assert hook.posts[1]["state"] == "failed" and hook.posts[1]["failure_kind"] == "python_exception"  # diagnosed
    assert Path(hook.posts[1]["summary"].removeprefix("file://")).is_file()

    dead = f"http://127.0.0.1:{free_port()}/hook"
    other = tmp_path / "second"
    other.mkdir()
    result = run_launcher("up", str(write_tiny_job(other, tiny_dataset, notify={"webhook": dead})), cwd=other)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning: notify: the ") == 2  # started and ended, neither delivered
    assert RunRecord.load(only_run(other)).state == "succeeded"

"""The runner's restart loop on its own: when it starts another attempt, what it tells the webhook, and
when it stops. The ranks are a stand-in here (ScriptedBackend ends each attempt as the test says,
without running anything); real attempts, resumed from real checkpoints, are in test_e2e_resume.py and
test_backend_contract.py."""

import copy
import json

import pytest
import yaml
from conftest import EXAMPLES
from test_notify import Hook

from launcher import runner
from launcher.backends.base import Backend, Outcome
from launcher.plan import build_plan
from launcher.runs import RunRecord
from launcher.spec import parse_job


class ScriptedBackend(Backend):
    """A test double: execute ends each attempt with the next of `ends` (state, failure kind)."""

    name = "local"
    OPTIONS = ()

    def __init__(self, ends):
        self.ends, self.plans = list(ends), []

    def execute(self, run, events):
        state, kind = self.ends.pop(0)
        self.plans.append(run.plan)
        run.record.state, run.record.exit_code = state, 0 if state == "succeeded" else 1
        if kind:
            run.record.failure = {"kind": kind, "rank": 1, "summary": kind, "fix": "", "evidence": ""}
        run.record.save(run.dir)
        return Outcome()

    status = logs = gather = down = None


class Lines:
    console = None

    def __init__(self):
        self.lines = []

    def info(self, text):
        self.lines.append(text)


def first_attempt(tmp_path, ends, **sections):
    """A run directory as `up` leaves it after its first attempt ended (ends[0]), and the backend."""
    job = copy.deepcopy(yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text()))
    job["dataset"]["path"] = "/nonexistent/tiny.mindrecord"
    job.update(sections)
    plan = build_plan(parse_job(job))
    backend = ScriptedBackend(ends)
    run = runner._new_run(plan, tmp_path / "runs", backend, Lines())
    backend.execute(run, None)
    return run, backend


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


def test_attempts_go_on_until_max_attempts_and_each_one_is_listed(tmp_path, hook):
    run, backend = first_attempt(tmp_path, [("failed", "out_of_memory"), ("failed", "node_lost"),
                                            ("failed", "stalled")],
                                 restart={"max_attempts": 3, "backoff_s": 0}, notify={"webhook": hook.url})
    events = Lines()
    runner._restarts(run, run, backend, events, runner.notify.Notifier(hook.url), Outcome(), None)
    record = RunRecord.load(run.dir)
    assert record.attempts == 3 and record.state == "failed"
    assert [(a["attempt"], a["failure"]["kind"]) for a in record.attempt_records] == [
        (1, "out_of_memory"), (2, "node_lost"), (3, "stalled")]
    assert [a["run_id"] for a in record.attempt_records] == [record.run_id, f"{record.run_id}-a2",
                                                             f"{record.run_id}-a3"]
    assert [p["event"] for p in hook.posts] == ["restarted", "restarted"]
    # No checkpoint anywhere: each attempt starts from the beginning, with the job's own checkpoint settings.
    assert [a["resumed_from"] for a in record.attempt_records] == [None, None, None]
    assert sum("from the start: no step has a verified checkpoint" in line for line in events.lines) == 2
    assert all("resume_training: resume" not in p.artifacts["mindformers/run.yaml"] for p in backend.plans)
    assert json.loads((run.dir / "attempts" / "3" / "run.json").read_text())["run_id"] == f"{record.run_id}-a3"


def test_a_kind_the_policy_does_not_name_is_not_restarted(tmp_path):
    run, backend = first_attempt(tmp_path, [("failed", "python_exception")], restart={"max_attempts": 3})
    runner._restarts(run, run, backend, Lines(), runner.notify.Notifier(None), Outcome(), None)
    record = RunRecord.load(run.dir)
    assert record.attempts == 1 and record.attempt_records == [] and not (run.dir / "attempts").exists()


def test_a_success_or_an_interruption_is_not_restarted(tmp_path):
    for end in ("succeeded", "interrupted"):
        run, backend = first_attempt(tmp_path / end, [(end, None)], restart={"max_attempts": 3})
        runner._restarts(run, run, backend, Lines(), runner.notify.Notifier(None), Outcome(), None)
        assert RunRecord.load(run.dir).attempts == 1


def test_the_backoff_doubles_and_the_second_attempt_can_succeed(tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(runner.time, "sleep", waits.append)
    run, backend = first_attempt(tmp_path, [("failed", "hccl_timeout"), ("failed", "hccl_timeout"),
                                            ("succeeded", None)],
                                 restart={"max_attempts": 5, "backoff_s": 7, "on": ["hccl_timeout"]})
    runner._restarts(run, run, backend, Lines(), runner.notify.Notifier(None), Outcome(), None)
    record = RunRecord.load(run.dir)
    assert waits == [7, 14] and record.attempts == 3 and record.state == "succeeded" and record.exit_code == 0

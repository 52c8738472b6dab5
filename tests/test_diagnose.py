"""Why a run failed: every kind diagnosed from a fixture run directory (tests/data/failures/), and two real
failing runs (a rank that raises, a rank killed with SIGKILL) diagnosed end to end."""

import json
import re
from pathlib import Path

import pytest
from conftest import EXAMPLES, only_run, run_launcher, write_tiny_job

from launcher import diagnose
from launcher.plan import build_plan
from launcher.runs import RunRecord
from launcher.spec import load_job

FAILURES = Path(__file__).parent / "data" / "failures"
CASES = sorted(p.name for p in FAILURES.iterdir() if (p / "case.json").is_file())


def load_case(name: str):
    case = json.loads((FAILURES / name / "case.json").read_text())
    fields = {"backend": "local", "started": 0.0, **case["record"]}
    record = RunRecord(run_id=f"case-{name}", job_name="tiny-lora", **fields)
    return case, record, build_plan(load_job(EXAMPLES / case["job"]))


def test_every_kind_has_a_fixture():
    kinds = {p.kind for p in diagnose.PATTERNS}
    covered = {json.loads((FAILURES / name / "case.json").read_text())["expect"]["kind"] for name in CASES}
    assert kinds == covered


@pytest.mark.parametrize("name", CASES)
def test_a_fixture_is_diagnosed_to_its_kind(name):
    case, record, plan = load_case(name)
    assert case["source"].strip()
    expect = case["expect"]
    failure = diagnose.diagnose(FAILURES / name, record, plan)
    assert failure is not None
    assert (failure["kind"], failure["rank"]) == (expect["kind"], expect["rank"]), failure
    assert failure["fix"].strip() and "{" not in failure["fix"], failure
    assert failure["summary"].strip()
    if "summary" in expect:
        assert failure["summary"] == expect["summary"]
    if "summary_has" in expect:
        assert expect["summary_has"] in failure["summary"]
    if "evidence" in expect:
        assert failure["evidence"] == expect["evidence"]


def _patterns_hitting(name: str) -> set[str]:
    """The kinds whose LOG patterns match some line of the case's failing rank's logs."""
    _, record, _ = load_case(name)
    folder = FAILURES / name / "ranks" / f"rank_{record.failed_rank}"
    lines = [line for log in folder.rglob("*.log") for line in log.read_text().splitlines()]
    return {p.kind for p in diagnose.PATTERNS if p.scope == diagnose.LOG and any(p.regex.search(x) for x in lines)}


@pytest.mark.parametrize("name, specific", [("bad_data", "bad_data"), ("device_oom", "out_of_memory"),
                                            ("hccl_socket", "hccl_timeout")])
def test_a_log_with_two_candidates_gets_the_more_specific(name, specific):
    assert _patterns_hitting(name) == {specific, "python_exception"}
    _, record, plan = load_case(name)
    assert diagnose.diagnose(FAILURES / name, record, plan)["kind"] == specific


def test_how_a_rank_ended_wins_over_a_later_traceback():
    # killed_msrun's node log also holds the scheduler's RuntimeError, written after rank 1 was killed.
    text = (FAILURES / "killed_msrun" / "node-0.log").read_text()
    assert "Traceback (most recent call last):" in text
    _, record, plan = load_case("killed_msrun")
    assert diagnose.diagnose(FAILURES / "killed_msrun", record, plan)["kind"] == "out_of_memory"


def test_a_rank_killed_by_the_teardown_is_not_the_cause():
    # python_exception's node log says msrun saw rank 0 end with -9, after rank 1 had raised.
    assert "Error code: -9" in (FAILURES / "python_exception" / "node-0.log").read_text()
    _, record, plan = load_case("python_exception")
    failure = diagnose.diagnose(FAILURES / "python_exception", record, plan)
    assert (failure["kind"], failure["rank"]) == ("python_exception", 1)


@pytest.mark.parametrize("message, kind", [
    ("pods failed: tiny-lora-rank-1 (rank 1)\nEvicted: The node was low on resource: memory. ", "pod_evicted"),
    ("1 pods still Pending after 600s:\n  tiny-lora-rank-0: no events", "pod_unschedulable"),
    ("node 0 (10.0.0.5) lost: no answer for 45s; node 1 (10.0.0.6) lost: no answer for 45s", "node_lost"),
])
def test_backend_messages(tmp_path, message, kind):
    plan = build_plan(load_job(EXAMPLES / "tiny-lora-local.yaml"))
    record = RunRecord("r", "tiny-lora", "local", "failed", 0.0, message=message)
    failure = diagnose.diagnose(tmp_path, record, plan)
    assert failure["kind"] == kind and failure["evidence"].startswith("run.json message:")


def test_only_the_tail_of_a_big_log_is_read(tmp_path):
    log = tmp_path / "ranks" / "rank_0" / "console.log"
    log.parent.mkdir(parents=True)
    head = "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\nValueError: early\n"
    filler = "2026-12-01 10:00:00,000 - mindformers - INFO - step\n" * (diagnose.TAIL_BYTES // 40)
    log.write_text(head + filler + "[ERROR] ME(1:2,MainProcess):t [a.py:1] f] the last error\n")
    plan = build_plan(load_job(EXAMPLES / "tiny-lora-local.yaml"))
    record = RunRecord("r", "tiny-lora", "local", "failed", 0.0, failed_rank=0, message="node script exited")
    failure = diagnose.diagnose(tmp_path, record, plan)
    assert failure["kind"] == "unknown" and failure["summary"].endswith("the last error")  # not the early one
    assert re.match(r"ranks/rank_0/console\.log \(line \d+ of its last 256 KiB\): \[ERROR\]", failure["evidence"])


def test_no_failure_for_a_run_that_succeeded_or_was_stopped(tmp_path):
    plan = build_plan(load_job(EXAMPLES / "tiny-lora-local.yaml"))
    for state in ("succeeded", "interrupted"):
        assert diagnose.diagnose(tmp_path, RunRecord("r", "tiny-lora", "local", state, 0.0), plan) is None


def test_nothing_to_go_on_is_unknown_with_the_message(tmp_path):
    plan = build_plan(load_job(EXAMPLES / "tiny-lora-local.yaml"))
    record = RunRecord("r", "tiny-lora", "local", "failed", 0.0, message="node script exited with code 1")
    failure = diagnose.diagnose(tmp_path, record, plan)
    assert failure["kind"] == "unknown" and failure["summary"] == "node script exited with code 1"


def test_kinds_are_short_snake_case_with_a_fix():
    for pattern in diagnose.PATTERNS:
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", pattern.kind) and pattern.fix


def test_a_record_without_failure_still_loads(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "r", "job_name": "j", "backend": "local",
                                                   "state": "failed", "started": 0.0}))
    assert RunRecord.load(tmp_path).failure is None


# --- real drills: the tiny fine-tune on two CPU ranks, one rank made to fail ---


def _drill(tmp_path: Path, dataset: Path, fault: str):
    path = write_tiny_job(tmp_path, dataset, env={"LAUNCHER_FAULT": fault})
    result = run_launcher("up", path, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    run_dir = only_run(tmp_path)
    failure = json.loads((run_dir / "run.json").read_text())["failure"]
    status = run_launcher("status", run_dir.name, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    where = f" (rank {failure['rank']})" if failure["rank"] is not None else ""
    lines = [f"failure: {failure['kind']}{where}: {failure['summary']}", f"fix: {failure['fix']}"]
    for line in lines:
        assert line in status.stdout.splitlines(), status.stdout
        assert line in result.stderr.splitlines(), result.stderr  # the end of `up`, after the log's tail
    assert result.stderr.index("Last lines of its log:") < result.stderr.index(lines[0])
    assert failure["kind"] in (run_dir / "report.html").read_text()
    return failure


@pytest.mark.e2e
def test_drill_a_rank_that_raises(tmp_path, tiny_dataset):
    failure = _drill(tmp_path, tiny_dataset, "1:3")
    assert (failure["kind"], failure["rank"]) == ("python_exception", 1), failure
    assert "RuntimeError: LAUNCHER_FAULT" in failure["summary"]
    assert failure["evidence"].startswith("ranks/rank_1/console.log:")


@pytest.mark.e2e
def test_drill_a_rank_killed_like_the_oom_killer(tmp_path, tiny_dataset):
    failure = _drill(tmp_path, tiny_dataset, "1:3:kill")
    assert (failure["kind"], failure["rank"]) == ("out_of_memory", 1), failure
    assert "SIGKILL" in failure["summary"] and "Error code: -9" in failure["evidence"]

"""Restarts: attempts' directories and merged steps (launcher/attempts.py), the restart/checkpoint/monitor
job sections and their MindFormers rendering, the rank side's fault drill, and the k8s refusal."""

import copy
import json

import pytest
import yaml
from conftest import EXAMPLES

from launcher import attempts, mfconfig
from launcher.backends.base import Run
from launcher.backends.k8s.backend import K8sBackend
from launcher.errors import ConfigError
from launcher.plan import CONFIG_PATH, build_plan
from launcher.resume import ResumePoint
from launcher.runs import RunRecord
from launcher.spec import parse_job


def line(step: int, loss: float, total: int = 16, ms: int = 26) -> str:
    """An MFLossMonitor line as MindFormers r1.8.0 logs it (tests/test_logparse.py)."""
    return (f"[INFO] 2026-11-23 18:27:00,765 [mindformers/core/callback/callback.py:616] print_output_info: "
            f"{{ Epoch:[  1/  1], step:[{step:5d}/{total:5d}], loss:[{loss:.6f}/{loss:.6f}], per_step_time: {ms}ms, "
            "lr: 0.001, overflow cond: False, loss_scale: 1.0, global_norm: [0.20497443]")


def info_log(directory, rank: int, steps, loss: float) -> None:
    path = directory / "ranks" / f"rank_{rank}" / "log" / "info.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line(s, loss) + "\nsome other line\n" for s in steps))


def test_attempt_dirs_are_in_numeric_order_and_top_of_finds_the_run(tmp_path):
    """attempt 1 is the run directory; attempts/2 comes before attempts/10; other names are not attempts."""
    assert attempts.attempt_dirs(tmp_path) == [tmp_path]
    for name in ("10", "2", "3", "notes"):
        (tmp_path / "attempts" / name).mkdir(parents=True)
    (tmp_path / "attempts" / "README").write_text("")
    dirs = attempts.attempt_dirs(tmp_path)
    assert dirs == [tmp_path] + [tmp_path / "attempts" / n for n in ("2", "3", "10")]
    assert [attempts.top_of(d) for d in dirs] == [tmp_path] * 4
    assert attempts.attempt_dir(tmp_path, 1) == tmp_path and attempts.attempt_dir(tmp_path, 10) == dirs[-1]


def test_rank_records_replace_earlier_steps_from_a_later_attempts_first_step(tmp_path):
    """Attempt 1 made steps 1-6 and failed; attempt 2 resumed after 4 and made 5-9; attempt 3 logged no step
    yet. Rank 0's curve is 1-4 of attempt 1, then 5-9 of attempt 2. A rank with no later log keeps attempt 1's."""
    info_log(tmp_path, 0, range(1, 7), 5.0)
    info_log(tmp_path, 1, range(1, 7), 5.0)
    info_log(tmp_path / "attempts" / "2", 0, range(5, 10), 4.0)
    (tmp_path / "attempts" / "3" / "ranks" / "rank_0" / "log").mkdir(parents=True)
    (tmp_path / "attempts" / "3" / "ranks" / "rank_0" / "log" / "info.log").write_text("compiling\n")
    records = attempts.rank_records(tmp_path, 0)
    assert [(r.step, r.loss) for r in records] == [(s, 5.0) for s in range(1, 5)] + [(s, 4.0) for s in range(5, 10)]
    assert [r.step for r in attempts.rank_records(tmp_path, 1)] == list(range(1, 7))
    assert attempts.rank_records(tmp_path, 7) == []


def test_rank_records_a_later_attempt_from_step_one_replaces_everything(tmp_path):
    """An attempt that started over (no checkpoint) supersedes the whole earlier curve."""
    info_log(tmp_path, 0, range(1, 9), 5.0)
    info_log(tmp_path / "attempts" / "2", 0, range(1, 4), 3.0)
    assert [(r.step, r.loss) for r in attempts.rank_records(tmp_path, 0)] == [(1, 3.0), (2, 3.0), (3, 3.0)]


# ---- the job sections ----

def tiny(**sections) -> dict:
    job = copy.deepcopy(yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text()))
    job["dataset"]["path"] = "/nonexistent/tiny.mindrecord"  # only local host checks look at it
    job.update(sections)
    return job


@pytest.mark.parametrize("sections, message", [
    ({"restart": {"max_attempts": 0}}, "restart.max_attempts: Input should be greater than or equal to 1"),
    ({"restart": {"max_attempts": 101}}, "restart.max_attempts: Input should be less than or equal to 100"),
    ({"restart": {"on": ["stalled", "stall"]}}, "restart.on[1]: Input should be 'python_exception'"),
    ({"restart": {"backoff_s": -1}}, "restart.backoff_s: Input should be greater than or equal to 0"),
    ({"restart": {"retries": 2}}, "restart.retries: unknown key 'retries'"),
    ({"checkpoint": {"save_steps": 0}}, "checkpoint.save_steps: Input should be greater than or equal to 1"),
    ({"checkpoint": {"keep": 0}}, "checkpoint.keep: Input should be greater than or equal to 1"),
    ({"checkpoint": {"resume": "llama_rank_0-1_8.ckpt"}}, "checkpoint: resume names a file under load's "
                                                          "rank_N/ folders: give load too"),
    ({"checkpoint": {"load": "ck", "resume": "llama_rank_1-1_8.ckpt"}}, "is not a rank-0 checkpoint name"),
    ({"checkpoint": {"load": "ck", "resume": "sub/llama_rank_0-1_8.ckpt"}}, "is not a rank-0 checkpoint name"),
    ({"checkpoint": {"load": "ck", "resume": "llama_rank_0-1_8"}}, "is not a rank-0 checkpoint name"),
    ({"monitor": {"stall_after_s": 0}}, "monitor.stall_after_s: Input should be greater than 0"),
    ({"monitor": {"first_step_within_s": -5}}, "monitor.first_step_within_s: Input should be greater than 0"),
])
def test_bad_restart_checkpoint_and_monitor_settings_are_one_line_errors(sections, message):
    """Each bad value is refused with one line naming the job file and the field."""
    with pytest.raises(ConfigError) as info:
        parse_job(tiny(**sections), "job.yaml")
    text = str(info.value)
    assert text.startswith("job.yaml: ") and message in text and "\n" not in text, text


def test_section_defaults_and_good_values():
    """By default one attempt (no restart) on the transient failure kinds; good values are kept."""
    job = parse_job(tiny())
    assert (job.restart.max_attempts, job.restart.backoff_s) == (1, 10)
    assert "stalled" in job.restart.on and "python_exception" not in job.restart.on
    assert (job.checkpoint.save_steps, job.checkpoint.keep, job.checkpoint.resume) == (None, None, None)
    assert (job.monitor.stall_after_s, job.monitor.first_step_within_s) == (None, 3600)
    job = parse_job(tiny(restart={"max_attempts": 3, "on": ["bad_data"], "backoff_s": 0},
                         checkpoint={"load": "ck", "resume": "llama_tiny_rank_0-2_16.ckpt", "save_steps": 4}))
    assert (job.restart.max_attempts, job.restart.on, job.checkpoint.resume) == (3, ["bad_data"],
                                                                                "llama_tiny_rank_0-2_16.ckpt")


def checkpoint_monitor(cfg: dict) -> dict:
    (callback,) = [c for c in cfg["callbacks"] if "Checkpoint" in c["type"]]
    return callback


def test_save_steps_keep_and_resume_render_into_the_mindformers_config():
    """save_steps/keep set CheckpointMonitor's save_checkpoint_steps/keep_checkpoint_max; resume renders
    resume_training: <name> with load_checkpoint; unset, the base config's values stay."""
    base = mfconfig.build(parse_job(tiny()))
    assert "keep_checkpoint_max" not in checkpoint_monitor(base) and base["resume_training"] is False
    cfg = mfconfig.build(parse_job(tiny(checkpoint={"save_steps": 4, "keep": 2, "load": "resume",
                                                    "resume": "resume_rank_0-1_8.ckpt"})))
    assert checkpoint_monitor(cfg)["save_checkpoint_steps"] == 4 and checkpoint_monitor(cfg)["keep_checkpoint_max"] == 2
    assert (cfg["resume_training"], cfg["load_checkpoint"]) == ("resume_rank_0-1_8.ckpt", "resume")
    only_keep = checkpoint_monitor(mfconfig.build(parse_job(tiny(checkpoint={"keep": 3}))))
    assert only_keep["save_checkpoint_steps"] == checkpoint_monitor(base)["save_checkpoint_steps"]


def test_save_steps_without_a_checkpoint_callback_is_a_config_error(monkeypatch):
    """A base config with no CheckpointMonitor cannot take save_steps/keep: said, not ignored."""
    load_base = mfconfig.load_base
    monkeypatch.setattr(mfconfig, "load_base", lambda job: {**load_base(job), "callbacks": [{"type": "MFLossMonitor"}]})
    mfconfig.build(parse_job(tiny()))  # fine without the settings
    with pytest.raises(ConfigError, match=r"^checkpoint.save_steps/keep: the base config has no CheckpointMonitor"):
        mfconfig.build(parse_job(tiny(checkpoint={"keep": 2})))


def top_run(tmp_path, plan) -> Run:
    record = RunRecord("tiny-lora-20260101-120000", "tiny-lora", "local", "failed", 1.0, exit_code=1)
    record.save(tmp_path)
    return Run(tmp_path, record, plan)


def test_resumed_plan_start_attempt_and_end(tmp_path):
    """The next attempt resumes from the point's staged files, gets the -a<k> run id and its own run.json;
    the run's run.json counts it and, when it ends, records how and what it resumed from."""
    plan = build_plan(parse_job(tiny()))
    src = tmp_path / "ranks" / "rank_0" / "checkpoint" / "x.ckpt"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"ckpt")
    point = ResumePoint(8, 1, {0: src})
    resumed = attempts.resumed_plan(plan, point)
    cfg = yaml.safe_load(resumed.artifacts[CONFIG_PATH])
    assert (cfg["resume_training"], cfg["load_checkpoint"]) == ("resume_rank_0-1_8.ckpt", "resume")
    assert yaml.safe_load(attempts.resumed_plan(plan, None).artifacts[CONFIG_PATH])["resume_training"] is False

    top = top_run(tmp_path, plan)
    run = attempts.start_attempt(top, 2, resumed, point)
    assert run.dir == tmp_path / "attempts" / "2" and run.record.run_id == "tiny-lora-20260101-120000-a2"
    assert (run.dir / "resume" / "rank_0" / "resume_rank_0-1_8.ckpt").read_bytes() == b"ckpt"
    assert RunRecord.load(run.dir).attempts == 2
    saved = RunRecord.load(tmp_path)
    assert (saved.attempts, saved.state, saved.exit_code) == (2, "running", None)

    run.record.state, run.record.exit_code, run.record.finished = "succeeded", 0, 9.0
    attempts.end(top, run, 2, point)
    saved = json.loads((tmp_path / "run.json").read_text())
    assert (saved["state"], saved["exit_code"], saved["finished"]) == ("succeeded", 0, 9.0)
    (entry,) = saved["attempt_records"]
    assert entry["dir"] == "attempts/2" and entry["run_id"].endswith("-a2")
    assert entry["resumed_from"] == {"step": 8, "epoch": 1, "files": {"0": "ranks/rank_0/checkpoint/x.ckpt"}}


def test_a_kubernetes_attempt_resumes_from_its_folder_on_the_claim():
    """A Kubernetes run restarts only with an output claim, which its pods mount at output/ (their claim
    folder runs/<run id>/, where the launcher stages the checkpoint): the resumed plan loads output/resume."""
    job = copy.deepcopy(yaml.safe_load((EXAMPLES / "tiny-lora-k8s.yaml").read_text()))
    job["dataset"]["path"] = "/data/tiny.mindrecord"
    job["cluster"]["k8s"].pop("output_pvc", None)
    with pytest.raises(ConfigError, match=r"^restart: .* set cluster.k8s.output_pvc"):
        K8sBackend().check_restart(build_plan(parse_job(job)))
    job["cluster"]["k8s"]["output_pvc"] = "launcher-output"
    plan = build_plan(parse_job(job))
    K8sBackend().check_restart(plan)
    resumed = attempts.resumed_plan(plan, ResumePoint(8, 1, {}), K8sBackend.resume_dir)
    cfg = yaml.safe_load(resumed.artifacts[CONFIG_PATH])
    assert (cfg["resume_training"], cfg["load_checkpoint"]) == ("resume_rank_0-1_8.ckpt", "output/resume")
    pods = [doc for rel, text in resumed.artifacts.items() if rel.startswith("k8s/") and rel.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc and doc.get("kind") == "Pod"]
    assert len(pods) == 2
    for pod in pods:
        [container] = [c for c in pod["spec"]["containers"] if c["name"] == "ascend"]
        [mount] = [m for m in container["volumeMounts"] if m["name"] == "output" and "subPathExpr" in m]
        # load_checkpoint is relative to the rank's working directory (MindFormers resolves it from cwd).
        assert mount["mountPath"] == f"{container['workingDir']}/output"
        assert mount["subPathExpr"] == "runs/$(LAUNCHER_RUN_ID)"


# ---- the rank's side: entrypoints/finetune.py ----

@pytest.fixture
def finetune(monkeypatch):
    from launcher.entrypoints import finetune

    monkeypatch.delenv("LAUNCHER_RUN_ID", raising=False)
    monkeypatch.delenv("LAUNCHER_FAULT", raising=False)
    return finetune


@pytest.mark.parametrize("run_id, attempt", [("", 1), ("tiny-lora-20260101-120000", 1),
                                             ("tiny-lora-20260101-120000-2", 1), ("tiny-lora-20260101-120000-a3", 3),
                                             ("tiny-a7-20260101-120000-a12", 12), ("x-a", 1)])
def test_current_attempt_reads_the_run_id_suffix(finetune, monkeypatch, run_id, attempt):
    """-a<k> at the end of LAUNCHER_RUN_ID is attempt k; anything else is attempt 1."""
    monkeypatch.setenv("LAUNCHER_RUN_ID", run_id)
    assert finetune.current_attempt() == attempt


def test_fault_spec_for_another_rank_or_attempt_adds_no_callback(finetune, monkeypatch):
    """LAUNCHER_FAULT aimed at another rank, or at an attempt other than this one, is not armed."""
    assert finetune._fault_callbacks(0) == []
    for spec in ("1:5", "1:5:kill", "0:5:raise:2", "0:5:sleep:1"):
        monkeypatch.setenv("LAUNCHER_FAULT", spec)
        monkeypatch.setenv("LAUNCHER_RUN_ID", "job-20260101-120000-a2" if spec.endswith(":1") else "job-20260101")
        assert finetune._fault_callbacks(0) == [], spec
    monkeypatch.setenv("LAUNCHER_FAULT", "0:5:raise:2")
    monkeypatch.setenv("LAUNCHER_RUN_ID", "job-20260101-120000-a2")
    assert len(finetune._fault_callbacks(0)) == 1  # this rank, this attempt: armed


@pytest.mark.parametrize("spec", ["0:5:explode", "0:5:raise:x", "0:5:raise:2:3", "0:5:", "0:5:kill:"])
def test_a_malformed_fault_spec_stops_the_rank(finetune, monkeypatch, spec):
    """A spec that is not RANK:STEP[:raise|kill|sleep[:ATTEMPT]] ends the rank with the usage line."""
    monkeypatch.setenv("LAUNCHER_FAULT", spec)
    with pytest.raises(SystemExit, match=r"is not RANK:STEP\[:raise\|kill\|sleep\[:ATTEMPT\]\]"):
        finetune._fault_callbacks(1)


@pytest.mark.parametrize("spec", ["0", "zero:5", "0:five"])
def test_a_malformed_rank_or_step_stops_the_rank_with_the_usage_line(finetune, monkeypatch, spec):
    """A RANK or STEP that is not a number should be refused like any other malformed spec."""
    monkeypatch.setenv("LAUNCHER_FAULT", spec)
    with pytest.raises(SystemExit):
        finetune._fault_callbacks(0)


def test_restart_kinds_are_the_kinds_a_failure_is_diagnosed_as():
    """restart.on accepts exactly the kinds launcher/diagnose.py can give a failure (its patterns, and unknown)."""
    from launcher import diagnose
    from launcher.job_sections import RESTART_KINDS

    assert sorted(RESTART_KINDS) == sorted({p.kind for p in diagnose.PATTERNS} | {"unknown"})

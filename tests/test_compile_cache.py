"""MindSpore's compile cache on the local backend: on only when the job asks, in a folder keyed by what
shapes the graph. (MindSpore reads MS_COMPILER_CACHE_ENABLE and MS_COMPILER_CACHE_PATH in
mindspore/common/api.py of the installed 2.7.2.)"""

import yaml
from conftest import EXAMPLES

from launcher.backends.local import compile_cache_env, wants_compile_cache
from launcher.plan import build_plan
from launcher.spec import load_job


def planned(tmp_path, name, change=None):
    job = yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text())
    (change or (lambda j: None))(job)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(job))
    plan = build_plan(load_job(tmp_path / f"{name}.yaml"))
    plan.write(tmp_path / name / "plan")
    return plan, tmp_path / name


def test_only_a_job_that_asks_gets_the_cache(tmp_path):
    plain, _ = planned(tmp_path, "plain")
    asks, _ = planned(tmp_path, "asks", lambda j: j.update(env={"MS_COMPILER_CACHE_ENABLE": "1"}))
    assert not wants_compile_cache(plain) and wants_compile_cache(asks)


def test_the_folder_follows_the_graph_not_the_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCHER_CACHE", str(tmp_path / "cache"))
    _, base = planned(tmp_path, "base")
    _, moved = planned(tmp_path, "moved", lambda j: j.update(dataset={"path": "elsewhere/tiny.mindrecord"},
                                                            checkpoint={"load": "/some/base.ckpt"}))
    _, other = planned(tmp_path, "other", lambda j: j["lora"].update(rank=8))
    path = compile_cache_env(base)["MS_COMPILER_CACHE_PATH"]
    assert path.startswith(str(tmp_path / "cache" / "compile"))
    assert compile_cache_env(moved)["MS_COMPILER_CACHE_PATH"] == path
    assert compile_cache_env(other)["MS_COMPILER_CACHE_PATH"] != path

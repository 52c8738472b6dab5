"""`--set key=value` on render and up: the path, the YAML value, and errors that name the --set."""

import copy
import json

import pytest
import yaml
from conftest import EXAMPLES, free_port, only_run, run_launcher

from launcher.errors import ConfigError
from launcher.job_overrides import apply_overrides, parse_override
from launcher.runs import RunRecord
from launcher.schema import Strict
from launcher.spec import Job, parse_job

BASE = yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text())


def job(*sets, data=None):
    return parse_job(copy.deepcopy(data or BASE), "job.yaml", sets)


def error_of(*sets, data=None) -> str:
    with pytest.raises(ConfigError) as info:
        job(*sets, data=data)
    return str(info.value)


def applied(*sets, data=None) -> dict:
    return apply_overrides(data or BASE, [parse_override(s, Job) for s in sets])


# -- the path and the value ------------------------------------------------------------------------------

def test_values_are_yaml():
    assert parse_override("parallel.data_parallel=4", Job).value == 4
    assert parse_override('parallel.data_parallel="4"', Job).value == "4"
    assert parse_override("dataset.shuffle=true", Job).value is True
    assert parse_override("cluster.nodes[0].devices=[0,1]", Job).value == [0, 1]
    assert parse_override("lora={rank: 2, alpha: 4}", Job).value == {"rank": 2, "alpha": 4}
    assert parse_override("env.X=a=b", Job).value == "a=b"  # only the first '=' splits


def test_paths_walk_mappings_and_lists():
    assert parse_override("cluster.nodes[0].host=n2", Job).path == ("cluster", "nodes", 0, "host")
    assert parse_override("cluster.nodes[0].devices[1]=3", Job).path == ("cluster", "nodes", 0, "devices", 1)
    # secret_env maps names to sections: the name is one key, then the section's own keys
    assert parse_override("secret_env.TOKEN.from_env=T", Job).path == ("secret_env", "TOKEN", "from_env")


def test_a_free_mapping_takes_the_rest_of_the_path_as_one_key():
    assert parse_override("mindformers.overrides.runner_config.epochs=3", Job).path == (
        "mindformers", "overrides", "runner_config.epochs")
    assert parse_override("cluster.k8s.node_selector.kubernetes.io/arch=arm64", Job).path == (
        "cluster", "k8s", "node_selector", "kubernetes.io/arch")
    assert job("mindformers.overrides.runner_config.epochs=3").mindformers.overrides == {"runner_config.epochs": 3}


def test_sets_change_the_job():
    four = copy.deepcopy(BASE)
    four["cluster"]["nodes"][0]["devices"] = [0, 1, 2, 3]
    changed = job("parallel.data_parallel=4", data=four)
    assert changed.parallel.data_parallel == 4
    assert job("cluster.nodes[0].host=127.0.0.1").cluster.nodes[0].host == "127.0.0.1"
    assert job("cluster.nodes[0].devices[1]=3").cluster.nodes[0].devices == [0, 3]
    assert job("env.GLOG_v='3'").env == {"GLOG_v": "3"}
    assert job("lora.rank=2", "lora.rank=3").lora.rank == 3  # a later --set wins


def test_a_known_section_missing_from_the_file_is_created():
    data = copy.deepcopy(BASE)
    del data["lora"]
    assert applied("lora.rank=16", data=data)["lora"] == {"rank": 16}
    assert job("lora.rank=16", data=data).lora.rank == 16
    empty = {**copy.deepcopy(BASE), "lora": None}  # `lora:` with nothing under it
    assert job("lora.rank=16", data=empty).lora.rank == 16


def test_the_file_mapping_is_not_changed_and_yaml_anchors_are_not_shared():
    data = yaml.safe_load("a: &x {k: 1}\nb: *x\n")
    out = apply_overrides(data, [parse_override("a.k=2", _Free)])
    assert out == {"a": {"k": 2}, "b": {"k": 1}}
    assert data == {"a": {"k": 1}, "b": {"k": 1}}


class _Free(Strict):
    a: dict[str, int]
    b: dict[str, int]


# -- errors ----------------------------------------------------------------------------------------------

def test_unknown_keys_say_did_you_mean_and_name_the_set():
    assert error_of("paralel.data_parallel=4") == (
        "--set paralel.data_parallel=4: unknown key 'paralel'; did you mean 'parallel'?")
    assert error_of("parallel.data_paralel=4") == (
        "--set parallel.data_paralel=4: unknown key 'data_paralel' in parallel; did you mean 'data_parallel'?")
    assert error_of("cluster.nodes[0].hots=n2") == (
        "--set cluster.nodes[0].hots=n2: unknown key 'hots' in cluster.nodes[0]; did you mean 'host'?")
    assert error_of("zzz=1").startswith("--set zzz=1: unknown key 'zzz'; allowed keys: name, model, method")


def test_a_quoted_number_is_a_string_and_strict_validation_says_so():
    assert error_of('parallel.data_parallel="4"') == (
        "--set parallel.data_parallel=\"4\": parallel.data_parallel: Input should be a valid integer (got '4')")
    assert error_of("lora.rank=true") == "--set lora.rank=true: lora.rank: Input should be a valid integer (got True)"


def test_a_list_index_past_the_end_names_the_length():
    assert error_of("cluster.nodes[1].host=n2") == (
        "--set cluster.nodes[1].host=n2: index 1 is past the end of cluster.nodes, which has 1 item")
    assert error_of("cluster.nodes[0].devices[2]=3") == (
        "--set cluster.nodes[0].devices[2]=3: index 2 is past the end of cluster.nodes[0].devices, which has 2 items")


def test_paths_that_do_not_fit_the_job():
    assert error_of("name.x=1") == "--set name.x=1: name holds a value, not keys; set it as --set name=VALUE"
    assert error_of("cluster.nodes.host=x") == (
        "--set cluster.nodes.host=x: cluster.nodes is a list; pick an item, as in cluster.nodes[0].host")
    assert error_of("parallel[0]=1") == "--set parallel[0]=1: parallel is not a list, so it has no item [0]"
    assert error_of("lora.=1") == "--set lora.=1: an empty key in 'lora.'"
    data = {**copy.deepcopy(BASE), "parallel": 4}
    assert error_of("parallel.data_parallel=2", data=data) == (
        "--set parallel.data_parallel=2: parallel is 4 in the job file, not a mapping")


def test_malformed_sets():
    assert error_of("parallel.data_parallel") == (
        "--set parallel.data_parallel: give KEY=VALUE, e.g. --set parallel.data_parallel=4")
    assert error_of("=4") == "--set =4: the key before '=' is empty; give a path such as parallel.data_parallel"
    assert error_of("lora.rank=[1").startswith("--set lora.rank=[1: the value does not parse as YAML")


def test_a_cross_field_check_names_the_set_that_broke_it():
    assert error_of("cluster.nodes[0].devices=[0,9]") == (
        "--set cluster.nodes[0].devices=[0,9]: cluster.nodes[0].devices: device 9 is outside 0-7 on an "
        "8-device node; devices are numbered 0-7")
    assert error_of("parallel.data_parallel=3").startswith(
        "--set parallel.data_parallel=3: parallel: data_parallel × model_parallel × pipeline_stage = 3×1×1")


def test_an_error_in_a_field_no_set_gave_names_the_file():
    # method: full makes the file's own lora section wrong
    assert error_of("method=full") == "job.yaml (with --set): lora: a lora section only applies with method: lora"


# -- the command line ------------------------------------------------------------------------------------

def write_job(tmp_path, data=None) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data or BASE))
    return str(path)


def test_render_writes_the_overridden_mindformers_config(tmp_path):
    result = run_launcher("render", write_job(tmp_path), "-o", tmp_path / "out",
                          "--set", "mindformers.overrides.runner_config.epochs=3", "--set", "lora.rank=16")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load((tmp_path / "out" / "mindformers" / "run.yaml").read_text())
    assert cfg["runner_config"]["epochs"] == 3
    assert cfg["model"]["model_config"]["pet_config"]["lora_rank"] == 16


@pytest.mark.parametrize("sets, message", [
    (["paralel.data_parallel=4"], "error: --set paralel.data_parallel=4: unknown key 'paralel'; did you mean 'parallel'?"),
    (["cluster.nodes[0].devices=[0,8]"], "error: --set cluster.nodes[0].devices=[0,8]: cluster.nodes[0].devices: "
                                         "device 8 is outside 0-7 on an 8-device node; did you mean [0,8)?"),
    (['parallel.data_parallel="2"'], "error: --set parallel.data_parallel=\"2\": parallel.data_parallel: "
                                     "Input should be a valid integer (got '2')"),
    (["parallel.data_parallel"], "error: --set parallel.data_parallel: give KEY=VALUE"),
])
def test_render_reports_a_bad_set_on_one_line(tmp_path, sets, message):
    args = [a for s in sets for a in ("--set", s)]
    result = run_launcher("render", write_job(tmp_path), "-o", tmp_path / "out", *args)
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_up_refuses_a_set_on_a_rendered_directory(tmp_path):
    assert run_launcher("render", write_job(tmp_path), "-o", tmp_path / "out").returncode == 0
    result = run_launcher("up", tmp_path / "out", "--set", "lora.rank=2", "--runs-dir", tmp_path / "runs")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --set changes a job file; a rendered directory is already rendered"
    assert not (tmp_path / "runs").exists()


def test_up_dry_run_takes_sets(tmp_path):
    result = run_launcher("up", write_job(tmp_path), "--dry-run", "-o", tmp_path / "out", "--set", "lora.rank=5")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load((tmp_path / "out" / "mindformers" / "run.yaml").read_text())
    assert cfg["model"]["model_config"]["pet_config"]["lora_rank"] == 5


def test_help_explains_set():
    for command in ("render", "up"):
        text = run_launcher(command, "--help").stdout
        assert "--set KEY=VALUE" in text and "--set parallel.data_parallel=4" in text
        assert "mindformers.overrides.runner_config.epochs=3" in text


def test_an_old_run_json_without_overrides_still_loads(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(
        {"run_id": "r", "job_name": "j", "backend": "local", "state": "succeeded", "started": 0.0}))
    assert RunRecord.load(tmp_path).overrides == []


@pytest.mark.e2e
def test_up_records_its_sets_and_trains_with_them(tmp_path, tiny_dataset):
    import mindspore as ms

    data = copy.deepcopy(BASE)
    data["dataset"]["path"] = str(tiny_dataset)
    data["cluster"]["master_port"] = free_port()
    sets = ["lora.rank=2", "mindformers.overrides.runner_config.epochs=1"]
    result = run_launcher("up", write_job(tmp_path, data), *[a for s in sets for a in ("--set", s)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run(tmp_path)
    assert json.loads((run_dir / "run.json").read_text())["overrides"] == sets
    cfg = yaml.safe_load((run_dir / "plan" / "mindformers" / "run.yaml").read_text())
    assert cfg["model"]["model_config"]["pet_config"]["lora_rank"] == 2
    assert cfg["runner_config"]["epochs"] == 1
    # the rank reached training: the file says rank 4, the trained LoRA A matrices have 2 rows
    ckpt = next((run_dir / "ranks" / "rank_0" / "checkpoint").glob("*.ckpt"))
    shapes = [p.shape for n, p in ms.load_checkpoint(str(ckpt)).items() if "lora_a" in n]
    assert shapes and all(s[0] == 2 for s in shapes), shapes

"""Job-file validation: each bad input gets one clear message naming the field."""

import copy
import socket

import pytest
import yaml
from conftest import EXAMPLES, free_port, run_launcher

from launcher.errors import ConfigError
from launcher.job_sections import parse_devices
from launcher.spec import load_job, parse_job

BASE = yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text())


def job_with(**changes):
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        node[leaf] = value
    return data


def error_of(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_job(data, "job.yaml")
    return str(info.value)


def test_example_job_is_valid():
    job = parse_job(BASE)
    assert job.world_size == 2
    assert job.cluster.nodes[0].devices == [0, 1]


@pytest.mark.parametrize(
    "text, devices",
    [([3, 1], [3, 1]), ("0-3", [0, 1, 2, 3]), ("[0,8)", list(range(8))), ("[8, 16)", list(range(8, 16)))],
)
def test_device_notations(text, devices):
    assert parse_devices(text) == devices


def test_unknown_key_suggests_the_close_one():
    data = job_with(cluster__master_prot=9000)
    assert error_of(data) == "job.yaml: cluster.master_prot: unknown key 'master_prot'; did you mean 'master_port'?"


def test_unknown_top_level_key_lists_allowed_keys_when_nothing_is_close():
    message = error_of(job_with(zzz=1))
    assert message.startswith("job.yaml: zzz: unknown key 'zzz'; allowed keys: name, model, method")


def test_unknown_key_inside_a_node_names_its_index():
    data = job_with()
    data["cluster"]["nodes"][0]["device"] = [0, 1]
    assert "cluster.nodes[0].device: unknown key 'device'; did you mean 'devices'?" in error_of(data)


def test_wrong_type_names_field_and_value():
    message = error_of(job_with(parallel__data_parallel="two"))
    assert message.startswith("job.yaml: parallel.data_parallel: ")
    assert "'two'" in message


def test_parallel_product_must_equal_rank_count():
    message = error_of(job_with(parallel__data_parallel=4))
    assert "parallel: data_parallel × model_parallel × pipeline_stage = 4×1×1 = 4, but the cluster has 2 ranks" in message


def test_duplicate_device():
    data = job_with(parallel__data_parallel=3)
    data["cluster"]["nodes"][0]["devices"] = [0, 1, 1]
    assert "cluster.nodes[0].devices: device 1 is listed twice" in error_of(data)


def test_device_outside_node_suggests_half_open_range():
    data = job_with(parallel__data_parallel=9)
    data["cluster"]["nodes"][0]["devices"] = list(range(9))
    data["cluster"]["device"] = "ascend"
    assert error_of(data).endswith(
        "cluster.nodes[0].devices: device 8 is outside 0-7 on an 8-device node; did you mean [0,8)?"
    )


def test_duplicate_hosts():
    data = job_with(parallel__data_parallel=4)
    data["cluster"]["backend"] = "ssh"
    data["cluster"]["nodes"] = [{"host": "a", "devices": [0, 1]}, {"host": "a", "devices": [0, 1]}]
    assert "cluster.nodes[1].host: host 'a' is listed twice" in error_of(data)


def test_ranktable_on_ascend_needs_device_ips():
    data = job_with(parallel__data_parallel=2)
    data["cluster"].update(device="ascend", launch="ranktable", backend="local")
    data["cluster"]["nodes"] = [{"host": "10.0.0.1", "devices": [0, 1], "device_ips": ["192.168.0.1"]}]
    assert "cluster.nodes[0].device_ips: 1 device_ips for 2 devices" in error_of(data)
    data["cluster"]["nodes"][0].pop("device_ips")
    assert "cluster.nodes[0].device_ips: launch: ranktable on Ascend needs the device IPs" in error_of(data)
    # Over SSH they may be left out: the launcher reads them from the nodes.
    data["cluster"]["backend"] = "ssh"
    assert parse_job(data).cluster.nodes[0].device_ips is None
    # On Kubernetes MindCluster writes the table (rings-config) from the NPUs each pod was given.
    data["cluster"]["backend"] = "k8s"
    data["cluster"]["k8s"] = {"kind": "volcano-job", "pods": "per-rank"}
    assert parse_job(data).cluster.nodes[0].device_ips is None


def test_cpu_refuses_model_parallel():
    data = job_with(parallel__data_parallel=1, parallel__model_parallel=2)
    assert "MindSpore on CPU runs data parallel only" in error_of(data)


def test_unknown_model_suggests():
    assert "unknown model 'llama2-7b'; did you mean 'llama2_7b'?" in error_of(job_with(model="llama2-7b"))


# --- the same cases through the command line: exit 2, one line on stderr, nothing left behind ---


def write_job(tmp_path, data, name="job.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def assert_clean_failure(result, tmp_path, expected: str):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def job_env(tmp_path, tiny_dataset):
    """A valid job (with a real dataset and a free port) to break one field at a time."""
    data = job_with(dataset__path=str(tiny_dataset))
    data["cluster"]["master_port"] = free_port()
    return data


def test_cli_missing_job_file(tmp_path):
    result = run_launcher("up", tmp_path / "nope.yaml", cwd=tmp_path)
    assert_clean_failure(result, tmp_path, "nope.yaml: no such job file")


def test_cli_yaml_that_does_not_parse(tmp_path):
    path = write_job(tmp_path, "name: x\ncluster: [unclosed\n")
    assert_clean_failure(run_launcher("up", path, cwd=tmp_path), tmp_path, "YAML does not parse at line")


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"cluster__nodes__0__devcies": [0, 1]}, "did you mean 'devices'?"),
        ({"parallel__data_parallel": "two"}, "parallel.data_parallel"),
        ({"parallel__data_parallel": 4}, "but the cluster has 2 ranks"),
        ({"cluster__nodes__0__devices": [1, 1]}, "device 1 is listed twice"),
        ({"cluster__nodes__0__devices": [0, 8]}, "device 8 is outside 0-7"),
        ({"dataset__path": "no/such/file.mindrecord"}, "dataset.path: "),
    ],
)
def test_cli_bad_fields(tmp_path, job_env, change, expected):
    data = copy.deepcopy(job_env)
    for dotted, value in change.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[leaf] = value
    path = write_job(tmp_path, data)
    assert_clean_failure(run_launcher("up", path, cwd=tmp_path), tmp_path, expected)


def test_cli_port_in_use(tmp_path, job_env):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", job_env["cluster"]["master_port"]))
        holder.listen()
        path = write_job(tmp_path, job_env)
        result = run_launcher("up", path, cwd=tmp_path)
    assert_clean_failure(result, tmp_path, f"cluster.master_port: port {job_env['cluster']['master_port']} is in use")


def test_cli_dry_run_writes_artifacts_and_starts_nothing(tmp_path, job_env):
    path = write_job(tmp_path, job_env)
    result = run_launcher("up", path, "--dry-run", "-o", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "nodes" / "node-0" / "launch.sh").is_file()
    assert "output/msrun_log/worker_1.log" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_checkpoint_auto_trans_needs_ascend(tmp_path):
    job = yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text())
    job["checkpoint"] = {"load": "base.ckpt", "auto_trans": True}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError, match=r"checkpoint.auto_trans: needs Ascend"):
        load_job(path)


def test_data_on_kubernetes_needs_the_claim(tmp_path):
    job = yaml.safe_load((EXAMPLES / "tiny-lora-k8s.yaml").read_text())
    del job["dataset"]
    job["cluster"]["k8s"].pop("output_pvc", None)
    job["data"] = {"source": "rows.json", "format": "alpaca", "tokenizer": "tokenizer.model"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError, match=r"data: on Kubernetes .* set cluster.k8s.output_pvc"):
        load_job(path)

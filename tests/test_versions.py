"""What a run ran with (run.json versions): the launcher's side at the start, each rank's report folded
per node at gather, the difference warning of `launcher status`, and one real tiny run.

The Ascend version files below are written by hand from these sources:
- mindformers 1.8.0 wheel, mindformers/run_check.py: reads $ASCEND_HOME_PATH (default
  /usr/local/Ascend/ascend-toolkit/latest)/<platform.machine()>-linux/ascend_toolkit_install.info and
  /usr/local/Ascend/driver/version.info.
- Ascend/mind-cluster, MindCluster Ascend FaultDiag "Collecting Logs" (npu_info_before.txt), which prints
  `cat /usr/local/Ascend/driver/version.info` (Version=24.1.rc1, ascendhal_version=, ..., Innerversion=,
  compatible_version=, compatible_version_fw=) and `cat /usr/local/Ascend/cann/aarch64-linux/
  ascend_toolkit_install.info` (package_name=Ascend-cann-toolkit, version=8.5.0, innerversion=,
  compatible_version=, arch=, os=, path=).
- <toolkit>/version.cfg of older toolkits: "# version: 1.0" then <component>_running_version=[inner:release]
  lines, e.g. toolkit_running_version=[7.6.0.1.220:8.0.0], as public CANN 8.0.0 install notes print it.
"""

import ast
import hashlib
import importlib.metadata
import json
import platform
import socket
import subprocess

import pytest
import yaml
from conftest import EXAMPLES, run_launcher

from launcher import gather, run_versions
from launcher.entrypoints import finetune
from launcher.plan import build_plan
from launcher.runs import RunRecord
from launcher.spec import parse_job

DRIVER_VERSION_INFO = """\
Version=24.1.rc1
ascendhal_version=7.35.19
aicpu_version=1.0
tdt_version=1.0
log_version=1.0
prof_version=2.0
dvppkernels_version=1.1
tsfw_version=1.0
Innerversion=V100R001C15SPC006B220
compatible_version=[V100R001C30],[V100R001C13],[V100R001C15],[V100R001C17]
compatible_version_fw=[7.0.0,7.2.99]
"""

TOOLKIT_INSTALL_INFO = """\
package_name=Ascend-cann-toolkit
version=8.5.0
innerversion=V100R001C25SPC001B212
compatible_version=[V100R001C15],[V100R001C18],[V100R001C19],[V100R001C20],[V100R001C21],[V100R001C23]
arch=aarch64
os=linux
path=/usr/local/Ascend/cann-8.5.0/aarch64-linux
"""

VERSION_CFG = """\
# version: 1.0
runtime_running_version=[7.6.0.1.220:8.0.0]
compiler_running_version=[7.6.0.1.220:8.0.0]
hccl_running_version=[7.6.0.1.220:8.0.0]
opp_running_version=[7.6.0.1.220:8.0.0]
toolkit_running_version=[7.6.0.1.220:8.0.0]
aoe_running_version=[7.6.0.1.220:8.0.0]
"""


def tiny_plan():
    return build_plan(parse_job(yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text())))


def report(ms="2.7.2", host="n0", **more):
    return {"python": "3.11.7", "mindspore": ms, "mindformers": "1.8.0", "hostname": host, **more}


# --- folding the ranks' reports, and the difference warning ---------------------------------------

def test_ranks_fold_into_one_entry_per_node():
    nodes = run_versions.fold({0: report(), 1: report(), 2: report(host="n1"), 3: report(host="n1")},
                              {0: 0, 1: 0, 2: 1, 3: 1})
    assert nodes == {
        "0": {"ranks": [0, 1], "host": "n0", "python": "3.11.7", "mindspore": "2.7.2", "mindformers": "1.8.0"},
        "1": {"ranks": [2, 3], "host": "n1", "python": "3.11.7", "mindspore": "2.7.2", "mindformers": "1.8.0"},
    }
    assert run_versions.mismatches(nodes) == []


def test_a_difference_between_nodes_names_the_field_and_the_nodes():
    nodes = run_versions.fold({0: report(cann="8.5.0"), 1: report("2.6.0", "n1", cann="8.5.0"),
                               2: report(host="n2", cann="8.5.0")}, {0: 0, 1: 1, 2: 2})
    assert run_versions.mismatches(nodes) == ["mindspore differs between nodes: 2.7.2 on nodes 0, 2, 2.6.0 on node 1"]
    lines = run_versions.summary_lines({"launcher": "0.1.0", "nodes": nodes})
    assert lines == ["versions: launcher 0.1.0",
                     "nodes (3 nodes): python 3.11.7, mindspore 2.7.2 | 2.6.0, mindformers 1.8.0, cann 8.5.0"]


def test_a_field_one_node_did_not_find_is_a_difference_and_ranks_of_a_node_that_disagree_show_both():
    nodes = run_versions.fold({0: report(driver="25.5.0"), 1: report("2.6.0"), 2: report(host="n1")},
                              {0: 0, 1: 0, 2: 1})
    assert nodes["0"]["mindspore"] == "2.7.2 / 2.6.0"
    assert run_versions.mismatches(nodes) == [
        "mindspore differs between nodes: 2.7.2 / 2.6.0 on node 0, 2.7.2 on node 1",
        "driver differs between nodes: 25.5.0 on node 0, not found on node 1",
    ]


def test_the_start_fields_show_in_one_line():
    versions = {"launcher": "0.1.0", "job_sha256": "ab" * 32, "git_commit": "c0ffee" * 6 + "abcd+dirty",
                "image": "registry.example/mf:1.8.0"}
    assert run_versions.summary_lines(versions) == [
        "versions: launcher 0.1.0, job sha256 abababababab, git c0ffeec0ffee+dirty, image registry.example/mf:1.8.0"]
    assert run_versions.summary_lines({}) == []


def test_status_prints_the_versions_and_warns_when_nodes_differ(tmp_path):
    plan = tiny_plan()
    run_dir = tmp_path / "runs" / "tiny-lora-20261201-000000"
    plan.write(run_dir / "plan")
    nodes = {"0": {"ranks": [0], "python": "3.11.7", "mindspore": "2.7.2"},
             "1": {"ranks": [1], "python": "3.11.7", "mindspore": "2.6.0"}}
    RunRecord(run_dir.name, "tiny-lora", "local", "succeeded", 1_796_000_000.0, 1_796_000_060.0, exit_code=0,
              versions={"launcher": "0.1.0", "nodes": nodes}).save(run_dir)
    result = run_launcher("status", run_dir.name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "versions: launcher 0.1.0" in result.stdout
    assert "nodes (2 nodes): python 3.11.7, mindspore 2.7.2 | 2.6.0" in result.stdout
    assert "warning: mindspore differs between nodes: 2.7.2 on node 0, 2.6.0 on node 1" in result.stderr


# --- gather: the files, the manifest, run.json ------------------------------------------------------

def test_gather_maps_each_ranks_versions_file_and_folds_them_into_run_json(tmp_path):
    plan = tiny_plan()
    paths = ["output/launcher/rank_0.versions.json", "output/launcher/rank_1.versions.json",
             "output/launcher/rank_0.pid", "output/launcher/.rank_1.versions.json.tmp"]
    wanted = {(w.rank, w.source, w.dest) for w in gather.wanted_from_paths(plan, paths)}
    assert wanted == {(0, paths[0], "ranks/rank_0/versions.json"), (1, paths[1], "ranks/rank_1/versions.json")}

    record = RunRecord("r", "tiny-lora", "local", "succeeded", 0.0, versions={"launcher": "0.1.0"})
    record.save(tmp_path)
    for rank in (0, 1):
        dest = tmp_path / "ranks" / f"rank_{rank}" / "versions.json"
        dest.parent.mkdir(parents=True)
        dest.write_text(json.dumps(report(host="vm")))
    gather.record_node_versions(plan, tmp_path, record)
    saved = RunRecord.load(tmp_path).versions
    assert saved["launcher"] == "0.1.0"
    assert saved["nodes"] == {"0": {"ranks": [0, 1], "host": "vm", "python": "3.11.7", "mindspore": "2.7.2",
                                    "mindformers": "1.8.0"}}
    assert {"ranks/rank_0/versions.json", "ranks/rank_1/versions.json"} <= set(gather.manifest_entries(tmp_path))


def test_a_pods_console_line_stands_in_for_a_versions_file_that_was_not_gathered(tmp_path):
    (tmp_path / "console.log").write_text("[WARNING] something\n" + finetune.VERSIONS_MARK
                                          + json.dumps(report()) + "\nstep 1\n")
    assert finetune.VERSIONS_MARK == run_versions.CONSOLE_MARK
    assert run_versions.read_rank(tmp_path) == report()
    (tmp_path / "versions.json").write_text(json.dumps(report("2.6.0")))
    assert run_versions.read_rank(tmp_path)["mindspore"] == "2.6.0"  # the file comes first
    assert run_versions.read_rank(tmp_path / "missing") is None


def test_an_older_run_json_without_versions_still_loads(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({
        "run_id": "old", "job_name": "tiny-lora", "backend": "local", "state": "succeeded", "started": 1.0,
        "finished": 2.0, "exit_code": 0, "failed_rank": None, "leader_pid": None, "message": "", "overrides": []}))
    assert RunRecord.load(tmp_path).versions == {}


# --- the start: job sha256, git commit, image -----------------------------------------------------

def git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args], cwd=cwd,
                   check=True, capture_output=True, timeout=30)


def test_the_git_commit_of_the_job_file_and_dirty_when_it_changed(tmp_path):
    repo = tmp_path / "repo"
    (repo / "jobs").mkdir(parents=True)
    job = repo / "jobs" / "job.yaml"
    job.write_text("name: a\n")
    git(repo, "init", "-q")
    git(repo, "add", "jobs/job.yaml")
    git(repo, "commit", "-q", "-m", "job")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert run_versions.git_commit(job) == head
    (repo / "jobs" / "other.yaml").write_text("name: b\n")  # another file's state does not matter
    assert run_versions.git_commit(job) == head
    assert run_versions.git_commit(repo / "jobs" / "other.yaml") == head + "+dirty"  # not in the commit
    job.write_text("name: changed\n")
    assert run_versions.git_commit(job) == head + "+dirty"

    outside = tmp_path / "outside" / "job.yaml"
    outside.parent.mkdir()
    outside.write_text("name: a\n")
    assert run_versions.git_commit(outside) is None


def test_no_git_means_no_commit_and_no_error(tmp_path, monkeypatch):
    job = tmp_path / "job.yaml"
    job.write_text("name: a\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert run_versions.git_commit(job) is None


def test_the_job_sha256_is_of_the_file_or_of_a_rendered_plans_plan_json(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text((EXAMPLES / "tiny-lora-local.yaml").read_text() + "# a comment changes the hash\n")
    plan = tiny_plan()
    found = run_versions.at_start(plan, str(job))
    assert found["job_sha256"] == hashlib.sha256(job.read_bytes()).hexdigest()
    assert found["launcher"] == importlib.metadata.version("launcher")
    assert "git_commit" not in found and "image" not in found  # not in a repository; the ranks run on the host

    plan.write(tmp_path / "rendered")
    found = run_versions.at_start(plan, str(tmp_path / "rendered"))
    assert found["job_sha256"] == hashlib.sha256((tmp_path / "rendered" / "plan.json").read_bytes()).hexdigest()


def test_the_image_is_recorded_when_the_ranks_run_in_one():
    job = parse_job(yaml.safe_load((EXAMPLES / "tiny-lora-k8s.yaml").read_text()))
    plan = build_plan(job)
    assert run_versions.image_of(plan) == job.image.reference


# --- the rank's side: entrypoints/finetune.py -------------------------------------------------------

def test_the_entrypoint_imports_nothing_of_the_launcher():
    tree = ast.parse(open(finetune.__file__).read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [n for n in names if n.split(".")[0] == "launcher"]


def test_the_driver_version_is_the_version_line_of_version_info(tmp_path):
    path = tmp_path / "version.info"
    path.write_text(DRIVER_VERSION_INFO)
    assert finetune.driver_version(str(path)) == "24.1.rc1"
    path.write_text("ascendhal_version=7.35.19\n")
    assert finetune.driver_version(str(path)) is None
    assert finetune.driver_version(str(tmp_path / "missing")) is None


def test_the_cann_version_from_the_toolkit_install_info_or_version_cfg(tmp_path, monkeypatch):
    new, old = tmp_path / "cann", tmp_path / "ascend-toolkit" / "latest"
    (new / "aarch64-linux").mkdir(parents=True)
    (new / "aarch64-linux" / "ascend_toolkit_install.info").write_text(TOOLKIT_INSTALL_INFO)
    old.mkdir(parents=True)
    (old / "version.cfg").write_text(VERSION_CFG)
    assert finetune.cann_version((str(new),), arch="aarch64") == "8.5.0"
    assert finetune.cann_version((str(new),), arch="x86_64") is None  # another machine's file
    assert finetune.cann_version((str(old),), arch="aarch64") == "8.0.0"
    assert finetune.cann_version((str(tmp_path / "none"), str(old)), arch="aarch64") == "8.0.0"
    (old / "version.cfg").write_text("toolkit_running_version=[8.3.RC2]\n")  # no inner version
    assert finetune.cann_version((str(old),), arch="aarch64") == "8.3.RC2"
    # $ASCEND_HOME_PATH, which the toolkit's set_env.sh sets, before the default places
    monkeypatch.setenv("ASCEND_HOME_PATH", str(new))
    assert finetune.cann_version(arch="aarch64") == "8.5.0"


def test_a_rank_records_what_it_found_and_never_fails_for_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    finetune.write_versions("1")
    written = json.loads((tmp_path / "output" / "launcher" / "rank_1.versions.json").read_text())
    assert written == {"python": platform.python_version(), "hostname": socket.gethostname(),
                       "mindspore": importlib.metadata.version("mindspore"),
                       "mindformers": importlib.metadata.version("mindformers")}  # no Ascend files here
    assert finetune.VERSIONS_MARK + json.dumps(written, sort_keys=True) in capsys.readouterr().out

    (tmp_path / "output").rename(tmp_path / "kept")
    (tmp_path / "output").write_text("a file where the folder would go\n")
    finetune.write_versions("1")  # cannot write: says so and goes on
    assert "could not record the versions" in capsys.readouterr().err


# --- one real run -----------------------------------------------------------------------------------

@pytest.mark.e2e
def test_a_real_run_records_its_versions(tmp_path, tiny_run):
    run_dir, job = tiny_run, tmp_path / "job.yaml"  # the job file the run was started with

    versions = json.loads((run_dir / "run.json").read_text())["versions"]
    assert versions["launcher"] == importlib.metadata.version("launcher")
    assert versions["job_sha256"] == hashlib.sha256(job.read_bytes()).hexdigest()
    assert "git_commit" not in versions and "image" not in versions
    assert versions["nodes"] == {"0": {
        "ranks": [0, 1], "host": socket.gethostname(), "python": platform.python_version(),
        "mindspore": importlib.metadata.version("mindspore"), "mindformers": importlib.metadata.version("mindformers"),
    }}
    manifest = json.loads((run_dir / "manifest.json").read_text())["files"]
    assert {"ranks/rank_0/versions.json", "ranks/rank_1/versions.json"} <= set(manifest)
    assert gather.verify_manifest(run_dir) == []

    status = run_launcher("status", run_dir.name, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert f"versions: launcher {versions['launcher']}, job sha256 {versions['job_sha256'][:12]}" in status.stdout
    assert (f"nodes (1 node): python {platform.python_version()}, mindspore {versions['nodes']['0']['mindspore']}, "
            f"mindformers {versions['nodes']['0']['mindformers']}") in status.stdout
    assert "warning" not in status.stderr

"""Ascend preflight against fake `npu-smi` and `hccn_tool` that print the real tools' formats.

The fixtures are written here. Their layout follows the public documentation:
- `npu-smi info`: the device table ("NPU Name | Health | Power(W) Temp(C) Hugepages-Usage(page)",
  then "Chip | Bus-Id | AICore(%) Memory-Usage(MB) HBM-Usage(MB)") and the process table
  ("NPU Chip | Process id | Process name | Process memory(MB)", or
  "No running processes found in NPU N"): hiascend.com npu-smi reference, "查询基本信息"
  (https://www.hiascend.com/document/detail/zh/Atlas%20200I%20A2/2520/re/npu/npusmi_007.html,
  field list in .../Atlas%20300I%20Pro%20Inference%20Card/300Ipro_015.html).
- `hccn_tool -i N -net_health -g`: "net health status: Success" or "net health status: Fault"
  (MindSpore tutorial "rank table Startup", mindspore-ai/docs tutorials/source_en/parallel/rank_table.md).
- driver/version.info and <toolkit>/<arch>-linux/ascend_toolkit_install.info: see tests/test_ascend_versions.py.
"""

import os
from pathlib import Path

import pytest
from conftest import EXAMPLES, run_launcher
from test_ascend_versions import driver_version_info, toolkit_install_info

from launcher import ascend

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
TWO_NODES = EXAMPLES / "qwen1_5-7b-full-2x8-msrun.yaml"  # 2 × 8 devices on Ascend
ONE_NODE = EXAMPLES / "llama2-7b-lora-1x8-ranktable.yaml"  # 1 × 8 devices on Ascend
TINY_CPU = EXAMPLES / "tiny-lora-local.yaml"

ROW = "+===========================+===============+====================================================+"
LINE = "+---------------------------+---------------+----------------------------------------------------+"


def npu_smi_info(npus=range(8), holders: dict[int, list[int]] | None = None) -> str:
    """`npu-smi info` of an 8-NPU Atlas 800T A2 (910B3) with the given processes on the NPUs."""
    holders = holders or {}
    lines = [
        "+------------------------------------------------------------------------------------------------+",
        "| npu-smi 24.1.rc2                 Version: 24.1.rc2                                             |",
        LINE,
        "| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|",
        "| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |",
        ROW,
    ]
    for n in npus:
        hbm = "40112/ 65536" if n in holders else "3412 / 65536"
        lines += [
            f"| {n:<5} {'910B3':<19} | {'OK':<13} | {92.6 + n:<11.1f} {36 + n:<17} {'0    / 0':<21}|",
            f"| {0:<25} | {f'0000:{0xC1 + n:02X}:00.0':<13} | {0:<11} {'0    / 0':<17} {hbm:<21}|",
            ROW,
        ]
    lines += [
        LINE,
        "| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |",
        ROW,
    ]
    for n in npus:
        if n in holders:
            lines += [f"| {n:<7} {0:<17} | {pid:<13} | {'python3':<24} | {36700:<23} |" for pid in holders[n]]
        else:
            lines.append(f"| {'No running processes found in NPU ' + str(n):<94} |")
        lines.append(ROW)
    return "\n".join(lines) + "\n"


FAKE_NPU_SMI = """#!/usr/bin/env bash
# Fake npu-smi: prints npu-smi.out beside it for "npu-smi info".
{sleep}
[ "$1" = "info" ] && cat "$(dirname "$0")/npu-smi.out"
"""

FAKE_HCCN_TOOL = """#!/usr/bin/env bash
# Fake hccn_tool: answers "-i N -net_health -g" from the file health_N beside it.
if [ "$3" = "-net_health" ] && [ -f "$(dirname "$0")/health_$2" ]; then
  cat "$(dirname "$0")/health_$2"
  exit 0
fi
echo "unsupported: $*" >&2
exit 1
"""


class Node:
    """A fake Ascend node: tools on PATH, a driver directory and a CANN toolkit, all under tmp_path.

    Its versions are the ones MindSpore 2.7.2 (the test environment's) runs on: CANN 8.5.0, driver 25.5.0
    (mindspore-lab/mindformers README.md at r1.8.0, version table)."""

    def __init__(self, tmp_path: Path, driver: str = "25.5.0", cann: str = "8.5.0"):
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.driver = tmp_path / "Ascend" / "driver"
        self.driver.mkdir(parents=True)
        (self.driver / "version.info").write_text(driver_version_info(driver))
        self.toolkit = tmp_path / "Ascend" / "ascend-toolkit" / "latest"
        arch_dir = self.toolkit / f"{os.uname().machine}-linux"
        arch_dir.mkdir(parents=True)
        (arch_dir / "ascend_toolkit_install.info").write_text(toolkit_install_info(cann, os.uname().machine))

    def npu_smi(self, text: str, sleep: int = 0) -> "Node":
        self._tool("npu-smi", FAKE_NPU_SMI.format(sleep=f"sleep {sleep}" if sleep else ""))
        (self.bin / "npu-smi.out").write_text(text)
        return self

    def hccn_tool(self, health: dict[int, str]) -> "Node":
        self._tool("hccn_tool", FAKE_HCCN_TOOL)
        for dev, status in health.items():
            (self.bin / f"health_{dev}").write_text(f"net health status: {status}\n")
        return self

    def _tool(self, name: str, text: str) -> None:
        (self.bin / name).write_text(text)
        (self.bin / name).chmod(0o755)

    @property
    def env(self) -> dict:
        return {**os.environ, "PATH": f"{self.bin}:{SYSTEM_PATH}"}

    def preflight(self, monkeypatch, devices=range(8), multi_node=True, timeout=10.0, **versions) -> list[str]:
        monkeypatch.setenv("PATH", self.env["PATH"])
        return ascend.preflight(list(devices), multi_node, ascend.local_runner(timeout), str(self.driver),
                                (str(self.toolkit),), **versions)

    def cli(self, *args):
        return run_launcher("preflight", *args, "--driver-dir", self.driver, "--toolkit-dir", self.toolkit,
                            env=self.env)


HEALTHY = {d: "Success" for d in range(8)}


def test_parse_npu_smi_finds_npus_and_their_processes():
    npus, holders = ascend.parse_npu_smi(npu_smi_info(range(8), {2: [1333928], 6: [3085960, 3085961]}))
    assert npus == set(range(8))
    assert holders == {2: [1333928], 6: [3085960, 3085961]}


def test_parse_npu_smi_of_nothing():
    assert ascend.parse_npu_smi("dcmi model initialized failed, because the device is used. ret is -8020\n") == \
        (set(), {})


def test_preflight_passes(tmp_path, monkeypatch):
    node = Node(tmp_path).npu_smi(npu_smi_info()).hccn_tool(HEALTHY)
    assert node.preflight(monkeypatch) == []


def test_single_node_does_not_check_net_health(tmp_path, monkeypatch):
    node = Node(tmp_path).npu_smi(npu_smi_info()).hccn_tool({d: "Fault" for d in range(8)})
    assert node.preflight(monkeypatch, multi_node=False) == []


def test_devices_held_by_other_jobs_on_devices_not_asked_for_are_fine(tmp_path, monkeypatch):
    node = Node(tmp_path).npu_smi(npu_smi_info(range(8), {6: [4242], 7: [4243]})).hccn_tool(HEALTHY)
    assert node.preflight(monkeypatch, devices=range(4)) == []


def test_driver_missing(tmp_path, monkeypatch):
    node = Node(tmp_path).npu_smi(npu_smi_info()).hccn_tool(HEALTHY)
    (node.driver / "version.info").unlink()
    node.driver.rmdir()
    assert node.preflight(monkeypatch) == [
        f"{node.driver} is missing; install the Ascend NPU driver "
        f"(in a container: mount it from the host with hostPath {node.driver})"]


def test_npu_smi_missing(tmp_path, monkeypatch):
    node = Node(tmp_path).hccn_tool(HEALTHY)
    assert node.preflight(monkeypatch) == [
        "npu-smi not found on PATH; install the Ascend NPU driver, which ships npu-smi "
        "(in a container: mount /usr/local/bin/npu-smi from the host)"]


def test_npu_smi_lists_no_npu(tmp_path, monkeypatch):
    node = Node(tmp_path).npu_smi("").hccn_tool(HEALTHY)
    assert node.preflight(monkeypatch) == [
        "npu-smi info lists no NPU; check that the driver is loaded and /dev/davinci* exist "
        "(in a container: request the NPUs through the device plugin)"]


def test_npu_smi_that_hangs_is_stopped(tmp_path, monkeypatch):
    node = Node(tmp_path).npu_smi(npu_smi_info(), sleep=30).hccn_tool(HEALTHY)
    assert node.preflight(monkeypatch, timeout=0.5) == [
        "'npu-smi info' did not answer before the timeout; the driver may be stuck (check 'dmesg')"]


def test_device_not_on_this_node(tmp_path, monkeypatch):
    node = Node(tmp_path).npu_smi(npu_smi_info(range(4))).hccn_tool(HEALTHY)
    problems = node.preflight(monkeypatch, devices=[0, 5, 6], multi_node=False)
    assert problems == [
        "device 5: npu-smi info does not list it (it lists 0, 1, 2, 3); use devices of this node in "
        "cluster.nodes[].devices",
        "device 6: npu-smi info does not list it (it lists 0, 1, 2, 3); use devices of this node in "
        "cluster.nodes[].devices",
    ]


def test_device_held_by_another_process(tmp_path, monkeypatch):
    node = Node(tmp_path).npu_smi(npu_smi_info(range(8), {2: [1333928], 5: [77, 78]})).hccn_tool(HEALTHY)
    assert node.preflight(monkeypatch) == [
        "device 2: held by process 1333928 (npu-smi info); stop it ('kill 1333928') or use a free device",
        "device 5: held by process 77, 78 (npu-smi info); stop it ('kill 77') or use a free device",
    ]


def test_net_health_fault(tmp_path, monkeypatch):
    node = Node(tmp_path).npu_smi(npu_smi_info()).hccn_tool({**HEALTHY, 3: "Fault", 6: "Receive timeout"})
    assert node.preflight(monkeypatch) == [
        "device 3: net health status is 'Fault'; check the link with 'hccn_tool -i 3 -link -g' and the detect "
        "address with 'hccn_tool -i 3 -netdetect -g' (set it to the gateway with "
        "'hccn_tool -i 3 -netdetect -s address GATEWAY')",
        "device 6: net health status is 'Receive timeout'; check the link with 'hccn_tool -i 6 -link -g' and the "
        "detect address with 'hccn_tool -i 6 -netdetect -g' (set it to the gateway with "
        "'hccn_tool -i 6 -netdetect -s address GATEWAY')",
    ]


def test_net_health_not_answered(tmp_path, monkeypatch):
    node = Node(tmp_path).npu_smi(npu_smi_info()).hccn_tool({d: "Success" for d in range(7)})
    assert node.preflight(monkeypatch) == ["device 7: 'hccn_tool -i 7 -net_health -g' exited 1: unsupported: "
                                           "-i 7 -net_health -g"]


def test_hccn_tool_missing_on_a_multi_node_job(tmp_path, monkeypatch):
    node = Node(tmp_path).npu_smi(npu_smi_info())
    assert node.preflight(monkeypatch) == [
        "hccn_tool not found on PATH; add the driver's tools (/usr/local/Ascend/driver/tools) to PATH"]


def test_cann_the_installed_mindspore_does_not_run_on(tmp_path, monkeypatch):
    """This environment's python has MindSpore 2.7.2, which runs on CANN 8.5 only (its AscendEnvChecker)."""
    node = Node(tmp_path, cann="8.3.RC1").npu_smi(npu_smi_info()).hccn_tool(HEALTHY)
    assert node.preflight(monkeypatch) == [
        "CANN 8.3.RC1 is installed, but MindSpore 2.7.2 runs on CANN 8.5.0; install CANN 8.5.0 (toolkit and "
        "ops packages), or MindSpore 2.7.1, which runs on CANN 8.3.RC1"]


def test_driver_older_than_the_cann_needs(tmp_path, monkeypatch):
    node = Node(tmp_path, driver="25.3.rc1").npu_smi(npu_smi_info()).hccn_tool(HEALTHY)
    assert node.preflight(monkeypatch) == [
        "Ascend driver 25.3.rc1 is older than the 25.5.0 that CANN 8.5.0 needs; upgrade the NPU driver and "
        "firmware to Ascend HDK 25.5.0 or later"]


def test_missing_version_files_are_reported_with_the_other_problems(tmp_path, monkeypatch):
    node = Node(tmp_path).npu_smi(npu_smi_info(range(8), {3: [99]}))
    (node.driver / "version.info").unlink()
    info = node.toolkit / f"{os.uname().machine}-linux" / "ascend_toolkit_install.info"
    info.unlink()
    problems = node.preflight(monkeypatch, multi_node=False)
    assert problems[0].startswith("device 3: held by process 99")
    assert problems[1].startswith(f"{node.driver}/version.info is missing; reinstall the Ascend NPU driver")
    assert problems[2].startswith(f"no CANN toolkit version found (none of {info}, {node.toolkit}/version.cfg "
                                  "gives one); install the CANN toolkit")
    assert len(problems) == 3


# --- launcher preflight JOB -------------------------------------------------------------------

def test_cli_passes(tmp_path):
    node = Node(tmp_path).npu_smi(npu_smi_info()).hccn_tool(HEALTHY)
    result = node.cli(TWO_NODES, "--node", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "preflight passed on node 1 (10.0.0.10): devices 0, 1, 2, 3, 4, 5, 6, 7\n"


def test_cli_single_node_job_needs_no_node_index(tmp_path):
    node = Node(tmp_path).npu_smi(npu_smi_info())
    result = node.cli(ONE_NODE)
    assert result.returncode == 0, result.stderr
    assert "preflight passed on node 0 (10.0.0.11)" in result.stdout


def test_cli_reports_every_failure_together(tmp_path):
    node = Node(tmp_path).npu_smi(npu_smi_info(range(8), {4: [5150]})).hccn_tool({**HEALTHY, 1: "Fault"})
    (node.driver / "version.info").unlink()
    node.driver.rmdir()
    result = node.cli(TWO_NODES, "--node", "0")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "preflight failed on node 0 (10.0.0.9): 3 problem(s)"
    assert lines[1].startswith(f"  {node.driver} is missing; install the Ascend NPU driver")
    assert lines[2].startswith("  device 4: held by process 5150 (npu-smi info)")
    assert lines[3].startswith("  device 1: net health status is 'Fault'")
    assert len(lines) == 4


def test_cli_refuses_versions_that_do_not_go_together(tmp_path):
    node = Node(tmp_path, driver="24.1.0", cann="8.3.RC1").npu_smi(npu_smi_info())
    result = node.cli(ONE_NODE)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "preflight failed on node 0 (10.0.0.11): 2 problem(s)",
        "  CANN 8.3.RC1 is installed, but MindSpore 2.7.2 runs on CANN 8.5.0; install CANN 8.5.0 (toolkit and "
        "ops packages), or MindSpore 2.7.1, which runs on CANN 8.3.RC1",
        "  Ascend driver 24.1.0 is older than the 25.3.RC1 that CANN 8.3.RC1 needs; upgrade the NPU driver and "
        "firmware to Ascend HDK 25.3.RC1 or later",
    ]


def test_cli_checks_the_mindspore_of_the_python_given(tmp_path):
    node = Node(tmp_path).npu_smi(npu_smi_info())
    python = tmp_path / "job-python"
    python.write_text("#!/usr/bin/env bash\n# Stands for a python whose MindSpore is 2.4.10.\necho 2.4.10\n")
    python.chmod(0o755)
    result = node.cli(ONE_NODE, "--python", python)
    assert result.returncode == 1
    assert ("  CANN 8.5.0 is installed, but MindSpore 2.4.10 runs on CANN 8.0.0; install CANN 8.0.0 (toolkit and "
            "ops packages), or MindSpore 2.7.2, which runs on CANN 8.5.0") in result.stderr.splitlines()


def test_cli_cpu_job_has_nothing_to_check():
    result = run_launcher("preflight", TINY_CPU)
    assert result.returncode == 0, result.stderr
    assert "cluster.device is cpu: there is no Ascend preflight to run" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--node", "2"], "--node: 2 is not a node of this job (0-1)"),
    ([], "cannot tell which node of cluster.nodes this machine is; pass --node INDEX"),
])
def test_cli_node_choice(tmp_path, args, message):
    result = run_launcher("preflight", TWO_NODES, *args, env={**os.environ, "PATH": SYSTEM_PATH})
    assert result.returncode == 2
    assert message in result.stderr


def test_local_up_on_ascend_runs_the_preflight_first(tmp_path):
    """`launcher up` with device ascend on the local backend stops at the preflight here (no NPU driver)."""
    import yaml
    from conftest import EXAMPLES, free_port, run_launcher

    data = yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text())
    data["cluster"].update(device="ascend", master_port=free_port())
    dataset = tmp_path / "tiny.mindrecord"
    dataset.write_bytes(b"placeholder: the preflight fails before anything reads it")
    data["dataset"]["path"] = str(dataset)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(data))
    result = run_launcher("up", job, cwd=tmp_path)
    assert result.returncode == 1
    assert "preflight failed on this machine; nothing was started" in result.stderr
    assert "/usr/local/Ascend/driver is missing" in result.stderr
    assert not (tmp_path / "runs").exists()

"""`launcher ranktable discover|merge|build|validate` as a user runs them, and the wait script.

The fake hccn_tool prints what the real one does for `hccn_tool -i N -ip -g`: an `ipaddr:IP` line
and a `netmask:MASK` line (the format mindspore-ai/models utils/hccl_tools/hccl_tools.py parses;
also shown in MindSpore's "rank table Startup" tutorial, mindspore-ai/docs
tutorials/source_en/parallel/rank_table.md, which documents the `address_N=IP` lines of /etc/hccn.conf).
"""

import json
import os
import subprocess
import time
from pathlib import Path

from click.testing import CliRunner
from conftest import require_tool, run_launcher

from launcher import ascend, ranktable
from launcher.cli.main import main
from launcher.ranktable import ServerDevices, single_node_table
from launcher.render import to_json

GOLDEN_V12 = Path(__file__).parent / "golden" / "ranktable-v1.2"
INVENTORIES = Path(__file__).parent / "data" / "ranktable"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"

FAKE_HCCN_TOOL = """#!/usr/bin/env bash
# Fake hccn_tool: answers "-i N -ip -g" from the file ip_N beside it.
here="$(dirname "$0")"
{sleep}
if [ "$3" = "-ip" ] && [ -f "${{here}}/ip_$2" ]; then
  cat "${{here}}/ip_$2"
  exit 0
fi
echo "Get ipconf failed, because no ip was preset there!"
exit 1
"""


def fake_hccn_tool(bin_dir: Path, ips: dict[int, str], sleep: int = 0) -> dict:
    """Put a fake hccn_tool on PATH; return the environment to run the launcher with."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    tool = bin_dir / "hccn_tool"
    tool.write_text(FAKE_HCCN_TOOL.format(sleep=f"sleep {sleep}" if sleep else ""))
    tool.chmod(0o755)
    for dev, ip in ips.items():
        (bin_dir / f"ip_{dev}").write_text(f"ipaddr:{ip}\nnetmask:255.255.255.0\n")
    return {**os.environ, "PATH": f"{bin_dir}:{SYSTEM_PATH}"}


def no_hccn_tool_env(tmp_path: Path) -> dict:
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    return {**os.environ, "PATH": f"{empty}:{SYSTEM_PATH}"}


FOUR_DEVICES_10_0_0_9 = {
    "version": "1.0",
    "server_count": "1",
    "server_list": [
        {
            "server_id": "10.0.0.9",
            "device": [
                {"device_id": "0", "device_ip": "192.168.100.101", "rank_id": "0"},
                {"device_id": "1", "device_ip": "192.168.101.101", "rank_id": "1"},
                {"device_id": "2", "device_ip": "192.168.102.101", "rank_id": "2"},
                {"device_id": "3", "device_ip": "192.168.103.101", "rank_id": "3"},
            ],
            "host_nic_ip": "reserve",
        }
    ],
    "status": "completed",
}


# --- discover ---------------------------------------------------------------------------------

def test_discover_reads_hccn_tool(tmp_path):
    env = fake_hccn_tool(tmp_path / "bin", {d: f"192.168.10{d}.101" for d in range(8)})
    result = run_launcher("ranktable", "discover", "--server-ip", "10.0.0.9", "--devices", "0-3", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == FOUR_DEVICES_10_0_0_9


def test_discover_writes_the_file(tmp_path):
    env = fake_hccn_tool(tmp_path / "bin", {d: f"192.168.10{d}.101" for d in range(8)})
    out = tmp_path / "tables" / "node.json"
    result = run_launcher("ranktable", "discover", "--server-ip", "10.0.0.9", "--devices", "[0,4)", "-o", out,
                          env=env)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == to_json(FOUR_DEVICES_10_0_0_9)
    assert "4 ranks" in result.stdout


def test_discover_reports_every_device_without_ip(tmp_path):
    env = fake_hccn_tool(tmp_path / "bin", {0: "192.168.100.101", 2: "192.168.102.101"})
    result = run_launcher("ranktable", "discover", "--server-ip", "10.0.0.9", "--devices", "0-3", env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "error: cannot read the device IPs:"
    assert lines[1].startswith("device 1: 'hccn_tool -i 1 -ip -g' exited 1: Get ipconf failed")
    assert lines[1].endswith("set the IP with 'hccn_tool -i 1 -ip -s address IP netmask MASK'")
    assert lines[2].startswith("device 3: 'hccn_tool -i 3 -ip -g' exited 1")
    assert len(lines) == 3


def test_discover_times_out_a_stuck_hccn_tool(tmp_path):
    env = fake_hccn_tool(tmp_path / "bin", {0: "192.168.100.101"}, sleep=30)
    start = time.monotonic()
    result = run_launcher("ranktable", "discover", "--server-ip", "10.0.0.9", "--devices", "0", "--timeout", "0.5",
                          env=env, timeout=60)
    assert time.monotonic() - start < 15
    assert result.returncode == 2
    assert "device 0: 'hccn_tool -i 0 -ip -g' did not answer before the timeout" in result.stderr


def test_discover_falls_back_to_hccn_conf(tmp_path):
    conf = tmp_path / "hccn.conf"
    # As /etc/hccn.conf holds them: address_N, netmask_N and netdetect_N for each device.
    conf.write_text("".join(f"address_{d}=192.168.10{d}.101\nnetmask_{d}=255.255.255.0\n"
                            f"netdetect_{d}=192.168.10{d}.1\n" for d in range(8)))
    result = run_launcher("ranktable", "discover", "--server-ip", "10.0.0.9", "--devices", "0-3",
                          "--hccn-conf", conf, env=no_hccn_tool_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == FOUR_DEVICES_10_0_0_9


def test_discover_hccn_conf_missing_device(tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_text("address_0=192.168.100.101\naddress_1=192.168.101.101\n")
    result = run_launcher("ranktable", "discover", "--server-ip", "10.0.0.9", "--devices", "0-3",
                          "--hccn-conf", conf, env=no_hccn_tool_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines()[1:] == [f"device 2: {conf} has no address_2=IP line",
                                             f"device 3: {conf} has no address_3=IP line"]


def test_discover_without_hccn_tool_or_conf(tmp_path):
    result = run_launcher("ranktable", "discover", "--server-ip", "10.0.0.9", "--hccn-conf", tmp_path / "none",
                          env=no_hccn_tool_env(tmp_path))
    assert result.returncode == 2
    assert "hccn_tool is not on PATH and" in result.stderr and "--hccn-conf" in result.stderr


def test_discover_refuses_a_guessed_loopback_server_id(tmp_path, monkeypatch):
    conf = tmp_path / "hccn.conf"
    conf.write_text("address_0=192.168.100.101\n")
    monkeypatch.setenv("PATH", no_hccn_tool_env(tmp_path)["PATH"])
    # Debian maps the hostname to 127.0.1.1 in /etc/hosts: the usual way a guess ends up on loopback.
    monkeypatch.setattr(ascend, "guess_server_ip", lambda: "127.0.1.1")
    result = CliRunner().invoke(main, ["ranktable", "discover", "--devices", "0", "--hccn-conf", str(conf)])
    assert result.exit_code == 2
    assert "resolves to 127.0.1.1, a loopback address" in result.stderr
    assert "pass --server-ip" in result.stderr
    assert result.stdout == ""


def test_discover_uses_a_guessed_ip_that_is_not_loopback(tmp_path, monkeypatch):
    conf = tmp_path / "hccn.conf"
    conf.write_text("address_0=192.168.100.101\n")
    monkeypatch.setenv("PATH", no_hccn_tool_env(tmp_path)["PATH"])
    monkeypatch.setattr(ascend, "guess_server_ip", lambda: "10.0.0.9")
    result = CliRunner().invoke(main, ["ranktable", "discover", "--devices", "0", "--hccn-conf", str(conf)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["server_list"][0]["server_id"] == "10.0.0.9"


def test_discover_accepts_an_explicit_loopback_ip_with_a_warning(tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_text("address_0=192.168.100.101\n")
    result = run_launcher("ranktable", "discover", "--server-ip", "127.0.0.1", "--devices", "0",
                          "--hccn-conf", conf, env=no_hccn_tool_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["server_list"][0]["server_id"] == "127.0.0.1"
    assert "loopback" in result.stderr


def test_discover_rejects_a_server_ip_that_is_not_an_ip(tmp_path):
    result = run_launcher("ranktable", "discover", "--server-ip", "node-1", env=no_hccn_tool_env(tmp_path))
    assert result.returncode == 2
    assert "--server-ip: 'node-1' is not an IP address" in result.stderr


# --- merge ------------------------------------------------------------------------------------

def node_table(server_id: str, ips: list[str]) -> dict:
    return {
        "version": "1.0",
        "server_count": "1",
        "server_list": [{
            "server_id": server_id,
            "device": [{"device_id": str(d), "device_ip": ip, "rank_id": str(d)} for d, ip in enumerate(ips)],
            "host_nic_ip": "reserve",
        }],
        "status": "completed",
    }


MERGED_2X4 = {
    "version": "1.0",
    "server_count": "2",
    "server_list": [
        {
            "server_id": "10.0.0.10",
            "device": [
                {"device_id": "0", "device_ip": "192.168.100.10", "rank_id": "0"},
                {"device_id": "1", "device_ip": "192.168.101.10", "rank_id": "1"},
                {"device_id": "2", "device_ip": "192.168.102.10", "rank_id": "2"},
                {"device_id": "3", "device_ip": "192.168.103.10", "rank_id": "3"},
            ],
            "host_nic_ip": "reserve",
        },
        {
            "server_id": "10.0.0.9",
            "device": [
                {"device_id": "0", "device_ip": "192.168.100.9", "rank_id": "4"},
                {"device_id": "1", "device_ip": "192.168.101.9", "rank_id": "5"},
                {"device_id": "2", "device_ip": "192.168.102.9", "rank_id": "6"},
                {"device_id": "3", "device_ip": "192.168.103.9", "rank_id": "7"},
            ],
            "host_nic_ip": "reserve",
        },
    ],
    "status": "completed",
}


def write(path: Path, table: dict) -> Path:
    path.write_text(json.dumps(table, indent=2))
    return path


def test_merge_follows_the_order_of_the_files(tmp_path):
    # As mindspore-lab/mindformers r1.0 mindformers/tools/merge_hccl.py: servers in argument order,
    # rank_id counted up through them. b.json (10.0.0.10) given first holds ranks 0-3.
    a = write(tmp_path / "a.json", node_table("10.0.0.9", [f"192.168.10{d}.9" for d in range(4)]))
    b = write(tmp_path / "b.json", node_table("10.0.0.10", [f"192.168.10{d}.10" for d in range(4)]))
    out = tmp_path / "hccl.json"
    result = run_launcher("ranktable", "merge", b, a, "-o", out)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == MERGED_2X4
    # The other order puts 10.0.0.9 first, with ranks 0-3.
    result = run_launcher("ranktable", "merge", a, b)
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    assert [s["server_id"] for s in table["server_list"]] == ["10.0.0.9", "10.0.0.10"]
    assert table["server_list"][0]["device"][3] == {"device_id": "3", "device_ip": "192.168.103.9", "rank_id": "3"}
    assert table["server_list"][1]["device"][0] == {"device_id": "0", "device_ip": "192.168.100.10", "rank_id": "4"}


def test_merge_four_servers_in_the_given_order(tmp_path):
    ids = ["10.1.0.8", "10.1.0.100", "10.1.0.9", "10.1.0.11"]
    files = [
        write(tmp_path / f"node-{n}.json",
              single_node_table(ServerDevices(sid, tuple(range(16)), tuple(f"172.16.{n}.{d}" for d in range(16)))))
        for n, sid in enumerate(ids)
    ]
    order = [files[2], files[0], files[3], files[1]]
    result = run_launcher("ranktable", "merge", *order)
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    assert [s["server_id"] for s in table["server_list"]] == ["10.1.0.9", "10.1.0.8", "10.1.0.11", "10.1.0.100"]
    ranks = [int(d["rank_id"]) for s in table["server_list"] for d in s["device"]]
    assert ranks == list(range(64))
    assert table["server_list"][1]["device"][0] == {"device_id": "0", "device_ip": "172.16.0.0", "rank_id": "16"}
    assert table["server_count"] == "4"


def test_merge_refuses_duplicates_and_unfinished_tables_all_at_once(tmp_path):
    a = write(tmp_path / "a.json", node_table("10.0.0.1", ["192.168.1.1", "192.168.1.2"]))
    b = write(tmp_path / "b.json", node_table("10.0.0.1", ["192.168.2.1", "192.168.2.2"]))
    c = write(tmp_path / "c.json", node_table("10.0.0.3", ["192.168.3.1", "192.168.1.2"]))
    d = write(tmp_path / "d.json", {**node_table("10.0.0.4", ["192.168.4.1"]), "status": "initializing"})
    out = tmp_path / "hccl.json"
    result = run_launcher("ranktable", "merge", a, b, c, d, "-o", out)
    assert result.returncode == 2
    assert not out.exists()
    assert result.stderr.splitlines() == [
        "error: cannot merge (3 problems):",
        f"{b}: server_id 10.0.0.1 is also in {a}",
        f"{c}: device_ip 192.168.1.2 (server 10.0.0.3) is also in {a}",
        f"{d}: status: is 'initializing', not 'completed'",
    ]


def test_merge_reports_a_file_that_is_not_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0",')
    result = run_launcher("ranktable", "merge", bad)
    assert result.returncode == 2
    assert f"{bad}: not JSON" in result.stderr


def test_merge_v12_tables(tmp_path):
    pods = [ServerDevices("10.0.0.3", (0, 1), ("192.168.3.1", "192.168.3.2"), ("0", "1"), "1"),
            ServerDevices("10.0.0.2", (0, 1), ("192.168.2.1", "192.168.2.2"), ("2", "3"), "0"),
            ServerDevices("10.0.0.1", (0, 1), ("192.168.1.1", "192.168.1.2"), ("0", "1"), "0")]
    files = [write(tmp_path / f"{s.server_id}.json", single_node_table(s)) for s in pods]
    result = run_launcher("ranktable", "merge", *files)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ranktable.merge_servers(pods)


# --- build and validate -----------------------------------------------------------------------

def test_build_from_inventory_matches_golden(tmp_path):
    out = tmp_path / "hccl.json"
    result = run_launcher("ranktable", "build", INVENTORIES / "a3-2pods-4x16.yaml", "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == (GOLDEN_V12 / "a3-2pods-4x16.json").read_text()


def test_validate_clean_table(tmp_path):
    result = run_launcher("ranktable", "validate", write(tmp_path / "t.json", MERGED_2X4))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "valid: rank table 1.0, 2 servers, 8 ranks\n"


def test_validate_v12_golden():
    result = run_launcher("ranktable", "validate", GOLDEN_V12 / "a3-2pods-4x16.json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("valid: rank table 1.2, 4 servers, 64 ranks")


def test_validate_prints_one_line_per_problem(tmp_path):
    table = json.loads(json.dumps(MERGED_2X4))
    table["server_count"] = "3"
    table["server_list"][0]["device"][1]["device_ip"] = "192.168.100.9"
    table["server_list"][1]["device"][3]["device_id"] = "8"
    table["server_list"][1]["device"][2]["rank_id"] = 6
    path = write(tmp_path / "t.json", table)
    result = run_launcher("ranktable", "validate", "--devices-per-node", "8", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "server_count: says '3' but server_list has 2",
        "server_list[1].device[0].device_ip: 192.168.100.9 is also the IP of server_list[0].device[1]",
        "server_list[1].device[2].rank_id: 6 must be a string",
        "server_list[1].device[3].device_id: '8' is not a device of the node (0-7)",
        "rank_id: must be 0..7, each once; missing 6",
    ]


def test_validate_missing_file(tmp_path):
    result = run_launcher("ranktable", "validate", tmp_path / "none.json")
    assert result.returncode == 2
    assert "none.json: no such rank table file" in result.stderr


# --- the wait script --------------------------------------------------------------------------

def wait_script(tmp_path: Path, table: Path, timeout_s: int) -> Path:
    script = tmp_path / "wait_ranktable.sh"
    script.write_text(ranktable.wait_script(str(table), timeout_s=timeout_s, interval_s=0.1))
    return script


def test_wait_script_is_shellcheck_clean(tmp_path):
    shellcheck = require_tool("shellcheck")
    script = wait_script(tmp_path, tmp_path / "it's a table.json", 5)
    result = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_wait_script_waits_until_completed(tmp_path):
    table = tmp_path / "hccl.json"
    write(table, {**MERGED_2X4, "status": "initializing"})
    proc = subprocess.Popen(["bash", str(wait_script(tmp_path, table, 20))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.8)
    assert proc.poll() is None, "the script returned while the table was initializing"
    staged = tmp_path / "hccl.json.new"
    write(staged, MERGED_2X4)
    os.replace(staged, table)  # as a ConfigMap update lands: the whole file at once
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert out == f"rank table {table} is completed\n"


def test_wait_script_gives_up_at_the_timeout(tmp_path):
    table = tmp_path / "hccl.json"
    write(table, {**MERGED_2X4, "status": "initializing"})
    start = time.monotonic()
    result = subprocess.run(["bash", str(wait_script(tmp_path, table, 1))], capture_output=True, text=True,
                            timeout=30)
    assert 1 <= time.monotonic() - start < 10
    assert result.returncode == 1
    assert f"rank table {table} is not completed after 1s (status: initializing)" in result.stderr


def test_wait_script_without_a_file(tmp_path):
    result = subprocess.run(["bash", str(wait_script(tmp_path, tmp_path / "none.json", 1))], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    assert "(status: no file or no status)" in result.stderr

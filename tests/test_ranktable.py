"""HCCL rank tables (v1.0 and v1.2) against tables written out by hand, validation, v1.2 golden files."""

import copy
import json
from pathlib import Path

import pytest

from launcher.ascend import read_inventory, servers_from_inventory
from launcher.errors import ConfigError
from launcher.ranktable import ServerDevices, merge_servers, single_node_table, validate
from launcher.render import to_json

HERE = Path(__file__).parent
INVENTORIES = HERE / "data" / "ranktable"
GOLDEN_V12 = HERE / "golden" / "ranktable-v1.2"

IPS_A = ["192.168.100.9", "192.168.101.9", "192.168.102.9", "192.168.103.9",
         "192.168.100.19", "192.168.101.19", "192.168.102.19", "192.168.103.19"]
IPS_B = ["192.168.100.10", "192.168.101.10", "192.168.102.10", "192.168.103.10",
         "192.168.100.20", "192.168.101.20", "192.168.102.20", "192.168.103.20"]


def test_single_node_8():
    table = single_node_table(ServerDevices("10.0.0.9", tuple(range(8)), tuple(IPS_A)))
    assert table == {
        "version": "1.0",
        "server_count": "1",
        "server_list": [
            {
                "server_id": "10.0.0.9",
                "device": [
                    {"device_id": "0", "device_ip": "192.168.100.9", "rank_id": "0"},
                    {"device_id": "1", "device_ip": "192.168.101.9", "rank_id": "1"},
                    {"device_id": "2", "device_ip": "192.168.102.9", "rank_id": "2"},
                    {"device_id": "3", "device_ip": "192.168.103.9", "rank_id": "3"},
                    {"device_id": "4", "device_ip": "192.168.100.19", "rank_id": "4"},
                    {"device_id": "5", "device_ip": "192.168.101.19", "rank_id": "5"},
                    {"device_id": "6", "device_ip": "192.168.102.19", "rank_id": "6"},
                    {"device_id": "7", "device_ip": "192.168.103.19", "rank_id": "7"},
                ],
                "host_nic_ip": "reserve",
            }
        ],
        "status": "completed",
    }


def test_merged_2x8_keeps_the_given_server_order():
    # mindspore-lab/mindformers r1.0 mindformers/tools/merge_hccl.py: servers are appended in the order of
    # its file arguments and rank_id counts up in that order. So .9 first, then .10 (no string order).
    table = merge_servers([
        ServerDevices("10.0.0.9", tuple(range(8)), tuple(IPS_A)),
        ServerDevices("10.0.0.10", tuple(range(8)), tuple(IPS_B)),
    ])
    assert table == {
        "version": "1.0",
        "server_count": "2",
        "server_list": [
            {
                "server_id": "10.0.0.9",
                "device": [
                    {"device_id": "0", "device_ip": "192.168.100.9", "rank_id": "0"},
                    {"device_id": "1", "device_ip": "192.168.101.9", "rank_id": "1"},
                    {"device_id": "2", "device_ip": "192.168.102.9", "rank_id": "2"},
                    {"device_id": "3", "device_ip": "192.168.103.9", "rank_id": "3"},
                    {"device_id": "4", "device_ip": "192.168.100.19", "rank_id": "4"},
                    {"device_id": "5", "device_ip": "192.168.101.19", "rank_id": "5"},
                    {"device_id": "6", "device_ip": "192.168.102.19", "rank_id": "6"},
                    {"device_id": "7", "device_ip": "192.168.103.19", "rank_id": "7"},
                ],
                "host_nic_ip": "reserve",
            },
            {
                "server_id": "10.0.0.10",
                "device": [
                    {"device_id": "0", "device_ip": "192.168.100.10", "rank_id": "8"},
                    {"device_id": "1", "device_ip": "192.168.101.10", "rank_id": "9"},
                    {"device_id": "2", "device_ip": "192.168.102.10", "rank_id": "10"},
                    {"device_id": "3", "device_ip": "192.168.103.10", "rank_id": "11"},
                    {"device_id": "4", "device_ip": "192.168.100.20", "rank_id": "12"},
                    {"device_id": "5", "device_ip": "192.168.101.20", "rank_id": "13"},
                    {"device_id": "6", "device_ip": "192.168.102.20", "rank_id": "14"},
                    {"device_id": "7", "device_ip": "192.168.103.20", "rank_id": "15"},
                ],
                "host_nic_ip": "reserve",
            },
        ],
        "status": "completed",
    }
    # The table MindCluster would write for these two servers (.9 before .10) is valid as it is.
    assert validate(table) == []


def test_merged_4x16():
    servers = ["10.1.0.8", "10.1.0.100", "10.1.0.9", "10.1.0.11"]
    table = merge_servers([
        ServerDevices(s, tuple(range(16)), tuple(f"172.16.{n}.{d}" for d in range(16)))
        for n, s in enumerate(servers)
    ])
    assert table["server_count"] == "4"
    # The given order, as merge_hccl.py keeps it.
    assert [s["server_id"] for s in table["server_list"]] == ["10.1.0.8", "10.1.0.100", "10.1.0.9", "10.1.0.11"]
    second = table["server_list"][1]
    assert second["device"][0] == {"device_id": "0", "device_ip": "172.16.1.0", "rank_id": "16"}
    assert second["device"][15] == {"device_id": "15", "device_ip": "172.16.1.15", "rank_id": "31"}
    last = table["server_list"][3]["device"][15]
    assert last == {"device_id": "15", "device_ip": "172.16.3.15", "rank_id": "63"}
    assert validate(table) == []


def test_merge_refuses_duplicates():
    with pytest.raises(ConfigError, match="server_id 10.0.0.1 appears twice"):
        merge_servers([ServerDevices("10.0.0.1", (0,), ("1.1.1.1",)), ServerDevices("10.0.0.1", (0,), ("1.1.1.2",))])
    with pytest.raises(ConfigError, match=r"server_list\[1\].device\[0\].device_ip: 1.1.1.1 is also the IP of "
                                          r"server_list\[0\].device\[0\]"):
        merge_servers([ServerDevices("10.0.0.1", (0,), ("1.1.1.1",)), ServerDevices("10.0.0.2", (0,), ("1.1.1.1",))])


def test_validate_reports_every_problem_with_its_path():
    table = {
        "version": "1.0",
        "server_count": "2",
        "server_list": [
            {"server_id": "10.0.0.1", "device": [
                {"device_id": 0, "device_ip": "192.168.1.1", "rank_id": "0"},
                {"device_id": "9", "device_ip": "not-an-ip", "rank_id": "2"},
            ], "host_nic_ip": "reserve"},
        ],
        "status": "initializing",
    }
    problems = validate(table, devices_per_node=8)
    assert problems == [
        "status: is 'initializing', not 'completed'",
        "server_count: says '2' but server_list has 1",
        "server_list[0].device[0].device_id: 0 must be a string",
        "server_list[0].device[1].device_id: '9' is not a device of the node (0-7)",
        "server_list[0].device[1].device_ip: 'not-an-ip' is not an IP address",
        "rank_id: must be 0..1, each once; missing 1",
    ]


# --- v1.2 (Atlas A3 super pods) ---------------------------------------------------------------

A3_SERVERS = [
    # Pod "1" holds 10.0.0.10, pod "0" holds 10.0.0.9 and 10.0.0.11. The servers of a pod are listed
    # together, at the place of the pod's first server: pod "1" first, then 10.0.0.9 and 10.0.0.11.
    ServerDevices("10.0.0.10", (0, 1), ("192.168.3.1", "192.168.3.2"), ("0", "1"), "1"),
    ServerDevices("10.0.0.9", (0, 1), ("192.168.2.1", "192.168.2.2"), ("2", "3"), "0"),
    ServerDevices("10.0.0.11", (0, 1), ("192.168.1.1", "192.168.1.2"), ("0", "1"), "0"),
]


def test_merged_v12_groups_super_pods():
    assert merge_servers(A3_SERVERS) == {
        "version": "1.2",
        "server_count": "3",
        "server_list": [
            {"server_id": "10.0.0.10", "device": [
                {"device_id": "0", "super_device_id": "0", "device_ip": "192.168.3.1", "rank_id": "0"},
                {"device_id": "1", "super_device_id": "1", "device_ip": "192.168.3.2", "rank_id": "1"},
            ]},
            {"server_id": "10.0.0.9", "device": [
                {"device_id": "0", "super_device_id": "2", "device_ip": "192.168.2.1", "rank_id": "2"},
                {"device_id": "1", "super_device_id": "3", "device_ip": "192.168.2.2", "rank_id": "3"},
            ]},
            {"server_id": "10.0.0.11", "device": [
                {"device_id": "0", "super_device_id": "0", "device_ip": "192.168.1.1", "rank_id": "4"},
                {"device_id": "1", "super_device_id": "1", "device_ip": "192.168.1.2", "rank_id": "5"},
            ]},
        ],
        "super_pod_list": [
            {"super_pod_id": "1", "server_list": [{"server_id": "10.0.0.10"}]},
            {"super_pod_id": "0", "server_list": [{"server_id": "10.0.0.9"}, {"server_id": "10.0.0.11"}]},
        ],
        "status": "completed",
    }


def test_merge_refuses_mixed_versions():
    v10 = ServerDevices("10.0.0.1", (0,), ("192.168.9.1",))
    with pytest.raises(ConfigError, match="some servers have a super_pod_id and some do not"):
        merge_servers([*A3_SERVERS, v10])


def v12_golden_cases() -> list[str]:
    return sorted(p.stem for p in INVENTORIES.glob("*.yaml"))


@pytest.mark.parametrize("case", v12_golden_cases())
def test_v12_matches_golden(case, request):
    text = to_json(merge_servers(read_inventory(INVENTORIES / f"{case}.yaml")))
    golden = GOLDEN_V12 / f"{case}.json"
    if request.config.getoption("--update-golden"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.read_text() == text, f"{golden} differs; rerun with --update-golden if meant"
    table = json.loads(text)
    assert table["version"] == "1.2"
    assert all("super_device_id" in d for s in table["server_list"] for d in s["device"])
    assert validate(table) == []


def test_v12_golden_folder_has_no_stale_files():
    assert sorted(p.stem for p in GOLDEN_V12.glob("*.json")) == v12_golden_cases()


def test_v12_golden_groups_pods_in_the_inventory_order():
    table = json.loads((GOLDEN_V12 / "a3-2pods-4x16.json").read_text())
    # Inventory order 10.0.1.9 (pod 1), 10.0.0.9 (pod 0), 10.0.1.10 (pod 1), 10.0.0.10 (pod 0).
    assert [s["server_id"] for s in table["server_list"]] == ["10.0.1.9", "10.0.1.10", "10.0.0.9", "10.0.0.10"]
    assert [p["super_pod_id"] for p in table["super_pod_list"]] == ["1", "0"]
    assert table["server_list"][2]["device"][0]["rank_id"] == "32"


def test_inventory_problems_are_reported_together():
    data = {"servers": [
        {"server_id": "10.0.0.1", "devices": "0-1", "device_ips": ["192.168.1.1"]},
        {"server_id": "10.0.0.2", "devices": "0-1", "device_ips": ["192.168.2.1", "192.168.2.2"],
         "super_pod_id": "0"},
        {"devices": "9-1", "device_ips": []},
    ]}
    with pytest.raises(ConfigError) as info:
        servers_from_inventory(data, "inv.yaml")
    assert str(info.value).splitlines() == [
        "inv.yaml: servers[0].device_ips: give a list of 2, one per device",
        "inv.yaml: servers[1]: a v1.2 server needs both super_pod_id and super_device_ids",
        "inv.yaml: servers[2].server_id: give the server's IP (the address the other nodes reach it at)",
        "inv.yaml: servers[2].devices: '9-1' is an empty device range",
    ]


# --- validation: every kind of problem, each with its JSON path -------------------------------

V10 = merge_servers([
    ServerDevices("10.0.0.9", (0, 1), ("192.168.2.1", "192.168.2.2")),
    ServerDevices("10.0.0.10", (0, 1), ("192.168.1.1", "192.168.1.2")),
])
V12 = merge_servers([
    ServerDevices("10.0.0.1", (0, 1), ("192.168.1.1", "192.168.1.2"), ("0", "1"), "0"),
    ServerDevices("10.0.0.2", (0, 1), ("192.168.2.1", "192.168.2.2"), ("2", "3"), "0"),
    ServerDevices("10.0.0.3", (0, 1), ("192.168.3.1", "192.168.3.2"), ("0", "1"), "1"),
])


def renumber(table: dict) -> None:
    rank = 0
    for server in table["server_list"]:
        for dev in server["device"]:
            dev["rank_id"] = str(rank)
            rank += 1


def servers_reordered(table: dict, order: list[int]) -> None:
    table["server_list"] = [table["server_list"][i] for i in order]
    renumber(table)


def set_at(path: str, value):
    """A change to a table: set the value at a path such as 'server_list.1.device.0.rank_id'."""
    def change(table):
        *parents, last = path.split(".")
        node = table
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return change


def delete(path: str):
    def change(table):
        *parents, last = path.split(".")
        node = table
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]
    return change


def both(*changes):
    def change(table):
        for c in changes:
            c(table)
    return change


V10_CASES = {
    "value not a string": (set_at("server_count", 2), ["server_count: 2 must be a string"]),
    "key missing": (delete("status"), ["status: missing"]),
    "unknown version": (set_at("version", "2.0"),
                        ["version: '2.0' is not a rank table version the launcher knows (1.0 or 1.2)"]),
    "not completed": (set_at("status", "initializing"), ["status: is 'initializing', not 'completed'"]),
    "server_count": (set_at("server_count", "3"), ["server_count: says '3' but server_list has 2"]),
    "server_list not a list": (set_at("server_list", {}), [
        "server_list: must be a list of servers", "server_count: says '2' but server_list has 0"]),
    "server not an object": (set_at("server_list.1", "10.0.0.9"),
                             ["server_list[1]: must be an object with server_id and device"]),
    "server_id missing": (delete("server_list.1.server_id"), ["server_list[1].server_id: missing"]),
    "server_id twice": (set_at("server_list.1.server_id", "10.0.0.9"),
                        ["server_list[1].server_id: '10.0.0.9' is also the server_id of server_list[0]"]),
    "device not a list": (set_at("server_list.0.device", None), [
        "server_list[0].device: must be a list of devices", "rank_id: must be 0..1, each once; missing 0, 1"]),
    "device not an object": (set_at("server_list.0.device.0", "0"), [
        "server_list[0].device[0]: must be an object with device_id, device_ip and rank_id",
        "rank_id: must be 0..2, each once; missing 0"]),
    "device_id not a string": (set_at("server_list.1.device.0.device_id", 5),
                               ["server_list[1].device[0].device_id: 5 must be a string"]),
    "device_id outside the node": (set_at("server_list.1.device.0.device_id", "16"),
                                   ["server_list[1].device[0].device_id: '16' is not a device of the node (0-15)"]),
    "device_id twice": (set_at("server_list.1.device.0.device_id", "1"),
                        ["server_list[1].device[1].device_id: device 1 is listed twice on this server"]),
    "device_ip malformed": (set_at("server_list.0.device.1.device_ip", "192.168.1.300"),
                            ["server_list[0].device[1].device_ip: '192.168.1.300' is not an IP address"]),
    "device_ip missing": (delete("server_list.0.device.0.device_ip"),
                          ["server_list[0].device[0].device_ip: missing"]),
    "device_ip twice": (set_at("server_list.1.device.1.device_ip", "192.168.2.1"), [
        "server_list[1].device[1].device_ip: 192.168.2.1 is also the IP of server_list[0].device[0]"]),
    "rank_id not a number": (set_at("server_list.1.device.1.rank_id", "x"), [
        "server_list[1].device[1].rank_id: 'x' is not a number", "rank_id: must be 0..3, each once; missing 3"]),
    "rank_id twice": (set_at("server_list.1.device.0.rank_id", "0"), [
        "server_list[1].device[0].rank_id: 0 is also the rank of server_list[0].device[0]",
        "rank_id: must be 0..3, each once; missing 2"]),
    "rank_ids interleaved": (
        both(set_at("server_list.0.device.1.rank_id", "2"), set_at("server_list.1.device.0.rank_id", "1")), [
            "server_list[0]: its rank_ids must be 0-1, the next block after the servers listed before it",
            "server_list[1]: its rank_ids must be 2-3, the next block after the servers listed before it"]),
    "servers swapped without renumbering": (lambda t: t.update(server_list=t["server_list"][::-1]), [
        "server_list[0]: its rank_ids must be 0-1, the next block after the servers listed before it",
        "server_list[1]: its rank_ids must be 2-3, the next block after the servers listed before it"]),
}


def test_any_server_order_is_valid_when_ranks_follow_it():
    # No anchor requires an order of server_id: merge_hccl.py (mindformers r1.0) keeps its arguments'
    # order, and ascend-operator (Ascend/mind-cluster component/ascend-operator/pkg/ranktable) lists pods
    # by rank index. Each order is valid once rank_id counts up through it.
    for order in ([0, 1], [1, 0]):
        table = copy.deepcopy(V10)
        servers_reordered(table, order)
        assert validate(table) == []


@pytest.mark.parametrize("case", V10_CASES)
def test_validate_v10_problem(case):
    change, expected = V10_CASES[case]
    table = copy.deepcopy(V10)
    assert validate(table) == []
    change(table)
    assert validate(table) == expected


V12_CASES = {
    "super_device_id missing": (delete("server_list.0.device.0.super_device_id"),
                                ["server_list[0].device[0].super_device_id: missing"]),
    "super_device_id not a number": (set_at("server_list.0.device.0.super_device_id", "x"),
                                     ["server_list[0].device[0].super_device_id: 'x' is not a number"]),
    "super_device_id twice in a pod": (set_at("server_list.1.device.0.super_device_id", "0"), [
        "server_list[1].device[0].super_device_id: 0 is also the super_device_id of server_list[0].device[0] "
        "in the same super pod"]),
    "super_pod_list missing": (delete("super_pod_list"), [
        "super_pod_list: a v1.2 table needs a list of super pods, each with super_pod_id and server_list"]),
    "pod names an unknown server": (set_at("super_pod_list.1.server_list.0.server_id", "10.0.0.4"), [
        "super_pod_list[1].server_list[0].server_id: '10.0.0.4' is not in server_list",
        "server_list[2].server_id: '10.0.0.3' is in no super pod of super_pod_list"]),
    "server in two pods": (lambda t: t["super_pod_list"][1]["server_list"].append({"server_id": "10.0.0.1"}), [
        "super_pod_list[1].server_list[1].server_id: '10.0.0.1' is also in super pod '0'"]),
    "super_pod_id twice": (set_at("super_pod_list.1.super_pod_id", "0"), [
        "super_pod_list[1].super_pod_id: '0' is also the id of super_pod_list[0]",
        "server_list[2].device[0].super_device_id: 0 is also the super_device_id of server_list[0].device[0] "
        "in the same super pod",
        "server_list[2].device[1].super_device_id: 1 is also the super_device_id of server_list[0].device[1] "
        "in the same super pod"]),
    "pod servers apart": (lambda t: servers_reordered(t, [0, 2, 1]), [
        "server_list[2]: server '10.0.0.2' of super pod '0' is apart from the other servers of its pod; "
        "list each super pod's servers together"]),
    "pod server_list not a list": (set_at("super_pod_list.0.server_list", "10.0.0.1"), [
        'super_pod_list[0].server_list: must be a list of {"server_id": ...}',
        "server_list[0].server_id: '10.0.0.1' is in no super pod of super_pod_list",
        "server_list[1].server_id: '10.0.0.2' is in no super pod of super_pod_list"]),
}


@pytest.mark.parametrize("case", V12_CASES)
def test_validate_v12_problem(case):
    change, expected = V12_CASES[case]
    table = copy.deepcopy(V12)
    assert validate(table) == []
    change(table)
    assert validate(table) == expected


def test_validate_not_a_table():
    assert validate(["server_list"]) == [
        "(top): a rank table is a JSON object with version, server_count, server_list and status"]


def test_same_super_device_id_in_two_pods_is_fine():
    ids = [(s["server_id"], d["super_device_id"]) for s in V12["server_list"] for d in s["device"]]
    assert ("10.0.0.1", "0") in ids and ("10.0.0.3", "0") in ids
    assert validate(V12) == []


def test_merge_input_skips_rank_numbering():
    # A per-node table rendered for node 1 of a job starts at its global rank, which merge renumbers.
    table = single_node_table(ServerDevices("10.0.0.9", (0, 1), ("192.168.2.1", "192.168.2.2")), first_rank=8)
    assert validate(table) == ["rank_id: must be 0..1, each once; missing 0, 1"]
    assert validate(table, merge_input=True) == []

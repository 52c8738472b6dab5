"""HCCL rank tables v1.0 against tables written out by hand."""

import pytest

from launcher.errors import ConfigError
from launcher.ranktable import ServerDevices, merge_servers, single_node_table, validate

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


def test_merged_2x8_follows_string_order_of_server_id():
    # Given in numeric order .9 then .10; the table must list "10.0.0.10" first ("1" < "9").
    table = merge_servers([
        ServerDevices("10.0.0.9", tuple(range(8)), tuple(IPS_A)),
        ServerDevices("10.0.0.10", tuple(range(8)), tuple(IPS_B)),
    ])
    assert table == {
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
                    {"device_id": "4", "device_ip": "192.168.100.20", "rank_id": "4"},
                    {"device_id": "5", "device_ip": "192.168.101.20", "rank_id": "5"},
                    {"device_id": "6", "device_ip": "192.168.102.20", "rank_id": "6"},
                    {"device_id": "7", "device_ip": "192.168.103.20", "rank_id": "7"},
                ],
                "host_nic_ip": "reserve",
            },
            {
                "server_id": "10.0.0.9",
                "device": [
                    {"device_id": "0", "device_ip": "192.168.100.9", "rank_id": "8"},
                    {"device_id": "1", "device_ip": "192.168.101.9", "rank_id": "9"},
                    {"device_id": "2", "device_ip": "192.168.102.9", "rank_id": "10"},
                    {"device_id": "3", "device_ip": "192.168.103.9", "rank_id": "11"},
                    {"device_id": "4", "device_ip": "192.168.100.19", "rank_id": "12"},
                    {"device_id": "5", "device_ip": "192.168.101.19", "rank_id": "13"},
                    {"device_id": "6", "device_ip": "192.168.102.19", "rank_id": "14"},
                    {"device_id": "7", "device_ip": "192.168.103.19", "rank_id": "15"},
                ],
                "host_nic_ip": "reserve",
            },
        ],
        "status": "completed",
    }


def test_merged_4x16():
    servers = ["10.1.0.8", "10.1.0.100", "10.1.0.9", "10.1.0.11"]
    table = merge_servers([
        ServerDevices(s, tuple(range(16)), tuple(f"172.16.{n}.{d}" for d in range(16)))
        for n, s in enumerate(servers)
    ])
    assert table["server_count"] == "4"
    # String order: "10.1.0.100" < "10.1.0.11" < "10.1.0.8" < "10.1.0.9".
    assert [s["server_id"] for s in table["server_list"]] == ["10.1.0.100", "10.1.0.11", "10.1.0.8", "10.1.0.9"]
    second = table["server_list"][1]
    assert second["device"][0] == {"device_id": "0", "device_ip": "172.16.3.0", "rank_id": "16"}
    assert second["device"][15] == {"device_id": "15", "device_ip": "172.16.3.15", "rank_id": "31"}
    last = table["server_list"][3]["device"][15]
    assert last == {"device_id": "15", "device_ip": "172.16.2.15", "rank_id": "63"}
    assert validate(table) == []


def test_merge_refuses_duplicates():
    with pytest.raises(ConfigError, match="server_id 10.0.0.1 appears twice"):
        merge_servers([ServerDevices("10.0.0.1", (0,), ("1.1.1.1",)), ServerDevices("10.0.0.1", (0,), ("1.1.1.2",))])
    with pytest.raises(ConfigError, match="device_ip: 1.1.1.1 used more than once"):
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
        "server_list[0].device[1].device_ip: 'not-an-ip' is not an IP address",
        "server_list[0].device[1].device_id: '9' is not a device of the node",
        "rank_id: must be 0..1, each once; got 0, 2",
    ]

"""HCCL rank tables (v1.0): build per node, merge across nodes, validate.

Every value in the table is a string. A merged table lists servers in the dictionary (string)
order of server_id, as MindSpore requires, and numbers rank_id from 0 in that order.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from launcher.errors import ConfigError


@dataclass(frozen=True)
class ServerDevices:
    server_id: str
    device_ids: tuple[int, ...]
    device_ips: tuple[str, ...]


def single_node_table(server: ServerDevices, first_rank: int = 0) -> dict:
    return {
        "version": "1.0",
        "server_count": "1",
        "server_list": [_server_entry(server, first_rank)],
        "status": "completed",
    }


def _server_entry(server: ServerDevices, first_rank: int) -> dict:
    devices = [
        {"device_id": str(dev), "device_ip": ip, "rank_id": str(first_rank + i)}
        for i, (dev, ip) in enumerate(zip(server.device_ids, server.device_ips, strict=True))
    ]
    return {"server_id": server.server_id, "device": devices, "host_nic_ip": "reserve"}


def merge_servers(servers: list[ServerDevices]) -> dict:
    """One table for the whole cluster, servers in string order of server_id."""
    ids = [s.server_id for s in servers]
    if len(ids) != len(set(ids)):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"rank table: server_id {dup} appears twice")
    server_list, rank = [], 0
    for server in sorted(servers, key=lambda s: s.server_id):
        server_list.append(_server_entry(server, rank))
        rank += len(server.device_ids)
    table = {
        "version": "1.0",
        "server_count": str(len(server_list)),
        "server_list": server_list,
        "status": "completed",
    }
    problems = validate(table)
    if problems:
        raise ConfigError("rank table: " + "; ".join(problems))
    return table


def server_order(servers: list[ServerDevices]) -> list[str]:
    """The server_ids in the order the merged table lists them (and numbers their ranks)."""
    return sorted(s.server_id for s in servers)


def validate(table: dict, devices_per_node: int = 16) -> list[str]:
    """Every problem found in a v1.0 table, each with its JSON path."""
    problems: list[str] = []

    def need_str(path: str, value) -> None:
        if not isinstance(value, str):
            problems.append(f"{path}: {value!r} must be a string")

    for key in ("version", "server_count", "status"):
        if key not in table:
            problems.append(f"{key}: missing")
        else:
            need_str(key, table[key])
    if table.get("status") not in (None, "completed"):
        problems.append(f"status: is {table['status']!r}, not 'completed'")
    servers = table.get("server_list", [])
    if str(len(servers)) != str(table.get("server_count")):
        problems.append(f"server_count: says {table.get('server_count')!r} but server_list has {len(servers)}")
    ranks, ips = [], []
    for s, server in enumerate(servers):
        need_str(f"server_list[{s}].server_id", server.get("server_id"))
        for d, dev in enumerate(server.get("device", [])):
            where = f"server_list[{s}].device[{d}]"
            for key in ("device_id", "device_ip", "rank_id"):
                need_str(f"{where}.{key}", dev.get(key))
            try:
                ipaddress.ip_address(str(dev.get("device_ip")))
            except ValueError:
                problems.append(f"{where}.device_ip: {dev.get('device_ip')!r} is not an IP address")
            if not str(dev.get("device_id", "")).isdigit() or int(dev["device_id"]) >= devices_per_node:
                problems.append(f"{where}.device_id: {dev.get('device_id')!r} is not a device of the node")
            ranks.append(str(dev.get("rank_id")))
            ips.append(dev.get("device_ip"))
    if sorted(ranks, key=lambda r: int(r) if r.isdigit() else -1) != [str(i) for i in range(len(ranks))]:
        problems.append(f"rank_id: must be 0..{len(ranks) - 1}, each once; got {', '.join(ranks)}")
    dup_ips = sorted({ip for ip in ips if ips.count(ip) > 1})
    if dup_ips:
        problems.append(f"device_ip: {', '.join(dup_ips)} used more than once")
    return problems

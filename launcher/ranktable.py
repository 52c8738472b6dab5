"""HCCL rank tables, v1.0 and v1.2: build per node, merge across nodes, validate.

Every value in the table is a string. A merged table lists the servers in the order it is given them,
as mindformers r1.0 mindformers/tools/merge_hccl.py keeps its arguments' order (and ascend-operator,
Ascend/mind-cluster component/ascend-operator/pkg/ranktable, lists pods by their rank index), and
numbers rank_id from 0 in that order, each server holding the next block. No source requires another
order of server_id, so a table in any server order is valid.

v1.2 (Atlas A3 super pods) adds a super_device_id to every device and a super_pod_list that names
the servers of each super pod. HCCL wants the servers of one super pod listed together, so a v1.2
merge groups each super pod's servers at the place of its first server, keeping the given order otherwise.
Format: CANN HCCL user guide, "rank table configuration, Atlas A3 training products"
(https://www.hiascend.com/document/detail/zh/canncommercial/82RC1/hccl/hcclug/hcclug_000014.html).

Where the servers come from (hccn_tool, hccn.conf, an inventory of super pods) is launcher/ascend.py.
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import ConfigError
from launcher.render import render_template

VERSIONS = ("1.0", "1.2")
WAIT_TEMPLATE = "wait_ranktable.sh.j2"


@dataclass(frozen=True)
class ServerDevices:
    server_id: str
    device_ids: tuple[int, ...]
    device_ips: tuple[str, ...]
    # v1.2 only: one super_device_id per device, and the super pod of the server.
    super_device_ids: tuple[str, ...] | None = None
    super_pod_id: str | None = None


def _in_table_order(servers: list[ServerDevices]) -> list[ServerDevices]:
    """The given order, with the servers of one super pod brought together (v1.2)."""
    first_seen = {}
    for i, server in enumerate(servers):
        first_seen.setdefault(server.super_pod_id, i)
    return sorted(servers, key=lambda s: first_seen[s.super_pod_id])


def single_node_table(server: ServerDevices, first_rank: int = 0) -> dict:
    return _table([server], first_rank)


def merge_servers(servers: list[ServerDevices]) -> dict:
    """One table for the whole cluster in the given server order, rank_id renumbered from 0."""
    if not servers:
        raise ConfigError("rank table: no servers to put in it")
    dups = [i for i, n in Counter(s.server_id for s in servers).items() if n > 1]
    if dups:
        raise ConfigError(f"rank table: server_id {', '.join(dups)} appears twice")
    if len({s.super_pod_id is None for s in servers}) > 1:
        raise ConfigError("rank table: some servers have a super_pod_id and some do not; "
                          "a v1.2 table needs one for every server")
    table = _table(_in_table_order(servers), 0)
    problems = validate(table)
    if problems:
        raise ConfigError("rank table: " + "; ".join(problems))
    return table


def server_order(servers: list[ServerDevices]) -> list[str]:
    """The server_ids in the order the merged table lists them (and numbers their ranks)."""
    return [s.server_id for s in _in_table_order(servers)]


def _table(servers: list[ServerDevices], first_rank: int) -> dict:
    v12 = servers[0].super_pod_id is not None
    server_list, rank = [], first_rank
    for server in servers:
        server_list.append(_server_entry(server, rank))
        rank += len(server.device_ids)
    table = {"version": "1.2" if v12 else "1.0", "server_count": str(len(servers)), "server_list": server_list}
    if v12:
        pods: dict[str, list[dict]] = {}
        for server in servers:
            pods.setdefault(server.super_pod_id, []).append({"server_id": server.server_id})
        table["super_pod_list"] = [{"super_pod_id": pod, "server_list": members} for pod, members in pods.items()]
    table["status"] = "completed"
    return table


def _server_entry(server: ServerDevices, first_rank: int) -> dict:
    supers = server.super_device_ids or (None,) * len(server.device_ids)
    devices = []
    for i, (dev, ip, sdid) in enumerate(zip(server.device_ids, server.device_ips, supers, strict=True)):
        entry = {"device_id": str(dev)}
        if sdid is not None:
            entry["super_device_id"] = sdid
        entry.update(device_ip=ip, rank_id=str(first_rank + i))
        devices.append(entry)
    if server.super_device_ids is not None:
        return {"server_id": server.server_id, "device": devices}  # v1.2 has no host_nic_ip
    return {"server_id": server.server_id, "device": devices, "host_nic_ip": "reserve"}


def validate(table, devices_per_node: int = 16, merge_input: bool = False) -> list[str]:
    """Every problem of a v1.0 or v1.2 table, each with its JSON path.

    merge_input: the table is about to be merged, which renumbers ranks and reorders servers,
    so neither is checked.
    """
    if not isinstance(table, dict):
        return ["(top): a rank table is a JSON object with version, server_count, server_list and status"]
    problems: list[str] = []
    for key in ("version", "server_count", "server_list", "status"):
        if key not in table:
            problems.append(f"{key}: missing")
        elif key != "server_list" and not isinstance(table[key], str):
            problems.append(f"{key}: {table[key]!r} must be a string")
    version = table.get("version", "1.0")
    if version not in VERSIONS:
        problems.append(f"version: {version!r} is not a rank table version the launcher knows (1.0 or 1.2)")
    if table.get("status", "completed") != "completed":
        problems.append(f"status: is {table['status']!r}, not 'completed'")
    servers = table.get("server_list", [])
    if not isinstance(servers, list):
        problems.append("server_list: must be a list of servers")
        servers = []
    if "server_count" in table and str(table["server_count"]) != str(len(servers)):
        problems.append(f"server_count: says {table['server_count']!r} but server_list has {len(servers)}")
    checker = _Checker(version == "1.2", devices_per_node, problems)
    for s, server in enumerate(servers):
        checker.server(s, server)
    if version == "1.2":
        checker.super_pods(table.get("super_pod_list"))
    if not merge_input:
        checker.rank_blocks()
    return problems


class _Checker:
    """Walks a table once; dictionaries of what was seen keep it linear in the number of devices."""

    def __init__(self, v12: bool, devices_per_node: int, problems: list[str]):
        self.v12, self.devices_per_node, self.problems = v12, devices_per_node, problems
        self.server_at: dict[str, str] = {}  # server_id -> path of its server
        self.servers: list[tuple[str, str | None, list[int | None]]] = []  # (path, server_id, ranks)
        self.ip_at: dict[str, str] = {}
        self.rank_at: dict[int, str] = {}
        self.super_ids: list[tuple[str | None, str, str]] = []  # (server_id, super_device_id, path)

    def string(self, path: str, container: dict, key: str) -> str | None:
        if key not in container:
            self.problems.append(f"{path}.{key}: missing")
            return None
        value = container[key]
        if not isinstance(value, str):
            self.problems.append(f"{path}.{key}: {value!r} must be a string")
            return None
        return value

    def server(self, s: int, server) -> None:
        where = f"server_list[{s}]"
        if not isinstance(server, dict):
            self.problems.append(f"{where}: must be an object with server_id and device")
            return
        sid = self.string(where, server, "server_id")
        if sid is not None:
            if sid in self.server_at:
                self.problems.append(f"{where}.server_id: {sid!r} is also the server_id of {self.server_at[sid]}")
            else:
                self.server_at[sid] = where
        devices = server.get("device")
        if not isinstance(devices, list):
            self.problems.append(f"{where}.device: must be a list of devices")
            devices = []
        ranks: list[int | None] = []
        device_ids: set[str] = set()
        for d, dev in enumerate(devices):
            path = f"{where}.device[{d}]"
            if not isinstance(dev, dict):
                self.problems.append(f"{path}: must be an object with device_id, device_ip and rank_id")
                continue
            self.device_id(path, dev, device_ids)
            self.device_ip(path, dev)
            ranks.append(self.rank_id(path, dev))
            if self.v12:
                sdid = self.string(path, dev, "super_device_id")
                if sdid is not None and not sdid.isdigit():
                    self.problems.append(f"{path}.super_device_id: {sdid!r} is not a number")
                elif sdid is not None:
                    self.super_ids.append((sid, sdid, path))
        self.servers.append((where, sid, ranks))

    def device_id(self, path: str, dev: dict, seen: set[str]) -> None:
        device_id = self.string(path, dev, "device_id")
        if device_id is None:
            return
        n = self.devices_per_node
        if not device_id.isdigit() or int(device_id) >= n:
            self.problems.append(f"{path}.device_id: {device_id!r} is not a device of the node (0-{n - 1})")
        elif device_id in seen:
            self.problems.append(f"{path}.device_id: device {device_id} is listed twice on this server")
        seen.add(device_id)

    def device_ip(self, path: str, dev: dict) -> None:
        ip = self.string(path, dev, "device_ip")
        if ip is None:
            return
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            self.problems.append(f"{path}.device_ip: {ip!r} is not an IP address")
            return
        if ip in self.ip_at:
            self.problems.append(f"{path}.device_ip: {ip} is also the IP of {self.ip_at[ip]}")
        else:
            self.ip_at[ip] = path

    def rank_id(self, path: str, dev: dict) -> int | None:
        rank = self.string(path, dev, "rank_id")
        if rank is None:
            return None
        if not rank.isdigit():
            self.problems.append(f"{path}.rank_id: {rank!r} is not a number")
            return None
        if int(rank) in self.rank_at:
            self.problems.append(f"{path}.rank_id: {rank} is also the rank of {self.rank_at[int(rank)]}")
            return None
        self.rank_at[int(rank)] = path
        return int(rank)

    def rank_blocks(self) -> None:
        total = sum(len(ranks) for _, _, ranks in self.servers)
        missing = [r for r in range(total) if r not in self.rank_at]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            self.problems.append(f"rank_id: must be 0..{total - 1}, each once; missing {shown}")
            return
        # Each server holds the next block of ranks: HCCL does not take ranks interleaved across servers.
        first = 0
        for where, _, ranks in self.servers:
            if ranks and sorted(ranks) != list(range(first, first + len(ranks))):
                self.problems.append(f"{where}: its rank_ids must be {first}-{first + len(ranks) - 1}, "
                                     "the next block after the servers listed before it")
            first += len(ranks)

    def super_pods(self, pods) -> None:
        if not isinstance(pods, list):
            self.problems.append("super_pod_list: a v1.2 table needs a list of super pods, each with "
                                 "super_pod_id and server_list")
            return
        pod_of: dict[str, str] = {}  # server_id -> super_pod_id
        pod_at: dict[str, str] = {}  # super_pod_id -> path
        for p, pod in enumerate(pods):
            where = f"super_pod_list[{p}]"
            if not isinstance(pod, dict):
                self.problems.append(f"{where}: must be an object with super_pod_id and server_list")
                continue
            pod_id = self.string(where, pod, "super_pod_id")
            if pod_id is not None and pod_id in pod_at:
                self.problems.append(f"{where}.super_pod_id: {pod_id!r} is also the id of {pod_at[pod_id]}")
            elif pod_id is not None:
                pod_at[pod_id] = where
            members = pod.get("server_list")
            if not isinstance(members, list):
                self.problems.append(f"{where}.server_list: must be a list of {{\"server_id\": ...}}")
                continue
            for m, member in enumerate(members):
                path = f"{where}.server_list[{m}]"
                sid = self.string(path, member, "server_id") if isinstance(member, dict) else None
                if not isinstance(member, dict):
                    self.problems.append(f"{path}: must be an object with server_id")
                elif sid is not None and sid not in self.server_at:
                    self.problems.append(f"{path}.server_id: {sid!r} is not in server_list")
                elif sid is not None and sid in pod_of:
                    self.problems.append(f"{path}.server_id: {sid!r} is also in super pod {pod_of[sid]!r}")
                elif sid is not None:
                    pod_of[sid] = pod_id
        self.pods_contiguous(pod_of)
        self.super_device_ids_unique(pod_of)

    def pods_contiguous(self, pod_of: dict[str, str]) -> None:
        done: set[str] = set()
        current = None
        for where, sid, _ in self.servers:
            if sid is None:
                continue
            if sid not in pod_of:
                self.problems.append(f"{where}.server_id: {sid!r} is in no super pod of super_pod_list")
                continue
            pod = pod_of[sid]
            if pod != current:
                if pod in done:
                    self.problems.append(f"{where}: server {sid!r} of super pod {pod!r} is apart from the other "
                                         "servers of its pod; list each super pod's servers together")
                done.add(current)
                current = pod

    def super_device_ids_unique(self, pod_of: dict[str, str]) -> None:
        # A super_device_id names an NPU within its super pod, so it is unique there.
        seen: dict[tuple[str, str], str] = {}
        for sid, sdid, path in self.super_ids:
            if sid not in pod_of:
                continue
            key = (pod_of[sid], sdid)
            if key in seen:
                self.problems.append(f"{path}.super_device_id: {sdid} is also the super_device_id of {seen[key]} "
                                     "in the same super pod")
            else:
                seen[key] = path


def read_table(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such rank table file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the rank table ({exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def servers_from_table(table: dict) -> list[ServerDevices]:
    """The servers of a valid table (see validate), with their super pods for v1.2."""
    pod_of = {member["server_id"]: pod["super_pod_id"]
              for pod in table.get("super_pod_list", []) for member in pod["server_list"]}
    v12 = table["version"] == "1.2"
    return [
        ServerDevices(
            server_id=server["server_id"],
            device_ids=tuple(int(d["device_id"]) for d in server["device"]),
            device_ips=tuple(d["device_ip"] for d in server["device"]),
            super_device_ids=tuple(d["super_device_id"] for d in server["device"]) if v12 else None,
            super_pod_id=pod_of[server["server_id"]] if v12 else None,
        )
        for server in table["server_list"]
    ]


def merge_files(paths: list[str], devices_per_node: int = 16) -> dict:
    """Merge the tables in `paths` (any order). Every problem of every file is reported together."""
    problems, servers, versions = [], [], set()
    server_in: dict[str, str] = {}  # server_id -> file
    ip_in: dict[str, str] = {}  # device_ip -> file
    for path in paths:
        table = read_table(path)
        found = validate(table, devices_per_node, merge_input=True)
        if found:
            problems += [f"{path}: {p}" for p in found]
            continue
        versions.add(table["version"])
        for server in servers_from_table(table):
            if server.server_id in server_in:
                problems.append(f"{path}: server_id {server.server_id} is also in {server_in[server.server_id]}")
            server_in.setdefault(server.server_id, path)
            for ip in server.device_ips:
                if ip in ip_in:
                    problems.append(f"{path}: device_ip {ip} (server {server.server_id}) is also in {ip_in[ip]}")
                ip_in.setdefault(ip, path)
            servers.append(server)
    if len(versions) > 1:
        problems.append("the files mix rank table versions 1.0 and 1.2; merge tables of one version")
    if problems:
        raise ConfigError(f"cannot merge ({len(problems)} problems):\n" + "\n".join(problems))
    if not servers:
        raise ConfigError("give at least one rank table file to merge")
    return merge_servers(servers)


def wait_script(path: str, timeout_s: int = 600, interval_s: float = 2) -> str:
    """A bash script that waits until the rank table at `path` has status "completed"
    (a cluster component writes it with status "initializing" first)."""
    return render_template(WAIT_TEMPLATE, path=path, timeout_s=timeout_s, interval_s=interval_s)

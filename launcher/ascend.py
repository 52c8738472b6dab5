"""Ascend servers as rank tables need them (device IPs from hccn_tool or hccn.conf, or an inventory
of super pods), and the preflight checks of a job on a node.

Parsers of the tools' output are pure functions. The tools run through a runner, any function
argv -> Result that enforces a timeout: `run_local` here; the SSH backend can pass its own to run
the same checks on a remote node.

Output formats, as the public documentation shows them:
- `hccn_tool -i N -ip -g` prints `ipaddr:IP` and `netmask:MASK` lines; /etc/hccn.conf has
  `address_N=IP` lines (mindspore-ai/models utils/hccl_tools/hccl_tools.py reads both;
  MindSpore tutorial "rank table Startup", mindspore-ai/docs tutorials/source_en/parallel/rank_table.md).
- `hccn_tool -i N -net_health -g` prints `net health status: Success` (or `Fault`, ...) (same tutorial).
- `npu-smi info`: one table row per NPU (`| NPU  Name | Health | ...`), then a process table with
  `| NPU  Chip | Process id | Process name | Process memory(MB) |` rows, or
  `No running processes found in NPU N` (npu-smi reference, "查询基本信息":
  https://www.hiascend.com/document/detail/zh/Atlas%20200I%20A2/2520/re/npu/npusmi_007.html,
  and its field list in the Atlas 300I Pro guide, 300Ipro_015.html).
- the driver, CANN toolkit and MindSpore versions: see launcher/ascend_versions.py.
- super_device_id of an NPU: the SDID field of `npu-smi info -t spod-info -i ID -c CHIP`, super_pod_id:
  its "Super Pod ID" (CANN HCCL user guide, see launcher/ranktable.py).
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from launcher import ascend_versions as versions
from launcher.errors import ConfigError
from launcher.ranktable import ServerDevices, single_node_table
from launcher.inputs import read_yaml_file
from launcher.job_sections import parse_devices

DRIVER_DIR = "/usr/local/Ascend/driver"
HCCN_CONF = "/etc/hccn.conf"
TOOLKIT_DIRS = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/cann")  # CANN up to 8.3, 8.5 on
MINDSPORE_VERSION = "from importlib.metadata import version; print(version('mindspore'))"  # no slow import
TIMEOUT_S = 30.0
NOT_FOUND = 127


@dataclass(frozen=True)
class Result:
    rc: int | None  # None: killed at the timeout; NOT_FOUND: no such program
    out: str  # stdout and stderr together


Runner = Callable[[list[str]], Result]


def run_local(argv: list[str], timeout: float = TIMEOUT_S) -> Result:
    """Run a command on this machine; at the timeout its whole process group is killed, so a tool
    that left children behind cannot hold the pipe open."""
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)
    except FileNotFoundError:
        return Result(NOT_FOUND, "")
    with proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it ended just now
            proc.communicate()
            return Result(None, "")
    return Result(proc.returncode, out)


def local_runner(timeout: float) -> Runner:
    return lambda argv: run_local(argv, timeout)


def _failed(argv: list[str], result: Result, fix: str) -> str | None:
    """The problem with a tool run that did not work, or None if it ran."""
    cmd = " ".join(argv)
    if result.rc == NOT_FOUND:
        return f"{argv[0]} not found on PATH; {fix}"
    if result.rc is None:
        return f"'{cmd}' did not answer before the timeout; the driver may be stuck (check 'dmesg')"
    if result.rc != 0:
        tail = result.out.strip().splitlines()[-1:] or ["no output"]
        return f"'{cmd}' exited {result.rc}: {tail[0]}"
    return None


# --- device IPs (ranktable discover) ---------------------------------------------------------

def parse_hccn_ip(text: str) -> str | None:
    m = re.search(r"^\s*ipaddr\s*:\s*(\S+)", text, re.MULTILINE)
    return m[1] if m else None


def parse_hccn_conf(text: str) -> dict[int, str]:
    return {int(m[1]): m[2] for m in re.finditer(r"^\s*address_(\d+)\s*=\s*(\S+)", text, re.MULTILINE)}


def device_ips(devices: list[int], run: Runner, conf_path: str = HCCN_CONF) -> list[str]:
    """Each device's NIC IP, from hccn_tool, or from the hccn.conf file where hccn_tool is missing.

    Everything goes through the runner, so the same code reads a remote node over SSH."""
    problems, ips = [], []
    first = run(["hccn_tool", "-i", str(devices[0]), "-ip", "-g"]) if devices else Result(0, "")
    if first.rc != NOT_FOUND:
        for dev in devices:
            argv = ["hccn_tool", "-i", str(dev), "-ip", "-g"]
            result = first if dev == devices[0] else run(argv)
            ip = parse_hccn_ip(result.out) if result.rc == 0 else None
            if ip is None:
                why = _failed(argv, result, "add the driver's tools to PATH") or f"'{' '.join(argv)}' printed no ipaddr"
                problems.append(f"device {dev}: {why}; set the IP with "
                                f"'hccn_tool -i {dev} -ip -s address IP netmask MASK'")
            ips.append(ip)
    else:
        result = run(["cat", conf_path])
        if result.rc != 0:
            raise ConfigError(f"hccn_tool is not on PATH and {conf_path} cannot be read; add the driver's tools "
                              "(/usr/local/Ascend/driver/tools) to PATH or point --hccn-conf at the file")
        conf = parse_hccn_conf(result.out)
        for dev in devices:
            if dev not in conf:
                problems.append(f"device {dev}: {conf_path} has no address_{dev}=IP line")
            ips.append(conf.get(dev))
    for dev, ip in zip(devices, ips):
        if ip is not None and not _is_ip(ip):
            problems.append(f"device {dev}: {ip!r} is not an IP address")
    if problems:
        raise ConfigError("cannot read the device IPs:\n" + "\n".join(problems))
    return ips


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def guess_server_ip() -> str | None:
    """This host's IP as its hostname resolves, or None."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def server_id(given: str | None) -> str:
    """The server_id for this host: the IP given, or a guess that is refused when it is loopback,
    since a loopback server_id in a multi-node table makes the job hang at HCCL init."""
    if given:
        if not _is_ip(given):
            raise ConfigError(f"--server-ip: {given!r} is not an IP address")
        return given
    guessed = guess_server_ip()
    if guessed is None:
        raise ConfigError("cannot find this host's IP from its hostname; pass --server-ip with the address "
                          "the other nodes reach this host at")
    if ipaddress.ip_address(guessed).is_loopback:
        raise ConfigError(f"this host's name resolves to {guessed}, a loopback address, and a rank table with a "
                          "loopback server_id makes multi-node jobs hang; pass --server-ip with the address "
                          "the other nodes reach this host at")
    return guessed


def this_node(hosts: list[str]) -> int | None:
    """The index of the host that names this machine, if exactly one does."""
    names = {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn(), guess_server_ip()}
    matches = [i for i, host in enumerate(hosts) if host in names]
    return matches[0] if len(matches) == 1 else None


def discover(devices: list[int], server_ip: str | None, run: Runner, conf_path: str = HCCN_CONF) -> dict:
    """The single-node v1.0 rank table of this host."""
    sid = server_id(server_ip)
    ips = device_ips(devices, run, conf_path)
    return single_node_table(ServerDevices(sid, tuple(devices), tuple(ips)))


# --- inventories (v1.2) ----------------------------------------------------------------------

def servers_from_inventory(data, source: str = "inventory") -> list[ServerDevices]:
    """The servers of an inventory (YAML) that lists, per server, what hccn_tool and npu-smi report:

        servers:
          - server_id: 10.0.0.1
            super_pod_id: "0"              # v1.2 only (Atlas A3)
            devices: 0-15                  # as in a job file
            device_ips: [192.168.1.1, ...] # one per device
            super_device_ids: [0, 1, ...]  # v1.2 only; one per device (npu-smi info -t spod-info: SDID)
    """
    entries = data.get("servers") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: needs a 'servers' list; each server has server_id, devices and device_ips")
    problems, servers = [], []
    for i, entry in enumerate(entries):
        where = f"{source}: servers[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping with server_id, devices and device_ips")
            continue
        unknown = set(entry) - {"server_id", "super_pod_id", "devices", "device_ips", "super_device_ids"}
        if unknown:
            problems.append(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        if not isinstance(entry.get("server_id"), str) or not entry["server_id"]:
            problems.append(f"{where}.server_id: give the server's IP (the address the other nodes reach it at)")
        if entry.get("device_ips") is None:
            problems.append(f"{where}.device_ips: missing; read them with 'hccn_tool -i N -ip -g' or /etc/hccn.conf")
        try:
            devices = tuple(parse_devices(entry.get("devices")))
        except ValueError as exc:
            problems.append(f"{where}.devices: {exc}")
            continue
        lists = {}
        for key in ("device_ips", "super_device_ids"):
            value = entry.get(key)
            if value is not None and (not isinstance(value, list) or len(value) != len(devices)):
                problems.append(f"{where}.{key}: give a list of {len(devices)}, one per device")
            lists[key] = tuple(str(v) for v in value) if isinstance(value, list) else None
        pod = entry.get("super_pod_id")
        if (pod is None) != (lists["super_device_ids"] is None):
            problems.append(f"{where}: a v1.2 server needs both super_pod_id and super_device_ids")
        servers.append(ServerDevices(str(entry.get("server_id", "")), devices, lists["device_ips"] or (),
                                     lists["super_device_ids"], None if pod is None else str(pod)))
    if problems:
        raise ConfigError("\n".join(problems))
    return servers


def read_inventory(path: str | Path) -> list[ServerDevices]:
    return servers_from_inventory(read_yaml_file(path, "inventory file"), str(path))


# --- preflight -------------------------------------------------------------------------------

_NPU_ROW = re.compile(r"^\|\s*(\d+)\s+(\S*[A-Za-z]\S*)\s*\|")  # "| 0     910B3     | OK ..."
_PROCESS_ROW = re.compile(r"^\|\s*(\d+)\s+\d+\s*\|\s*(\d+)\s*\|")  # "| 2     0     | 1333928 | ..."


def parse_npu_smi(text: str) -> tuple[set[int], dict[int, list[int]]]:
    """The NPUs `npu-smi info` lists, and the pids that hold each one (from its process table)."""
    npus: set[int] = set()
    holders: dict[int, list[int]] = {}
    in_processes = False
    for line in text.splitlines():
        if "Process id" in line:
            in_processes = True
        elif in_processes and (m := _PROCESS_ROW.match(line)):
            holders.setdefault(int(m[1]), []).append(int(m[2]))
        elif not in_processes and (m := _NPU_ROW.match(line)):
            npus.add(int(m[1]))
    return npus, holders


def check_npus(text: str, devices: list[int]) -> list[str]:
    npus, holders = parse_npu_smi(text)
    if not npus:
        return ["npu-smi info lists no NPU; check that the driver is loaded and /dev/davinci* exist "
                "(in a container: request the NPUs through the device plugin)"]
    problems = []
    for dev in devices:
        if dev not in npus:
            listed = ", ".join(map(str, sorted(npus)))
            problems.append(f"device {dev}: npu-smi info does not list it (it lists {listed}); "
                            "use devices of this node in cluster.nodes[].devices")
        elif dev in holders:
            pids = ", ".join(map(str, holders[dev]))
            problems.append(f"device {dev}: held by process {pids} (npu-smi info); "
                            f"stop it ('kill {holders[dev][0]}') or use a free device")
    return problems


def check_net_health(dev: int, text: str) -> str | None:
    m = re.search(r"net health status\s*:\s*(.+)", text)
    status = m[1].strip() if m else "not reported"
    if status == "Success":
        return None
    return (f"device {dev}: net health status is {status!r}; check the link with 'hccn_tool -i {dev} -link -g' "
            f"and the detect address with 'hccn_tool -i {dev} -netdetect -g' "
            f"(set it to the gateway with 'hccn_tool -i {dev} -netdetect -s address GATEWAY')")


def _read(run: Runner, path: str) -> str | None:
    result = run(["cat", path])
    return result.out if result.rc == 0 else None


def read_driver_version(run: Runner, driver_dir: str) -> tuple[str | None, str | None]:
    """The driver version, or None and the problem."""
    path = f"{driver_dir}/version.info"
    text = _read(run, path)
    version = versions.parse_driver_version_info(text) if text is not None else None
    if version:
        return version, None
    why = "has no Version= line" if text is not None else "is missing"
    return None, f"{path} {why}; reinstall the Ascend NPU driver (in a container: mount the host's {driver_dir})"


def read_cann_version(run: Runner, toolkit_dirs: tuple[str, ...]) -> tuple[str | None, str | None]:
    """The CANN toolkit version from the first toolkit directory that records one, or None and the problem."""
    arch = run(["uname", "-m"]).out.strip() or "aarch64"
    tried = []
    for root in toolkit_dirs:
        for path, parse in ((f"{root}/{arch}-linux/ascend_toolkit_install.info", versions.parse_toolkit_install_info),
                            (f"{root}/version.cfg", versions.parse_version_cfg)):
            text = _read(run, path)
            version = parse(text) if text is not None else None
            if version:
                return version, None
            tried.append(path)
    return None, (f"no CANN toolkit version found (none of {', '.join(tried)} gives one); install the CANN "
                  "toolkit (in a container: use an image with CANN); if it is elsewhere, give "
                  "'launcher preflight --toolkit-dir' the ASCEND_HOME_PATH its set_env.sh sets")


def read_mindspore_version(run: Runner, python: str) -> str | None:
    result = run([python, "-c", MINDSPORE_VERSION])
    lines = result.out.strip().splitlines()
    return lines[-1].strip() if result.rc == 0 and lines else None


def check_versions(run: Runner, driver_dir: str | None, toolkit_dirs: tuple[str, ...],
                   mindspore: str | None, python: str | None) -> list[str]:
    """Problems with the driver, CANN and MindSpore versions of a node: files missing, a CANN the installed
    MindSpore does not run on, a driver older than the CANN needs. driver_dir None: no driver to read.
    mindspore: the version if the caller has read it; else it is read with python (None: not checked)."""
    problems = []
    driver = None
    if driver_dir is not None:
        driver, problem = read_driver_version(run, driver_dir)
        if problem:
            problems.append(problem)
    cann, problem = read_cann_version(run, toolkit_dirs)
    if problem:
        problems.append(problem)
    if mindspore is None and python is not None:
        mindspore = read_mindspore_version(run, python)
        if mindspore is None:
            fits = versions.mindspore_for_cann(cann) if cann else []
            hint = f" (MindSpore {' / '.join(fits)} goes with CANN {cann})" if fits else ""
            problems.append(f"MindSpore is not installed for {python}; install it there{hint}")
    if cann and mindspore and (problem := versions.check_cann(mindspore, cann)):
        problems.append(problem)
    if cann and driver and (problem := versions.check_driver(cann, driver)):
        problems.append(problem)
    return problems


def preflight(devices: list[int], multi_node: bool, run: Runner, driver_dir: str = DRIVER_DIR,
              toolkit_dirs: tuple[str, ...] = TOOLKIT_DIRS, mindspore: str | None = None,
              python: str | None = sys.executable) -> list[str]:
    """Every problem that would stop the job's ranks on this node, each with what to run to fix it.

    mindspore and python: as check_versions takes them; python is the interpreter the job runs."""
    problems = []
    result = run(["test", "-d", driver_dir])
    has_driver = result.rc == 0
    if not has_driver:
        problems.append(f"{driver_dir} is missing; install the Ascend NPU driver "
                        f"(in a container: mount it from the host with hostPath {driver_dir})")
    argv = ["npu-smi", "info"]
    result = run(argv)
    failed = _failed(argv, result, "install the Ascend NPU driver, which ships npu-smi "
                                   "(in a container: mount /usr/local/bin/npu-smi from the host)")
    problems += [failed] if failed else check_npus(result.out, devices)
    if multi_node:
        for dev in devices:
            argv = ["hccn_tool", "-i", str(dev), "-net_health", "-g"]
            result = run(argv)
            failed = _failed(argv, result, "add the driver's tools (/usr/local/Ascend/driver/tools) to PATH")
            if failed and result.rc == NOT_FOUND:
                problems.append(failed)
                break  # one line is enough for a missing tool
            problem = f"device {dev}: {failed}" if failed else check_net_health(dev, result.out)
            if problem:
                problems.append(problem)
    problems += check_versions(run, driver_dir if has_driver else None, toolkit_dirs, mindspore, python)
    return problems

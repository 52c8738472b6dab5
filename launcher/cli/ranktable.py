"""Commands for Ascend hosts: HCCL rank tables and the node preflight."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from launcher.cli.console import err, out, reports_errors
from launcher.errors import ConfigError
from launcher.spec import load_job

# --- rank tables and the Ascend preflight -----------------------------------------------------


@click.group("ranktable")
def ranktable_cmd() -> None:
    """Make, merge and check HCCL rank tables (v1.0, and v1.2 for Atlas A3 super pods)."""


def _write_table(table: dict, output: str | None) -> None:
    from launcher.render import to_json

    if not output:
        click.echo(to_json(table), nl=False)
        return
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(to_json(table))
    ranks = sum(len(s["device"]) for s in table["server_list"])
    out.print(f"wrote {output}: rank table {table['version']}, {table['server_count']} servers, {ranks} ranks")


def _device_list(text: str) -> list[int]:
    from launcher.job_sections import parse_devices

    try:
        if text.replace(",", "").replace(" ", "").isdigit():
            return [int(d) for d in text.split(",")]
        return parse_devices(text)
    except ValueError as exc:
        raise ConfigError(f"--devices: {exc}") from None


@ranktable_cmd.command("discover")
@click.option("--server-ip", help="this host's IP as the other nodes reach it (default: its hostname's IP)")
@click.option("--devices", default="0-7", show_default=True, help="devices of this host: 0-7, [0,8) or 0,1,2")
@click.option("--hccn-conf", default="/etc/hccn.conf", show_default=True,
              help="where to read device IPs when hccn_tool is not on PATH")
@click.option("--timeout", default=30.0, show_default=True, help="seconds each hccn_tool call may take")
@click.option("-o", "--output", help="file to write (default: standard output)")
@reports_errors
def ranktable_discover(server_ip: str | None, devices: str, hccn_conf: str, timeout: float,
                       output: str | None) -> None:
    """Write this host's single-node v1.0 rank table, with device IPs from hccn_tool (or hccn.conf)."""
    import ipaddress

    from launcher import ascend

    table = ascend.discover(_device_list(devices), server_ip, ascend.local_runner(timeout), hccn_conf)
    if server_ip and ipaddress.ip_address(server_ip).is_loopback:
        err.print(f"warning: server_id {server_ip} is a loopback address; other nodes cannot reach it",
                  markup=False)
    _write_table(table, output)


@ranktable_cmd.command("merge")
@click.argument("files", nargs=-1, required=True)
@click.option("-o", "--output", help="file to write (default: standard output)")
@click.option("--devices-per-node", default=16, show_default=True, type=click.IntRange(1, 64))
@reports_errors
def ranktable_merge(files: tuple[str, ...], output: str | None, devices_per_node: int) -> None:
    """Merge per-node rank tables into one, servers in the order of FILES (as merge_hccl.py does; v1.2
    brings each super pod's servers together), rank_id renumbered from 0 in that order."""
    from launcher import ranktable

    _write_table(ranktable.merge_files(list(files), devices_per_node), output)


@ranktable_cmd.command("build")
@click.argument("inventory")
@click.option("-o", "--output", help="file to write (default: standard output)")
@reports_errors
def ranktable_build(inventory: str, output: str | None) -> None:
    """Write the rank table of an inventory (YAML): v1.2 when its servers have super pods."""
    from launcher import ascend, ranktable

    _write_table(ranktable.merge_servers(ascend.read_inventory(inventory)), output)


@ranktable_cmd.command("validate")
@click.argument("file")
@click.option("--devices-per-node", default=16, show_default=True, type=click.IntRange(1, 64))
@reports_errors
def ranktable_validate(file: str, devices_per_node: int) -> None:
    """Check a v1.0 or v1.2 rank table; print every problem with its JSON path (exit 2) or "valid"."""
    from launcher import ranktable

    table = ranktable.read_table(file)
    problems = ranktable.validate(table, devices_per_node)
    if problems:
        for problem in problems:
            click.echo(problem, err=True)
        sys.exit(2)
    ranks = sum(len(s["device"]) for s in table["server_list"])
    out.print(f"valid: rank table {table['version']}, {table['server_count']} servers, {ranks} ranks")


@click.command("preflight")
@click.argument("job_file", metavar="JOB")
@click.option("--node", type=int, help="index in cluster.nodes of this machine (default: the node whose host "
                                       "names this machine)")
@click.option("--driver-dir", default="/usr/local/Ascend/driver", show_default=True)
@click.option("--toolkit-dir", "toolkit_dirs", multiple=True,
              help="CANN toolkit directory, as ASCEND_HOME_PATH names it (default: $ASCEND_HOME_PATH, "
                   "/usr/local/Ascend/ascend-toolkit/latest, /usr/local/Ascend/cann)")
@click.option("--python", "python", default=sys.executable, show_default="this launcher's",
              help="the python the job runs, whose MindSpore is checked against CANN")
@click.option("--timeout", default=30.0, show_default=True, help="seconds each npu-smi/hccn_tool call may take")
@reports_errors
def preflight_cmd(job_file: str, node: int | None, driver_dir: str, toolkit_dirs: tuple[str, ...], python: str,
                  timeout: float) -> None:
    """Check this node for JOB on Ascend: driver, free NPUs, (multi-node) each NPU's network health, and
    that the driver, CANN and MindSpore versions go together."""
    import os

    from launcher import ascend

    job = load_job(job_file)
    nodes = job.cluster.nodes
    if job.cluster.device != "ascend":
        out.print(f"cluster.device is {job.cluster.device}: there is no Ascend preflight to run")
        return
    if node is None:
        node = 0 if len(nodes) == 1 else ascend.this_node([n.host for n in nodes])
        if node is None:
            raise ConfigError("cannot tell which node of cluster.nodes this machine is; pass --node INDEX")
    if not 0 <= node < len(nodes):
        raise ConfigError(f"--node: {node} is not a node of this job (0-{len(nodes) - 1})")
    devices = nodes[node].devices
    if not toolkit_dirs:
        home = os.environ.get("ASCEND_HOME_PATH")
        toolkit_dirs = ((home,) if home else ()) + ascend.TOOLKIT_DIRS
    problems = ascend.preflight(devices, len(nodes) > 1, ascend.local_runner(timeout), driver_dir,
                                toolkit_dirs, python=python)
    where = f"node {node} ({nodes[node].host})"
    if problems:
        err.print(f"preflight failed on {where}: {len(problems)} problem(s)", markup=False)
        for problem in problems:
            err.print(f"  {problem}", markup=False)
        sys.exit(1)
    out.print(f"preflight passed on {where}: devices {', '.join(map(str, devices))}")

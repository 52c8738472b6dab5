"""The command line: this module and the cli_*.py modules are the only places that print errors or exit."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from launcher import cli_ascend, cli_ckpt, cli_data, cli_predict, gather
from launcher.console import err, out, reports_errors
from launcher.entrypoints import nodectl
from launcher.errors import BackendError, ConfigError, LauncherError
from launcher.plan import LaunchPlan, build_plan
from launcher.runs import PLAN_DIR, RunRecord, find_run, new_run_id
from launcher.spec import (
    Job,
    check_local_host,
    load_job,
    port_is_free,
    resolve_local_paths,
)

DEFAULT_RUNS_DIR = "runs"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="launcher")
def main() -> None:
    """Launch MindSpore/MindFormers fine-tunes (LoRA or full) from one job file.

    \b
    launcher render JOB -o DIR    write every artifact for review
    launcher up JOB               start the job, watch it, gather it into runs/<run-id>/
    launcher status|logs|gather|down RUN
    launcher dataset tiny PATH    make the demo dataset for the tiny CPU model
    launcher data prepare JOB     tokenize the job's data: section into a MindRecord
    """


def _load_with_data(job_file: str, pvc_dir: str | None = None) -> tuple[Job, bool, Path | None]:
    """The job, whether it is local, and the file its data: section prepares (None without one).

    dataset.path is set to that file here, before planning, so that the plan stays pure.
    """
    job = load_job(job_file)
    local = job.cluster.backend == "local"
    if local:
        job = resolve_local_paths(job, Path.cwd())
    if job.data is None:
        return job, local, None
    from launcher.data_cache import resolve_data

    job, path = resolve_data(job, Path.cwd(), Path(pvc_dir).resolve() if pvc_dir else None)
    return job, local, path


def _load(job_file: str) -> tuple[Job, bool]:
    job, local, _ = _load_with_data(job_file)
    return job, local


def _prepare_data(job_file: str, pvc_dir: str | None) -> tuple[Job, bool, Path | None]:
    """_load, and the job's data: section prepared (or found in the cache) before anything starts."""
    job, local, path = _load_with_data(job_file, pvc_dir)
    if path is None:
        return job, local, None
    if job.cluster.backend == "k8s" and not pvc_dir:
        raise ConfigError(f"data: the pods read the prepared dataset from the claim {job.cluster.k8s.output_pvc!r}; "
                          "mount it on this machine and pass --pvc-dir (the dataset goes to <pvc-dir>/data/)")
    from launcher import data_cache

    report = data_cache.ensure_prepared(job, path, cli_data.progress_bar)
    if report is None:
        out.print(f"dataset: {path} (prepared earlier from the same inputs)")
    cli_data.print_report(report)
    return job, local, path


def _rank_table(plan: LaunchPlan) -> Table:
    table = Table(title=f"{plan.job_name}: {plan.world_size} ranks, {plan.launch} on {plan.backend}/{plan.device}")
    for column in ("rank", "node", "host", "device", "log"):
        table.add_column(column)
    for s in plan.ranks:
        table.add_row(str(s.rank), str(s.node), s.host, str(s.device), s.console_log)
    return table


def _render(job_file: str, output: str | None) -> LaunchPlan:
    job, _ = _load(job_file)
    plan = build_plan(job)
    target = Path(output or f"rendered/{job.name}")
    if target.exists() and any(target.iterdir()) and not (target / "plan.json").exists():
        raise ConfigError(f"{target} exists and is not a rendered plan; choose an empty or new directory")
    plan.write(target)
    out.print(_rank_table(plan))
    out.print(f"wrote {len(plan.artifacts)} artifacts to {target}/")
    return plan


@main.command()
@click.argument("job_file", metavar="JOB")
@click.option("-o", "--output", required=True, help="directory to write the artifacts into")
@reports_errors
def render(job_file: str, output: str) -> None:
    """Validate JOB and write every artifact (configs, scripts, rank tables) to a directory."""
    _render(job_file, output)


@main.command()
@click.argument("job", metavar="JOB")
@click.option("--dry-run", is_flag=True, help="only validate and render, like 'launcher render'")
@click.option("-o", "--output", help="with --dry-run: where to write (default: rendered/<job-name>)")
@click.option("--runs-dir", default=DEFAULT_RUNS_DIR, show_default=True, help="where run directories go")
@click.option("--accept-new-host-keys", is_flag=True,
              help="ssh: trust nodes whose host key is not yet in known_hosts, and record their keys")
@click.option("--kill-stale", is_flag=True, help="ssh: stop processes of earlier runs of this job found on the nodes")
@click.option("--kubeconfig", help="k8s: kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster)")
@click.option("--context", help="k8s: kubeconfig context (default: the current one)")
@click.option("--namespace", help="k8s: namespace (default: cluster.k8s.namespace)")
@click.option("--replace", is_flag=True, help="k8s: replace objects of the same name that already exist")
@click.option("--pending-timeout", type=float, default=600, show_default=True,
              help="k8s: seconds pods may stay Pending before the run is deleted")
@click.option("--pvc-dir", help="k8s: where cluster.k8s.output_pvc is mounted on this machine (gather reads output/ there)")
@reports_errors
def up(job: str, dry_run: bool, output: str | None, runs_dir: str, accept_new_host_keys: bool,
       kill_stale: bool, kubeconfig: str | None, context: str | None, namespace: str | None, replace: bool,
       pending_timeout: float, pvc_dir: str | None) -> None:
    """Start JOB (a job file, or a directory written by 'launcher render'), watch it, and gather it.

    Any rank that fails, a lost node, Ctrl-C or SIGTERM stops every rank; what exists is still gathered.
    """
    if dry_run:
        if Path(job).is_dir():
            raise ConfigError("--dry-run takes a job file; a rendered directory is already rendered")
        _render(job, output)
        return
    data_path = None  # the dataset a data: section prepared
    if Path(job).is_dir():
        plan = LaunchPlan.read(Path(job))
        if plan.backend == "local" and not port_is_free(plan.master_port):
            raise ConfigError(f"port {plan.master_port} of this rendered plan is in use on this machine; "
                              "render it again with a free cluster.master_port")
    else:
        spec, local, data_path = _prepare_data(job, pvc_dir)
        if local:
            check_local_host(spec)
            if spec.cluster.device == "ascend":
                _ascend_preflight_here(spec)
        plan = build_plan(spec)
        if _needs_device_ips(spec):
            plan = build_plan(_with_discovered_ips(spec, plan, Path(runs_dir), accept_new_host_keys))
    run_dir, record = _new_run(plan, Path(runs_dir))
    if data_path is not None:
        from launcher.data_cache import stage_into_run

        stage_into_run(spec, data_path, run_dir)
    if plan.backend == "k8s":
        from launcher.backends.k8s import Target

        pvc = str(Path(pvc_dir).resolve()) if pvc_dir else None
        target = Target(kubeconfig, context, namespace, pvc)
        _run_k8s(plan, run_dir, record, target, replace, pending_timeout)
    elif plan.backend == "ssh":
        _run_ssh(plan, run_dir, record, accept_new_host_keys, kill_stale)
    else:
        _run_local(plan, run_dir, record)


def _ascend_preflight_here(job: Job) -> None:
    from launcher import ascend

    problems = ascend.preflight(job.cluster.nodes[0].devices, False, ascend.local_runner(ascend.TIMEOUT_S))
    if problems:
        raise BackendError("preflight failed on this machine; nothing was started:\n  " + "\n  ".join(problems))


def _needs_device_ips(job: Job) -> bool:
    cluster = job.cluster
    return (cluster.backend == "ssh" and cluster.device == "ascend" and cluster.launch == "ranktable"
            and any(n.device_ips is None for n in cluster.nodes))


def _with_discovered_ips(job: Job, plan: LaunchPlan, runs_dir: Path, accept_new: bool) -> Job:
    """Read the missing device IPs from the nodes, so that the plan can carry the merged rank table."""
    from launcher.backends import ssh_preflight

    out.print("reading device IPs from the nodes (hccn_tool or /etc/hccn.conf) ...")
    found = ssh_preflight.discover_device_ips(plan, runs_dir, accept_new)
    nodes = [n if n.device_ips else n.model_copy(update={"device_ips": found[i]})
             for i, n in enumerate(job.cluster.nodes)]
    return job.model_copy(update={"cluster": job.cluster.model_copy(update={"nodes": nodes})})


def _new_run(plan: LaunchPlan, runs_dir: Path) -> tuple[Path, RunRecord]:
    runs_dir.mkdir(parents=True, exist_ok=True)
    run_id = new_run_id(plan.job_name, runs_dir)
    run_dir = (runs_dir / run_id).resolve()
    plan.write(run_dir / PLAN_DIR)
    record = RunRecord(run_id, plan.job_name, plan.backend, "starting", time.time())
    record.save(run_dir)
    where = {"local": "this machine", "k8s": "Kubernetes"}.get(plan.backend, f"{len(plan.nodes)} nodes over SSH")
    out.print(f"run [bold]{run_id}[/] — {plan.world_size} ranks, {plan.launch} on {where}")
    return run_dir, record


def _run_local(plan: LaunchPlan, run_dir: Path, record: RunRecord) -> None:
    from launcher.backends import local

    # SIGTERM gets the same teardown as Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        record = local.execute(plan, run_dir, record, out)
    finally:
        signal.signal(signal.SIGTERM, previous)
    out.print("gathering ...")
    summary = local.gather_run(plan, run_dir, record)
    _report(plan, run_dir, record, summary, _failed_rank_tail(run_dir, record), [])


def _run_ssh(plan: LaunchPlan, run_dir: Path, record: RunRecord, accept_new: bool, kill_stale: bool) -> None:
    from launcher.backends import ssh

    try:
        record, problems, tail = ssh.execute(plan, run_dir, record, out, accept_new, kill_stale)
    except LauncherError:
        if RunRecord.load(run_dir).state == "starting":
            shutil.rmtree(run_dir)  # nothing ran anywhere: leave no run behind
        raise
    out.print("gathered; verifying ...")
    summary = gather.finish(plan, run_dir, record)
    _report(plan, run_dir, record, summary, tail, problems)


def _run_k8s(plan: LaunchPlan, run_dir: Path, record: RunRecord, target, replace: bool,
             pending_timeout: float) -> None:
    from launcher.backends import k8s

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM: the same teardown as Ctrl-C
    try:
        record, problems = k8s.execute(plan, run_dir, record, out, target, replace, pending_timeout)
    except LauncherError:
        if RunRecord.load(run_dir).state == "starting":
            shutil.rmtree(run_dir)  # nothing was left in the cluster: leave no run behind
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    out.print("gathered; verifying ...")
    summary = gather.finish(plan, run_dir, record)
    _report(plan, run_dir, record, summary, _failed_rank_tail(run_dir, record), problems)


def _failed_rank_tail(run_dir: Path, record: RunRecord, lines: int = 20) -> str:
    """The end of the failing rank's gathered console log."""
    if record.failed_rank is None:
        return ""
    log = run_dir / gather.rank_dir(record.failed_rank) / "console.log"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""


def _report(plan: LaunchPlan, run_dir: Path, record: RunRecord, summary: dict, tail: str,
            problems: list[str]) -> None:
    _print_summary(summary)
    out.print(f"run directory: {run_dir}/")
    for problem in problems:
        err.print(f"warning: {problem}", markup=False)
    if record.state == "succeeded" and not problems:
        return
    if record.state == "succeeded":
        sys.exit(1)
    if record.state == "interrupted":
        err.print(f"interrupted: every rank of {record.run_id} was stopped; what they wrote is gathered")
        sys.exit(130)
    rank = record.failed_rank
    if rank is None:
        err.print(f"error: run {record.run_id} failed: {record.message}", markup=False)
    else:
        slot = plan.ranks[rank]
        where = f"node {slot.node}, {slot.host}"
        if plan.backend == "k8s":
            from launcher.backends.k8s_objects import short_id

            where = f"pod {plan.job_name}-{short_id(record.run_id, plan.job_name)}-rank-{rank}"
        err.print(f"error: rank {rank} failed ({where}); every other rank was stopped. "
                  f"Last lines of its log:", markup=False)
        err.print(tail, markup=False)
    sys.exit(1)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _print_summary(summary: dict) -> None:
    table = Table(title=f"{summary['run_id']}: {summary['state']}")
    for column in ("rank", "steps", "first loss", "last loss", "tokens/s", "checkpoints"):
        table.add_column(column, justify="right")
    for rank, r in summary["ranks"].items():
        fmt = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
        table.add_row(rank, str(r["steps"]), fmt(r["first_loss"]), fmt(r["last_loss"]),
                      "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}", str(len(r["checkpoints"])))
    out.print(table)


runs_option = click.option("--runs-dir", default=DEFAULT_RUNS_DIR, show_default=True, help="where run directories are")


def _open_run(run: str, runs_dir: str) -> tuple[Path, RunRecord, LaunchPlan]:
    run_dir = find_run(run, Path(runs_dir))
    return run_dir, RunRecord.load(run_dir), LaunchPlan.read(run_dir / PLAN_DIR)


@main.command()
@click.argument("run")
@runs_option
@reports_errors
def status(run: str, runs_dir: str) -> None:
    """Show the state of RUN (a run id or directory) and each rank's progress."""
    from launcher.liveview import LiveView

    run_dir, record, plan = _open_run(run, runs_dir)
    out.print(f"run {record.run_id}: {record.state}")
    if record.failed_rank is not None:
        out.print(f"failed rank: {record.failed_rank}")
    if record.backend == "ssh":
        from launcher.backends import ssh

        lines, view = ssh.reconnect(plan, run_dir, record, out, "status")
        for line in lines:
            out.print(line, markup=False)
    elif record.backend == "k8s":
        from launcher.backends import k8s_ops

        lines, view = k8s_ops.status(plan, run_dir, record)
        for line in lines:
            out.print(line, markup=False)
    else:
        alive = nodectl.run_processes(record.run_id)
        if record.state == "running" and not alive:
            out.print("its processes are gone, but the launcher did not record the end (was it killed?)")
        out.print(f"{len(alive)} processes alive")
        view = LiveView(plan, run_dir, Console(force_terminal=False), record.run_id)
        view.update()
    out.print(view.table())


@main.command()
@click.argument("run")
@click.option("--rank", type=int, help="only this rank (default: all, each line prefixed)")
@click.option("-f", "--follow", is_flag=True, help="keep printing as the logs grow, until the run ends")
@runs_option
@reports_errors
def logs(run: str, rank: int | None, follow: bool, runs_dir: str) -> None:
    """Print the console logs of RUN's ranks."""
    run_dir, record, plan = _open_run(run, runs_dir)
    if rank is not None and not 0 <= rank < plan.world_size:
        raise ConfigError(f"--rank: {rank} is not a rank of this run (0-{plan.world_size - 1})")
    slots = [plan.ranks[rank]] if rank is not None else list(plan.ranks)
    if record.backend == "ssh":
        from launcher.backends import ssh

        problems = ssh.reconnect(plan, run_dir, record, out, "logs", ranks=[s.rank for s in slots],
                                 follow=follow, prefix=rank is None, echo=click.echo)
        for problem in problems:
            err.print(f"warning: {problem}", markup=False)
        return
    if record.backend == "k8s":
        from launcher.backends import k8s_ops

        for problem in k8s_ops.logs(plan, run_dir, record, [s.rank for s in slots], follow, rank is None, click.echo):
            err.print(f"warning: {problem}", markup=False)
        return
    offsets = {s.rank: 0 for s in slots}
    while True:
        for s in slots:
            path = run_dir / s.console_log
            if not path.is_file():
                continue
            with path.open("rb") as f:
                f.seek(offsets[s.rank])
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1] if follow else data
            offsets[s.rank] += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                click.echo(line if rank is not None else f"[rank {s.rank}] {line}")
        if not follow or not nodectl.run_processes(record.run_id):
            break
        time.sleep(0.5)


@main.command("gather")
@click.argument("run")
@runs_option
@reports_errors
def gather_cmd(run: str, runs_dir: str) -> None:
    """Gather RUN again: copy what is missing, then verify every file against manifest.json."""
    from launcher.backends import local

    run_dir, record, plan = _open_run(run, runs_dir)
    if (run_dir / gather.MANIFEST).is_file():
        problems = gather.verify_manifest(run_dir)
        if problems:
            raise LauncherError("gathered files do not match manifest.json: " + "; ".join(problems[:10]))
    if record.backend == "ssh":
        from launcher.backends import ssh

        for problem in ssh.reconnect(plan, run_dir, record, out, "gather"):
            err.print(f"warning: {problem}", markup=False)
        summary = gather.finish(plan, run_dir, record)
    elif record.backend == "k8s":
        from launcher.backends import k8s_ops

        problems = k8s_ops.gather_again(plan, run_dir, record)
        summary = gather.finish(plan, run_dir, record)
        if problems:
            raise LauncherError("; ".join(problems))
    else:
        summary = local.gather_run(plan, run_dir, record)
    files = json.loads((run_dir / gather.MANIFEST).read_text())["files"]
    _print_summary(summary)
    out.print(f"verified {len(files)} files in {run_dir}/")


@main.command()
@click.argument("run")
@click.option("--purge", is_flag=True, help="ssh: also remove the run's directories on the nodes")
@runs_option
@reports_errors
def down(run: str, purge: bool, runs_dir: str) -> None:
    """Stop every process of RUN. Nothing is removed unless --purge is given."""
    run_dir, record, plan = _open_run(run, runs_dir)
    if purge and record.backend != "ssh":
        raise ConfigError("--purge removes node directories of ssh runs; a local run's files are all in its run directory")
    if record.backend == "ssh":
        from launcher.backends import ssh

        problems = ssh.reconnect(plan, run_dir, record, out, "down", purge=purge)
        if problems:
            raise LauncherError("; ".join(problems))
    elif record.backend == "k8s":
        from launcher.backends import k8s_ops

        problems = k8s_ops.down(plan, run_dir, record)
        if problems:
            raise LauncherError("; ".join(problems))
        out.print(f"run {record.run_id}: every object with label launcher/run-id={record.run_id} is deleted")
        return
    else:
        # Every process of the run carries its run id, the node script included; no pid from run.json is
        # trusted, since it may have been reused.
        left = nodectl.stop_run(record.run_id)
        if left:
            raise LauncherError(f"processes {left} of {record.run_id} would not stop")
    out.print(f"run {record.run_id}: no process left" + (", node directories removed" if purge else ""))


@main.group()
def dataset() -> None:
    """Make datasets."""


@dataset.command("tiny")
@click.argument("path")
@click.option("--force", is_flag=True, help="replace an existing dataset")
@reports_errors
def dataset_tiny(path: str, force: bool) -> None:
    """Write the demo MindRecord for the tiny model to PATH (byte tokens of the shipped text)."""
    from launcher.dataset import write_tiny

    count = write_tiny(Path(path), force=force)
    out.print(f"wrote {count} records to {path}")


# Rank tables, the Ascend preflight and container images live in their own module.
main.add_command(cli_ascend.ranktable_cmd)
main.add_command(cli_ascend.preflight_cmd)
main.add_command(cli_ascend.image)
main.add_command(cli_predict.predict_cmd)
main.add_command(cli_ckpt.ckpt_cmd)
main.add_command(cli_data.data_cmd)


if __name__ == "__main__":
    main()

"""The command line. The only place that prints errors or exits."""

from __future__ import annotations

import functools
import json
import signal
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from launcher import gather, procs
from launcher.errors import ConfigError, LauncherError
from launcher.plan import LaunchPlan, build_plan
from launcher.runs import PLAN_DIR, RunRecord, find_run, new_run_id
from launcher.spec import Job, check_local_host, load_job, port_is_free, resolve_local_paths

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
DEFAULT_RUNS_DIR = "runs"


def reports_errors(fn):
    """Turn LauncherError into one line on stderr and its exit code; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LauncherError as exc:
            err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
            sys.exit(exc.exit_code)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="launcher")
def main() -> None:
    """Launch MindSpore/MindFormers fine-tunes (LoRA or full) from one job file.

    \b
    launcher render JOB -o DIR    write every artifact for review
    launcher up JOB               start the job, watch it, gather it into runs/<run-id>/
    launcher status|logs|gather|down RUN
    launcher dataset tiny PATH    make the demo dataset for the tiny CPU model
    """


def _load(job_file: str) -> tuple[Job, bool]:
    job = load_job(job_file)
    local = job.cluster.backend == "local"
    if local:
        job = resolve_local_paths(job, Path.cwd())
    return job, local


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
@reports_errors
def up(job: str, dry_run: bool, output: str | None, runs_dir: str) -> None:
    """Start JOB (a job file, or a directory written by 'launcher render'), watch it, and gather it.

    Any rank that fails, Ctrl-C or SIGTERM stops every rank; what exists is still gathered.
    """
    if dry_run:
        if Path(job).is_dir():
            raise ConfigError("--dry-run takes a job file; a rendered directory is already rendered")
        _render(job, output)
        return
    if Path(job).is_dir():
        plan = LaunchPlan.read(Path(job))
        if plan.backend == "local" and not port_is_free(plan.master_port):
            raise ConfigError(f"port {plan.master_port} of this rendered plan is in use on this machine; "
                              "render it again with a free cluster.master_port")
    else:
        spec, local = _load(job)
        if local:
            check_local_host(spec)
        plan = build_plan(spec)
    if plan.backend != "local":
        raise ConfigError(f"cluster.backend: the {plan.backend} backend is not available in this version; "
                          "use 'launcher render' and start the node scripts yourself")
    _run_local(plan, Path(runs_dir))


def _run_local(plan: LaunchPlan, runs_dir: Path) -> None:
    from launcher.backends import local

    runs_dir.mkdir(parents=True, exist_ok=True)
    run_id = new_run_id(plan.job_name, runs_dir)
    run_dir = (runs_dir / run_id).resolve()
    plan.write(run_dir / PLAN_DIR)
    record = RunRecord(run_id, plan.job_name, plan.backend, "starting", time.time())
    record.save(run_dir)
    out.print(f"run [bold]{run_id}[/] — {plan.world_size} ranks, {plan.launch} on this machine; "
              f"logs under {run_dir}/output/")
    # SIGTERM gets the same teardown as Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        record = local.execute(plan, run_dir, record, out)
    finally:
        signal.signal(signal.SIGTERM, previous)
    out.print("gathering ...")
    summary = local.gather_run(plan, run_dir, record)
    _print_summary(summary)
    out.print(f"run directory: {run_dir}/")
    if record.state == "succeeded":
        return
    if record.state == "interrupted":
        err.print(f"interrupted: every rank of {run_id} was stopped; what they wrote is gathered")
        sys.exit(130)
    rank = record.failed_rank
    if rank is None:
        err.print(f"error: run {run_id} failed ({record.message}); see {run_dir / local.NODE_LOG}")
    else:
        log = run_dir / plan.ranks[rank].console_log
        tail = log.read_text(errors="replace").splitlines()[-20:] if log.is_file() else []
        err.print(f"error: rank {rank} failed (node {plan.ranks[rank].node}, {plan.ranks[rank].host}); "
                  f"every other rank was stopped. Last lines of {log}:")
        err.print("\n".join(tail), markup=False)
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
    alive = procs.run_processes(record.run_id)
    state = record.state
    if state == "running" and not alive:
        state = "ended without recording its end (launcher was killed?)"
    out.print(f"run {record.run_id}: {state}" + (f", {len(alive)} processes alive" if alive else ""))
    if record.failed_rank is not None:
        out.print(f"failed rank: {record.failed_rank}")
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
        if not follow or not procs.run_processes(record.run_id):
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
    summary = local.gather_run(plan, run_dir, record)
    files = json.loads((run_dir / gather.MANIFEST).read_text())["files"]
    _print_summary(summary)
    out.print(f"verified {len(files)} files in {run_dir}/")


@main.command()
@click.argument("run")
@runs_option
@reports_errors
def down(run: str, runs_dir: str) -> None:
    """Stop every process of RUN on this machine. Nothing gathered is removed."""
    run_dir = find_run(run, Path(runs_dir))
    record = RunRecord.load(run_dir)
    # Every process of the run carries its run id, the node script included; no pid from run.json is
    # trusted, since it may have been reused.
    left = procs.stop_run(record.run_id)
    if left:
        raise LauncherError(f"processes {left} of {record.run_id} would not stop")
    out.print(f"run {record.run_id}: no process left")


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


# ---- container images of the Ascend version matrix (images/matrix.yaml) ----------------------
# Imports stay inside the commands: the other commands do not need them.

@main.group()
@click.option("--matrix", "matrix_file", metavar="FILE", help="image matrix to use (default: the shipped one)")
@click.pass_context
def image(ctx: click.Context, matrix_file: str | None) -> None:
    """Container images for the MindSpore/MindFormers/CANN combinations of the image matrix.

    \b
    launcher image list                     the entries of the matrix
    launcher image render ENTRY -o DIR      write DIR/Dockerfile and DIR/build.sh
    launcher image build ENTRY              build it with docker, buildah or podman
    """
    ctx.obj = matrix_file


@image.command("list")
@click.pass_obj
@reports_errors
def image_list(matrix_file: str | None) -> None:
    """Show the entries of the image matrix."""
    from launcher.image_build import entry_rows
    from launcher.images import load_matrix

    rows = entry_rows(load_matrix(matrix_file))
    table = Table(title="image matrix")
    for column in rows[0]:
        table.add_column(column, no_wrap=column == "id", overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    out.print(table)


@image.command("render")
@click.argument("entry_id", metavar="ENTRY")
@click.option("-o", "--output", required=True, help="directory to write Dockerfile and build.sh into")
@click.pass_obj
@reports_errors
def image_render(matrix_file: str | None, entry_id: str, output: str) -> None:
    """Write the Dockerfile of ENTRY and the build.sh that builds it."""
    from launcher.image_build import build_script, dockerfile, required_files
    from launcher.images import get_entry, load_matrix

    entry = get_entry(load_matrix(matrix_file), entry_id)
    target = Path(output)
    try:
        target.mkdir(parents=True, exist_ok=True)
        (target / "Dockerfile").write_text(dockerfile(entry))
        (target / "build.sh").write_text(build_script(entry))
        (target / "build.sh").chmod(0o755)
    except OSError as exc:
        raise ConfigError(f"-o: cannot write to {target}: {exc.strerror}") from None
    out.print(f"wrote {target}/Dockerfile and {target}/build.sh")
    for arch in entry.arch:
        if required_files(entry, arch):
            out.print(f"{arch} builds need in the build context: {', '.join(required_files(entry, arch))}")


@image.command("build")
@click.argument("entry_id", metavar="ENTRY")
@click.option("--context", "context_dir", default=".", show_default=True,
              help="build context (the folder with the CANN packages, if the image installs them)")
@click.option("--arch", help="aarch64 or x86_64 (default: this machine's)")
@click.option("--tag", help="image tag (default: ascend-mindformers:ENTRY)")
@click.option("--timeout", default=4 * 3600, show_default=True, help="seconds before the build is stopped")
@click.pass_obj
@reports_errors
def image_build(matrix_file: str | None, entry_id: str, context_dir: str, arch: str | None, tag: str | None,
                timeout: int) -> None:
    """Build ENTRY with the first of docker, buildah and podman found on PATH, showing its progress."""
    import platform
    import subprocess
    import tempfile

    from launcher import image_build as ib
    from launcher.images import get_entry, load_matrix

    entry = get_entry(load_matrix(matrix_file), entry_id)
    engine = ib.find_engine()
    if engine is None:
        raise LauncherError(f"no container engine found on PATH: install {', '.join(ib.ENGINES[:-1])} or {ib.ENGINES[-1]}")
    arch = ib.host_arch(arch or platform.machine())
    context = Path(context_dir).resolve()
    ib.check_build_inputs(entry, arch, context)
    tag = tag or ib.DEFAULT_TAG.format(id=entry.id)
    with tempfile.TemporaryDirectory(prefix="launcher-image-") as tmp:
        dockerfile_path = Path(tmp) / "Dockerfile"
        dockerfile_path.write_text(ib.dockerfile(entry))
        build = ib.build_command(entry, engine, arch, dockerfile_path, context, tag)
        out.print(f"building {tag} for {arch} with {build.engine}: {' '.join(build.argv)}")
        try:
            rc = subprocess.run(build.argv, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise LauncherError(f"{build.engine} did not finish building {entry.id} in {timeout} s; "
                                "it was stopped (raise --timeout)") from None
        except OSError as exc:
            raise LauncherError(f"cannot run {engine}: {exc.strerror}") from None
    if rc != 0:
        raise LauncherError(f"{build.engine} failed to build {entry.id} (exit code {rc}); its output is above")
    out.print(f"built {tag}")


if __name__ == "__main__":
    main()

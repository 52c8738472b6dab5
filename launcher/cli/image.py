"""`launcher image list|render|build`: container images of the Ascend version matrix (images/matrix.yaml)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from launcher.cli.console import out, reports_errors
from launcher.errors import ConfigError, LauncherError

# Imports stay inside the commands: the other commands do not need them.


@click.group()
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
    from launcher.image.build import entry_rows
    from launcher.image.matrix import load_matrix

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
    from launcher.image.build import build_script, dockerfile, required_files
    from launcher.image.matrix import get_entry, load_matrix

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

    from launcher.image import build as ib
    from launcher.image.matrix import get_entry, load_matrix

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

"""Render and build the images of the matrix: the Dockerfile, its build script, the engine's command.

Everything the templates print is computed here; images/Dockerfile.j2 and images/build.sh.j2 only
place it.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import ConfigError
from launcher.image.matrix import PLATFORMS, ROOT_ONLY, ImageEntry
from launcher.render import render_template

ENGINES = ("docker", "buildah", "podman")  # tried in this order
ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64"}
TOOLKIT_HOME = "/usr/local/Ascend/ascend-toolkit/latest"
DEFAULT_TAG = "ascend-mindformers:{id}"

# Python packages that CANN's operator compiler (te/tbe) imports at run time; the same set the
# official CANN images install. Pinned here, installed with MindSpore in one resolver run.
CANN_PYTHON_DEPS = (
    "absl-py==2.1.0", "attrs==23.2.0", "cffi==1.16.0", "decorator==5.1.1", "numpy==1.24.4",
    "pathlib2==2.3.7.post1", "protobuf==3.20.3", "psutil==5.9.8", "pyyaml==6.0.1", "requests==2.31.0",
    "scipy==1.10.1", "sympy==1.12",
)

# Defaults for the job's HCCL and logging settings; a job overrides them with its own environment.
JOB_ENV_DEFAULTS = {
    "HCCL_CONNECT_TIMEOUT": "1200",  # seconds to set up links between devices; large jobs need more than 120
    "ASCEND_GLOBAL_LOG_LEVEL": "3",  # 0 debug, 1 info, 2 warning, 3 error
    "ASCEND_SLOG_PRINT_TO_STDOUT": "0",  # CANN logs go to ~/ascend/log, not into the rank's console
}


# ---- rendering ------------------------------------------------------------------------------

def _word(value: str) -> str:
    """One shell word for a RUN line: a literal is single-quoted; a value that holds {arch} becomes a
    double-quoted word in which ${ARCH} (the build argument) expands. _check_safe keeps both exact."""
    if "{arch}" in value:
        return '"' + value.replace("{arch}", "${ARCH}") + '"'
    return shlex.quote(value)


def _dockerfile_value(value: str) -> str:
    """A value for ENV or LABEL, double-quoted as the Dockerfile parser reads it (${...} expands)."""
    return json.dumps(value)


def _set_env_vars() -> list[tuple[str, str]]:
    """What ascend-toolkit/set_env.sh exports, written as ENV so that every process sees it without a
    login shell. The driver libraries are mounted from the host at run time."""
    home = TOOLKIT_HOME
    lib = [
        "/usr/local/Ascend/driver/lib64", "/usr/local/Ascend/driver/lib64/common",
        "/usr/local/Ascend/driver/lib64/driver", f"{home}/lib64", f"{home}/lib64/plugin/opskernel",
        f"{home}/lib64/plugin/nnengine", f"{home}/opp/built-in/op_impl/ai_core/tbe/op_tiling",
        f"{home}/tools/aml/lib64", f"{home}/tools/aml/lib64/plugin",
    ]
    py = [f"{home}/python/site-packages", f"{home}/opp/built-in/op_impl/ai_core/tbe"]
    path = [f"{home}/bin", f"{home}/compiler/ccec_compiler/bin", f"{home}/tools/ccec_compiler/bin"]
    return [
        ("ASCEND_TOOLKIT_HOME", home),
        ("ASCEND_HOME_PATH", home),
        ("ASCEND_AICPU_PATH", home),
        ("ASCEND_OPP_PATH", f"{home}/opp"),
        ("TOOLCHAIN_HOME", f"{home}/toolkit"),
        # ${X:+:${X}} appends what the base set, without leaving an empty entry when it set nothing.
        ("LD_LIBRARY_PATH", ":".join(lib) + "${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"),
        ("PYTHONPATH", ":".join(py) + "${PYTHONPATH:+:${PYTHONPATH}}"),
        ("PATH", ":".join(path) + ":${PATH}"),
    ]


def _pip_requirements(entry: ImageEntry) -> list[str]:
    ms, mf = entry.mindspore, entry.mindformers
    mindspore = ms.wheel or f"mindspore=={ms.version}"
    mindformers = f"mindformers @ git+{mf.git}@{mf.ref}" if mf.git else f"mindformers=={mf.version}"
    return [mindspore, mindformers, *entry.extras, *CANN_PYTHON_DEPS]


def required_files(entry: ImageEntry, arch: str) -> list[str]:
    """The CANN packages the build context must hold for this architecture (none unless source: run)."""
    if entry.cann.source != "run":
        return []
    return [entry.per_arch(entry.cann.toolkit, arch), entry.per_arch(entry.cann.kernels, arch)]


def dockerfile(entry: ImageEntry) -> str:
    cann = entry.cann
    run_files = [cann.toolkit, cann.kernels]
    wheels_dir = shlex.quote(f"{TOOLKIT_HOME}/lib64")
    context = {
        "entry": entry,
        "summary": f"MindSpore {entry.mindspore.version} + MindFormers {entry.mindformers.version}, "
                   f"CANN {cann.version}, Python {entry.python}, Ascend {entry.soc}, {'/'.join(entry.arch)}",
        "context_files": [(arch, required_files(entry, arch)) for arch in entry.arch],
        # The build argument must name the architecture being built, and the entry must support it.
        "arch_patterns": " | ".join(shlex.quote(f"{arch}:{arch}") for arch in entry.arch),
        "arch_check": shlex.quote(f"error: {entry.id} is built for {' or '.join(entry.arch)}; pass "
                                  "--build-arg ARCH=<uname -m of the target> with the matching --platform"),
        "apt_packages": [shlex.quote(p) for p in entry.apt_packages],
        "python": shlex.quote(f"python{entry.python}"),
        "copy_run_files": " ".join(f.replace("{arch}", "${ARCH}") for f in run_files),
        "install_run_files": [_word(f"/tmp/cann/{f}") for f in run_files],
        "cann_stage": {"run": "cann", "image": "cann-image"}.get(cann.source),
        "set_env": [(k, _dockerfile_value(v)) for k, v in _set_env_vars()],
        "pip": [_word(r) for r in _pip_requirements(entry)],
        # CANN 7 keeps te and hccl as wheels in lib64 (CANN 8 puts them on PYTHONPATH).
        "toolkit_wheels": [f"{wheels_dir}/{name}-*-py3-none-any.whl" for name in ("te", "hccl")]
        if int(cann.version.split(".")[0]) < 8 else [],
        "job_env": [(k, _dockerfile_value(v)) for k, v in {**JOB_ENV_DEFAULTS, **entry.env}.items()],
        "labels": [(k, _dockerfile_value(v)) for k, v in {
            "org.opencontainers.image.title": entry.id,
            "org.opencontainers.image.description": entry.description,
            "org.opencontainers.image.base.name": entry.base_image,
            "ascend.soc": entry.soc,
            "ascend.cann.version": cann.version,
            "mindspore.version": entry.mindspore.version,
            "mindformers.version": entry.mindformers.version,
        }.items()],
        "user": shlex.quote(entry.user),
        "root_reason": ROOT_ONLY.get(entry.soc, ""),
    }
    return render_template("Dockerfile.j2", **context)


def build_script(entry: ImageEntry, tag: str | None = None) -> str:
    return render_template(
        "build.sh.j2",
        entry=entry,
        tag=tag or DEFAULT_TAG.format(id=entry.id),
        engines=ENGINES,
        arches=[(arch, PLATFORMS[arch], required_files(entry, arch)) for arch in entry.arch],
        unsupported=f"error: {entry.id} is built for {' or '.join(entry.arch)}; set ARCH to one of them, not ",
    )


# ---- building -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Build:
    engine: str
    argv: list[str]


def host_arch(machine: str) -> str:
    return ARCH_ALIASES.get(machine, machine)


def find_engine() -> str | None:
    """Path of the first container engine on PATH."""
    for name in ENGINES:
        path = shutil.which(name)
        if path:
            return path
    return None


def build_command(entry: ImageEntry, engine: str, arch: str, dockerfile_path: Path, context: Path,
                  tag: str) -> Build:
    """The engine's argv; build.sh runs the same command."""
    name = Path(engine).name
    subcommand = "bud" if name == "buildah" else "build"
    argv = [engine, subcommand, "--platform", PLATFORMS[arch], "--build-arg", f"ARCH={arch}",
            "-f", str(dockerfile_path), "-t", tag, str(context)]
    return Build(name, argv)


def check_build_inputs(entry: ImageEntry, arch: str, context: Path) -> None:
    if arch not in entry.arch:
        raise ConfigError(f"--arch: {entry.id} is built for {' or '.join(entry.arch)}, not {arch}")
    if not context.is_dir():
        raise ConfigError(f"--context: {context} is not a directory")
    missing = [f for f in required_files(entry, arch) if not (context / f).is_file()]
    if missing:
        raise ConfigError(f"--context: {context} lacks {', '.join(missing)}; download the CANN {entry.cann.version} "
                          f"packages for {entry.soc} ({arch}) from Ascend's CANN download page into it")


def entry_rows(entries: dict[str, ImageEntry]) -> list[dict[str, Any]]:
    return [
        {"id": e.id, "soc": e.soc, "arch": "/".join(e.arch), "python": e.python, "cann": e.cann.version,
         "cann from": e.cann.source, "mindspore": e.mindspore.version, "mindformers": e.mindformers.version,
         "base image": e.base_image}
        for e in entries.values()
    ]

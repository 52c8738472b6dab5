"""The image matrix: the MindSpore/MindFormers/CANN/Python combinations that get a container image.

images/matrix.yaml lists them. This module loads the matrix and validates every entry: pydantic for
the shape, then the checks that span several fields (MindSpore/MindFormers compatibility, CANN
package names, pins). launcher/image/build.py turns an entry into its Dockerfile and build command.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from launcher.errors import ConfigError
from launcher.render import data_dir
from launcher.inputs import ENV_NAME_RE, read_yaml_file
from launcher.schema import Closed, FieldProblem, did_you_mean, first_error

PLATFORMS = {"aarch64": "linux/arm64", "x86_64": "linux/amd64"}
RUN_USER = "HwHiAiUser"  # the NPU driver's default running user and group

# MindFormers release line -> the MindSpore releases it supports, as [lowest, first unsupported).
# From MindFormers' own records: VERSION_MAP.json in the 1.3.2 and 1.8.0 wheels (1.2 -> 2.3.0,
# 1.3.0 -> 2.4.0, 1.3.2 -> 2.4.10, 1.5 -> 2.6.0, 1.6 -> 2.7.0, 1.7 -> 2.7.1, 1.8 -> 2.7.2), the 1.8.0
# wheel's requirement mindspore~=2.7.2, and the r1.0 installation guide (MindSpore 2.2.x).
MINDSPORE_FOR_MINDFORMERS = {
    "1.0": ("2.2.0", "2.3.0"),
    "1.2": ("2.3.0", "2.4.0"),
    "1.3": ("2.4.0", "2.5.0"),
    "1.5": ("2.6.0", "2.7.0"),
    "1.6": ("2.7.0", "2.7.1"),
    "1.7": ("2.7.1", "2.7.2"),
    "1.8": ("2.7.2", "2.8.0"),
}

# How each SoC is spelled in the names of CANN operator packages (Ascend-cann-kernels-910b_...).
SOC_IN_PACKAGE = {"910A": "910", "910B": "910b", "310P": "310p", "310B": "310b"}

# SoCs whose containers run as root, and why.
ROOT_ONLY = {
    "310B": "on Atlas 200I A2 (310B) a non-root process that uses the NPU from a container is treated as a "
            "normal container and takes every device of the host, so the container runs as root",
}

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_SAFE_RE = re.compile(r"^[A-Za-z0-9._:/@%+=,~-]+$")  # characters a file name, URL or value may use here
_IMAGE_RE = re.compile(
    r"^(?P<name>(?:[a-z0-9.-]+(?::\d+)?/)?[a-z0-9._/-]+?)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:[.-]?(?:rc|post)\d+)?$")
_PIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!-]+$")
_REF_RE = re.compile(r"^(v?\d+\.\d+\.\d+[A-Za-z0-9.-]*|[0-9a-f]{40})$")  # a release tag or a commit


def release(version: str) -> tuple[int, int, int]:
    """'2.7.2' -> (2, 7, 2); a pre- or post-release counts as its release ('2.6.0rc1' -> (2, 6, 0))."""
    m = _VERSION_RE.match(version)
    if not m:
        raise ValueError(f"'{version}' is not a version like 2.4.10")
    return int(m[1]), int(m[2]), int(m[3])


def cann_file_versions(version: str) -> set[str]:
    """Versions that CANN package file names use: beta releases drop the suffix (7.0.0.beta1 -> 7.0.0)."""
    return {version, re.sub(r"\.beta\d+$", "", version)}


def check_pinned_image(ref: str) -> str:
    m = _IMAGE_RE.match(ref)
    if not m:
        raise ValueError(f"'{ref}' is not an image reference like ubuntu:jammy-20240911.1")
    if m["digest"] is None and m["tag"] in (None, "latest"):
        raise ValueError(f"'{ref}' is not pinned; give a fixed tag (never latest) or a @sha256 digest")
    return ref


class Cann(Closed):
    version: str = Field(description="CANN release, e.g. 7.0.0.beta1 or 8.0.0")
    source: Literal["run", "image", "base"] = Field(
        "run", description="run: install the .run packages from the build context; image: copy CANN from "
                           "'image'; base: the base image already has it")
    image: str | None = Field(None, description="with source: image, a pinned image that has CANN installed")
    toolkit: str = Field(description="toolkit package file name; {arch} stands for the architecture")
    kernels: str = Field(description="operator (kernels/ops) package file name; {arch} likewise")

    _pinned = field_validator("image")(lambda v: v if v is None else check_pinned_image(v))


class MindSpore(Closed):
    version: str
    wheel: str | None = Field(None, description="wheel URL ({arch} for the architecture); default: PyPI")


class MindFormers(Closed):
    version: str
    git: str | None = Field(None, description="install from this repository instead of PyPI")
    ref: str | None = Field(None, description="with git: a release tag or commit (not a branch)")


class ImageEntry(Closed):
    id: str
    description: str = ""
    base_image: str
    arch: list[Literal["aarch64", "x86_64"]] = Field(min_length=1)
    soc: Literal["910A", "910B", "310P", "310B"]
    python: str = Field(description="Python minor version the image runs, e.g. 3.9")
    apt_packages: list[str] = Field(default_factory=list, description="Debian/Ubuntu packages, e.g. Python")
    cann: Cann
    mindspore: MindSpore
    mindformers: MindFormers
    extras: list[str] = Field(default_factory=list, description="more pip packages, each name==version")
    env: dict[str, str] = Field(default_factory=dict, description="job environment defaults to add or change")

    _pinned = field_validator("base_image")(lambda v: check_pinned_image(v))

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID_RE.match(v):
            raise ValueError("use lowercase letters, digits, '.', '_' and '-' (it becomes the image tag)")
        return v

    @field_validator("description")
    @classmethod
    def _one_line(cls, v: str) -> str:
        if any(c in v for c in '\n"\\$`'):
            raise ValueError("write one line without quotes, backslashes, '$' or '`'")
        return v

    @field_validator("python")
    @classmethod
    def _python(cls, v: str) -> str:
        if not re.fullmatch(r"3\.\d{1,2}", v):
            raise ValueError(f"'{v}' is not a Python minor version like 3.10")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> ImageEntry:
        check_entry(self)
        return self

    @property
    def user(self) -> str:
        return "root" if self.soc in ROOT_ONLY else RUN_USER

    def per_arch(self, template: str, arch: str) -> str:
        return template.replace("{arch}", arch)


def _check_safe(path: str, value: str) -> None:
    if not _SAFE_RE.match(value.replace("{arch}", "")):
        raise FieldProblem(path, f"'{value}' has characters that cannot go into a Dockerfile unquoted; "
                                 "use letters, digits and ._:/@%+=,~-")


def _check_arch_placeholder(entry: ImageEntry, path: str, value: str) -> None:
    named = [a for a in PLATFORMS if a in value]
    if len(entry.arch) > 1 and named:
        raise FieldProblem(path, f"names {named[0]} but the entry builds {', '.join(entry.arch)}; "
                                 "write {arch} instead")
    if named and named != entry.arch:
        raise FieldProblem(path, f"names {named[0]} but the entry builds {entry.arch[0]}")


def check_cann_files(entry: ImageEntry) -> None:
    """Package names as Ascend publishes them: Ascend-cann-toolkit_<ver>_linux-<arch>.run, and the
    operator package Ascend-cann-kernels-<soc>_<ver>_linux.run (7.x, 8.0.RC), ..._linux-<arch>.run
    (8.0.0 to 8.3) or Ascend-cann-<soc>-ops_<ver>_linux-<arch>.run (8.5 on)."""
    cann = entry.cann
    versions = "|".join(re.escape(v) for v in sorted(cann_file_versions(cann.version)))
    soc = re.escape(SOC_IN_PACKAGE[entry.soc])
    toolkit_re = re.compile(rf"^Ascend-cann-toolkit_({versions})_linux-(?P<arch>aarch64|x86_64)\.run$")
    kernels_re = re.compile(
        rf"^(Ascend-cann-kernels-{soc}_({versions})_linux(-(?P<arch>aarch64|x86_64))?"
        rf"|Ascend-cann-{soc}-ops_({versions})_linux-(?P<arch2>aarch64|x86_64))\.run$"
    )
    in_name = min(cann_file_versions(cann.version), key=len)
    for field, pattern, example in (
        ("toolkit", toolkit_re, f"Ascend-cann-toolkit_{in_name}_linux-{{arch}}.run"),
        ("kernels", kernels_re, f"Ascend-cann-kernels-{SOC_IN_PACKAGE[entry.soc]}_{in_name}_linux.run"),
    ):
        value = getattr(cann, field)
        _check_safe(f"cann.{field}", value)
        _check_arch_placeholder(entry, f"cann.{field}", value)
        for arch in entry.arch:
            name = entry.per_arch(value, arch)
            m = pattern.match(name)
            if not m:
                raise FieldProblem(f"cann.{field}", f"'{name}' is not a CANN {cann.version} {field} package name "
                                                    f"for {entry.soc}; expected a name like {example}")
            named_arch = m.group("arch") or (m.group("arch2") if "arch2" in pattern.groupindex else None)
            if named_arch not in (None, arch):
                raise FieldProblem(f"cann.{field}", f"'{name}' is the {named_arch} package, not the {arch} one")


def check_compatible(entry: ImageEntry) -> None:
    mf, ms = entry.mindformers.version, entry.mindspore.version
    line = ".".join(mf.split(".")[:2])
    if line not in MINDSPORE_FOR_MINDFORMERS:
        known = ", ".join(f"{k}.x" for k in MINDSPORE_FOR_MINDFORMERS)
        raise FieldProblem("mindformers.version", f"no MindSpore compatibility record for MindFormers {mf} "
                                                  f"(known: {known}); add its line to "
                                                  "MINDSPORE_FOR_MINDFORMERS from MindFormers' installation guide")
    low, high = MINDSPORE_FOR_MINDFORMERS[line]
    if not release(low) <= release(ms) < release(high):
        fits = [f"{k}.x" for k, (lo, hi) in MINDSPORE_FOR_MINDFORMERS.items() if release(lo) <= release(ms) < release(hi)]
        hint = f"; MindSpore {ms} goes with MindFormers {fits[0]}" if fits else ""
        raise FieldProblem("mindformers.version", f"MindFormers {mf} needs MindSpore >={low},<{high}, but "
                                                  f"mindspore.version is {ms}; pick a supported pair{hint}")


def check_entry(entry: ImageEntry) -> None:
    """Checks that span several fields. Raises FieldProblem naming the field to fix."""
    cann = entry.cann
    if cann.source == "image" and cann.image is None:
        raise FieldProblem("cann.image", "source: image needs the image that has CANN installed")
    if cann.source != "image" and cann.image is not None:
        raise FieldProblem("cann.image", f"only used with source: image (this entry has source: {cann.source})")
    check_cann_files(entry)
    for field in ("mindspore.version", "mindformers.version"):
        value = getattr(getattr(entry, field.split(".")[0]), "version")
        try:
            release(value)
        except ValueError as exc:
            raise FieldProblem(field, str(exc)) from None
    check_compatible(entry)
    wheel = entry.mindspore.wheel
    if wheel is not None:
        _check_safe("mindspore.wheel", wheel)
        _check_arch_placeholder(entry, "mindspore.wheel", wheel)
        tag = "cp" + entry.python.replace(".", "")
        if not (wheel.startswith("https://") and wheel.endswith(".whl")):
            raise FieldProblem("mindspore.wheel", "give an https URL of a .whl file")
        if f"mindspore-{entry.mindspore.version}-{tag}-" not in wheel:
            raise FieldProblem("mindspore.wheel", f"the wheel is not MindSpore {entry.mindspore.version} for "
                                                  f"Python {entry.python} (its name should hold {tag})")
    mf = entry.mindformers
    if (mf.git is None) != (mf.ref is None):
        raise FieldProblem("mindformers.ref", "give both git and ref, or neither (then PyPI's release is used)")
    if mf.git is not None:
        _check_safe("mindformers.git", mf.git)
        if not _REF_RE.match(mf.ref):
            raise FieldProblem("mindformers.ref", f"'{mf.ref}' looks like a branch; pin a release tag or a commit")
    for i, extra in enumerate(entry.extras):
        if not _PIN_RE.match(extra):
            raise FieldProblem(f"extras[{i}]", f"'{extra}' is not pinned; write it as name==version")
    for i, pkg in enumerate(entry.apt_packages):
        if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", pkg):
            raise FieldProblem(f"apt_packages[{i}]", f"'{pkg}' is not a package name")
    for key, value in entry.env.items():
        if not ENV_NAME_RE.match(key):
            raise FieldProblem("env", f"'{key}' is not a valid environment variable name")
        _check_safe(f"env.{key}", value)


def matrix_path() -> Path:
    return data_dir("images") / "matrix.yaml"


def load_matrix(path: str | Path | None = None) -> dict[str, ImageEntry]:
    """Entries by id, in file order. Any problem is one ConfigError naming the entry and field."""
    path = Path(path) if path else matrix_path()
    data = read_yaml_file(path, "image matrix")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or set(data) != {"images"}:
        raise ConfigError(f"{path}: the matrix must be a mapping with one key, 'images', holding a list of entries")
    if not data["images"]:
        raise ConfigError(f"{path}: images: the list is empty; add at least one entry")
    entries: dict[str, ImageEntry] = {}
    for i, raw in enumerate(data["images"]):
        name = raw.get("id", f"#{i}") if isinstance(raw, dict) else f"#{i}"
        try:
            entry = ImageEntry.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(f"{path}: images[{i}] ({name}): {first_error(err, 'entry')}") from None
        if entry.id in entries:
            raise ConfigError(f"{path}: images[{i}] ({name}): id: listed twice; every entry needs its own id")
        entries[entry.id] = entry
    return entries


def get_entry(entries: dict[str, ImageEntry], entry_id: str) -> ImageEntry:
    if entry_id not in entries:
        hint = did_you_mean(entry_id, entries, cutoff=0.5, form="did you mean '{}'? ")
        raise ConfigError(f"ENTRY: no image '{entry_id}' in the matrix; {hint}see 'launcher image list'")
    return entries[entry_id]


"""The image matrix: validation, the rendered Dockerfiles and build scripts, and 'launcher image'.

Regenerate the golden files on purpose with:  pytest tests/test_images.py --update-golden
"""

import copy
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import require_tool, run_launcher

from launcher.errors import ConfigError
from launcher.image.build import DEFAULT_TAG, build_command, build_script, dockerfile
from launcher.image.matrix import load_matrix, matrix_path

GOLDEN = Path(__file__).parent / "golden" / "images"
MATRIX = load_matrix()
RAW = yaml.safe_load(matrix_path().read_text())["images"]
RUN_ENTRY = next(e.id for e in MATRIX.values() if e.cann.source == "run")  # needs .run files in its context
# MindFormers 1.8 on a base image that has CANN; built for both architectures.
MULTI_ARCH = next(e.id for e in MATRIX.values() if e.mindformers.version.startswith("1.8."))


def rendered(entry_id: str) -> dict[str, str]:
    entry = MATRIX[entry_id]
    return {"Dockerfile": dockerfile(entry), "build.sh": build_script(entry)}


def raw_entry(entry_id: str) -> dict:
    return copy.deepcopy(next(e for e in RAW if e["id"] == entry_id))


def write_matrix(path: Path, *entries: dict) -> Path:
    path.write_text(yaml.safe_dump({"images": list(entries)}, sort_keys=False))
    return path


# ---- the matrix ---------------------------------------------------------------------------------

def test_matrix_has_the_combinations_people_run():
    def has(**want) -> bool:
        return any(all(check(e) for check in want.values()) for e in MATRIX.values())

    assert has(ms=lambda e: e.mindspore.version == "2.2.10", cann=lambda e: e.cann.version == "7.0.0.beta1",
               py=lambda e: e.python == "3.9", os=lambda e: "euler_2.8.3" in e.base_image,
               soc=lambda e: e.soc == "910B")
    assert has(ms=lambda e: e.mindspore.version == "2.2.13", mf=lambda e: e.mindformers.version.startswith("1.0."),
               cann=lambda e: e.cann.version.startswith(("7.", "8.")), soc=lambda e: e.soc == "910A")
    assert has(ms=lambda e: e.mindspore.version.startswith("2.4."), mf=lambda e: e.mindformers.version.startswith("1.3."))
    assert has(ms=lambda e: e.mindspore.version.startswith("2.7."), mf=lambda e: e.mindformers.version.startswith("1.8."))


def test_every_cann_source_is_exercised():
    assert {e.cann.source for e in MATRIX.values()} == {"run", "image", "base"}
    assert MATRIX[MULTI_ARCH].cann.source == "base" and len(MATRIX[MULTI_ARCH].arch) == 2


@pytest.mark.parametrize("entry_id", MATRIX)
def test_dockerfile_pins_versions_and_sets_the_environment(entry_id):
    text = rendered(entry_id)["Dockerfile"]
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", text, re.M))
    for image in re.findall(r"^FROM (\S+)", text, re.M):
        assert image in stages or (":" in image and not image.endswith(":latest")), image
    for var in ("ASCEND_TOOLKIT_HOME", "ASCEND_OPP_PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "PATH",
                "HCCL_CONNECT_TIMEOUT", "ASCEND_GLOBAL_LOG_LEVEL"):
        assert re.search(rf"^(ENV|   ) {var}=", text, re.M), var
    assert "bashrc" not in text.replace("from .bashrc", "")  # ENV, not a shell profile
    pip = text.split("pip install --no-cache-dir \\\n")[1].split(" && ")[0]
    for requirement in re.findall(r"^\s+(\S+) \\$", pip, re.M):
        assert "==" in requirement or requirement.rstrip('"').endswith(".whl"), requirement
    entry = MATRIX[entry_id]
    assert f"mindformers=={entry.mindformers.version}" in pip
    assert entry.mindspore.version in pip
    assert text.rstrip().splitlines()[-1] == "USER ${HWHIAIUSER_UID}:${HWHIAIUSER_GID}"


# ---- golden files and linters -------------------------------------------------------------------

@pytest.mark.parametrize("entry_id", MATRIX)
def test_matches_golden(entry_id, request):
    files = rendered(entry_id)
    folder = GOLDEN / entry_id
    if request.config.getoption("--update-golden"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_text(text)
    on_disk = {p.name: p.read_text() for p in folder.iterdir()} if folder.is_dir() else {}
    assert sorted(on_disk) == sorted(files), "the set of files changed; rerun with --update-golden if meant"
    for name, text in files.items():
        assert text == on_disk[name], f"images/{entry_id}/{name} differs from the golden file"


def test_golden_folders_match_the_matrix():
    assert sorted(p.name for p in GOLDEN.iterdir()) == sorted(MATRIX)


def hadolint(path: Path) -> subprocess.CompletedProcess:
    # Run from the file's folder so that no project or home configuration adds ignores.
    return subprocess.run([require_tool("hadolint"), "--no-color", "--failure-threshold", "info", path.name],
                          cwd=path.parent, capture_output=True, text=True, timeout=60)


def check_ignores_are_explained(text: str) -> None:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint"):
            above = lines[i - 1] if i else ""
            assert above.startswith("# ") and "hadolint" not in above, f"unexplained '{line}'"


@pytest.mark.parametrize("entry_id", MATRIX)
def test_hadolint_passes(entry_id, tmp_path):
    text = rendered(entry_id)["Dockerfile"]
    (tmp_path / "Dockerfile").write_text(text)
    result = hadolint(tmp_path / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    check_ignores_are_explained(text)


def test_hadolint_catches_problems(tmp_path):
    # The linter really runs: an unpinned base and an unpinned pip package fail.
    (tmp_path / "Dockerfile").write_text("FROM ubuntu:latest\nRUN pip install flask\n")
    result = hadolint(tmp_path / "Dockerfile")
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout


def test_root_only_soc_runs_as_root_and_says_why(tmp_path):
    raw = raw_entry(MULTI_ARCH) | {"id": "root-example", "soc": "310B"}
    raw["cann"] = raw["cann"] | {"kernels": raw["cann"]["kernels"].replace("910b", "310b")}
    entry = load_matrix(write_matrix(tmp_path / "m.yaml", raw))["root-example"]
    text = dockerfile(entry)
    assert "# Runs as root: on Atlas 200I A2 (310B)" in text
    assert "USER ${HWHIAIUSER_UID}" not in text and "useradd" not in text
    (tmp_path / "Dockerfile").write_text(text)
    result = hadolint(tmp_path / "Dockerfile")
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("entry_id", MATRIX)
def test_build_script_is_shell_clean(entry_id, tmp_path):
    shellcheck = require_tool("shellcheck")
    script = tmp_path / "build.sh"
    script.write_text(rendered(entry_id)["build.sh"])
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# ---- refusals -----------------------------------------------------------------------------------

def _set(raw: dict, dotted: str, value) -> dict:
    *parents, key = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[key] = value
    return raw


BAD = {
    # MindFormers/MindSpore pairs that do not go together
    "mf1.8-with-ms2.4": (MULTI_ARCH, {"mindspore.version": "2.4.10"},
                         ["mindformers.version", "MindFormers 1.8.0 needs MindSpore >=2.7.2,<2.8.0",
                          "2.4.10", "goes with MindFormers 1.3.x"]),
    "mf1.3-with-ms2.7": (MULTI_ARCH, {"mindformers.version": "1.3.2"},
                         ["mindformers.version", "MindFormers 1.3.2 needs MindSpore >=2.4.0,<2.5.0", "2.7.2"]),
    "mf1.8-with-ms2.7.1": (MULTI_ARCH, {"mindspore.version": "2.7.1"}, ["needs MindSpore >=2.7.2", "2.7.1"]),
    "mf1.0-with-ms2.4": (RUN_ENTRY, {"mindformers.version": "1.0.2", "mindspore.version": "2.4.10",
                                     "mindspore.wheel": None}, ["needs MindSpore >=2.2.0,<2.3.0"]),
    "mf-line-unknown": (MULTI_ARCH, {"mindformers.version": "1.4.0"},
                        ["mindformers.version", "no MindSpore compatibility record for MindFormers 1.4.0"]),
    # pins
    "base-latest": (MULTI_ARCH, {"base_image": "ubuntu:latest"}, ["base_image", "not pinned", "never latest"]),
    "base-untagged": (MULTI_ARCH, {"base_image": "ubuntu"}, ["base_image", "not pinned"]),
    "cann-image-latest": (RUN_ENTRY, {"cann.source": "image", "cann.image": "ascendai/cann:latest"},
                          ["cann.image", "not pinned"]),
    "extra-unpinned": (MULTI_ARCH, {"extras": ["fschat"]}, ["extras[0]", "'fschat' is not pinned"]),
    "mindformers-branch": (MULTI_ARCH, {"mindformers.git": "https://gitee.com/mindspore/mindformers.git",
                                        "mindformers.ref": "dev"}, ["mindformers.ref", "branch"]),
    # CANN package names
    "kernels-of-other-soc": (RUN_ENTRY, {"cann.kernels": "Ascend-cann-kernels-910b_7.0.0_linux.run"},
                             ["cann.kernels", "not a CANN 7.0.0.beta1 kernels package name for 910A"]),
    "toolkit-other-version": (RUN_ENTRY, {"cann.toolkit": "Ascend-cann-toolkit_8.0.0_linux-{arch}.run"},
                              ["cann.toolkit", "Ascend-cann-toolkit_8.0.0_linux-aarch64.run"]),
    "toolkit-fixed-arch": (MULTI_ARCH, {"cann.toolkit": "Ascend-cann-toolkit_8.5.0_linux-aarch64.run"},
                           ["cann.toolkit", "write {arch} instead"]),
    "image-without-image": (MULTI_ARCH, {"cann.source": "image"}, ["cann.image", "needs the image"]),
    "wheel-of-other-python": (RUN_ENTRY, {"python": "3.10"}, ["mindspore.wheel", "Python 3.10", "cp310"]),
    # shape
    "unknown-key": (MULTI_ARCH, {"cuda": "12.1"}, ["cuda: unknown key"]),
    "unknown-soc": (MULTI_ARCH, {"soc": "910C"}, ["soc:"]),
    "no-arch": (MULTI_ARCH, {"arch": []}, ["arch:"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_entries_are_refused(case, tmp_path):
    entry_id, changes, expected = BAD[case]
    raw = raw_entry(entry_id)
    for dotted, value in changes.items():
        _set(raw, dotted, value)
    path = write_matrix(tmp_path / "matrix.yaml", raw)
    with pytest.raises(ConfigError) as err:
        load_matrix(path)
    message = str(err.value)
    assert f"images[0] ({entry_id})" in message
    for part in expected:
        assert part in message, message


def test_duplicate_ids_are_refused(tmp_path):
    path = write_matrix(tmp_path / "matrix.yaml", raw_entry(MULTI_ARCH), raw_entry(MULTI_ARCH))
    with pytest.raises(ConfigError, match=r"images\[1\] .*id: listed twice"):
        load_matrix(path)


def test_cli_refuses_a_bad_matrix_in_one_line(tmp_path):
    raw = _set(raw_entry(MULTI_ARCH), "mindspore.version", "2.4.10")
    path = write_matrix(tmp_path / "matrix.yaml", raw)
    result = run_launcher("image", "--matrix", path, "list")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "mindformers.version" in result.stderr and MULTI_ARCH in result.stderr


# ---- the command line ---------------------------------------------------------------------------

def test_cli_list_shows_every_entry():
    result = run_launcher("image", "list", env={**os.environ, "COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    for entry_id in MATRIX:
        assert entry_id in result.stdout


def test_cli_render_writes_the_golden_files(tmp_path):
    result = run_launcher("image", "render", RUN_ENTRY, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    for name in ("Dockerfile", "build.sh"):
        assert (tmp_path / "out" / name).read_text() == (GOLDEN / RUN_ENTRY / name).read_text()
    assert (tmp_path / "out" / "build.sh").stat().st_mode & stat.S_IXUSR
    assert "Ascend-cann-toolkit_7.0.0_linux-aarch64.run" in result.stdout


def test_cli_render_unknown_entry_suggests_one(tmp_path):
    result = run_launcher("image", "render", RUN_ENTRY[:-1], "-o", tmp_path)
    assert result.returncode == 2
    assert f"did you mean '{RUN_ENTRY}'" in result.stderr
    assert not any(tmp_path.iterdir())


FAKE_ENGINE = """#!{bash}
# Records how it was called, keeps the Dockerfile it was given, and exits with $FAKE_RC.
# Only bash builtins: PATH holds nothing else.
printf '%s\\n' "${{0##*/}}" "$@" > "$FAKE_LOG/argv"
previous=""
for arg in "$@"; do
  if [ "$previous" = -f ]; then
    while IFS= read -r line; do printf '%s\\n' "$line"; done < "$arg" > "$FAKE_LOG/Dockerfile"
  fi
  previous="$arg"
done
echo "step 1/9: fake progress"
exit "${{FAKE_RC:-0}}"
"""


def engines_on_path(tmp_path: Path, *names: str, tools=()) -> dict:
    """An environment whose PATH has only fake engines (and the named real tools)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        (bin_dir / name).write_text(FAKE_ENGINE.format(bash=shutil.which("bash")))
        (bin_dir / name).chmod(0o755)
    for tool in tools:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    log = tmp_path / "log"
    log.mkdir()
    return {**os.environ, "PATH": str(bin_dir), "FAKE_LOG": str(log)}


def recorded(env: dict) -> list[str]:
    return (Path(env["FAKE_LOG"]) / "argv").read_text().splitlines()


def test_cli_build_without_engine_fails_in_one_line(tmp_path):
    env = engines_on_path(tmp_path)
    result = run_launcher("image", "build", MULTI_ARCH, "--arch", "x86_64", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert result.stderr == "error: no container engine found on PATH: install docker, buildah or podman\n"


@pytest.mark.parametrize("engines, chosen, subcommand", [
    (("docker", "buildah", "podman"), "docker", "build"),
    (("buildah", "podman"), "buildah", "bud"),
    (("podman",), "podman", "build"),
])
def test_cli_build_runs_the_first_engine(tmp_path, engines, chosen, subcommand):
    env = engines_on_path(tmp_path, *engines)
    context = tmp_path / "ctx"
    context.mkdir()
    result = run_launcher("image", "build", MULTI_ARCH, "--arch", "x86_64", "--context", context,
                          cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "step 1/9: fake progress" in result.stdout  # the engine's output streams through
    argv = recorded(env)
    assert argv[0] == chosen
    assert argv[1:6] == [subcommand, "--platform", "linux/amd64", "--build-arg", "ARCH=x86_64"]
    assert argv[6] == "-f" and argv[7].endswith("/Dockerfile")
    assert argv[8:] == ["-t", DEFAULT_TAG.format(id=MULTI_ARCH), str(context)]
    assert (Path(env["FAKE_LOG"]) / "Dockerfile").read_text() == (GOLDEN / MULTI_ARCH / "Dockerfile").read_text()


def test_cli_build_reports_the_engine_failing(tmp_path):
    env = engines_on_path(tmp_path, "podman") | {"FAKE_RC": "3"}
    result = run_launcher("image", "build", MULTI_ARCH, "--arch", "aarch64", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert result.stderr == f"error: podman failed to build {MULTI_ARCH} (exit code 3); its output is above\n"


def test_cli_build_checks_the_cann_packages(tmp_path):
    env = engines_on_path(tmp_path, "docker")
    result = run_launcher("image", "build", RUN_ENTRY, "--arch", "aarch64", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "lacks Ascend-cann-toolkit_7.0.0_linux-aarch64.run, Ascend-cann-kernels-910_7.0.0_linux.run" in result.stderr
    assert not (Path(env["FAKE_LOG"]) / "argv").exists()

    for name in ("Ascend-cann-toolkit_7.0.0_linux-aarch64.run", "Ascend-cann-kernels-910_7.0.0_linux.run"):
        (tmp_path / name).write_text("")
    result = run_launcher("image", "build", RUN_ENTRY, "--arch", "aarch64", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert recorded(env)[-1] == str(tmp_path)


def test_cli_build_refuses_an_architecture_the_entry_lacks(tmp_path):
    env = engines_on_path(tmp_path, "docker")
    result = run_launcher("image", "build", RUN_ENTRY, "--arch", "x86_64", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "is built for aarch64, not x86_64" in result.stderr


def test_build_script_runs_the_same_command(tmp_path):
    shell_tools = ("bash", "uname", "dirname")
    out = tmp_path / "out"
    assert run_launcher("image", "render", MULTI_ARCH, "-o", out).returncode == 0

    env = engines_on_path(tmp_path, tools=shell_tools) | {"ARCH": "x86_64"}
    result = subprocess.run([str(out / "build.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == "error: no container engine found: install docker, buildah or podman\n"

    fake = tmp_path / "bin" / "podman"
    fake.write_text(FAKE_ENGINE.format(bash=shutil.which("bash")))
    fake.chmod(0o755)
    result = subprocess.run([str(out / "build.sh"), str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    expected = build_command(MATRIX[MULTI_ARCH], "podman", "x86_64", out / "Dockerfile", tmp_path,
                             DEFAULT_TAG.format(id=MULTI_ARCH)).argv
    assert recorded(env) == expected


def test_build_script_checks_architecture_and_packages(tmp_path):
    out = tmp_path / "out"
    assert run_launcher("image", "render", RUN_ENTRY, "-o", out).returncode == 0
    env = engines_on_path(tmp_path, "docker", tools=("bash", "uname", "dirname"))
    result = subprocess.run([str(out / "build.sh")], env=env | {"ARCH": "x86_64"}, capture_output=True, text=True)
    assert result.returncode == 2 and "is built for aarch64; set ARCH" in result.stderr
    result = subprocess.run([str(out / "build.sh")], env=env | {"ARCH": "aarch64"}, capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{out}/Ascend-cann-toolkit_7.0.0_linux-aarch64.run is missing" in result.stderr

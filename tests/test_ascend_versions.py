"""The version map (MindSpore -> CANN -> driver) and the version files preflight reads.

Expected pairs come from:
- mindspore-lab/mindformers README.md at r1.8.0 (1a72d5583747857f6908c8bcfb3f2502f9f2e541), version table:
  MindSpore 2.7.2 / CANN 8.5.0 / driver 25.5.0, 2.7.1 / 8.3.RC1 / 25.3.RC1, 2.4.10 / 8.0.0 / 24.1.0,
  2.4.0 / 8.0.RC3 / 24.1.RC3.
- mindspore 2.7.2 wheel, run_check/_check_version.py: AscendEnvChecker.version = ["8.5"] (major.minor only).
- mindspore-ai/docs install/mindspore_ascend_install_pip_en.md at r2.2 (5542fa76): MindSpore 2.2 on CANN
  7.0.0.beta1, "Ascend Training Solution 23.0.0"; Ascend/docs _static/package_info.js (4b48d7f8): CANN 7.0.0
  on 910B with driver 23.0.3.

File layouts, written here by hand:
- driver/version.info: `Version=` first, then component versions (ascendhal_version=, aicpu_version=, ...),
  Innerversion=, compatible_version=, compatible_version_fw=, package_version= - as `cat
  /usr/local/Ascend/driver/version.info` prints it in public install notes for the 24.1.rc1 and 25.0.rc1.1
  drivers. MindSpore 2.7.2 (include/.../ascend_vmm_adapter.h, CheckVmmDriverVersion) takes the value after
  "Version=".
- <toolkit>/<arch>-linux/ascend_toolkit_install.info: package_name=Ascend-cann-toolkit, version=,
  innerversion=, compatible_version=, arch=, os=, path= - as vllm-project/vllm-ascend collect_env.py
  (get_cann_info, `cat .../ascend_toolkit_install.info`) prints it in that project's bug reports; mindformers
  r1.8.0 mindformers/run_check.py reads the same file under $ASCEND_HOME_PATH.
- <toolkit>/version.cfg: `<component>_running_version=[<inner version>:<release>]` lines, e.g.
  toolkit_running_version=[7.3.0.1.231:8.0.RC2], as CANN 8.0.RC2 and 8.1.RC1 installs print it.
"""

import pytest

from launcher import ascend, ascend_versions
from launcher.ascend import Result


def driver_version_info(version: str) -> str:
    return "\n".join([
        f"Version={version}", "ascendhal_version=7.35.23", "aicpu_version=1.0", "tdt_version=1.0",
        "log_version=1.0", "prof_version=2.0", "dvppkernels_version=1.1", "tsfw_version=1.0",
        "Innerversion=V100R001C21SPC002B220",
        "compatible_version=[V100R001C17],[V100R001C18],[V100R001C19],[V100R001C20],[V100R001C21]",
        "compatible_version_fw=[7.0.0,7.7.99]", f"package_version={version}", ""])


def toolkit_install_info(version: str, arch: str = "aarch64") -> str:
    return "\n".join([
        "package_name=Ascend-cann-toolkit", f"version={version}", "innerversion=V100R001C20SPC001B251",
        "compatible_version=[V100R001C15],[V100R001C17],[V100R001C18],[V100R001C19],[V100R001C20]",
        f"arch={arch}", "os=linux", f"path=/usr/local/Ascend/ascend-toolkit/{version}/{arch}-linux", ""])


VERSION_CFG_8_0_RC2 = """runtime_running_version=[7.3.0.1.231:8.0.RC2]
compiler_running_version=[7.3.0.1.231:8.0.RC2]
hccl_running_version=[7.3.0.1.231:8.0.RC2]
opp_running_version=[7.3.0.1.231:8.0.RC2]
toolkit_running_version=[7.3.0.1.231:8.0.RC2]
aoe_running_version=[7.3.0.1.231:8.0.RC2]
"""


# --- parsers ---------------------------------------------------------------------------------

def test_driver_version_is_the_version_line_not_a_component_version():
    assert ascend_versions.parse_driver_version_info(driver_version_info("24.1.rc1")) == "24.1.rc1"


def test_toolkit_version_is_the_release_not_the_inner_version():
    assert ascend_versions.parse_toolkit_install_info(toolkit_install_info("8.0.0")) == "8.0.0"


def test_version_cfg_gives_the_toolkit_release():
    assert ascend_versions.parse_version_cfg(VERSION_CFG_8_0_RC2) == "8.0.RC2"


@pytest.mark.parametrize("parse", [ascend_versions.parse_driver_version_info,
                                   ascend_versions.parse_toolkit_install_info, ascend_versions.parse_version_cfg])
def test_parsers_of_files_without_a_version(parse):
    assert parse("ascendhal_version=7.35.23\npackage_name=Ascend-cann-toolkit\n") is None


@pytest.mark.parametrize("older, newer", [
    ("24.1.RC3", "24.1.0"), ("24.1.rc2", "24.1.RC3"), ("25.0.rc1", "25.0.rc1.1"), ("24.1.0", "24.1.0.3"),
    ("23.0.3", "24.1.rc1"), ("25.3.RC1", "25.5.0"),
])
def test_driver_versions_in_ascend_order(older, newer):
    assert ascend_versions.version_key(older) < ascend_versions.version_key(newer)


# --- the map ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mindspore, cann", [
    ("2.7.2", "8.5.0"), ("2.7.2", "8.5.1"),  # MindSpore 2.7.2 accepts any CANN 8.5
    ("2.7.1", "8.3.RC1"), ("2.4.10", "8.0.0"), ("2.4.0", "8.0.RC3"),
    ("2.2.13", "7.0.0.beta1"), ("2.2.10", "7.0.0"),  # 7.0.0.beta1 is the community build of 7.0.0
])
def test_pairs_the_map_allows(mindspore, cann):
    assert ascend_versions.check_cann(mindspore, cann) is None


def test_a_cann_mindspore_does_not_run_on_is_refused_with_the_fix():
    assert ascend_versions.check_cann("2.7.2", "8.3.RC1") == (
        "CANN 8.3.RC1 is installed, but MindSpore 2.7.2 runs on CANN 8.5.0; install CANN 8.5.0 (toolkit and "
        "ops packages), or MindSpore 2.7.1, which runs on CANN 8.3.RC1")


def test_an_rc_is_not_the_release_of_its_line():
    assert ascend_versions.check_cann("2.4.10", "8.0.RC3").startswith(
        "CANN 8.0.RC3 is installed, but MindSpore 2.4.10 runs on CANN 8.0.0")


def test_a_mindspore_the_map_does_not_know_is_refused():
    assert ascend_versions.check_cann("2.5.0", "8.0.0").startswith(
        "MindSpore 2.5.0 has no entry in the version map (known: 2.2.x, 2.3.0, 2.4.0, 2.4.10, ")


@pytest.mark.parametrize("cann, driver", [
    ("8.5.0", "25.5.0"), ("8.5.0", "25.5.0.1"), ("8.0.0", "24.1.0"), ("8.0.RC3", "24.1.rc3"),
    ("7.0.0.beta1", "23.0.3"),
])
def test_drivers_new_enough(cann, driver):
    assert ascend_versions.check_driver(cann, driver) is None


def test_an_old_driver_is_refused_with_the_fix():
    assert ascend_versions.check_driver("8.5.0", "25.3.rc1") == (
        "Ascend driver 25.3.rc1 is older than the 25.5.0 that CANN 8.5.0 needs; upgrade the NPU driver and "
        "firmware to Ascend HDK 25.5.0 or later")
    assert ascend_versions.check_driver("8.0.0", "24.1.rc3").startswith(
        "Ascend driver 24.1.rc3 is older than the 24.1.0 that CANN 8.0.0 needs")
    assert ascend_versions.check_driver("7.0.0.beta1", "23.0.rc3").endswith(
        "to Ascend HDK 23.0.0 (firmware 7.1.0.5.220) or later")


def test_the_shipped_image_matrix_pairs_are_allowed():
    from launcher.image.matrix import load_matrix

    for entry in load_matrix().values():
        assert ascend_versions.check_cann(entry.mindspore.version, entry.cann.version) is None, entry.id


# --- reading a node's files through a runner -------------------------------------------------

class FakeNode:
    """A runner over a dict of files, with `uname -m` and a python whose MindSpore is given."""

    def __init__(self, files: dict[str, str], mindspore: str | None = "2.7.2"):
        self.files, self.mindspore, self.calls = files, mindspore, []

    def __call__(self, argv: list[str]) -> Result:
        self.calls.append(argv)
        if argv[0] == "cat":
            return Result(0, self.files[argv[1]]) if argv[1] in self.files else Result(1, "No such file")
        if argv == ["uname", "-m"]:
            return Result(0, "aarch64\n")
        if argv[0] == "python3":
            return Result(0, self.mindspore + "\n") if self.mindspore else Result(1, "PackageNotFoundError")
        raise AssertionError(argv)


DRIVER = "/usr/local/Ascend/driver"
LATEST, CANN_8_5 = "/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/cann"
INFO = "aarch64-linux/ascend_toolkit_install.info"


def check(node: FakeNode, mindspore: str | None = None, python: str | None = "python3") -> list[str]:
    return ascend.check_versions(node, DRIVER, ascend.TOOLKIT_DIRS, mindspore, python)


def test_a_node_whose_versions_go_together():
    node = FakeNode({f"{DRIVER}/version.info": driver_version_info("25.5.0"),
                     f"{CANN_8_5}/{INFO}": toolkit_install_info("8.5.0")})
    assert check(node) == []
    assert ["python3", "-c", ascend.MINDSPORE_VERSION] in node.calls


def test_version_cfg_is_read_where_the_install_info_is_missing():
    node = FakeNode({f"{DRIVER}/version.info": driver_version_info("24.1.rc2"),
                     f"{LATEST}/version.cfg": VERSION_CFG_8_0_RC2})
    assert check(node, mindspore="2.3.0") == []


def test_every_version_problem_of_a_node_together():
    node = FakeNode({f"{DRIVER}/version.info": driver_version_info("25.2.0"),
                     f"{LATEST}/{INFO}": toolkit_install_info("8.3.RC1")})
    assert check(node) == [
        "CANN 8.3.RC1 is installed, but MindSpore 2.7.2 runs on CANN 8.5.0; install CANN 8.5.0 (toolkit and "
        "ops packages), or MindSpore 2.7.1, which runs on CANN 8.3.RC1",
        "Ascend driver 25.2.0 is older than the 25.3.RC1 that CANN 8.3.RC1 needs; upgrade the NPU driver and "
        "firmware to Ascend HDK 25.3.RC1 or later",
    ]


def test_missing_version_files_are_reported_with_their_paths():
    assert check(FakeNode({})) == [
        f"{DRIVER}/version.info is missing; reinstall the Ascend NPU driver (in a container: mount the host's "
        f"{DRIVER})",
        f"no CANN toolkit version found (none of {LATEST}/{INFO}, {LATEST}/version.cfg, {CANN_8_5}/{INFO}, "
        f"{CANN_8_5}/version.cfg gives one); install the CANN toolkit (in a container: use an image with CANN); "
        "if it is elsewhere, give 'launcher preflight --toolkit-dir' the ASCEND_HOME_PATH its set_env.sh sets",
    ]


def test_a_driver_file_without_a_version_line():
    node = FakeNode({f"{DRIVER}/version.info": "ascendhal_version=7.35.23\n",
                     f"{CANN_8_5}/{INFO}": toolkit_install_info("8.5.0")})
    assert check(node) == [f"{DRIVER}/version.info has no Version= line; reinstall the Ascend NPU driver "
                           f"(in a container: mount the host's {DRIVER})"]


def test_mindspore_missing_from_the_jobs_python():
    node = FakeNode({f"{DRIVER}/version.info": driver_version_info("25.5.0"),
                     f"{CANN_8_5}/{INFO}": toolkit_install_info("8.5.0")}, mindspore=None)
    assert check(node) == ["MindSpore is not installed for python3; install it there "
                           "(MindSpore 2.7.2 goes with CANN 8.5.0)"]


def test_a_version_the_caller_read_is_not_read_again():
    node = FakeNode({f"{DRIVER}/version.info": driver_version_info("25.5.0"),
                     f"{CANN_8_5}/{INFO}": toolkit_install_info("8.5.0")}, mindspore=None)
    assert check(node, mindspore="2.4.10", python=None)[0].startswith(
        "CANN 8.5.0 is installed, but MindSpore 2.4.10 runs on CANN 8.0.0")
    assert not any(argv[0] == "python3" for argv in node.calls)

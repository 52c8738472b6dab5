"""Which CANN each MindSpore release runs on, and which Ascend driver each CANN needs.

The map is written by hand from these sources:
- mindspore-lab/mindformers, README.md at r1.8.0 (1a72d5583747857f6908c8bcfb3f2502f9f2e541), the version
  table (MindSpore, CANN, Driver/Firmware), and mindformers/VERSION_MAP.json on the same branch
  ("ms" -> CANN, "cann" -> driver) for MindSpore 2.3.0 to 2.7.2.
- mindspore 2.7.2 wheel, mindspore/run_check/_check_version.py: AscendEnvChecker.version = ["8.5"], the
  CANN major.minor it accepts.
- MindSpore 2.2.x: mindspore-ai/docs, install/mindspore_ascend_install_pip_en.md at r2.2
  (5542fa76fbb529d1838c5f8d2fba7a95cbf043e1): community CANN 7.0.0.beta1, commercial "Ascend Training
  Solution 23.0.0"; mindspore-lab/mindformers README.md at r1.0 (6a4076003f0c2461637b477199844cb92774e4d1)
  pairs MindSpore 2.2.13 with CANN 7.0.0.beta1. Ascend/docs, _static/package_info.js
  (4b48d7f8f562299c84d790adc1a499a3ac2bef6d): CANN 7.0.0 on 910B ships with driver 23.0.3 and firmware
  7.1.0.5.220 (310P with 23.0.1), so 23.0.0, the solution's release, is the oldest driver allowed.

Where a node keeps them, and the line each file gives the version in (MindSpore 2.7.2's
ascend_vmm_adapter.h and mindformers r1.8.0 mindformers/run_check.py read the same files):
- driver: /usr/local/Ascend/driver/version.info, a `Version=25.5.0` line (beside ascendhal_version=,
  Innerversion=, compatible_version= ... lines).
- CANN toolkit: <toolkit>/<arch>-linux/ascend_toolkit_install.info, a `version=8.5.0` line (after
  package_name=Ascend-cann-toolkit); <toolkit> is $ASCEND_HOME_PATH, by default
  /usr/local/Ascend/ascend-toolkit/latest (up to 8.3) or /usr/local/Ascend/cann (8.5 on). Older toolkits
  also have <toolkit>/version.cfg with `toolkit_running_version=[7.3.0.1.231:8.0.RC2]` (inner:release).

Versions are compared as Ascend numbers them: an RC comes before the release of the same line
(24.1.RC3 < 24.1.0), and later fields are patches (25.0.rc1.1 > 25.0.rc1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Cann:
    version: str  # as ascend_toolkit_install.info writes it
    driver: str  # the oldest Ascend HDK driver this CANN is released for
    firmware: str | None = None  # the firmware released with that driver, where a source gives it


CANN_RELEASES = {c.version: c for c in (
    Cann("7.0.0.beta1", "23.0.0", "7.1.0.5.220"),
    Cann("8.0.RC2", "24.1.RC2"),
    Cann("8.0.RC3", "24.1.RC3"),
    Cann("8.0.0", "24.1.0"),
    Cann("8.1.RC1", "25.0.RC1"),
    Cann("8.2.RC1", "25.2.0"),
    Cann("8.3.RC1", "25.3.RC1"),
    Cann("8.5.0", "25.5.0"),
)}

# MindSpore release (or a x.y line) -> the CANN releases it runs on.
CANN_FOR_MINDSPORE = {
    "2.2": ("7.0.0.beta1",),
    "2.3.0": ("8.0.RC2",),
    "2.4.0": ("8.0.RC3",),
    "2.4.10": ("8.0.0",),
    "2.6.0": ("8.1.RC1",),
    "2.7.0": ("8.2.RC1",),
    "2.7.1": ("8.3.RC1",),
    "2.7.2": ("8.5.0",),
}

_PART = re.compile(r"^(?:(\d+)|rc(\d+))$", re.IGNORECASE)
_CANN_LINE = re.compile(r"^(\d+)\.(\d+)\.(\d+|rc\d+)(?:\.(?:\d+|alpha\d+|beta\d+))*$", re.IGNORECASE)


def parse_driver_version_info(text: str) -> str | None:
    m = re.search(r"^Version=(\S+)", text, re.MULTILINE)
    return m[1] if m else None


def parse_toolkit_install_info(text: str) -> str | None:
    m = re.search(r"^version=(\S+)", text, re.MULTILINE)
    return m[1] if m else None


def parse_version_cfg(text: str) -> str | None:
    m = re.search(r"^toolkit_running_version=\[[^:\]]*:([^\]\s]+)\]", text, re.MULTILINE)
    return m[1] if m else None


def version_key(version: str) -> tuple:
    """A sort key: '24.1.RC3' < '24.1.0' < '24.1.0.3'. Raises ValueError for anything else."""
    key = []
    for part in version.strip().split("."):
        m = _PART.match(part)
        if not m:
            raise ValueError(f"'{version}' is not a version like 25.5.0 or 24.1.RC2")
        key.append((1, int(m[1])) if m[1] is not None else (0, int(m[2])))
    return tuple(key)


def cann_line(version: str) -> tuple | None:
    """The release a CANN version belongs to: '8.5.0' and '8.5.1' share one (MindSpore checks only
    major.minor), '7.0.0.beta1' is 7.0.0, '8.0.RC2' and '8.0.RC3' differ. None if it is no release."""
    m = _CANN_LINE.match(version.strip())
    if not m:
        return None
    stage = m[3].upper() if m[3].lower().startswith("rc") else "release"
    return int(m[1]), int(m[2]), stage


def cann_release(version: str) -> Cann | None:
    """The map's entry for the release a CANN version belongs to."""
    line = cann_line(version)
    return next((c for c in CANN_RELEASES.values() if line is not None and cann_line(c.version) == line), None)


def cann_for_mindspore(mindspore: str) -> tuple[str, ...] | None:
    """The CANN releases a MindSpore version runs on; '2.6.0rc1' counts as 2.6.0, any 2.2.x as 2.2."""
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", mindspore.strip())
    if not m:
        return None
    return CANN_FOR_MINDSPORE.get(f"{m[1]}.{m[2]}.{m[3]}") or CANN_FOR_MINDSPORE.get(f"{m[1]}.{m[2]}")


def mindspore_for_cann(cann: str) -> list[str]:
    line = cann_line(cann)
    return [ms + (".x" if ms.count(".") == 1 else "") for ms, canns in CANN_FOR_MINDSPORE.items()
            if any(cann_line(c) == line for c in canns)]


def check_cann(mindspore: str, cann: str) -> str | None:
    """The problem with running MindSpore on this CANN, or None if the map allows the pair."""
    allowed = cann_for_mindspore(mindspore)
    if allowed is None:
        known = ", ".join(ms + (".x" if ms.count(".") == 1 else "") for ms in CANN_FOR_MINDSPORE)
        return (f"MindSpore {mindspore} has no entry in the version map (known: {known}); install one of "
                "those, or add its CANN and driver from MindSpore's installation guide to launcher/ascend_versions.py")
    if any(cann_line(c) == cann_line(cann) for c in allowed):
        return None
    others = mindspore_for_cann(cann)
    alternative = f", or MindSpore {' / '.join(others)}, which runs on CANN {cann}" if others else ""
    return (f"CANN {cann} is installed, but MindSpore {mindspore} runs on CANN {' or '.join(allowed)}; "
            f"install CANN {allowed[0]} (toolkit and ops packages){alternative}")


def check_driver(cann: str, driver: str) -> str | None:
    """The problem with this driver under this CANN, or None (also when the map does not know the CANN)."""
    release = cann_release(cann)
    if release is None:
        return None
    try:
        too_old = version_key(driver) < version_key(release.driver)
    except ValueError as exc:
        return f"Ascend driver version: {exc}"
    if not too_old:
        return None
    firmware = f" (firmware {release.firmware})" if release.firmware else ""
    return (f"Ascend driver {driver} is older than the {release.driver} that CANN {cann} needs; upgrade the "
            f"NPU driver and firmware to Ascend HDK {release.driver}{firmware} or later")

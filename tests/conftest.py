import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "configs" / "examples"
LAUNCHER = str(Path(sys.executable).parent / "launcher")


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/ from the current output")


def require_tool(name: str) -> str:
    """Path of a tool the test needs. Skips where it is missing, except in CI (LAUNCHER_TESTS_STRICT)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path:
        return path
    if os.environ.get("LAUNCHER_TESTS_STRICT"):
        pytest.fail(f"{name} is required in CI but is not installed")
    pytest.skip(f"{name} is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(*args, cwd=None, env=None, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([LAUNCHER, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.mindrecord"
    result = run_launcher("dataset", "tiny", path)
    assert result.returncode == 0, result.stderr
    return path

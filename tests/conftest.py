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


def only_run(tmp_path) -> Path:
    """The one run directory a test made under tmp_path/runs."""
    runs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def assert_lora_checkpoints(run_dir: Path, world: int):
    """Each rank's gathered checkpoint loads with MindSpore and holds finite LoRA A and B weights."""
    import math

    import mindspore as ms

    for rank in range(world):
        ckpts = sorted((run_dir / "ranks" / f"rank_{rank}" / "checkpoint").glob("*.ckpt"))
        assert len(ckpts) == 1, ckpts
        params = ms.load_checkpoint(str(ckpts[0]))
        assert any("lora_a" in n for n in params) and any("lora_b" in n for n in params), ckpts[0].name
        for name in params:
            if "lora_a" in name or "lora_b" in name:
                assert math.isfinite(float(params[name].asnumpy().sum()))

"""bench/ssh_transfer.py runs end to end (small sizes, one round): its figures are for people, not asserted;
what is checked is that every side ran and the launcher's gather verified what it copied."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sshcluster

pytestmark = pytest.mark.e2e
BENCH = Path(__file__).resolve().parent.parent / "bench" / "ssh_transfer.py"


def test_the_ssh_transfer_benchmark_runs():
    reason = sshcluster.missing_capabilities()
    if reason:
        if os.environ.get("LAUNCHER_TESTS_STRICT"):
            pytest.fail(f"the SSH benchmark must run in CI: {reason}")
        pytest.skip(reason)
    result = subprocess.run([sys.executable, str(BENCH), "--gib", "0.0625", "--repeats", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "8 nodes / 1 node: wall" in out and "launcher gather / parallel scp: wall" in out, out
    assert "gather 64 MiB from 4 nodes" in out, out

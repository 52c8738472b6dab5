"""Launch overhead: the tiny 2-rank LoRA job through `launcher up` versus the raw msrun command line.

Runs both, alternating, and prints each one's median wall time and the ratio launcher / raw.
The raw run uses the same rendered MindFormers config and entrypoint, so the difference is what
the launcher adds: validation, planning, the live view, teardown checks and gather.

    .venv/bin/python bench/launch_overhead.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(argv: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    work = Path(tempfile.mkdtemp(prefix="launch-bench-"))
    try:
        dataset = work / "tiny.mindrecord"
        subprocess.run([BIN / "launcher", "dataset", "tiny", dataset], check=True, stdout=subprocess.DEVNULL)
        job = yaml.safe_load((REPO / "configs/examples/tiny-lora-local.yaml").read_text())
        job["dataset"]["path"] = str(dataset)
        rendered = work / "rendered"
        job_file = work / "job.yaml"
        job_file.write_text(yaml.safe_dump(job))
        subprocess.run([BIN / "launcher", "render", job_file, "-o", rendered], check=True, stdout=subprocess.DEVNULL)

        launcher_times, raw_times = [], []
        for i in range(args.repeats):
            job["cluster"]["master_port"] = free_port()
            job_file.write_text(yaml.safe_dump(job))
            launcher_times.append(timed([str(BIN / "launcher"), "up", str(job_file), "--runs-dir", str(work / "runs")],
                                        work, env))
            raw_dir = work / f"raw-{i}"
            raw_dir.mkdir()
            raw_times.append(timed([
                str(BIN / "msrun"), "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", "--log_dir=output/msrun_log", "--join=True",
                str(rendered / "entrypoint/finetune.py"), str(rendered / "mindformers/run.yaml"),
            ], raw_dir, env))
            print(f"round {i + 1}: launcher {launcher_times[-1]:.2f}s  raw msrun {raw_times[-1]:.2f}s", flush=True)
        lm, rm = statistics.median(launcher_times), statistics.median(raw_times)
        print(f"median launcher up: {lm:.2f}s")
        print(f"median raw msrun:   {rm:.2f}s")
        print(f"ratio launcher/raw: {lm / rm:.3f}  (goal: 1.15 or less)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

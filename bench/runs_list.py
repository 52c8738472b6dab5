"""`launcher runs` on 1,000 runs: how long the listing takes, in-process and as a command.

Writes synthetic run directories (run.json, summary.json with 2-8 ranks, manifest.json listing ~20
files that exist) into a temporary folder, lists them once to warm the file cache, then alternates
the in-process listing (read_runs + filter + the table text), `launcher runs` in a subprocess and
the same command on an empty runs directory (its start-up), and prints each one's median wall and
CPU time. Goal: under 1 s for 1,000 runs.

    .venv/bin/python bench/runs_list.py [--runs 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
STATES = ["succeeded"] * 6 + ["failed", "interrupted", "running"]
JOBS = ["tiny-lora", "llama2-7b-lora", "qwen-full", "baichuan2-lora", "smollm2-lora"]
BACKENDS = ["local", "ssh", "k8s"]


def write_run(runs_dir: Path, i: int, rng: random.Random, now: float) -> None:
    job = rng.choice(JOBS)
    started = now - i * 1800 - rng.uniform(0, 600)
    run_id = f"{job}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}-{i}"
    run_dir = runs_dir / run_id
    state = rng.choice(STATES)
    world = rng.choice([2, 4, 8])
    total = rng.choice([16, 100, 1000])
    record = {"run_id": run_id, "job_name": job, "backend": rng.choice(BACKENDS), "state": state,
              "started": started, "finished": None if state == "running" else started + rng.uniform(60, 7200),
              "exit_code": {"succeeded": 0, "failed": 1, "interrupted": 130}.get(state), "leader_pid": 1000 + i,
              "failed_rank": rng.randrange(world) if state == "failed" else None, "message": ""}
    if rng.random() < 0.1:
        record["attempts"] = 2
    files = {}
    for rank in range(world):  # 16 rank files and 4 plan files: 20 in each manifest
        names = ["log/info.log", "console.log", "log/error.log"]
        names += [f"checkpoint/{job}_rank_{rank}-{epoch}_{total}.ckpt" for epoch in range(1, 6)]
        for name in names[: 16 // world]:
            path = run_dir / "ranks" / f"rank_{rank}" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            data = f"{run_id} rank {rank} {name}\n".encode() * rng.randint(1, 40)
            path.write_bytes(data)
            files[str(path.relative_to(run_dir))] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for name in ("plan/plan.json", "plan/mindformers/run.yaml", "plan/env/job.env", "plan/nodes/node-0/launch.sh"):
        path = run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{run_id} {name}\n")
        files[name] = {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (run_dir / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    if state == "running":
        return  # gathered at the end: no summary or manifest yet
    steps = total if state == "succeeded" else rng.randrange(total)
    ranks = {str(r): {"node": r // 8, "host": f"node{r // 8}", "device": r % 8, "steps": steps, "total_steps": total,
                      "first_loss": rng.uniform(5, 6), "last_loss": rng.uniform(0.5, 3), "losses_finite": True,
                      "train_seconds": rng.uniform(10, 500), "tokens_per_s": rng.uniform(100, 5000),
                      "checkpoints": [f"{job}_rank_{r}-1_{total}.ckpt"]} for r in range(world)}
    summary = {"run_id": run_id, "job": job, "state": state, "exit_code": record["exit_code"],
               "failed_rank": record["failed_rank"], "message": "", "world_size": world, "seq_length": 4096,
               "batch_size": 1, "ranks": ranks}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "manifest.json").write_text(json.dumps({"files": files}, indent=2) + "\n")


def list_in_process(runs_dir: Path) -> tuple[float, float]:
    """The command's work without the interpreter's start: read, filter and lay out the table text.
    (wall seconds, CPU seconds)"""
    from rich.console import Console

    from launcher import run_index
    from launcher.cli.runs import _aligned

    start, cpu = time.perf_counter(), time.process_time()
    rows = run_index.filter_rows(run_index.read_runs(runs_dir).rows)
    Console(file=io.StringIO(), width=200, soft_wrap=True).print(_aligned(rows))
    return time.perf_counter() - start, time.process_time() - cpu


def command() -> tuple[list[str], str]:
    """`launcher runs`, as a user runs it, and what it is."""
    return [str(BIN / "launcher"), "runs"], "launcher runs"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_command(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the command; CPU time tells more when other work shares the cores."""
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, _children_cpu() - cpu


def _medians(times: list[tuple[float, float]]) -> str:
    return (f"{statistics.median(t[0] for t in times):.3f}s wall, "
            f"{statistics.median(t[1] for t in times):.3f}s CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="runs-bench-"))
    try:
        runs_dir = work / "runs"
        rng, now = random.Random(0), time.time()
        start = time.perf_counter()
        for i in range(args.runs):
            write_run(runs_dir, i, rng, now)
        files = sum(1 for p in runs_dir.rglob("*") if p.is_file())
        print(f"wrote {args.runs} runs ({files} files) in {time.perf_counter() - start:.1f}s", flush=True)
        argv, what = command()
        print(f"command: {what}")
        empty = work / "empty"
        empty.mkdir()
        listing, start_only = [*argv, "--runs-dir", str(runs_dir)], [*argv, "--runs-dir", str(empty)]
        list_in_process(runs_dir)  # warm: the file cache and the imports
        timed_command(listing)
        in_process, cli, start_up = [], [], []
        for i in range(args.repeats):
            in_process.append(list_in_process(runs_dir))
            cli.append(timed_command(listing))
            start_up.append(timed_command(start_only))
            print(f"round {i + 1}: in-process {in_process[-1][0]:.3f}s  command {cli[-1][0]:.3f}s  "
                  f"command on no runs {start_up[-1][0]:.3f}s", flush=True)
        print(f"median in-process listing: {_medians(in_process)}")
        print(f"median command:            {_medians(cli)}")
        print(f"  of which start-up:       {_medians(start_up)}  (the same command on an empty runs directory)")
        print(f"goal: under 1 s for {args.runs} runs  (load average now: {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""SSH backend benchmarks on real test hosts (network namespaces with sshd; needs root and openssh-server).

Fan-out: connect + preflight + staging wall time for 1, 4 and 8 nodes; ratio 8 / 1 (goal: 2 or less).
Gather: 1 GiB of checkpoint files spread over 4 nodes, gathered by the launcher (verified by sha256)
versus plain `scp` of the same files, one node after another and all at once; prints both ratios
(goal: no slower than sequential scp, and at least 80% of parallel scp's speed).

    .venv/bin/python bench/ssh_transfer.py [--gib 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import sshcluster  # noqa: E402  (the test hosts, shared with the end-to-end tests)
from rich.console import Console  # noqa: E402

from launcher.backends.ssh import gather as ssh_gather  # noqa: E402
from launcher.backends.ssh import preflight as ssh_preflight  # noqa: E402
from launcher.backends.ssh.session import SshRun, remote_run_dir  # noqa: E402
from launcher.plan import build_plan  # noqa: E402
from launcher.runs import PLAN_DIR, RunRecord  # noqa: E402
from launcher.spec import parse_job  # noqa: E402

QUIET = Console(quiet=True)


def make_plan(cluster, hosts, work: Path):
    job = {
        "name": "bench", "model": "tiny_llama", "method": "lora",
        "dataset": {"path": str(work / "tiny.mindrecord")},
        "parallel": {"data_parallel": len(hosts)},
        "cluster": {
            "backend": "ssh", "device": "cpu",
            "ssh": {"identity_file": str(cluster.identity_file), "known_hosts": str(cluster.known_hosts),
                    "path_prefix": [str(Path(sys.executable).parent)], "min_free_mb": 0},
            "nodes": [{"host": h.address, "devices": [0], "workdir": str(work / f"node{h.index}")} for h in hosts],
        },
    }
    return build_plan(parse_job(job))


def new_run(plan, work: Path, run_id: str) -> SshRun:
    run_dir = work / "runs" / run_id
    plan.write(run_dir / PLAN_DIR)
    return SshRun(plan, run_dir, RunRecord(run_id, plan.job_name, "ssh", "starting", time.time()), QUIET)


async def fan_out(cluster, n: int, work: Path) -> float:
    run = new_run(make_plan(cluster, cluster.hosts[:n], work), work, f"fanout-{n}")
    start = time.perf_counter()
    await run.connect_all()
    await ssh_preflight.preflight(run)
    await run.stage()
    elapsed = time.perf_counter() - start
    run.close()
    return elapsed


async def launcher_gather(run: SshRun) -> float:
    start = time.perf_counter()
    await run.connect_all()
    problems = await ssh_gather.gather(run)
    elapsed = time.perf_counter() - start
    run.close()
    assert not problems, problems
    return elapsed


def busy_seconds() -> float:
    """CPU time the whole machine has spent busy (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def scp_argv(cluster, host, remote: str, local: Path) -> list[str]:
    return ["scp", "-q", "-i", str(cluster.identity_file), "-o", f"UserKnownHostsFile={cluster.known_hosts}",
            f"root@{host.address}:{remote}", str(local)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    reason = sshcluster.missing_capabilities()
    if reason:
        sys.exit(f"cannot build test hosts: {reason}")
    work = Path(tempfile.mkdtemp(prefix="ssh-bench-"))
    cluster = sshcluster.build(work / "cluster", 8)
    try:
        times = {}
        for n in (1, 4, 8):
            before = busy_seconds()
            times[n] = asyncio.run(fan_out(cluster, n, work))
            busy = busy_seconds() - before
            # Here every "node" shares this machine's cores with the launcher: show how busy they were.
            print(f"fan-out {n} node(s): connect + preflight + staging {times[n]:.2f}s "
                  f"(CPU busy {busy:.2f}s of {times[n] * os.cpu_count():.2f}s available)")
        print(f"fan-out ratio 8 / 1: {times[8] / times[1]:.2f}  (goal: 2 or less)")

        hosts = cluster.hosts[:4]
        plan = make_plan(cluster, hosts, work)
        run = new_run(plan, work, "gather-bench")
        per_file = int(args.gib * (1 << 30) / len(hosts))
        files = []
        for rank, (host, step) in enumerate(zip(hosts, plan.nodes)):
            ckpt = Path(remote_run_dir(step, run.record.run_id)) / "output" / "checkpoint" / f"rank_{rank}" / "bench.ckpt"
            ckpt.parent.mkdir(parents=True)
            with ckpt.open("wb") as f:
                f.write(Path("/dev/urandom").open("rb").read(per_file))
            files.append((host, ckpt))
        total_mb = per_file * len(hosts) / (1 << 20)

        t_launcher = asyncio.run(launcher_gather(run))
        seq_dir, par_dir = work / "scp-seq", work / "scp-par"
        seq_dir.mkdir()
        par_dir.mkdir()
        start = time.perf_counter()
        for i, (host, path) in enumerate(files):
            subprocess.run(scp_argv(cluster, host, str(path), seq_dir / f"{i}.ckpt"), check=True)
        t_seq = time.perf_counter() - start
        start = time.perf_counter()
        procs = [subprocess.Popen(scp_argv(cluster, host, str(path), par_dir / f"{i}.ckpt"))
                 for i, (host, path) in enumerate(files)]
        assert all(p.wait() == 0 for p in procs)
        t_par = time.perf_counter() - start
        print(f"gather {total_mb:.0f} MiB from {len(hosts)} nodes: launcher {t_launcher:.2f}s "
              f"(with sha256 on both ends), sequential scp {t_seq:.2f}s, parallel scp {t_par:.2f}s")
        print(f"launcher / sequential scp time: {t_launcher / t_seq:.2f}  (goal: 1.0 or less)")
        print(f"launcher speed as a share of parallel scp: {t_par / t_launcher:.0%}  (goal: 80% or more)")
    finally:
        sshcluster.teardown(8, cluster)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

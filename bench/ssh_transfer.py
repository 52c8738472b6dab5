"""SSH backend benchmarks on real test hosts (tests/sshcluster.py: network, PID and mount namespaces, each
host with its own disk and sshd; needs root and openssh-server).

Every comparison runs its two sides alternately (A B A B ...) after one warm-up run of each, and reports
medians of wall time and of CPU seconds on each side: the launcher's process (or the scp processes) here,
and the nodes' sshd with everything it ran (their cumulative CPU time in /proc).

Fan-out: connect + preflight + staging of 1 node against 8 nodes. Goal: 8 / 1 of 2 or less in wall time,
with the launcher's CPU seconds at most 2x.
Gather: 1 GiB of checkpoint files on 4 nodes' disks, by the launcher (sha256 on both ends, resumable) and
by 4 scp processes at once. Goal: the launcher at 0.9x parallel scp's speed or better.

    .venv/bin/python bench/ssh_transfer.py [--gib 1] [--repeats 3] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import os
import pstats
import resource
import shutil
import statistics
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
from launcher.backends.ssh import staging as ssh_staging  # noqa: E402
from launcher.backends.ssh.session import SshRun, remote_run_dir  # noqa: E402
from launcher.plan import build_plan  # noqa: E402
from launcher.runs import PLAN_DIR, RunRecord  # noqa: E402
from launcher.spec import parse_job  # noqa: E402

QUIET = Console(quiet=True)
SOURCE_RUN = "gather-bench"  # the run id whose files the nodes hold
RUN_NUMBERS = itertools.count()  # each measured run has a folder of its own


def make_plan(cluster, hosts):
    job = {
        "name": "bench", "model": "tiny_llama", "method": "lora",
        "dataset": {"path": f"{sshcluster.DATA_DIR}/tiny.mindrecord"},
        "parallel": {"data_parallel": len(hosts)},
        "cluster": {
            "backend": "ssh", "device": "cpu",
            "ssh": {"identity_file": str(cluster.identity_file), "known_hosts": str(cluster.known_hosts),
                    "path_prefix": [str(Path(sys.executable).parent)], "min_free_mb": 0,
                    "workdir": sshcluster.WORKDIR},
            "nodes": [{"host": h.address, "devices": [0]} for h in hosts],
        },
    }
    return build_plan(parse_job(job))


def new_run(plan, work: Path, name: str, run_id: str | None = None) -> SshRun:
    """An SshRun whose local directory is work/runs/name (run_id: the run on the nodes, default name)."""
    run_dir = work / "runs" / name
    plan.write(run_dir / PLAN_DIR)
    return SshRun(plan, run_dir, RunRecord(run_id or name, plan.job_name, "ssh", "starting", time.time()), QUIET)


def node_cpu(cluster) -> float:
    """CPU seconds of every host's sshd and all it ran and waited for (utime, stime, cutime, cstime)."""
    total = 0
    for host in cluster.hosts:
        fields = Path(f"/proc/{host.sshd_pid()}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(cluster, action) -> dict:
    """Wall time, this process's CPU seconds, its children's, and the nodes', of one action()."""
    nodes, own, kids, start = node_cpu(cluster), time.process_time(), children_cpu(), time.perf_counter()
    action()
    wall = time.perf_counter() - start
    own, kids = time.process_time() - own, children_cpu() - kids
    time.sleep(0.5)  # the nodes' session processes end and are waited for by their sshd
    return {"wall": wall, "here": own + kids, "nodes": node_cpu(cluster) - nodes}


def alternate(cluster, sides: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Each side once to warm up, then A B A B ... `repeats` times; the median of each figure per side."""
    for action in sides.values():
        action()
    samples = {name: [] for name in sides}
    for _ in range(repeats):
        for name, action in sides.items():
            samples[name].append(measure(cluster, action))
    return {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for name, runs in samples.items()}


def fan_out(cluster, n: int, work: Path) -> None:
    run = new_run(make_plan(cluster, cluster.hosts[:n]), work, f"fanout-{n}-{next(RUN_NUMBERS)}")

    async def go():
        try:
            await run.connect_all()
            await ssh_preflight.preflight(run)
            await ssh_staging.stage(run)
        finally:
            run.close()

    asyncio.run(go())
    for host in cluster.hosts[:n]:  # keep the nodes' disks as they were
        shutil.rmtree(host.path(remote_run_dir(run.plan.nodes[0], run.record.run_id)), ignore_errors=True)


def launcher_gather(cluster, plan, work: Path) -> None:
    run = new_run(plan, work, f"gathered-{next(RUN_NUMBERS)}", SOURCE_RUN)

    async def go():
        await run.connect_all()
        try:
            problems = await ssh_gather.gather(run)
        finally:
            run.close()
        assert not problems, problems

    asyncio.run(go())
    shutil.rmtree(run.run_dir)


def parallel_scp(cluster, files, work: Path) -> None:
    out = work / "scp"
    out.mkdir()
    procs = [subprocess.Popen(["scp", "-q", "-i", str(cluster.identity_file),
                               "-o", f"UserKnownHostsFile={cluster.known_hosts}",
                               f"root@{host.address}:{path}", str(out / f"{i}.ckpt")])
             for i, (host, path) in enumerate(files)]
    assert all(p.wait() == 0 for p in procs)
    shutil.rmtree(out)


def report(title: str, results: dict, names: tuple[str, str]) -> None:
    a, b = (results[n] for n in names)
    print(f"\n{title}")
    for name in names:
        r = results[name]
        print(f"  {name:<22} wall {r['wall']:6.2f}s   CPU here {r['here']:6.2f}s   CPU on the nodes {r['nodes']:6.2f}s")
    print(f"  {names[0]} / {names[1]}: wall {a['wall'] / b['wall']:.2f}, CPU here {a['here'] / b['here']:.2f}, "
          f"CPU on the nodes {a['nodes'] / max(b['nodes'], 1e-9):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also profile one launcher gather (cProfile)")
    args = parser.parse_args()
    reason = sshcluster.missing_capabilities()
    if reason:
        sys.exit(f"cannot build test hosts: {reason}")
    work = Path(tempfile.mkdtemp(prefix="ssh-bench-"))
    cluster = sshcluster.build(work / "cluster", 8)
    try:
        dataset = work / "tiny.mindrecord"
        subprocess.run([str(Path(sys.executable).parent / "launcher"), "dataset", "tiny", str(dataset)],
                       check=True, capture_output=True)
        cluster.place_dataset(dataset)
        print(f"{os.cpu_count()} cores here, shared by the launcher and every node's sshd")
        fan = alternate(cluster, {"8 nodes": lambda: fan_out(cluster, 8, work),
                                  "1 node": lambda: fan_out(cluster, 1, work)}, args.repeats)
        report("fan-out: connect + preflight + staging (goal: wall 8 / 1 <= 2, CPU here <= 2)", fan,
               ("8 nodes", "1 node"))

        hosts = cluster.hosts[:4]
        plan = make_plan(cluster, hosts)
        per_file = int(args.gib * (1 << 30) / len(hosts))
        files = []
        for rank, (host, step) in enumerate(zip(hosts, plan.nodes)):
            remote = f"{remote_run_dir(step, SOURCE_RUN)}/output/checkpoint/rank_{rank}/bench.ckpt"
            local = host.path(remote)
            local.parent.mkdir(parents=True)
            with local.open("wb") as f:
                for _ in range(per_file >> 24):
                    f.write(os.urandom(1 << 24))
            files.append((host, remote))
        total_mib = (per_file >> 24) * 16 * len(hosts)
        results = alternate(cluster, {"launcher gather": lambda: launcher_gather(cluster, plan, work),
                                      "parallel scp": lambda: parallel_scp(cluster, files, work)}, args.repeats)
        report(f"gather {total_mib} MiB from {len(hosts)} nodes (goal: scp wall / launcher wall >= 0.9)", results,
               ("launcher gather", "parallel scp"))
        print(f"  launcher speed as a share of parallel scp's: "
              f"{results['parallel scp']['wall'] / results['launcher gather']['wall']:.0%}")
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(launcher_gather, cluster, plan, work)
            print("\nwhere one launcher gather spends its time here (cProfile, by own time):")
            pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    finally:
        sshcluster.teardown(8, cluster)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

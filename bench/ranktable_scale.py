"""Rank-table scale: discover and merge for 512 servers × 16 devices and for 64 servers × 16.

Each server's device IPs come from its own hccn.conf fixture (what `launcher ranktable discover`
reads where hccn_tool is missing); each server's table is written to a file, then all files are
merged, which validates them and the result. Prints the time of each size and
(time at 512 / time at 64) / 8, which stays near 1 while the work grows linearly with the servers.

    .venv/bin/python bench/ranktable_scale.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from launcher import ascend, ranktable
from launcher.render import to_json

DEVICES = list(range(16))


def write_fixtures(root: Path, servers: int) -> list[tuple[str, Path]]:
    """(server_id, hccn.conf) of each server; every device IP is unique across the cluster."""
    fixtures = []
    for k in range(servers):
        conf = root / f"server-{k}" / "hccn.conf"
        conf.parent.mkdir(parents=True)
        conf.write_text("".join(f"address_{d}=172.{16 + k // 256}.{k % 256}.{d + 1}\nnetmask_{d}=255.255.0.0\n"
                                for d in DEVICES))
        fixtures.append((f"10.0.{k // 256}.{k % 256}", conf))
    return fixtures


def discover_and_merge(fixtures: list[tuple[str, Path]]) -> tuple[float, float]:
    run = ascend.local_runner(5)
    start = time.perf_counter()
    files = []
    for server_id, conf in fixtures:
        table = ascend.discover(DEVICES, server_id, run, str(conf))
        path = conf.with_name("hccl.json")
        path.write_text(to_json(table))
        files.append(str(path))
    discovered = time.perf_counter()
    merged = ranktable.merge_files(files)
    done = time.perf_counter()
    assert len(merged["server_list"]) == len(fixtures)
    return discovered - start, done - discovered


def best_of(fixtures: list[tuple[str, Path]], repeats: int) -> tuple[float, float]:
    runs = [discover_and_merge(fixtures) for _ in range(repeats)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = write_fixtures(Path(tmp) / "64", 64)
        large = write_fixtures(Path(tmp) / "512", 512)
        times = {64: best_of(small, args.repeats), 512: best_of(large, args.repeats)}
    for servers, (discover, merge) in times.items():
        print(f"{servers:>4} servers × 16: discover {discover * 1000:8.1f} ms  merge {merge * 1000:8.1f} ms  "
              f"total {(discover + merge) * 1000:8.1f} ms")
    for i, what in enumerate(("discover", "merge")):
        print(f"{what:>8}: (512 / 64) / 8 = {times[512][i] / times[64][i] / 8:.2f}")
    total = sum(times[512]) / sum(times[64]) / 8
    print(f"   total: (512 / 64) / 8 = {total:.2f}   (1.00 = linear)")


if __name__ == "__main__":
    main()

"""Tokenization throughput of `launcher data prepare` against a plain single-process loop.

Synthetic alpaca rows (a JSON array, as Stanford alpaca ships) of 20k and 80k rows go through
`launcher data prepare --workers 2` and through a baseline that does the same steps one row at a
time in one process: stream the file, apply the template, tokenize with the same sentencepiece
model, write the MindRecord (in batches of 256 records, as prepare does; prepare writes files of at
most 20k records, the baseline one file). Both run as fresh processes, alternating; the bench prints
records/s of each, their ratio, and the peak RSS of the largest process (the launcher's main process
or a worker), which should not grow with the rows.

    .venv/bin/python bench/data_prepare.py [--rows 20000 80000] [--repeats 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = str(Path(sys.executable).parent / "launcher")
SEQ_LENGTH = 512


def words() -> list[str]:
    return (REPO / "configs" / "data" / "tiny_corpus.txt").read_text().split()


def make_rows(path: Path, count: int, seed: int = 0) -> None:
    """A JSON array of alpaca rows with sentences drawn from the shipped corpus."""
    rng, vocab = random.Random(seed), words()
    say = lambda lo, hi: " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(count):
            row = {"instruction": say(8, 30), "input": say(0, 20) if i % 3 else "", "output": say(20, 120)}
            f.write(("" if i == 0 else ",\n") + json.dumps(row, indent=1))
        f.write("\n]\n")


def train_tokenizer(path: Path, rows: Path) -> None:
    import sentencepiece

    text = (REPO / "configs" / "data" / "tiny_corpus.txt").read_text().splitlines()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text * 20), model_prefix=str(path.with_suffix("")), vocab_size=600,
        model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False, minloglevel=2)


def baseline(source: str, tokenizer_path: str, out: str) -> int:
    """The same steps as `data prepare`, as a plain loop in one process."""
    import numpy as np

    from launcher.data.prepare import BadRow, read_rows, row_turns
    from launcher.data.mindrecord import PREPARED_PAGES, atomic_mindrecord
    from launcher.data.tokenization import IGNORE_INDEX, load_tokenizer, template_parts

    tok = load_tokenizer(tokenizer_path)
    length, written, batch = SEQ_LENGTH + 1, 0, []
    with atomic_mindrecord(Path(out), "baseline", **PREPARED_PAGES) as writer:
        for _, item in read_rows(Path(source)):
            try:
                turns = row_turns(item, "alpaca")
            except BadRow:
                continue
            ids, mask = [tok.bos], [False]
            for text, learned in template_parts(turns):
                piece = tok.encode_batch([text])[0] + ([tok.eos] if learned else [])
                ids += piece
                mask += [learned] * len(piece)
            ids, mask = ids[:length], mask[:length]
            input_ids = np.full(length, tok.pad, np.int32)
            labels = np.full(length, IGNORE_INDEX, np.int32)
            input_ids[: len(ids)] = ids
            labels[: len(ids)] = np.where(mask, ids, IGNORE_INDEX)
            batch.append({"input_ids": input_ids, "labels": labels})
            if len(batch) == 256:
                writer.write_raw_data(batch)
                written += len(batch)
                batch = []
        if batch:
            writer.write_raw_data(batch)
            written += len(batch)
    return written


def measured(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB of the largest process) of argv, run from a fresh wrapper."""
    wrapper = ("import resource, subprocess, sys, time\n"
               "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "dt = time.perf_counter() - t\n"
               "assert r.returncode == 0, r.stderr\n"
               "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    result = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{argv[:4]} failed:\n{result.stderr[-2000:]}")
    seconds, kib = result.stdout.split()
    return float(seconds), int(kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[20000, 80000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baseline", nargs=3, metavar=("SOURCE", "TOKENIZER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        baseline(*args.baseline)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = root / "tokenizer.model"
        train_tokenizer(tokenizer, root)
        print(f"{'rows':>7} {'baseline rec/s':>15} {'prepare rec/s':>14} {'ratio':>6} "
              f"{'baseline MiB':>13} {'prepare MiB':>12}  (workers={args.workers}, seq_length={SEQ_LENGTH})")
        for count in args.rows:
            source = root / f"rows-{count}.json"
            make_rows(source, count)
            job = yaml.safe_load((REPO / "configs" / "examples" / "tiny-lora-local.yaml").read_text())
            del job["dataset"]
            job["data"] = {"source": str(source), "format": "alpaca", "tokenizer": str(tokenizer),
                           "seq_length": SEQ_LENGTH}
            (root / "job.yaml").write_text(yaml.safe_dump(job))
            base, prep = [], []
            for _ in range(args.repeats):
                for out, argv, into in (
                    (root / "base.mindrecord", [sys.executable, __file__, "--baseline", str(source), str(tokenizer)],
                     base),
                    (root / "prepared", [LAUNCHER, "data", "prepare", str(root / "job.yaml"), "--workers",
                                         str(args.workers), "-o"], prep),
                ):
                    shutil.rmtree(out, ignore_errors=True)  # prepare writes a directory of parts
                    for stale in (out, Path(f"{out}.db")):
                        stale.unlink(missing_ok=True)
                    into.append(measured([*argv, str(out)]))
            b = count / statistics.median(s for s, _ in base)
            p = count / statistics.median(s for s, _ in prep)
            print(f"{count:>7} {b:>15,.0f} {p:>14,.0f} {p / b:>6.2f} {max(m for _, m in base):>13,.0f} "
                  f"{max(m for _, m in prep):>12,.0f}")
            source.unlink()


if __name__ == "__main__":
    main()

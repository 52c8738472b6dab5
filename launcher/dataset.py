"""MindRecord output: the atomic writer shared by every dataset command, and the demo dataset.

The demo dataset is a MindRecord made from text shipped with the launcher, one byte per token.
Byte tokens match the tiny model's vocabulary of 256, so no tokenizer file is needed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from launcher.errors import ConfigError
from launcher.render import data_dir

TINY_CORPUS = "data/tiny_corpus.txt"
# What MindFormers' CausalLanguageModelDataset reads: token ids and their labels (-100 where no loss).
# Header and page size for prepared datasets: about 1000 records of 2k tokens per page, and room
# in the header for the pages of tens of GB (a 64 KiB header overflows at about 100 MB of data).
PREPARED_PAGES = {"header_size": 1 << 20, "page_size": 8 << 20}
TOKEN_SCHEMA = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}


def byte_windows(text: bytes, length: int, count: int) -> list[list[int]]:
    """`count` consecutive windows of `length` byte tokens."""
    windows = [list(text[i : i + length]) for i in range(0, len(text) - length + 1, length)]
    if len(windows) < count:
        raise ConfigError(f"the corpus has {len(windows)} samples of {length} bytes; {count} were asked for")
    return windows[:count]


def refuse_existing(out: Path, force: bool) -> None:
    if (out.exists() or Path(f"{out}.db").exists()) and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")


@contextlib.contextmanager
def atomic_mindrecord(out: Path, description: str, header_size: int = 1 << 16, page_size: int = 1 << 16):
    """Yield a FileWriter for `out` that only appears at `out` (and `out.db`) when the block succeeds.

    MindRecord writes a data file and a .db index that names it, and refuses to overwrite. Both are
    built under the final name in a temporary folder beside the target, then moved into place: a crash
    or an error never leaves half a dataset, and the old one (if --force) stays until the new one is whole.
    """
    from mindspore.mindrecord import FileWriter

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        writer = FileWriter(str(staged), shard_num=1, overwrite=True)
        # The default 16 MiB header and 32 MiB page would make a 50 MB file of 8 KB of tokens; the
        # header lists every page, so big datasets need bigger pages or header (PREPARED_PAGES).
        writer.set_header_size(header_size)
        writer.set_page_size(page_size)
        writer.add_schema(TOKEN_SCHEMA, description)
        yield writer
        writer.commit()
        # The index first: a data file at `out` then always has its .db beside it.
        os.replace(f"{staged}.db", f"{out}.db")
        os.replace(staged, out)


def write_tiny(out: Path, seq_length: int = 32, records: int = 64, force: bool = False) -> int:
    """Write the tiny MindRecord (input_ids and labels, seq_length + 1 tokens each). Returns the record count."""
    out = Path(out)
    refuse_existing(out, force)
    corpus = (data_dir("configs") / TINY_CORPUS).read_bytes()
    windows = byte_windows(corpus, seq_length + 1, records)

    import numpy as np

    with atomic_mindrecord(out, "tiny") as writer:
        writer.write_raw_data([{"input_ids": np.array(w, np.int32), "labels": np.array(w, np.int32)} for w in windows])
    return len(windows)

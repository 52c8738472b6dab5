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
# Records per file of a prepared dataset: MindRecord's commit holds the file's index in memory.
ROWS_PER_FILE = 20_000
TOKEN_SCHEMA = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}


def byte_windows(text: bytes, length: int, count: int) -> list[list[int]]:
    """`count` consecutive windows of `length` byte tokens."""
    windows = [list(text[i : i + length]) for i in range(0, len(text) - length + 1, length)]
    if len(windows) < count:
        raise ConfigError(f"the corpus has {len(windows)} samples of {length} bytes; {count} were asked for")
    return windows[:count]


def refuse_existing(out: Path, force: bool) -> None:
    """A file (and its .db) or a prepared directory at `out` is only replaced with --force."""
    if (out.exists() or Path(f"{out}.db").exists()) and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")


def _open_writer(path: Path, description: str, header_size: int, page_size: int):
    from mindspore.mindrecord import FileWriter

    writer = FileWriter(str(path), shard_num=1, overwrite=True)
    # The default 16 MiB header and 32 MiB page would make a 50 MB file of 8 KB of tokens; the
    # header lists every page, so big datasets need bigger pages or header (PREPARED_PAGES).
    writer.set_header_size(header_size)
    writer.set_page_size(page_size)
    writer.add_schema(TOKEN_SCHEMA, description)
    return writer


@contextlib.contextmanager
def atomic_mindrecord(out: Path, description: str, header_size: int = 1 << 16, page_size: int = 1 << 16):
    """Yield a FileWriter for `out` that only appears at `out` (and `out.db`) when the block succeeds.

    MindRecord writes a data file and a .db index that names it, and refuses to overwrite. Both are
    built under the final name in a temporary folder beside the target, then moved into place: a crash
    or an error never leaves half a dataset, and the old one (if --force) stays until the new one is whole.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        writer = _open_writer(staged, description, header_size, page_size)
        yield writer
        writer.commit()
        # The index first: a data file at `out` then always has its .db beside it.
        os.replace(f"{staged}.db", f"{out}.db")
        os.replace(staged, out)


class _PartWriter:
    """Records into part-00000.mindrecord, part-00001.mindrecord, ..., at most `rows_per_file` each."""

    def __init__(self, directory: Path, description: str, rows_per_file: int, pages: dict):
        self.directory, self.description, self.rows_per_file, self.pages = directory, description, rows_per_file, pages
        self.writer, self.rows, self.parts = None, 0, 0

    def write(self, records: list[dict]) -> None:
        while records:
            if self.writer is None:
                name = f"part-{self.parts:05d}.mindrecord"
                self.writer = _open_writer(self.directory / name, self.description, **self.pages)
            room = self.rows_per_file - self.rows
            self.writer.write_raw_data(records[:room])
            self.rows += len(records[:room])
            records = records[room:]
            if self.rows >= self.rows_per_file:
                self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.commit()
            self.writer, self.rows, self.parts = None, 0, self.parts + 1


@contextlib.contextmanager
def atomic_mindrecord_dir(out: Path, description: str, rows_per_file: int | None = None, **pages):
    """Yield write(records) filling the directory `out` with MindRecord parts; `out` appears only whole.

    MindRecord builds a file's whole index in memory when it commits (about 1.4 KB a record), so one
    file per dataset would make memory grow with the rows; parts of at most `rows_per_file` keep it
    flat. MindFormers reads every *.mindrecord under a dataset_dir that is a directory.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        staged.mkdir()
        parts = _PartWriter(staged, description, rows_per_file or ROWS_PER_FILE,
                            pages or {"header_size": 1 << 16, "page_size": 1 << 16})
        yield parts.write
        parts.close()
        if out.exists():  # --force: the old dataset goes only once the new one is whole
            os.replace(out, Path(tmp) / "replaced")
        os.replace(staged, out)


def mindrecord_files(path: Path) -> list[Path]:
    """The data files of a MindRecord dataset: the file itself, or the parts of a prepared directory."""
    path = Path(path)
    return sorted(path.glob("*.mindrecord")) if path.is_dir() else [path]


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

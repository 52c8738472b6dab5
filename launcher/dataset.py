"""The demo dataset: a MindRecord made from text shipped with the launcher, one byte per token.

Byte tokens match the tiny model's vocabulary of 256, so no tokenizer file is needed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from launcher.errors import ConfigError
from launcher.render import data_dir

TINY_CORPUS = "data/tiny_corpus.txt"


def byte_windows(text: bytes, length: int, count: int) -> list[list[int]]:
    """`count` consecutive windows of `length` byte tokens."""
    windows = [list(text[i : i + length]) for i in range(0, len(text) - length + 1, length)]
    if len(windows) < count:
        raise ConfigError(f"the corpus has {len(windows)} samples of {length} bytes; {count} were asked for")
    return windows[:count]


def write_tiny(out: Path, seq_length: int = 32, records: int = 64, force: bool = False) -> int:
    """Write the tiny MindRecord (input_ids and labels, seq_length + 1 tokens each). Returns the record count."""
    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    corpus = (data_dir("configs") / TINY_CORPUS).read_bytes()
    windows = byte_windows(corpus, seq_length + 1, records)

    import numpy as np
    from mindspore.mindrecord import FileWriter

    out.parent.mkdir(parents=True, exist_ok=True)
    # MindRecord writes a data file and a .db index that names it. Build both under the final name in a
    # temporary folder beside the target, then move them into place: a crash never leaves half a dataset.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        writer = FileWriter(str(staged), shard_num=1, overwrite=True)
        # The default 16 MiB header and 32 MiB page would make a 50 MB file of 8 KB of tokens.
        writer.set_header_size(1 << 16)
        writer.set_page_size(1 << 16)
        writer.add_schema(
            {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}, "tiny"
        )
        writer.write_raw_data([{"input_ids": np.array(w, np.int32), "labels": np.array(w, np.int32)} for w in windows])
        writer.commit()
        os.replace(f"{staged}.db", f"{out}.db")
        os.replace(staged, out)
    return len(windows)

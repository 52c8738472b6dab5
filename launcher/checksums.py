"""The sha256 of a file, read in chunks so that a checkpoint of gigabytes never sits in memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def sha256_of(path: Path):
    """A sha256 object fed with the file's bytes (more may be added)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest


def sha256_file(path: Path) -> str:
    return sha256_of(path).hexdigest()

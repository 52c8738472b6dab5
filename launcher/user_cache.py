"""The launcher's cache directory on this machine: $LAUNCHER_CACHE, else $XDG_CACHE_HOME/launcher, else
~/.cache/launcher. It holds what is slow to make and safe to reuse (downloads, compiled graphs)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("LAUNCHER_CACHE"):
        return Path(os.environ["LAUNCHER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "launcher"

"""The consoles and the error wrapper shared by the command modules."""

from __future__ import annotations

import functools
import sys

from rich.console import Console
from rich.markup import escape

from launcher.errors import LauncherError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def reports_errors(fn):
    """Turn LauncherError into one line on stderr and its exit code; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LauncherError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, soft_wrap=True)  # the text is not markup
            sys.exit(exc.exit_code)

    return wrapper

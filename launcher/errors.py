"""The one error hierarchy. Only the command line (launcher/cli/) turns these into messages and exit codes."""

from __future__ import annotations


class LauncherError(Exception):
    """Base of every error the launcher reports to the user without a traceback."""

    exit_code = 1


class ConfigError(LauncherError):
    """The job file or a command-line argument is wrong; the message says how to fix it."""

    exit_code = 2


class RenderError(LauncherError):
    """A template or base config could not be rendered."""


class BackendError(LauncherError):
    """A backend could not start, watch or stop the ranks."""


class TransportError(BackendError):
    """A command on a remote host failed."""

    def __init__(self, host: str, argv: list[str], rc: int | None, stderr_tail: str):
        self.host, self.argv, self.rc, self.stderr_tail = host, argv, rc, stderr_tail
        super().__init__(f"{host}: {' '.join(argv)} exited {rc}: {stderr_tail.strip()}")

"""SSH to the nodes with asyncssh: one connection per node, commands and SFTP over it, every call timed out.

asyncssh rather than the OpenSSH client: one process drives every node concurrently, SFTP reads at an
offset (resumable gather, log tails) need no helper processes, and errors come back as exceptions
instead of exit codes to parse. ~/.ssh/config is still read for anything the job leaves unset.

Host keys are always checked against known_hosts. An unknown host is accepted only when the user asks
(`--accept-new-host-keys`), and then its key is written to known_hosts; a changed key is never accepted.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from launcher.errors import TransportError

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
PREFERRED_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                     "aes128-ctr", "aes256-ctr"]


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int | None = None
    user: str | None = None
    identity_file: str | None = None


class Node:
    """A connected node: run commands and move files, each call under a timeout."""

    def __init__(self, endpoint: Endpoint, conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient,
                 timeout: float):
        self.endpoint, self.conn, self.sftp, self.timeout = endpoint, conn, sftp, timeout

    @property
    def host(self) -> str:
        return self.endpoint.host

    async def run(self, argv: list[str], check: bool = True, timeout: float | None = None,
                  stdin: str | None = None) -> str:
        """Run argv (each word quoted once; no nested quoting) and return stdout. stdin: text to feed the
        command, then end of file (data that must not be on a command line goes here)."""
        command = " ".join(shlex.quote(a) for a in argv)
        try:
            result = await asyncio.wait_for(self.conn.run(command, check=False, input=stdin), timeout or self.timeout)
        except asyncio.TimeoutError:
            raise TransportError(self.host, argv, None, f"no answer within {timeout or self.timeout:.0f}s") from None
        except (OSError, asyncssh.Error) as exc:
            raise TransportError(self.host, argv, None, str(exc)) from None
        if check and result.exit_status != 0:
            raise TransportError(self.host, argv, result.exit_status, str(result.stderr)[-2000:])
        return str(result.stdout)

    async def run_result(self, argv: list[str], timeout: float | None = None) -> tuple[int | None, str]:
        """(exit status, stdout and stderr) of argv; status None when it did not end in time."""
        command = " ".join(shlex.quote(a) for a in argv)
        try:
            result = await asyncio.wait_for(self.conn.run(command, check=False, stderr=asyncssh.STDOUT),
                                            timeout or self.timeout)
        except asyncio.TimeoutError:
            return None, ""
        except (OSError, asyncssh.Error) as exc:
            raise TransportError(self.host, argv, None, str(exc)) from None
        return result.exit_status, str(result.stdout)

    async def call(self, coro, what: str, timeout: float | None = None):
        """Await an SFTP call with the node's timeout, turning failures into TransportError."""
        try:
            return await asyncio.wait_for(coro, timeout or self.timeout)
        except asyncio.TimeoutError:
            raise TransportError(self.host, [what], None, "no answer in time") from None
        except (OSError, asyncssh.Error) as exc:
            raise TransportError(self.host, [what], None, str(exc)) from None

    async def read_from(self, path: str, offset: int) -> bytes:
        """Bytes of a remote file from offset on; b'' when it does not exist yet."""
        try:
            async with self.sftp.open(path, "rb") as f:
                return await f.read(-1, offset)
        except asyncssh.SFTPNoSuchFile:
            return b""

    def close(self) -> None:
        self.conn.close()


def _known_hosts_path(known_hosts: str | None) -> Path:
    return Path(os.path.expanduser(known_hosts or DEFAULT_KNOWN_HOSTS))


def _host_pattern(endpoint: Endpoint) -> str:
    port = endpoint.port or 22
    return endpoint.host if port == 22 else f"[{endpoint.host}]:{port}"


def _known_keys(path: Path, endpoint: Endpoint) -> int:
    if not path.is_file():
        return 0
    trusted = asyncssh.read_known_hosts(str(path)).match(endpoint.host, "", endpoint.port or 22)
    return len(trusted[0]) + len(trusted[3])


async def connect(endpoint: Endpoint, known_hosts: str | None, connect_timeout: float, command_timeout: float,
                  accept_new: bool = False) -> Node:
    path = _known_hosts_path(known_hosts)
    options = dict(
        port=endpoint.port or (),
        username=endpoint.user or (),
        client_keys=[os.path.expanduser(endpoint.identity_file)] if endpoint.identity_file else (),
        # An empty trust list (never None, which would switch checking off) when there is no file yet.
        known_hosts=str(path) if path.is_file() else ([], [], []),
        connect_timeout=connect_timeout,
        # AES-GCM first: with AES instructions it is the cheapest cipher to decrypt gathered checkpoints.
        encryption_algs=PREFERRED_CIPHERS,
        keepalive_interval=max(1.0, connect_timeout / 3),
        keepalive_count_max=3,
    )
    argv = ["ssh", _host_pattern(endpoint)]
    try:
        conn = await asyncio.wait_for(asyncssh.connect(endpoint.host, **options), connect_timeout + 5)
    except asyncssh.HostKeyNotVerifiable as exc:
        if _known_keys(path, endpoint):
            raise TransportError(
                endpoint.host, argv, None,
                f"host key does not match {path} ({exc.reason}); if the host was reinstalled, remove the old key "
                f"with: ssh-keygen -R {_host_pattern(endpoint)} -f {path}",
            ) from None
        if not accept_new:
            raise TransportError(
                endpoint.host, argv, None,
                f"host key is not in {path}; check it and add it (ssh-keyscan), or pass --accept-new-host-keys",
            ) from None
        await _accept_new_key(endpoint, path, connect_timeout)
        return await connect(endpoint, known_hosts, connect_timeout, command_timeout, accept_new=False)
    except asyncio.TimeoutError:
        raise TransportError(endpoint.host, argv, None, f"no answer within {connect_timeout:.0f}s") from None
    except (OSError, asyncssh.Error) as exc:
        raise TransportError(endpoint.host, argv, None, str(exc) or exc.__class__.__name__) from None
    try:
        sftp = await asyncio.wait_for(conn.start_sftp_client(), command_timeout)
    except (asyncio.TimeoutError, OSError, asyncssh.Error) as exc:
        conn.close()
        raise TransportError(endpoint.host, ["sftp"], None, f"cannot start SFTP: {exc}") from None
    return Node(endpoint, conn, sftp, command_timeout)


async def _accept_new_key(endpoint: Endpoint, path: Path, timeout: float) -> None:
    key = await asyncio.wait_for(
        asyncssh.get_server_host_key(endpoint.host, endpoint.port or 22), timeout + 5)
    if key is None:
        raise TransportError(endpoint.host, ["ssh-keyscan"], None, "the server sent no host key")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = f"{_host_pattern(endpoint)} {key.export_public_key('openssh').decode().strip()}\n"
    with path.open("a") as f:
        f.write(line)


async def gather_results(coros) -> tuple[list, list[Exception]]:
    """Run every coroutine; return results (None where one failed) and every failure, in order."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, Exception):
            raise r
    return [None if isinstance(r, Exception) else r for r in results], errors

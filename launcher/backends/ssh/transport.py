"""SSH to the nodes with asyncssh: one connection per node, commands and SFTP over it, every call timed out.

asyncssh rather than the OpenSSH client: one process drives every node concurrently, SFTP reads at an
offset (resumable gather, log tails) need no helper processes, and errors come back as exceptions
instead of exit codes to parse. ~/.ssh/config is still read for anything the job leaves unset, as
asyncssh reads it (HostName, User, Port, IdentityFile, ProxyJump, HostKeyAlias).

Nodes behind a login node are reached through it (cluster.ssh.jump or ProxyJump): one connection to the
jump host, each node's connection tunnelled inside it.

Host keys are always checked against known_hosts, the jump hosts' too, under the name OpenSSH would use.
An unknown host is accepted only when the user asks (`--accept-new-host-keys`), and then its key is
written to known_hosts; a changed key is never accepted.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from dataclasses import dataclass, replace
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
    jump: str | None = None  # [user@]host[:port][,...]; else ProxyJump from ~/.ssh/config


class Node:
    """A connected node: run commands and move files, each call under a timeout."""

    def __init__(self, endpoint: Endpoint, conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient,
                 timeout: float):
        self.endpoint, self.conn, self.sftp, self.timeout = endpoint, conn, sftp, timeout

    @property
    def host(self) -> str:
        return self.endpoint.host

    async def run(self, argv: list[str], check: bool = True, timeout: float | None = None,
                  stdin: str | bytes | None = None) -> str:
        """Run argv (each word quoted once; no nested quoting) and return stdout. stdin: text or bytes to
        feed the command, then end of file (data that must not be on a command line goes here)."""
        command = " ".join(shlex.quote(a) for a in argv)
        # Bytes in, bytes out (asyncssh's encoding=None); stdout and stderr are decoded here then.
        encoding = None if isinstance(stdin, bytes) else "utf-8"
        try:
            result = await asyncio.wait_for(self.conn.run(command, check=False, input=stdin, encoding=encoding),
                                            timeout or self.timeout)
        except asyncio.TimeoutError:
            raise TransportError(self.host, argv, None, f"no answer within {timeout or self.timeout:.0f}s") from None
        except (OSError, asyncssh.Error) as exc:
            raise TransportError(self.host, argv, None, str(exc)) from None
        stdout, stderr = (out.decode(errors="replace") if isinstance(out, bytes) else str(out)
                          for out in (result.stdout, result.stderr))
        if check and result.exit_status != 0:
            raise TransportError(self.host, argv, result.exit_status, stderr[-2000:])
        return stdout

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

    async def unpack(self, archive: bytes, directory: str) -> None:
        """Extract a tar archive, sent on the command's standard input, into directory (made if missing)."""
        await self.run(["sh", "-c", 'mkdir -p -- "$1" && exec tar -x -f - --no-same-owner -C "$1"', "unpack",
                        directory], stdin=archive)

    async def exists(self, path: str) -> bool:
        try:
            await self.sftp.stat(path)
        except asyncssh.SFTPNoSuchFile:
            return False
        return True

    def close(self) -> None:
        self.conn.close()


def _known_hosts_path(known_hosts: str | None) -> Path:
    return Path(os.path.expanduser(known_hosts or DEFAULT_KNOWN_HOSTS))


@dataclass(frozen=True)
class Target:
    """Where an endpoint leads once ~/.ssh/config has filled in what the job leaves unset (HostName, Port,
    User, ProxyJump, HostKeyAlias), as asyncssh itself reads it."""

    host: str
    port: int
    user: str | None
    jump: str | None  # [user@]host[:port][,...] to tunnel through, in order
    key_name: str  # the name its key has in known_hosts

    @property
    def pattern(self) -> str:
        return self.key_name if self.port == 22 else f"[{self.key_name}]:{self.port}"


def resolve(endpoint: Endpoint) -> Target:
    options = asyncssh.SSHClientConnectionOptions(
        host=endpoint.host, port=endpoint.port or (), username=endpoint.user or (), config=(), known_hosts=None,
        client_keys=None)
    jump = endpoint.jump or (options.tunnel if isinstance(options.tunnel, str) else None)
    if jump and jump.lower() == "none":  # ProxyJump none: connect directly
        jump = None
    return Target(options.host, options.port, endpoint.user or options.username, jump,
                  options.host_key_alias or options.host)


def parse_jump(hop: str) -> Endpoint:
    """One hop of a jump spec: [user@]host[:port] (the host may be an alias of ~/.ssh/config)."""
    user, _, address = hop.rpartition("@")
    host, _, port = address.partition(":")
    return Endpoint(host, int(port) if port else None, user or None)


def _known_keys(path: Path, target: Target) -> int:
    if not path.is_file():
        return 0
    trusted = asyncssh.read_known_hosts(str(path)).match(target.key_name, "", target.port)
    return len(trusted[0]) + len(trusted[3])


class Connector:
    """Opens node connections with one set of options: every host key (jump hosts too) checked against
    one known_hosts file, and each jump host logged in to once however many nodes are behind it."""

    def __init__(self, known_hosts: str | None, connect_timeout: float, command_timeout: float,
                 accept_new: bool = False, jump: str | None = None, jump_identity_file: str | None = None):
        self.path = _known_hosts_path(known_hosts)
        # The jump host is offered the job's key (cluster.ssh.identity_file), and ~/.ssh/config's for it.
        self.jump_keys = [os.path.expanduser(jump_identity_file)] if jump_identity_file else ()
        self.connect_timeout, self.command_timeout = connect_timeout, command_timeout
        self.accept_new, self.jump = accept_new, jump
        self.tunnels: dict[str, asyncio.Future] = {}

    async def node(self, endpoint: Endpoint) -> Node:
        target = resolve(replace(endpoint, jump=endpoint.jump or self.jump))
        argv = ["ssh", target.pattern]
        tunnel = None
        if target.jump:
            try:
                tunnel = await self._tunnel(target.jump)
            except TransportError as exc:
                raise TransportError(endpoint.host, argv, None, exc.stderr_tail) from None
        keys = [os.path.expanduser(endpoint.identity_file)] if endpoint.identity_file else ()
        conn = await self._open(target, endpoint.host, keys, tunnel)
        try:
            sftp = await asyncio.wait_for(conn.start_sftp_client(), self.command_timeout)
        except (asyncio.TimeoutError, OSError, asyncssh.Error) as exc:
            conn.close()
            raise TransportError(endpoint.host, ["sftp"], None, f"cannot start SFTP: {exc}") from None
        return Node(endpoint, conn, sftp, self.command_timeout)

    async def _tunnel(self, spec: str) -> asyncssh.SSHClientConnection:
        """The connection to the last hop of spec (each hop reached through the one before), made once."""
        if spec not in self.tunnels:
            self.tunnels[spec] = asyncio.ensure_future(self._open_hops(spec))
        return await asyncio.shield(self.tunnels[spec])

    async def _open_hops(self, spec: str) -> asyncssh.SSHClientConnection:
        conn = None
        for hop in spec.split(","):
            endpoint = parse_jump(hop.strip())
            target = resolve(endpoint)
            try:
                conn = await self._open(target, endpoint.host, self.jump_keys, conn)
            except TransportError as exc:
                raise TransportError(endpoint.host, exc.argv, None, f"jump host {hop}: {exc.stderr_tail}") from None
        return conn

    async def _open(self, target: Target, name: str, client_keys, tunnel) -> asyncssh.SSHClientConnection:
        """A connection to name (resolved as target), its host key checked, or accepted with consent."""
        options = dict(
            port=target.port,
            username=target.user or (),
            client_keys=client_keys,
            # An empty trust list (never None, which would switch checking off) when there is no file yet.
            known_hosts=str(self.path) if self.path.is_file() else ([], [], []),
            tunnel=tunnel,  # None: no jump host (also when ~/.ssh/config says ProxyJump none)
            connect_timeout=self.connect_timeout,
            # AES-GCM first: with AES instructions it is the cheapest cipher to decrypt gathered checkpoints.
            encryption_algs=PREFERRED_CIPHERS,
            keepalive_interval=max(1.0, self.connect_timeout / 3),
            keepalive_count_max=3,
        )
        argv = ["ssh", target.pattern]
        try:
            # The name as the job gives it, so that its ~/.ssh/config block (IdentityFile, HostName) applies.
            return await asyncio.wait_for(asyncssh.connect(name, **options), self.connect_timeout + 5)
        except asyncssh.HostKeyNotVerifiable as exc:
            if _known_keys(self.path, target):
                raise TransportError(
                    name, argv, None,
                    f"host key does not match {self.path} ({exc.reason}); if the host was reinstalled, remove the "
                    f"old key with: ssh-keygen -R {target.pattern} -f {self.path}",
                ) from None
            if not self.accept_new:
                raise TransportError(
                    name, argv, None,
                    f"host key of {target.pattern} is not in {self.path}; check it and add it (ssh-keyscan), "
                    "or pass --accept-new-host-keys",
                ) from None
        except asyncio.TimeoutError:
            raise TransportError(name, argv, None, f"no answer within {self.connect_timeout:.0f}s") from None
        except (OSError, asyncssh.Error) as exc:
            raise TransportError(name, argv, None, str(exc) or exc.__class__.__name__) from None
        await self._accept_new_key(target, name, tunnel)
        return await self._open(target, name, client_keys, tunnel)

    async def _accept_new_key(self, target: Target, name: str, tunnel) -> None:
        try:
            key = await asyncio.wait_for(
                asyncssh.get_server_host_key(target.host, target.port, tunnel=tunnel or ()), self.connect_timeout + 5)
        except (asyncio.TimeoutError, OSError, asyncssh.Error) as exc:
            raise TransportError(name, ["ssh-keyscan", target.pattern], None, str(exc) or "no answer") from None
        if key is None:
            raise TransportError(name, ["ssh-keyscan", target.pattern], None, "the server sent no host key")
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _known_keys(self.path, target):  # another node behind the same name may have added it
            with self.path.open("a") as f:
                f.write(f"{target.pattern} {key.export_public_key('openssh').decode().strip()}\n")

    def close(self) -> None:
        for future in self.tunnels.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().close()
            else:
                future.cancel()


async def gather_results(coros) -> tuple[list, list[Exception]]:
    """Run every coroutine; return results (None where one failed) and every failure, in order."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, Exception):
            raise r
    return [None if isinstance(r, Exception) else r for r in results], errors

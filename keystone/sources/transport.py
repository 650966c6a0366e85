"""The dulwich clients :class:`~keystone.sources.git.GitSource` talks through: local, smart HTTP,
ssh and git://, each with timeouts and every connection closed afterwards.

dulwich and urllib3 are imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dulwich.client import GitClient


def _is_local(client: GitClient) -> bool:
    # lazy: dulwich is heavy; the resident agent imports this module without it
    from dulwich.client import LocalGitClient

    return isinstance(client, LocalGitClient)


def _local_client() -> GitClient:
    # lazy: dulwich is heavy; the resident agent imports this module without it
    from dulwich.client import LocalGitClient

    return LocalGitClient()


def _close_client(client: GitClient) -> None:
    with contextlib.suppress(Exception):
        client.close()
    # dulwich's HTTP client leaves its urllib3 pool open; close the sockets now.
    pool = getattr(client, "pool_manager", None)
    if pool is not None:
        with contextlib.suppress(Exception):
            pool.clear()
    for conn in getattr(client, "_keystone_connections", ()):
        with contextlib.suppress(Exception):
            conn.close()


def bounded_read(
    read: Callable[[int], bytes], limit: int, over: Callable[[], Exception]
) -> Callable[[int], bytes]:
    """``read`` that raises ``over()`` once more than ``limit`` bytes came through it.

    Wraps the reader of a ref advertisement or a pack so that an oversized one is refused as it
    arrives, never held whole (the bounds are ``keystone.limits``' ``max_ref_advertisement_bytes``
    and ``max_pack_bytes``).
    """
    seen = 0

    def _read(size: int = -1) -> bytes:
        nonlocal seen
        data = read(size)
        seen += len(data)
        if seen > limit:
            raise over()
        return data

    return _read


def counting_pkt_lines(
    read: Callable[[int], bytes], limit: int, over: Callable[[], Exception]
) -> Callable[[int], bytes]:
    """``read`` that follows the pkt-line framing of what passes through it (however the
    caller splits its reads) and raises ``over()`` past ``limit`` data lines (flush, delim
    and response-end packets do not count): a ref advertisement with too many refs is refused
    before a client library filters it by ref prefix."""
    head = b""
    left = 0  # bytes of the current packet's payload still to come
    lines = 0

    def _read(size: int = -1) -> bytes:
        nonlocal head, left, lines
        data = read(size)
        i = 0
        while i < len(data):
            if left:
                step = min(left, len(data) - i)
                left -= step
                i += step
                continue
            take = min(4 - len(head), len(data) - i)
            head += data[i : i + take]
            i += take
            if len(head) < 4:
                break
            try:
                n = int(head, 16)
            except ValueError:
                n = 0  # not pkt-line framing: the client reports it
            head = b""
            if n > 4:
                left = n - 4
                lines += 1
                if lines > limit:
                    raise over()
        return data

    return _read


def _tracking_pool_classes(opened: list[Any]) -> dict[str, type]:
    """urllib3 pool classes whose connections are appended to ``opened`` when they connect."""
    # lazy: urllib3 is heavy; only an HTTP fetch needs it
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class _Conn(HTTPConnection):
        def connect(self) -> None:
            opened.append(self)
            super().connect()

    class _TLSConn(HTTPSConnection):
        def connect(self) -> None:
            opened.append(self)
            super().connect()

    class _Pool(HTTPConnectionPool):
        ConnectionCls = _Conn

    class _TLSPool(HTTPSConnectionPool):
        ConnectionCls = _TLSConn

    return {"http": _Pool, "https": _TLSPool}


def _tcp_client(host: str, port: int | None, timeout: float) -> GitClient:
    """A git:// client whose socket has connect and read timeouts (dulwich's has none)."""
    # lazy: dulwich is heavy; the resident agent imports this module without it
    from dulwich.client import TCPGitClient, _fileno_can_read
    from dulwich.protocol import (
        DEFAULT_GIT_PROTOCOL_VERSION_FETCH,
        DEFAULT_GIT_PROTOCOL_VERSION_SEND,
        Protocol,
    )

    class _TimeoutTCPGitClient(TCPGitClient):
        # Mirrors TCPGitClient._connect (dulwich 1.2) with socket.create_connection(timeout=).
        # dulwich does not close the connection when the first read fails, so each one is
        # remembered for _close_client.
        _keystone_connections: list[Protocol]

        def _connect(
            self,
            cmd: bytes,
            path: str | bytes,
            protocol_version: int | None = None,
        ) -> tuple[Protocol, Callable[[], bool], IO[bytes] | None]:
            if not isinstance(path, bytes):
                path = path.encode(self._remote_path_encoding)
            s = socket.create_connection((self._host, self._port), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rfile = s.makefile("rb", -1)
            wfile = s.makefile("wb", 0)

            def close() -> None:
                rfile.close()
                wfile.close()
                s.close()

            def shutdown_write() -> None:
                wfile.flush()
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_WR)

            proto = Protocol(
                rfile.read,
                wfile.write,
                close,
                report_activity=self._report_activity,
                shutdown_write=shutdown_write,
            )
            self._keystone_connections.append(proto)
            if path.startswith(b"/~"):
                path = path[1:]
            if cmd == b"upload-pack":
                self.protocol_version = (
                    DEFAULT_GIT_PROTOCOL_VERSION_FETCH
                    if protocol_version is None
                    else protocol_version
                )
            else:
                self.protocol_version = DEFAULT_GIT_PROTOCOL_VERSION_SEND
            version = b""
            if cmd == b"upload-pack" and self.protocol_version == 2:
                version = b"\0\0version=%d\0" % self.protocol_version
            proto.send_cmd(b"git-" + cmd, path, b"host=" + self._host.encode("ascii") + version)
            return proto, lambda: _fileno_can_read(s.fileno()), None

    client = _TimeoutTCPGitClient(host, port)
    client._keystone_connections = []
    return client

"""The dulwich clients :class:`~keystone.sources.git.GitSource` talks through: local, smart HTTP,
ssh and git://, each with timeouts and every connection closed afterwards; and the agent's own
look at a smart-HTTP ref advertisement (:func:`advertised_tip`).

dulwich and urllib3 are imported inside the functions: importing this module stays cheap.

:func:`advertised_tip` is what lets an unchanged poll skip the sync worker: one
``GET info/refs?service=git-upload-pack`` with the standard library, read through a small
pkt-line reader bounded by ``max_ref_advertisement_bytes``. It parses nothing but ref names and
object ids; packs and TOML from the wire are still read only by the worker. Whenever it cannot
be sure (a proxy, an error status, a dumb server, anything unexpected) it answers None and the
worker asks the server as before.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urljoin, urlsplit

if TYPE_CHECKING:
    import ssl

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


# -- the agent's own look at a ref advertisement ------------------------------------------------

ADVERTISEMENT_TYPE = "application/x-git-upload-pack-advertisement"
USER_AGENT = "git/keystone"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HEX40_BYTES = re.compile(rb"[0-9a-f]{40}")
GIT_PROXY_VARIABLES = ("https_proxy", "http_proxy", "all_proxy")
"""The variables the worker's git transport (dulwich) takes a proxy from."""


class Unusable(Exception):
    """The answer cannot be judged here; the worker asks the server instead."""


@dataclass(frozen=True)
class AdvertisedTip:
    """The tip of one ref as a smart-HTTP server advertises it.

    Attributes:
        ref: The advertised name that matched (``refs/heads/main``).
        sha: The object the ref points to.
        peeled: The commit an annotated tag points to (``ref^{}``), else None.
        bytes: Bytes of the advertisement read.
    """

    ref: str
    sha: str
    peeled: str | None
    bytes: int

    @property
    def revision(self) -> str:
        """The commit: the peeled object of a tag, else the ref's own object."""
        return self.peeled or self.sha


def ref_candidates(ref: str) -> list[str]:
    """The remote ref names tried for a configured ``source.ref``, in order."""
    if ref == "HEAD" or ref.startswith("refs/"):
        return [ref]
    return [f"refs/heads/{ref}", f"refs/tags/{ref}"]


def pkt_lines(data: bytes) -> Iterable[bytes | None]:
    """The pkt-lines of ``data``: each payload, None for a flush (``0000``).

    Raises:
        Unusable: a length that is not hex, or a line cut short.
    """
    pos, end = 0, len(data)
    while pos < end:
        head = data[pos : pos + 4]
        try:
            size = int(head, 16)
        except ValueError:
            raise Unusable(f"bad pkt-line length {head!r}") from None
        if size == 0:
            yield None
            pos += 4
            continue
        if size < 4 or pos + size > end:
            raise Unusable("pkt-line cut short")
        yield data[pos + 4 : pos + size]
        pos += size


def parse_advertisement(data: bytes) -> dict[str, str]:
    """Ref name -> object id of a smart-HTTP ``git-upload-pack`` advertisement (v0 or v1).

    Peeled tags appear as ``<name>^{}``. An empty repository yields ``{}``.

    Raises:
        Unusable: not a smart-HTTP upload-pack advertisement.
    """
    lines = iter(pkt_lines(data))
    first = next(lines, None)
    if first is None or first.rstrip(b"\n") != b"# service=git-upload-pack":
        raise Unusable("no service line")
    refs: dict[str, str] = {}
    for line in lines:
        if line is None:
            continue
        line = line.rstrip(b"\n")
        if line.startswith(b"version "):
            if line != b"version 1":
                raise Unusable(f"protocol {line!r}")
            continue
        line = line.split(b"\0", 1)[0]
        sha, sep, name = line.partition(b" ")
        if not sep or not _HEX40_BYTES.fullmatch(sha):
            raise Unusable("a ref line without a sha1 object id")
        if name == b"capabilities^{}":
            continue
        refs[name.decode("utf-8", "surrogateescape")] = sha.decode("ascii")
    return refs


def proxy_configured(names: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Any of the proxy variables ``names`` is set (then the worker's transport is used)."""
    return any(environ.get(n) for n in names)


@dataclass(frozen=True)
class HttpAnswer:
    """The status and headers (lower-case names) of an answer, and its body when read."""

    status: int
    headers: Mapping[str, str]
    body: bytes | None = None


MAX_HEAD = 64 * 1024
"""Bytes of status line and headers read before an answer is judged not HTTP."""


async def http_get(
    url: str,
    headers: Mapping[str, str],
    *,
    tls: Callable[[], ssl.SSLContext],
    body_limit: int | None = None,
    body_type: str | None = None,
) -> HttpAnswer:
    """One ``GET`` on the agent's loop (asyncio streams, HTTP/1.1, ``Connection: close``),
    following up to five redirects. The caller bounds it in time (``asyncio.timeout``).

    Credentials in the URL are sent as basic auth, as the worker's clients send them. The body
    is read only for a 200 whose content type is ``body_type`` (when given), and only up to
    ``body_limit`` bytes (more is :class:`Unusable`); otherwise it is left unread.

    The standard library's ``http.client`` would do, but it imports the ``email`` package and
    stays resident in the agent (~1.6 MB) for the one request of a poll.

    Raises:
        OSError: the server cannot be reached or hangs up.
        Unusable: not HTTP, a body over the limit, an unsupported scheme, too many redirects.
    """
    for _ in range(6):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname or ""
        if scheme not in ("http", "https") or not host:
            raise Unusable(f"cannot GET {scheme}://")
        https = scheme == "https"
        port = parts.port or (443 if https else 80)
        reader, writer = await asyncio.open_connection(
            host,
            port,
            ssl=tls() if https else None,
            server_hostname=host if https else None,
            limit=MAX_HEAD,
        )
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            lines = [
                f"GET {target} HTTP/1.1",
                f"Host: {parts.netloc.rpartition('@')[2]}",
                f"User-Agent: {USER_AGENT}",
                "Connection: close",
                *(f"{k}: {v}" for k, v in headers.items()),
            ]
            if parts.username is not None:
                pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                lines.append("Authorization: Basic " + base64.b64encode(pair.encode()).decode())
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            await writer.drain()
            status, head = await _read_head(reader)
            location = head.get("location")
            if status in _REDIRECTS and location:
                url = urljoin(url, location)
                continue
            kind = head.get("content-type", "").split(";")[0].strip().lower()
            if body_limit is None or status != 200 or (body_type and kind != body_type):
                return HttpAnswer(status, head)
            return HttpAnswer(status, head, await _read_body(reader, head, body_limit))
        finally:
            # No polite close: the transport finishes closing on the loop.
            writer.close()
    raise Unusable("more than five redirects")


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    budget = MAX_HEAD
    first = await reader.readline()
    parts = first.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise Unusable(f"not an HTTP answer: {first[:40]!r}")
    head: dict[str, str] = {}
    while True:
        line = await reader.readline()
        budget -= len(line)
        if budget < 0 or not line:
            raise Unusable("headers too long or cut short")
        if line in (b"\r\n", b"\n"):
            return int(parts[1]), head
        key, sep, value = line.decode("latin-1").partition(":")
        if sep:
            head[key.strip().lower()] = value.strip()


async def _read_body(reader: asyncio.StreamReader, head: Mapping[str, str], limit: int) -> bytes:
    if "chunked" in head.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        size = 0
        while True:
            line = await reader.readline()
            try:
                n = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise Unusable("bad chunk size") from None
            if n == 0:
                return b"".join(chunks)
            size += n
            if size > limit:
                raise Unusable(f"body over {limit} bytes")
            chunks.append(await reader.readexactly(n))
            await reader.readline()
    declared = head.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Unusable("bad Content-Length")
        if int(declared) > limit:
            raise Unusable(f"body of {declared} bytes is over {limit}")
        return await reader.readexactly(int(declared))
    data = await reader.read(limit + 1)
    while len(data) <= limit:
        more = await reader.read(limit + 1 - len(data))
        if not more:
            return data
        data += more
    raise Unusable(f"body over {limit} bytes")


def _system_tls() -> ssl.SSLContext:
    # lazy: ssl only for an https remote. The worker's urllib3 verifies against the system
    # store (its ca_certs is unset); so does this context.
    import ssl

    return ssl.create_default_context()


async def advertised_tip(
    url: str,
    candidates: Sequence[str],
    *,
    timeout: float,
    max_bytes: int,
    environ: Mapping[str, str] | None = None,
) -> AdvertisedTip | None:
    """The tip a smart-HTTP remote advertises for the first of ``candidates`` it has.

    One GET of ``info/refs?service=git-upload-pack``, the same request the worker's fetch
    starts with, bounded by ``timeout`` as a whole. None when the worker must look instead: not
    an http(s) URL, a proxy set in the environment, an error status (401, 404, 5xx), a dumb
    server, an advertisement over ``max_bytes``, a ref it does not have, or no answer at all;
    the worker then reports it with its own, complete message.
    """
    env = os.environ if environ is None else environ
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        return None
    if proxy_configured(GIT_PROXY_VARIABLES, env):
        return None
    try:
        async with asyncio.timeout(max(timeout, 1.0)):
            answer = await http_get(
                f"{url.rstrip('/')}/info/refs?service=git-upload-pack",
                {"Accept": "*/*", "Pragma": "no-cache"},
                tls=_system_tls,
                body_limit=max_bytes,
                body_type=ADVERTISEMENT_TYPE,
            )
        if answer.body is None:
            return None
        refs = parse_advertisement(answer.body)
    except Exception:  # any failure at all: the worker asks and reports it in full
        return None
    for name in candidates:
        sha = refs.get(name)
        if sha is not None:
            return AdvertisedTip(name, sha, refs.get(name + "^{}"), len(answer.body))
    return None

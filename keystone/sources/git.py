"""Fetching the fleet repository over git: :class:`GitSource`, on dulwich.

:class:`GitSource` fetches one ref from a remote (``http(s)://``, ``ssh://`` or ``user@host:path``,
``git://``, ``file://`` or a plain path) into the mirror and records the tip under
``refs/keystone/fetched``. When the remote tip is already in the mirror it asks for no pack.

The other git pieces live beside it and stay importable from here: :class:`GitMirror`
(:mod:`keystone.sources.mirror`), :class:`TreeReader` (:mod:`keystone.sources.tree`),
:class:`PackRejected` and the quarantine checks (:mod:`keystone.sources.pack`), and the dulwich
clients (:mod:`keystone.sources.transport`).

dulwich is imported inside the functions that use it, so importing this module stays cheap; the
fetch itself is meant to run in a short-lived worker process (DESIGN section 12).
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from keystone.errors import KeystoneError, LimitExceeded, SourceUnreachable, ValidationError
from keystone.limits import Limits, how_to_raise, human
from keystone.sources.base import FetchResult, PackTooLarge, RemoteRefNotFound, redact_url
from keystone.sources.mirror import (
    _HEX40,
    _INCOMING_PREFIX,
    DEFAULT_MAX_PACK_BYTES,
    DEFAULT_WALK_LIMIT,
    FETCHED_REF,
    GitMirror,
)
from keystone.sources.pack import PackRejected
from keystone.sources.transport import (
    _close_client,
    _is_local,
    _local_client,
    _tcp_client,
    _tracking_pool_classes,
    bounded_read,
    counting_pkt_lines,
    ref_candidates,
)
from keystone.sources.tree import TreeReader

if TYPE_CHECKING:
    from dulwich.client import GitClient
    from dulwich.objects import ObjectID

__all__ = [
    "DEFAULT_MAX_PACK_BYTES",
    "DEFAULT_WALK_LIMIT",
    "FETCHED_REF",
    "GitMirror",
    "GitSource",
    "PackRejected",
    "TreeReader",
]


_SCP_LIKE = re.compile(r"(?:(?P<user>[^@/:]+)@)?(?P<host>[^/:]+):(?P<path>.*)")


class GitSource:
    """Fetch one ref of a remote repository into a :class:`GitMirror`.

    Implements :class:`keystone.sources.base.Source`. Supported locations: ``http://`` and
    ``https://`` (smart HTTP through urllib3; credentials may be given in the URL; proxies from
    the usual environment variables), ``ssh://`` and ``[user@]host:path`` (the ``ssh`` client,
    non-interactive), ``git://``, ``file://`` and plain paths.

    An unchanged remote costs one ref advertisement and no pack: over HTTP that is a single GET
    (protocol v0/v1 is used there for that reason); over ssh and git:// protocol v2 with a
    ref-prefix so the server sends only the one ref.

    Args:
        url: Where the fleet repository lives.
        ref: ``refs/heads/main``, or a short name (``main``: tried as ``refs/heads/main`` then
            ``refs/tags/main``), or ``HEAD``.
        mirror: The local mirror that receives the objects.
        timeout: Seconds allowed for connecting and for each read.
        max_pack_bytes: Largest pack accepted; more is refused with :class:`PackTooLarge`
            (default: ``limits.max_pack_bytes``, ``KEYSTONE_MAX_PACK_BYTES``).
        total_timeout: Wall-clock bound for the whole fetch, checked as data arrives (default
            ten times ``timeout``). A hard kill is the worker process's job.
        ssh_command: The ssh client to run (default ``ssh``); Keystone adds ``BatchMode`` and
            keep-alive options.
        ssh_key: An identity file for ssh.
        protocol_version: Force git protocol 0, 1 or 2 (default: as described above).
        limits: The bounds of what the server sends (ref advertisement bytes and count, pack
            bytes, answer headers); default ``Limits.from_env()``.
    """

    def __init__(
        self,
        url: str,
        ref: str,
        mirror: GitMirror,
        *,
        timeout: float = 60,
        max_pack_bytes: int | None = None,
        total_timeout: float | None = None,
        ssh_command: str | None = None,
        ssh_key: Path | None = None,
        protocol_version: int | None = None,
        limits: Limits | None = None,
    ) -> None:
        if not url:
            raise ValidationError("the source URL is empty", field="source.url")
        if not ref or any(c.isspace() for c in ref) or ".." in ref:
            raise ValidationError(f"{ref!r} is not a valid ref", field="source.ref")
        self.url = url
        self.ref = ref
        self.mirror = mirror
        self.timeout = float(timeout)
        self.limits = limits or Limits.from_env()
        self.max_pack_bytes = int(max_pack_bytes or self.limits.max_pack_bytes)
        self.total_timeout = float(total_timeout) if total_timeout else 10 * self.timeout
        self.ssh_command = ssh_command
        self.ssh_key = ssh_key
        self.protocol_version = protocol_version
        self.display_url = redact_url(url)

    def __repr__(self) -> str:
        return f"GitSource({self.display_url!r}, ref={self.ref!r})"

    def ref_candidates(self) -> list[str]:
        """Return the remote ref names tried for :attr:`ref`, in order."""
        return ref_candidates(self.ref)

    def fetch(self) -> FetchResult:
        """Fetch the ref's tip into the mirror and record it under ``refs/keystone/fetched``.

        Raises:
            keystone.errors.SourceUnreachable: the remote did not answer, timed out, is not a
                git repository, or sent a damaged pack (retry later).
            RemoteRefNotFound: the remote has no such ref (a SourceUnreachable).
            PackTooLarge: the pack is over ``max_pack_bytes``.
            keystone.errors.ValidationError: the URL is not usable or the ref names no commit.
        """
        deadline = time.monotonic() + self.total_timeout
        client, path, http = self._client()
        with tempfile.TemporaryFile(dir=self.mirror.path, prefix=_INCOMING_PREFIX) as spool:
            try:
                tip, received = self._fetch_into(client, path, http, spool, deadline)
            finally:
                _close_client(client)
        if not self.mirror._contains(tip):
            raise SourceUnreachable(
                f"{self.display_url} advertised {tip} for {self.ref} but did not send it"
            )
        revision = self.mirror._peel(tip, f"{self.ref} at {self.display_url}")
        previous = self.mirror.ref(FETCHED_REF)
        self.mirror.set_ref(FETCHED_REF, revision)
        return FetchResult(
            revision=revision,
            changed=previous != revision,
            bytes_received=received,
            source=self.display_url,
        )

    def _fetch_into(
        self, client: GitClient, path: str, http: bool, spool: IO[bytes], deadline: float
    ) -> tuple[str, int]:
        """Run the protocol exchange, spool and ingest any pack; return (tip, pack bytes)."""
        # lazy: dulwich is heavy; the resident agent imports this module without it
        from dulwich.refs import Ref

        names = self.ref_candidates()
        state: dict[str, Any] = {"tip": None, "wanted": False, "received": 0}

        def check_deadline() -> None:
            if time.monotonic() > deadline:
                raise SourceUnreachable(
                    f"fetch from {self.display_url} took longer than {self.total_timeout:g}s; "
                    "it was abandoned and will be retried"
                )

        def determine_wants(
            refs: Mapping[Ref, ObjectID], depth: int | None = None
        ) -> list[ObjectID]:
            check_deadline()
            if len(refs) > self.limits.max_refs:
                raise self.limits.refuse(
                    "max_refs", len(refs), what=f"the ref advertisement of {self.display_url}"
                )
            if http and getattr(client, "dumb", False):
                raise SourceUnreachable(
                    f"{self.display_url} speaks only the dumb HTTP protocol; serve the "
                    "repository with smart HTTP (git http-backend or any git forge)"
                )
            for name in names:
                sha = refs.get(Ref(name.encode("utf-8")))
                if sha is not None:
                    break
            else:
                raise RemoteRefNotFound(
                    f"{self.display_url} has no ref {self.ref!r} (looked for "
                    f"{', '.join(names)}); check source.ref or push the branch",
                    ref=self.ref,
                    url=self.display_url,
                )
            tip = sha.decode("ascii", "replace")
            if not _HEX40.fullmatch(tip):
                raise ValidationError(
                    f"{self.display_url} advertises {name} as {tip!r}; only sha1 repositories "
                    "are supported",
                    field="source.url",
                )
            state["tip"] = tip
            if self.mirror._contains(tip):
                return []
            state["wanted"] = True
            return [sha]

        def on_pack(data: bytes) -> int:
            if not state["wanted"]:
                # dulwich's local client writes an empty pack even when nothing was asked for.
                return len(data)
            state["received"] += len(data)
            if state["received"] > self.max_pack_bytes:
                raise PackTooLarge(
                    f"the pack from {self.display_url} is larger than {self.max_pack_bytes} "
                    "bytes; nothing was applied; if the repository really is that large, "
                    + how_to_raise("max_pack_bytes")
                )
            check_deadline()
            spool.write(data)
            return len(data)

        def on_progress(_msg: bytes) -> None:
            check_deadline()

        try:
            if _is_local(client):
                # dulwich's local client walks the whole pack even when nothing is wanted;
                # reading the refs first keeps an unchanged poll cheap.
                advertised = client.get_refs(os.fsencode(path)).refs
                known = {k: v for k, v in advertised.items() if v is not None}
                if not determine_wants(known):
                    return str(state["tip"]), 0
            client.fetch_pack(
                path,
                determine_wants,
                self._graph_walker(),
                on_pack,
                progress=on_progress,
                ref_prefix=[n.encode("utf-8") for n in names],
                protocol_version=self._protocol_version(http),
            )
        except KeystoneError:
            raise
        except Exception as exc:
            raise self._unreachable(exc) from exc
        tip = state["tip"]
        if tip is None:
            raise RemoteRefNotFound(
                f"{self.display_url} advertises no refs (an empty repository?); push "
                f"{self.ref} to it",
                ref=self.ref,
                url=self.display_url,
            )
        if state["wanted"]:
            if spool.tell() == 0:
                raise SourceUnreachable(
                    f"{self.display_url} advertised {tip} but sent no pack; retrying later"
                )
            spool.seek(0)
            try:
                self.mirror.ingest_pack(
                    spool.read,
                    max_bytes=self.max_pack_bytes,
                    what=f"the pack from {self.display_url}",
                )
            except PackRejected as exc:
                raise SourceUnreachable(
                    f"{self.display_url} sent a pack that was refused: {exc.reason}; "
                    "the mirror is unchanged and the fetch will be retried"
                ) from exc
        return str(tip), int(state["received"])

    # -- helpers ---------------------------------------------------------------------------

    def _protocol_version(self, http: bool) -> int | None:
        if self.protocol_version is not None:
            return self.protocol_version
        return 1 if http else 2

    def _graph_walker(self) -> Any:
        """What the mirror has: every ref that points to a commit we hold."""
        # lazy: dulwich is heavy; the resident agent imports this module without it
        from dulwich.objects import ObjectID

        repo = self.mirror.repo
        heads = sorted(
            {
                ObjectID(sha.encode("ascii"))
                for sha in self.mirror.refs().values()
                if self.mirror._contains(sha)
            }
        )
        return repo.get_graph_walker(heads=heads)

    def _client(self) -> tuple[GitClient, str, bool]:
        """Build the dulwich client for :attr:`url`; returns (client, path, is_http)."""
        url = self.url
        if "://" in url:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme in ("http", "https"):
                return self._http_client(url), "", True
            if not parts.hostname and scheme != "file":
                raise ValidationError(f"{self.display_url} names no host", field="source.url")
            if scheme == "git":
                return (
                    _tcp_client(parts.hostname or "", parts.port, self.timeout),
                    parts.path,
                    False,
                )
            if scheme in ("ssh", "git+ssh"):
                user = unquote(parts.username) if parts.username else None
                return self._ssh_client(parts.hostname or "", parts.port, user), parts.path, False
            if scheme == "file":
                if parts.netloc not in ("", "localhost"):
                    raise ValidationError(
                        f"{self.display_url}: file:// URLs must name a local path",
                        field="source.url",
                    )
                return _local_client(), unquote(parts.path), False
            raise ValidationError(
                f"{self.display_url}: unsupported scheme {scheme!r} (use https, http, ssh, git, "
                "file or a path)",
                field="source.url",
            )
        scp = _SCP_LIKE.fullmatch(url)
        if scp and not url.startswith(("/", "./", "../")):
            return self._ssh_client(scp["host"], None, scp["user"]), scp["path"], False
        return _local_client(), url, False

    def _http_client(self, url: str) -> GitClient:
        # lazy: urllib3 is heavy; only an HTTP fetch needs it
        import urllib3
        from dulwich.client import Urllib3HttpGitClient, default_urllib3_manager

        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        base = parts._replace(netloc=netloc).geturl()
        pool = default_urllib3_manager(None, base_url=base, timeout=self.timeout)
        # urllib3 retries a failed connect three times by default; the sync loop has its own
        # backoff, so fail fast and let it decide.
        pool.connection_pool_kw["retries"] = urllib3.Retry(
            total=None, connect=0, read=0, status=0, other=0, redirect=5
        )
        # dulwich does not release the response when it raises on an HTTP error status; track
        # every connection so that _close_client can close them all.
        opened: list[Any] = []
        assert isinstance(pool, urllib3.PoolManager)  # no auth callbacks, so no wrapper
        pool.pool_classes_by_scheme = _tracking_pool_classes(opened)
        limits = self.limits
        shown = self.display_url

        class _BoundedHttpGitClient(Urllib3HttpGitClient):
            # Each answer is bounded as it arrives: its header (keystone.limits max_headers,
            # max_header_line_bytes), the ref advertisement (max_ref_advertisement_bytes) and
            # the upload-pack answer carrying the pack (max_pack_bytes, plus the ACKs).
            def _http_request(self, url: str, *args: Any, **kwargs: Any) -> Any:
                resp, read = super()._http_request(url, *args, **kwargs)
                try:
                    limits.check_headers(resp.headers.items(), what=f"the answer of {shown}")
                except LimitExceeded:
                    resp.close()
                    raise
                if "/info/refs" in url:
                    bound = "max_ref_advertisement_bytes"
                    limit = limits.max_ref_advertisement_bytes
                    what = f"the ref advertisement of {shown}"
                else:
                    bound = "max_pack_bytes"
                    limit = limits.max_pack_bytes + limits.max_ref_advertisement_bytes
                    what = f"the pack from {shown}"

                def over() -> Exception:
                    return limits.refuse(bound, f"more than {human(limit)}", what=what)

                bounded = bounded_read(read, limit, over)
                if bound != "max_ref_advertisement_bytes":
                    return resp, bounded

                def too_many() -> Exception:
                    return limits.refuse(
                        "max_refs",
                        f"more than {limits.max_refs} refs",
                        what=f"the ref advertisement of {shown}",
                    )

                # + the service line and HEAD, which are no refs of the repository
                return resp, counting_pkt_lines(bounded, limits.max_refs + 2, too_many)

        client = _BoundedHttpGitClient(
            base,
            pool_manager=pool,
            timeout=self.timeout,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )
        client._keystone_connections = opened  # type: ignore[attr-defined]
        return client

    def _ssh_client(self, host: str, port: int | None, user: str | None) -> GitClient:
        # lazy: dulwich is heavy; the resident agent imports this module without it
        from dulwich.client import SSHGitClient, SubprocessSSHVendor

        if not host or host.startswith("-"):
            raise ValidationError(
                f"{self.display_url}: {host!r} is not a host name", field="source.url"
            )
        alive = max(1, int(self.timeout // 3))
        options = [
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, int(self.timeout))}",
            "-o", f"ServerAliveInterval={alive}",
            "-o", "ServerAliveCountMax=3",
        ]  # fmt: skip
        command = " ".join([self.ssh_command or "ssh", *map(shlex.quote, options)])
        opened: list[Any] = []

        class _SSHClient(SSHGitClient):
            # dulwich leaves the connection (and the ssh process) open when the remote hangs
            # up before the first packet; remember each one so that _close_client closes it.
            def _connect(self, *args: Any, **kwargs: Any) -> Any:
                connection = super()._connect(*args, **kwargs)
                opened.append(connection[0])
                return connection

        client = _SSHClient(
            host,
            port=port,
            username=user,
            vendor=SubprocessSSHVendor(),
            ssh_command=command,
            key_filename=str(self.ssh_key) if self.ssh_key else None,
        )
        client._keystone_connections = opened  # type: ignore[attr-defined]
        return client

    def _unreachable(self, exc: BaseException) -> SourceUnreachable:
        # lazy: dulwich is heavy; the resident agent imports this module without it
        from dulwich.client import HTTPProxyUnauthorized, HTTPUnauthorized
        from dulwich.errors import HangupException, NotGitRepository

        where = self.display_url
        then = "the device keeps its current revision and will retry"
        if isinstance(exc, NotGitRepository):
            return SourceUnreachable(f"{where} is not a git repository (check source.url); {then}")
        if isinstance(exc, (HTTPUnauthorized, HTTPProxyUnauthorized)):
            return SourceUnreachable(
                f"{where} asks for credentials (HTTP 401/407); give them in source.url; {then}"
            )
        if isinstance(exc, HangupException):
            detail = "; ".join(
                line.decode("utf-8", "replace").strip() for line in (exc.stderr_lines or [])
            )
            return SourceUnreachable(f"{where} hung up{': ' + detail if detail else ''}; {then}")
        if isinstance(exc, socket.timeout | TimeoutError):
            return SourceUnreachable(f"{where} did not answer within {self.timeout:g}s; {then}")
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc) or errno.errorcode.get(exc.errno or 0, "error")
            return SourceUnreachable(f"cannot reach {where}: {reason}; {then}")
        text = str(exc) or type(exc).__name__
        return SourceUnreachable(f"fetch from {where} failed: {text}; {then}")

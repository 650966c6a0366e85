"""Artifacts: download, SHA-256, detached signatures, a content-addressed cache, safe unpack, GC.

The sha256 pinned in a (signed) recipe is the root of trust, so an artifact may come from any
medium: ``https``/``http`` (private GitHub releases included), ``file://`` or a path relative to the
fleet repo root. Every byte is hashed while it streams to a temp file; only a verified file is
renamed into the cache, under its hash::

    runtime/artifacts/
        sha256/<hex>        the blobs (read-only)
        unpacked/<hex>/     the unpacked tree of an archive (read-only, reused by a rollback)
        meta/<hex>/         cached signature and certificate files, the unpacked size
        tmp/                downloads in progress
        .lock               shared by prepare, exclusive for GC

Downloads retry with backoff, resume with ``Range`` after a dropped connection, and are bounded in
size, total time and minimum throughput (a server dripping a byte a second cannot hold the agent).
A token is sent only to the GitHub hosts and never across a redirect to another host.

This module imports ``httpx`` and ``cryptography`` only inside the functions that use them: the
resident agent runs :mod:`keystone.runtime.artifact_worker` in a child process instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import queue
import random
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from loguru import logger

from keystone.errors import (
    ArtifactFetchError,
    ArtifactIntegrityError,
    KeystoneError,
    UnsafeArchiveError,
    UsageError,
)
from keystone.repopath import repo_path_problem
from keystone.runtime.archive import (
    DEFAULT_MAX_EXTRACT_BYTES,
    DEFAULT_MAX_FILES,
    ArchiveLimits,
    ArchiveRefused,
    remove_tree,
    unpack,
)
from keystone.runtime.clock import CLOCK_POLICIES, HIGH_WATER, ClockBehind, TrustedClock
from keystone.state import fsync_dir, write_json
from keystone.units import parse_duration, parse_size

if TYPE_CHECKING:
    import httpx

GIB = 1024**3
DEFAULT_MAX_BYTES = 2 * GIB
DEFAULT_CACHE_LIMIT = 2 * GIB
DEFAULT_DOWNLOAD_TIMEOUT = 30 * 60.0
GITHUB_HOSTS = frozenset({"github.com", "api.github.com"})
MAX_SIGNATURE_BYTES = 64 * 1024
MAX_CERT_BYTES = 1024 * 1024
MAX_REDIRECTS = 10
USER_AGENT = "keystone-agent"
_CHUNK = 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Headers a recipe sets that may follow a redirect to another origin; every other one (an
# Authorization, a GitLab PRIVATE-TOKEN, an API key) stays with the host it was written for.
_CROSS_ORIGIN_HEADERS = frozenset({"accept", "accept-language", "user-agent"})
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class ArtifactLike(Protocol):
    """One ``[[artifacts]]`` entry of a recipe, as the recipe parser yields it."""

    @property
    def uri(self) -> str: ...
    @property
    def sha256(self) -> str | None: ...
    @property
    def sig_uri(self) -> str | None: ...
    @property
    def cert_uri(self) -> str | None: ...
    @property
    def unpack(self) -> bool: ...
    @property
    def github_token(self) -> str | None: ...
    @property
    def headers(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class ArtifactSpec:
    """A plain :class:`ArtifactLike` (the worker builds these from JSON)."""

    uri: str
    sha256: str | None = None
    sig_uri: str | None = None
    cert_uri: str | None = None
    unpack: bool = False
    github_token: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ArtifactSpec:
        """Build from the worker's JSON form (unknown keys are refused)."""
        known = {f.name for f in fields(cls)}
        extra = set(data) - known
        if extra:
            raise UsageError(f"unknown artifact keys {sorted(extra)} (expected {sorted(known)})")
        if "uri" not in data or not isinstance(data["uri"], str):
            raise UsageError("an artifact needs a string 'uri'")
        return cls(
            uri=data["uri"],
            sha256=data.get("sha256"),
            sig_uri=data.get("sig_uri"),
            cert_uri=data.get("cert_uri"),
            unpack=bool(data.get("unpack", False)),
            github_token=data.get("github_token"),
            headers=dict(data.get("headers") or {}),
        )

    @classmethod
    def of(cls, artifact: ArtifactLike) -> ArtifactSpec:
        """Copy any :class:`ArtifactLike`."""
        return cls(
            uri=artifact.uri,
            sha256=artifact.sha256,
            sig_uri=artifact.sig_uri,
            cert_uri=artifact.cert_uri,
            unpack=artifact.unpack,
            github_token=artifact.github_token,
            headers=dict(artifact.headers),
        )

    def to_json(self) -> dict[str, Any]:
        """The worker's JSON form (it carries the token: send it over a pipe, never argv)."""
        out = asdict(self)
        out["headers"] = dict(self.headers)
        return out


# --- errors -------------------------------------------------------------------------------------


class _ArtifactContext(KeystoneError):
    """Mixin: which artifact, which component, and a machine-readable reason."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        component: str | None = None,
        uri: str | None = None,
    ) -> None:
        self.reason = reason
        self.component = component
        self.uri = uri
        super().__init__(message)


class ArtifactRefusedError(_ArtifactContext, ArtifactIntegrityError):
    """An artifact refused for its content or trust: wait for a new revision.

    ``reason``: ``hash-mismatch``, ``bad-pin``, ``missing-pin``, ``missing-signature``,
    ``bad-signature``, ``bad-signature-encoding``, ``expired``, ``not-yet-valid``,
    ``untrusted-chain``, ``key-usage``, ``bad-certificate``, ``unsupported-key``,
    ``no-certificate``, ``no-trust-bundle``, ``clock-behind``, ``too-large``, ``unsupported-uri``,
    ``uri-escapes-repo``, ``relative-uri``, ``http-status``.
    """


class ArtifactArchiveError(_ArtifactContext, UnsafeArchiveError):
    """An artifact archive that would escape its directory, is over its bounds or is damaged."""


class ArtifactDownloadError(_ArtifactContext, ArtifactFetchError):
    """A download that failed after its retries (network, server, deadline): retry later.

    ``reason``: ``network``, ``http-status``, ``deadline``, ``too-slow``, ``not-found``, ``io``.
    """


ERROR_TYPES: dict[str, type[_ArtifactContext]] = {
    "ArtifactIntegrityError": ArtifactRefusedError,
    "UnsafeArchiveError": ArtifactArchiveError,
    "ArtifactFetchError": ArtifactDownloadError,
}


def public_error_type(exc: BaseException) -> str:
    """The ``keystone.errors`` class name an error is reported as (the worker's JSON ``type``)."""
    import keystone.errors as errors_module

    for cls in type(exc).__mro__:
        if cls.__module__ == errors_module.__name__:
            return cls.__name__
    return type(exc).__name__


# --- policy -------------------------------------------------------------------------------------


def _env_size(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse_size(raw)
    except ValueError as exc:
        raise UsageError(f"{name}={raw!r}: {exc}") from exc


def _env_duration(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse_duration(raw)
    except ValueError as exc:
        raise UsageError(f"{name}={raw!r}: {exc}") from exc
    if value <= 0:
        raise UsageError(f"{name}={raw!r}: must be a positive duration such as 30m")
    return value


def _env_flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ArtifactPolicy:
    """Where the cache lives and what an artifact must satisfy.

    Attributes:
        cache_dir: the content-addressed cache (``runtime/artifacts``).
        repo_root: base for repo-relative URIs; a path that leaves it is refused.
        allow_unsigned: ``False`` (strict): every artifact needs a ``sig_uri``.
        require_sha256: ``True`` for recipes from a signed revision: a missing pin is refused.
        trust_bundle: PEM roots for artifact signers (``KEYSTONE_TRUST_BUNDLE``).
        leaf_cert: the signer certificate when a recipe gives no ``cert_uri``
            (``KEYSTONE_LEAF_CERT``); with no trust bundle it is pinned as is.
        github_token: ``KEYSTONE_GITHUB_TOKEN``, for artifacts without their own token.
        github_hosts: the hosts a GitHub token may be sent to.
        max_bytes: bound on one download (``KEYSTONE_ARTIFACT_MAX_BYTES``, 2 GiB).
        max_extract_bytes: bound on an unpacked archive (``KEYSTONE_MAX_EXTRACT_BYTES``, 2 GiB).
        max_files: bound on an archive's members (``KEYSTONE_MAX_EXTRACT_FILES``).
        cache_limit_bytes: GC target (``KEYSTONE_ARTIFACT_CACHE_LIMIT_BYTES``, 2 GiB).
        download_timeout: total deadline of one download, retries included
            (``KEYSTONE_ARTIFACT_DOWNLOAD_TIMEOUT``, 30 min).
        connect_timeout / read_timeout: per connection and per read, in seconds.
        min_throughput: bytes per second a download must average over ``throughput_window``
            seconds (``KEYSTONE_ARTIFACT_MIN_THROUGHPUT``; 0 turns the check off).
        retries: attempts after the first that made no progress.
        backoff_base / backoff_max: exponential backoff between attempts, in seconds.
        tls_verify: ``False`` only with ``KEYSTONE_INSECURE_SKIP_VERIFY`` (the pinned sha256
            still guards the bytes).
        clock_policy: ``high-water`` or ``strict`` (``KEYSTONE_CLOCK_POLICY``).
        state_dir: where the clock's high-water mark persists (``runtime/state``).
    """

    cache_dir: Path
    repo_root: Path | None = None
    allow_unsigned: bool = True
    require_sha256: bool = False
    trust_bundle: Path | None = None
    leaf_cert: Path | None = None
    github_token: str | None = field(default=None, repr=False)
    github_hosts: frozenset[str] = GITHUB_HOSTS
    max_bytes: int = DEFAULT_MAX_BYTES
    max_extract_bytes: int = DEFAULT_MAX_EXTRACT_BYTES
    max_files: int = DEFAULT_MAX_FILES
    cache_limit_bytes: int = DEFAULT_CACHE_LIMIT
    download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    min_throughput: int = 1024
    throughput_window: float = 60.0
    retries: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    tls_verify: bool = True
    clock_policy: str = HIGH_WATER
    state_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.clock_policy not in CLOCK_POLICIES:
            raise UsageError(
                f"KEYSTONE_CLOCK_POLICY={self.clock_policy!r} is not a clock policy: use "
                "'high-water' or 'strict'"
            )

    @classmethod
    def from_env(
        cls,
        cache_dir: Path,
        environ: Mapping[str, str],
        **overrides: Any,
    ) -> ArtifactPolicy:
        """Read the Go Keystone's environment variables; ``overrides`` win (flags, config file).

        ``state_dir`` defaults to ``<cache_dir>/../state`` (``runtime/state``).

        Raises:
            UsageError: a variable with a value that does not parse, naming it.
        """
        values: dict[str, Any] = {
            "cache_dir": Path(cache_dir),
            "state_dir": Path(cache_dir).parent / "state",
            "trust_bundle": Path(environ["KEYSTONE_TRUST_BUNDLE"])
            if environ.get("KEYSTONE_TRUST_BUNDLE")
            else None,
            "leaf_cert": Path(environ["KEYSTONE_LEAF_CERT"])
            if environ.get("KEYSTONE_LEAF_CERT")
            else None,
            "github_token": environ.get("KEYSTONE_GITHUB_TOKEN") or None,
            "max_bytes": _env_size(environ, "KEYSTONE_ARTIFACT_MAX_BYTES", DEFAULT_MAX_BYTES),
            "max_extract_bytes": _env_size(
                environ, "KEYSTONE_MAX_EXTRACT_BYTES", DEFAULT_MAX_EXTRACT_BYTES
            ),
            "max_files": _env_size(environ, "KEYSTONE_MAX_EXTRACT_FILES", DEFAULT_MAX_FILES),
            "cache_limit_bytes": _env_size(
                environ, "KEYSTONE_ARTIFACT_CACHE_LIMIT_BYTES", DEFAULT_CACHE_LIMIT
            ),
            "download_timeout": _env_duration(
                environ, "KEYSTONE_ARTIFACT_DOWNLOAD_TIMEOUT", DEFAULT_DOWNLOAD_TIMEOUT
            ),
            "min_throughput": _env_size(environ, "KEYSTONE_ARTIFACT_MIN_THROUGHPUT", 1024),
            "tls_verify": not _env_flag(environ, "KEYSTONE_INSECURE_SKIP_VERIFY"),
            "clock_policy": (environ.get("KEYSTONE_CLOCK_POLICY") or HIGH_WATER).strip(),
        }
        values.update(overrides)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (paths as strings) for the worker; it holds the token."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, frozenset):
                value = sorted(value)
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ArtifactPolicy:
        """Inverse of :meth:`to_json`; unknown keys are refused."""
        known = {f.name: f for f in fields(cls)}
        extra = set(data) - set(known)
        if extra:
            raise UsageError(f"unknown artifact policy keys {sorted(extra)}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name in ("cache_dir", "repo_root", "trust_bundle", "leaf_cert", "state_dir"):
                values[name] = None if value is None else Path(value)
            elif name == "github_hosts":
                values[name] = frozenset(value)
            else:
                values[name] = value
        if "cache_dir" not in values or values["cache_dir"] is None:
            raise UsageError("the artifact policy needs a cache_dir")
        return cls(**values)


@dataclass(frozen=True)
class PreparedArtifact:
    """An artifact fetched (or found in the cache) and verified.

    Attributes:
        sha256: lowercase hex digest.
        path: the cached blob (read-only).
        size: its size in bytes.
        name: the file name it gets in a work dir (the URI's last path segment).
        unpacked: the unpacked tree (read-only) when the recipe asks ``unpack = true``.
        signed_by: the signer's certificate subject, when a signature was verified.
    """

    sha256: str
    path: Path
    size: int
    name: str
    unpacked: Path | None = None
    signed_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON form for the worker's answer."""
        return {
            "sha256": self.sha256,
            "path": str(self.path),
            "size": self.size,
            "name": self.name,
            "unpacked": None if self.unpacked is None else str(self.unpacked),
            "signed_by": self.signed_by,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PreparedArtifact:
        """Inverse of :meth:`to_json`."""
        return cls(
            sha256=str(data["sha256"]),
            path=Path(data["path"]),
            size=int(data["size"]),
            name=str(data["name"]),
            unpacked=None if data.get("unpacked") is None else Path(data["unpacked"]),
            signed_by=data.get("signed_by"),
        )


@dataclass(frozen=True)
class GcReport:
    """What a GC pass did.

    Attributes:
        evicted: sha256s removed, least recently used first.
        freed_bytes: bytes they held.
        remaining_bytes: cache size afterwards.
        limit_bytes: the limit it aimed at.
        over_limit: still over the limit because what remains is pinned by ``keep``.
    """

    evicted: tuple[str, ...]
    freed_bytes: int
    remaining_bytes: int
    limit_bytes: int
    over_limit: bool

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {**asdict(self), "evicted": list(self.evicted)}


# --- pure helpers -------------------------------------------------------------------------------


def normalize_sha256(value: str | None) -> str | None:
    """Return a pin as 64 lowercase hex (``sha256:`` prefix allowed), ``None`` if unset.

    Raises:
        ValueError: anything else.
    """
    if value is None:
        return None
    text = value.strip().lower()
    if not text:
        return None
    text = text.removeprefix("sha256:")
    if not _HEX64.match(text):
        raise ValueError(f"sha256 {value!r} is not 64 hex digits (optionally 'sha256:'-prefixed)")
    return text


def redact_uri(uri: str) -> str:
    """A URI fit for messages and logs: no user:password, no query (presigned URLs carry keys)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable uri>"
    if parts.scheme not in ("http", "https"):
        return uri
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    if ":" in (parts.hostname or ""):
        netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port is not None else "")
    query = "…" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def request_headers(
    url: str,
    first_url: str,
    headers: Mapping[str, str],
    token: str | None,
    github_hosts: Set[str] = GITHUB_HOSTS,
) -> dict[str, str]:
    """The headers for one hop of a download (pure; the heart of the no-leak rule).

    * The recipe's ``headers`` go to the artifact's own origin; after a redirect to another
      origin only harmless ones (``Accept``...) follow.
    * The GitHub token becomes ``Authorization: Bearer`` only when the recipe set no
      Authorization, the hop is the artifact's own origin, that host is a GitHub host, and the
      connection is https (or a loopback address, which never leaves the machine).
    """
    same_origin = _origin(url) == _origin(first_url)
    out: dict[str, str] = {}
    for name, value in headers.items():
        if same_origin or name.lower() in _CROSS_ORIGIN_HEADERS:
            out[name] = value
    scheme, host, _port = _origin(url)
    if (
        token
        and same_origin
        and host in github_hosts
        and (scheme == "https" or _is_loopback(host))
        and not any(k.lower() == "authorization" for k in out)
    ):
        out["Authorization"] = f"Bearer {token}"
    return out


def artifact_name(uri: str) -> str:
    """The file name an artifact gets in a work dir: the URI's last path segment."""
    try:
        path = unquote(urlsplit(uri).path) if "://" in uri or uri.startswith("file:") else uri
    except ValueError:
        path = uri
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if name in ("", ".", "..") or "\x00" in name:
        return "artifact"
    return name


@dataclass(frozen=True)
class Location:
    """Where an artifact's bytes come from: ``http`` (a URL) or ``file`` (a local path)."""

    kind: str
    url: str | None = None
    path: Path | None = None


def locate(uri: str, repo_root: Path | None) -> Location:
    """Classify a URI: http(s), ``file://``, or a path relative to the fleet repo root.

    Raises:
        ValueError: with ``(reason, message)`` args for an unsupported scheme, a relative path
            without a repo root, or one that leaves the repo (symlinks resolved).
    """
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise ValueError("unsupported-uri", f"the uri does not parse ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError("unsupported-uri", "the URL has no host")
        return Location("http", url=uri)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                "unsupported-uri", f"file URIs name the local host only, not {parts.netloc!r}"
            )
        path = unquote(parts.path)
        if path.startswith("/"):
            return Location("file", path=Path(path))
        return _repo_relative(path, repo_root)
    if scheme and len(scheme) > 1:
        raise ValueError(
            "unsupported-uri",
            f"scheme {scheme!r} is not supported: use https, http, file:// or a path relative "
            "to the fleet repo",
        )
    if uri.startswith("/"):
        return Location("file", path=Path(uri))
    return _repo_relative(uri, repo_root)


def _repo_relative(rel: str, repo_root: Path | None) -> Location:
    if repo_root is None:
        raise ValueError(
            "relative-uri",
            "a relative artifact path needs the fleet repo checkout, and none is known here; "
            "use an absolute file:// URI or an https URL",
        )
    root = os.path.realpath(repo_root)
    plain = repo_path_problem(rel, allow_root=True) is None  # no '..', no backslash
    real = os.path.realpath(os.path.join(root, rel)) if plain else None
    if real is None or (real != root and not real.startswith(root + os.sep)):
        raise ValueError(
            "uri-escapes-repo",
            "the path leaves the fleet repository (paths in the repo are relative to its root "
            "and may not leave it, through '..' or a symlink)",
        )
    return Location("file", path=Path(real))


def backoff_delay(
    attempt: int, base: float, cap: float, *, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): exponential, capped, with jitter."""
    raw = min(cap, base * (2 ** max(0, attempt - 1)))
    jitter = rng.uniform(0.5, 1.0) if rng is not None else random.uniform(0.5, 1.0)
    return float(raw * jitter)


# --- downloading --------------------------------------------------------------------------------


class _Transient(Exception):
    """An attempt that failed in a way a retry may fix."""

    def __init__(self, message: str, *, reason: str = "network", wait: float | None = None) -> None:
        self.reason = reason
        self.wait = wait
        super().__init__(message)


class _Sink:
    """The temp file a download streams into, with its running hash."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.hasher = hashlib.sha256()
        self.size = 0

    def reset(self) -> None:
        self.fh.seek(0)
        self.fh.truncate()
        self.hasher = hashlib.sha256()
        self.size = 0


class _PipelinedWriter:
    """Hash and write chunks on a second thread while the first one receives.

    ``hashlib`` and file writes release the GIL, so receiving (h11's parsing, in Python) overlaps
    with hashing and the disk. The queue is short (``_QUEUE_CHUNKS`` chunks of ~64 KiB): memory
    does not grow with the artifact. Leaving the ``with`` block waits until every accepted chunk is
    written, so the sink is consistent afterwards, and re-raises a write error (disk full).
    """

    _QUEUE_CHUNKS = 32

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self._queue: queue.Queue[bytes | None] = queue.Queue(self._QUEUE_CHUNKS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="artifact-writer", daemon=True)

    def __enter__(self) -> _PipelinedWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def write(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)
        self.sink.size += len(chunk)

    def _run(self) -> None:
        update = self.sink.hasher.update
        write = self.sink.fh.write
        while (chunk := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain, so that the receiving thread never blocks
            try:
                update(chunk)
                write(chunk)
            except BaseException as exc:
                self._error = exc


@dataclass
class _Fetch:
    """One artifact (or signature, or certificate) download in progress."""

    url: str
    headers: Mapping[str, str]
    token: str | None
    limit: int
    label: str
    component: str | None
    validator: str | None = None  # ETag or Last-Modified of what we have, for If-Range
    resumable: bool = True


class _Downloader:
    """HTTP downloads with retries, resume, deadlines and bounds (one ``httpx.Client``)."""

    def __init__(self, policy: ArtifactPolicy, monotonic: Callable[[], float]) -> None:
        self.policy = policy
        self._monotonic = monotonic
        self._client: httpx.Client | None = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def client(self) -> httpx.Client:
        import httpx

        if self._client is None:
            p = self.policy
            self._client = httpx.Client(
                timeout=httpx.Timeout(
                    connect=p.connect_timeout,
                    read=p.read_timeout,
                    write=p.read_timeout,
                    pool=p.connect_timeout,
                ),
                verify=p.tls_verify,
                follow_redirects=False,
                headers={"User-Agent": USER_AGENT},
            )
        return self._client

    def download(self, job: _Fetch, sink: _Sink) -> None:
        """Fill ``sink`` with the resource, retrying and resuming until the deadline."""
        p = self.policy
        deadline = self._monotonic() + p.download_timeout
        failures = 0
        while True:
            before = sink.size
            try:
                self._attempt(job, sink, deadline)
                return
            except _Transient as exc:
                progressed = sink.size > before and exc.reason != "too-slow"
                failures = 1 if progressed else failures + 1
                remaining = deadline - self._monotonic()
                if failures > p.retries or remaining <= 0:
                    raise ArtifactDownloadError(
                        f"{job.label}: download failed after {failures} attempt(s) without "
                        f"progress: {exc}; the agent will try again at the next sync",
                        reason=exc.reason,
                        component=job.component,
                        uri=redact_uri(job.url),
                    ) from exc
                wait = backoff_delay(failures, p.backoff_base, p.backoff_max)
                if exc.wait is not None:
                    wait = max(wait, min(exc.wait, p.backoff_max))
                wait = max(0.0, min(wait, remaining))
                logger.warning(
                    "{}: {} (attempt {}, {} bytes so far); retrying in {:.1f}s",
                    job.label,
                    exc,
                    failures,
                    sink.size,
                    wait,
                )
                time.sleep(wait)

    def _attempt(self, job: _Fetch, sink: _Sink, deadline: float) -> None:
        import httpx

        p = self.policy
        extra: dict[str, str] = {"Accept-Encoding": "identity"}
        if sink.size and job.resumable:
            extra["Range"] = f"bytes={sink.size}-"
            if job.validator:
                extra["If-Range"] = job.validator
        elif sink.size:
            sink.reset()
        url = job.url
        for _hop in range(MAX_REDIRECTS + 1):
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                self._deadline(job)
            headers = {
                **request_headers(url, job.url, job.headers, job.token, p.github_hosts),
                **extra,
            }
            timeout = httpx.Timeout(
                connect=min(p.connect_timeout, remaining),
                read=min(p.read_timeout, remaining),
                write=min(p.read_timeout, remaining),
                pool=min(p.connect_timeout, remaining),
            )
            try:
                request = self.client().build_request("GET", url, headers=headers, timeout=timeout)
                response = self.client().send(request, stream=True)
            except httpx.TransportError as exc:
                raise _Transient(f"{type(exc).__name__}: {exc or 'connection failed'}") from exc
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                raise self._permanent(
                    job, f"the URL is not usable ({exc})", "unsupported-uri"
                ) from exc
            try:
                location = response.headers.get("location")
                if response.status_code in (301, 302, 303, 307, 308) and location:
                    url = urljoin(url, location)
                    if urlsplit(url).scheme not in ("http", "https"):
                        raise self._permanent(
                            job, "a redirect leads to a non-HTTP location", "unsupported-uri"
                        )
                    continue
                self._receive(job, sink, response, deadline)
                return
            finally:
                response.close()
        raise self._permanent(job, f"more than {MAX_REDIRECTS} redirects", "http-status")

    def _receive(self, job: _Fetch, sink: _Sink, response: httpx.Response, deadline: float) -> None:
        import httpx

        status = response.status_code
        if status in _RETRY_STATUS:
            raise _Transient(f"HTTP {status}", reason="http-status", wait=_retry_after(response))
        if status == 416:
            sink.reset()
            raise _Transient(
                "HTTP 416 (the server cannot resume); starting over", reason="http-status"
            )
        if status not in (200, 206):
            hint = ""
            if status in (401, 403):
                hint = " (check the artifact's github_token / headers, or KEYSTONE_GITHUB_TOKEN)"
            elif status == 404:
                hint = " (check the uri; a private GitHub asset also answers 404 without a token)"
            raise ArtifactDownloadError(
                f"{job.label}: the server answered HTTP {status}{hint}",
                reason="not-found" if status == 404 else "http-status",
                component=job.component,
                uri=redact_uri(job.url),
            )
        total: int | None = None
        if status == 206:
            start, total = _content_range(response.headers.get("content-range", ""))
            if start != sink.size:
                sink.reset()
                raise _Transient(
                    f"the server resumed at byte {start}, not {sink.size}; starting over"
                )
        else:
            if sink.size:
                # The server ignored Range (or If-Range found the file changed): start over.
                sink.reset()
            length = response.headers.get("content-length")
            if length is not None and length.isdigit():
                total = int(length)
        if total is not None and total > job.limit:
            raise self._too_large(job, f"the server announces {total} bytes")
        encoding = response.headers.get("content-encoding", "identity").lower()
        job.resumable = encoding in ("", "identity")
        job.validator = _validator(response) if job.resumable else None
        chunks: Iterator[bytes] = response.iter_raw() if job.resumable else response.iter_bytes()
        window_start = self._monotonic()
        window_bytes = sink.size
        try:
            with _PipelinedWriter(sink) as writer:
                self._stream(job, chunks, writer, deadline, window_start, window_bytes)
        except httpx.TransportError as exc:
            raise _Transient(
                f"the connection broke after {sink.size} bytes ({type(exc).__name__}: {exc})"
            ) from exc
        except httpx.DecodingError as exc:
            sink.reset()
            raise _Transient(f"the response did not decode ({exc})") from exc

    def _stream(
        self,
        job: _Fetch,
        chunks: Iterator[bytes],
        writer: _PipelinedWriter,
        deadline: float,
        window_start: float,
        window_bytes: int,
    ) -> None:
        p = self.policy
        sink = writer.sink
        for chunk in chunks:
            size = sink.size + len(chunk)
            if size > job.limit:
                raise self._too_large(job, f"the server sent more than {job.limit} bytes")
            writer.write(chunk)
            now = self._monotonic()
            if now > deadline:
                self._deadline(job)
            if p.min_throughput and now - window_start >= p.throughput_window:
                rate = (size - window_bytes) / (now - window_start)
                if rate < p.min_throughput:
                    raise _Transient(
                        f"the transfer ran at {rate:.0f} B/s over {now - window_start:.0f}s, "
                        f"below the minimum of {p.min_throughput} B/s",
                        reason="too-slow",
                    )
                window_start, window_bytes = now, size

    def _deadline(self, job: _Fetch) -> None:
        raise ArtifactDownloadError(
            f"{job.label}: the download did not finish within {self.policy.download_timeout:.0f}s "
            "(KEYSTONE_ARTIFACT_DOWNLOAD_TIMEOUT); the agent will try again at the next sync",
            reason="deadline",
            component=job.component,
            uri=redact_uri(job.url),
        )

    def _too_large(self, job: _Fetch, what: str) -> ArtifactRefusedError:
        return ArtifactRefusedError(
            f"{job.label}: {what}, over the bound of {job.limit} bytes; the download was cut off "
            "(raise KEYSTONE_ARTIFACT_MAX_BYTES if the artifact is genuinely that large)",
            reason="too-large",
            component=job.component,
            uri=redact_uri(job.url),
        )

    def _permanent(self, job: _Fetch, what: str, reason: str) -> ArtifactRefusedError:
        return ArtifactRefusedError(
            f"{job.label}: {what}", reason=reason, component=job.component, uri=redact_uri(job.url)
        )


def _retry_after(response: httpx.Response) -> float | None:
    value = str(response.headers.get("retry-after", "")).strip()
    return float(value) if value.isdigit() else None


def _validator(response: httpx.Response) -> str | None:
    etag: str | None = response.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    modified: str | None = response.headers.get("last-modified")
    return modified


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


def _content_range(value: str) -> tuple[int, int | None]:
    m = _CONTENT_RANGE.match(value)
    if not m:
        raise _Transient(f"a 206 answer with an unreadable Content-Range {value!r}")
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), total


# --- the store ----------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fsync_dir(path)


def _copy_file(src: Path, dst_fd: int) -> None:
    """Copy a file into an empty open descriptor, in the kernel where it can (reflink on
    btrfs/XFS through ``copy_file_range``), else with plain reads and writes."""
    with open(src, "rb") as fh:
        in_fd = fh.fileno()
        size = os.fstat(in_fd).st_size
        offset = 0
        with contextlib.suppress(OSError):  # EXDEV/ENOSYS/EINVAL: fall back below
            while offset < size:
                n = os.copy_file_range(in_fd, dst_fd, size - offset, offset, offset)
                if n == 0:
                    break
                offset += n
        fh.seek(offset)
        os.lseek(dst_fd, offset, os.SEEK_SET)
        while chunk := fh.read(_CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst_fd, view) :]


def _hash_file(path: Path) -> tuple[str, int]:
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256")
        return digest.hexdigest(), fh.tell()


class ArtifactStore:
    """Fetch, verify, cache, unpack, install and collect artifacts under one policy.

    Each :meth:`prepare` opens its HTTP client and closes it before returning, so a store holds
    no sockets between calls; the context manager form is kept for symmetry.

    Args:
        policy: where and how.
        wall_clock: the system clock for certificate expiry (a seam for tests).
        monotonic: the clock for deadlines and throughput (a seam for tests).
    """

    def __init__(
        self,
        policy: ArtifactPolicy,
        *,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.root = policy.cache_dir
        self._wall = wall_clock
        self._downloader = _Downloader(policy, monotonic)

    def __enter__(self) -> ArtifactStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP client if one is open (prepare closes its own)."""
        self._downloader.close()

    # layout
    def blob_path(self, sha: str) -> Path:
        """Where the blob of ``sha`` lives (whether or not it is cached)."""
        return self.root / "sha256" / sha

    def unpacked_path(self, sha: str) -> Path:
        """Where the unpacked tree of ``sha`` lives."""
        return self.root / "unpacked" / sha

    def _meta(self, sha: str) -> Path:
        return self.root / "meta" / sha

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    # prepare
    def prepare(self, artifact: ArtifactLike, *, component: str) -> PreparedArtifact:
        """Fetch (or find in the cache), verify and, if asked, unpack one artifact.

        Nothing unverified enters the cache. A cached blob whose hash matches its pin is never
        fetched again (it is re-hashed, so a damaged cache file is fetched afresh).

        Raises:
            ArtifactRefusedError: hash, signature, trust, size or policy (names the component,
                the URI and the reason).
            ArtifactArchiveError: an unsafe or damaged archive.
            ArtifactDownloadError: the download failed after its retries (retryable).
        """
        label = f"artifact {redact_uri(artifact.uri)} of component {component!r}"

        def refuse(message: str, reason: str) -> ArtifactRefusedError:
            return ArtifactRefusedError(
                f"{label}: {message}",
                reason=reason,
                component=component,
                uri=redact_uri(artifact.uri),
            )

        try:
            pinned = normalize_sha256(artifact.sha256)
        except ValueError as exc:
            raise refuse(f"{exc}; fix the recipe's sha256", "bad-pin") from None
        if pinned is None and self.policy.require_sha256:
            raise refuse(
                "the recipe pins no sha256, and recipes from a signed revision must (the pin is "
                'the root of trust); add sha256 = "<hex>" to the [[artifacts]] entry',
                "missing-pin",
            )
        if not artifact.sig_uri and not self.policy.allow_unsigned:
            raise refuse(
                "has no sig_uri, and this agent accepts signed artifacts only "
                "(allow_unsigned_artifacts = false); sign it (docs/trust.md) and add sig_uri",
                "missing-signature",
            )
        # One HTTP client per prepare (artifact, signature, certificate share its connections);
        # closing it here leaves no socket open between syncs.
        with self._locked(fcntl.LOCK_SH), contextlib.closing(self._downloader):
            sha, size, tmp = self._obtain(artifact, pinned, label, component)
            try:
                if pinned is not None and sha != pinned:
                    raise refuse(
                        f"sha256 mismatch: the recipe pins {pinned}, the bytes hash to {sha} "
                        "(a corrupted or tampered file, or a stale pin)",
                        "hash-mismatch",
                    )
                signed_by = None
                if artifact.sig_uri:
                    signed_by = self._verify_signature(artifact, sha, label, component)
                if tmp is not None:
                    blob = self.blob_path(sha)
                    blob.parent.mkdir(parents=True, exist_ok=True)
                    os.chmod(tmp, 0o444)
                    os.replace(tmp, blob)
                    tmp = None
                    _fsync_dir(blob.parent)
            finally:
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
            unpacked = (
                self._unpack(sha, label, component, artifact.uri) if artifact.unpack else None
            )
            self._touch(sha)
        return PreparedArtifact(
            sha256=sha,
            path=self.blob_path(sha),
            size=size,
            name=artifact_name(artifact.uri),
            unpacked=unpacked,
            signed_by=signed_by,
        )

    def _obtain(
        self, artifact: ArtifactLike, pinned: str | None, label: str, component: str
    ) -> tuple[str, int, Path | None]:
        """Return ``(sha, size, temp file or None for a cache hit)``."""
        if pinned is not None:
            blob = self.blob_path(pinned)
            if blob.is_file():
                sha, size = _hash_file(blob)
                if sha == pinned:
                    logger.debug("{}: cache hit {}", label, pinned)
                    return sha, size, None
                logger.warning(
                    "{}: cached blob {} is damaged (hashes to {}); fetching it again",
                    label,
                    pinned,
                    sha,
                )
                blob.unlink(missing_ok=True)
        tmp, sha, size = self._fetch_to_temp(
            artifact.uri, artifact, label, component, limit=self.policy.max_bytes
        )
        return sha, size, tmp

    def _fetch_to_temp(
        self, uri: str, artifact: ArtifactLike, label: str, component: str, *, limit: int
    ) -> tuple[Path, str, int]:
        try:
            location = locate(uri, self.policy.repo_root)
        except ValueError as exc:
            reason, message = exc.args
            raise ArtifactRefusedError(
                f"{label}: {redact_uri(uri)}: {message}",
                reason=reason,
                component=component,
                uri=redact_uri(uri),
            ) from None
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        path = tmp_dir / f"dl-{secrets.token_hex(8)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w+b") as fh:
            sink = _Sink(fh)
            try:
                if location.kind == "http":
                    assert location.url is not None
                    job = _Fetch(
                        url=location.url,
                        headers=dict(artifact.headers),
                        token=artifact.github_token or self.policy.github_token,
                        limit=limit,
                        label=label if uri == artifact.uri else f"{label}: {redact_uri(uri)}",
                        component=component,
                    )
                    self._downloader.download(job, sink)
                else:
                    assert location.path is not None
                    self._copy_local(location.path, sink, limit, label, component, uri)
                fh.flush()
            except OSError as exc:  # disk full, a medium pulled out mid-copy
                path.unlink(missing_ok=True)
                raise ArtifactDownloadError(
                    f"{label}: I/O error while fetching into the cache {self.root} "
                    f"({exc.strerror or exc}); the agent will try again at the next sync",
                    reason="io",
                    component=component,
                    uri=redact_uri(uri),
                ) from exc
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        return path, sink.hasher.hexdigest(), sink.size

    def _copy_local(
        self, path: Path, sink: _Sink, limit: int, label: str, component: str, uri: str
    ) -> None:
        try:
            src = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError as exc:
            raise ArtifactDownloadError(
                f"{label}: {path} does not exist (is the medium mounted, is the repo checked out?)",
                reason="not-found",
                component=component,
                uri=redact_uri(uri),
            ) from exc
        except OSError as exc:
            raise ArtifactDownloadError(
                f"{label}: cannot read {path} ({exc.strerror})",
                reason="io",
                component=component,
                uri=redact_uri(uri),
            ) from exc
        with src:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                raise ArtifactRefusedError(
                    f"{label}: {path} is not a regular file",
                    reason="unsupported-uri",
                    component=component,
                    uri=redact_uri(uri),
                )
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            while True:
                n = src.readinto(buf)
                if not n:
                    break
                if sink.size + n > limit:
                    raise ArtifactRefusedError(
                        f"{label}: {path} is larger than the bound of {limit} bytes "
                        "(KEYSTONE_ARTIFACT_MAX_BYTES)",
                        reason="too-large",
                        component=component,
                        uri=redact_uri(uri),
                    )
                sink.hasher.update(view[:n])
                sink.fh.write(view[:n])
                sink.size += n

    # signatures
    def _aux(
        self,
        sha: str,
        uri: str,
        kind: str,
        limit: int,
        artifact: ArtifactLike,
        label: str,
        component: str,
    ) -> tuple[bytes, bool]:
        """Return a signature or certificate file (cached beside the blob) and whether cached."""
        key = hashlib.sha256(uri.encode()).hexdigest()[:16]
        cached = self._meta(sha) / f"{kind}-{key}"
        if cached.is_file():
            return cached.read_bytes(), True
        tmp, _sha, _size = self._fetch_to_temp(uri, artifact, label, component, limit=limit)
        try:
            data = tmp.read_bytes()
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
        return data, False

    def _drop_aux(self, sha: str) -> None:
        meta = self._meta(sha)
        for path in meta.glob("sig-*"):
            path.unlink(missing_ok=True)
        for path in meta.glob("cert-*"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            meta.rmdir()  # only if nothing else (the unpacked size) is left in it

    def _verify_signature(
        self, artifact: ArtifactLike, sha: str, label: str, component: str
    ) -> str:
        from keystone.runtime.signing import (
            SignatureCheck,
            SignatureRejected,
            load_certificates,
            verify_signature,
        )

        assert artifact.sig_uri is not None

        def refuse(message: str, reason: str) -> ArtifactRefusedError:
            return ArtifactRefusedError(
                f"{label}: {message}",
                reason=reason,
                component=component,
                uri=redact_uri(artifact.uri),
            )

        policy = self.policy
        if artifact.cert_uri is None and policy.leaf_cert is None:
            raise refuse(
                "has a sig_uri but no certificate to check it with: add cert_uri to the recipe or "
                "set KEYSTONE_LEAF_CERT",
                "no-certificate",
            )
        if policy.trust_bundle is None and artifact.cert_uri is not None:
            raise refuse(
                "its certificate comes from cert_uri, but no trust bundle is configured to judge "
                "it: set KEYSTONE_TRUST_BUNDLE to your CA bundle (docs/trust.md)",
                "no-trust-bundle",
            )
        roots = None
        if policy.trust_bundle is not None:
            try:
                bundle = policy.trust_bundle.read_bytes()
            except OSError as exc:
                raise UsageError(
                    f"KEYSTONE_TRUST_BUNDLE={policy.trust_bundle}: cannot read it ({exc.strerror})"
                ) from exc
            try:
                roots = tuple(load_certificates(bundle, what=f"trust bundle {policy.trust_bundle}"))
            except SignatureRejected as exc:
                raise UsageError(f"KEYSTONE_TRUST_BUNDLE: {exc}") from exc
        try:
            reading = TrustedClock(
                policy.state_dir, policy.clock_policy, wall=self._wall
            ).verification_time()
        except ClockBehind as exc:
            raise refuse(f"signature not judged: {exc}", "clock-behind") from exc
        at = datetime.fromtimestamp(reading.now, UTC)
        sig_label = redact_uri(artifact.sig_uri)
        for attempt in (1, 2):
            sig, sig_cached = self._aux(
                sha, artifact.sig_uri, "sig", MAX_SIGNATURE_BYTES, artifact, label, component
            )
            cert_cached = False
            if artifact.cert_uri is not None:
                cert_data, cert_cached = self._aux(
                    sha, artifact.cert_uri, "cert", MAX_CERT_BYTES, artifact, label, component
                )
                cert_what = f"certificate {redact_uri(artifact.cert_uri)}"
            else:
                assert policy.leaf_cert is not None
                try:
                    cert_data = policy.leaf_cert.read_bytes()
                except OSError as exc:
                    raise UsageError(
                        f"KEYSTONE_LEAF_CERT={policy.leaf_cert}: cannot read it ({exc.strerror})"
                    ) from exc
                cert_what = f"certificate {policy.leaf_cert}"
            try:
                chain = tuple(load_certificates(cert_data, what=cert_what))
                return verify_signature(
                    bytes.fromhex(sha),
                    sig,
                    SignatureCheck(chain, roots, at, reading.describe()),
                )
            except SignatureRejected as exc:
                if attempt == 1 and (sig_cached or cert_cached):
                    # The publisher may have re-signed since we cached the files: fetch afresh.
                    self._drop_aux(sha)
                    continue
                # Keep no files of a refused signature: a fixed one at the same URI is fetched.
                self._drop_aux(sha)
                raise refuse(f"signature {sig_label} refused: {exc}", exc.reason) from exc
        raise AssertionError("unreachable")

    # unpack
    def _unpack(self, sha: str, label: str, component: str, uri: str) -> Path:
        dest = self.unpacked_path(sha)
        if dest.is_dir():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        limits = ArchiveLimits(
            max_bytes=self.policy.max_extract_bytes, max_files=self.policy.max_files
        )
        try:
            result = unpack(self.blob_path(sha), dest, limits, what=f"{label}")
        except FileExistsError:
            return dest  # another process unpacked it meanwhile: same bytes, same tree
        except ArchiveRefused as exc:
            raise ArtifactArchiveError(
                str(exc), reason=exc.reason, component=component, uri=redact_uri(uri)
            ) from exc
        meta = self._meta(sha)
        meta.mkdir(parents=True, exist_ok=True)
        write_json(meta / "unpacked.json", {"bytes": result.bytes, "files": result.files})
        return dest

    def _touch(self, sha: str) -> None:
        now = self._wall()
        for path in (self.blob_path(sha), self.unpacked_path(sha)):
            with contextlib.suppress(OSError):
                os.utime(path, (now, now), follow_symlinks=False)

    # install
    def install(self, prepared: PreparedArtifact, workdir: Path) -> None:
        """Make a prepared artifact available in a component work dir.

        An unpacked tree's contents are copied into ``workdir`` (merged; same names replaced);
        a plain artifact is copied as ``workdir/<name>``. Copies, not hard links: a hard link
        shares the inode, so an install script's ``chmod``/``chown`` or a component writing
        its own file would change the cached tree that a rollback reuses. ``copy_file_range``
        makes the copy in the kernel, and a reflink on filesystems that can (btrfs, XFS).
        Existing symlinks in the work dir are replaced, never followed.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        if prepared.unpacked is not None:
            self._install_tree(prepared.unpacked, workdir)
        else:
            _place_file(prepared.path, workdir, prepared.name, 0o644)
        _fsync_dir(workdir)

    def _install_tree(self, tree: Path, workdir: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(tree):
            rel = Path(dirpath).relative_to(tree)
            target_dir = workdir / rel
            _ensure_real_dir(target_dir)
            for name in list(dirnames):
                src = Path(dirpath) / name
                if src.is_symlink():
                    dirnames.remove(name)
                    _place_symlink(os.readlink(src), target_dir, name)
            for name in filenames:
                src = Path(dirpath) / name
                if src.is_symlink():
                    _place_symlink(os.readlink(src), target_dir, name)
                else:
                    mode = (src.stat().st_mode & 0o555) | 0o200
                    _place_file(src, target_dir, name, mode)

    # gc
    def _entries(self) -> list[tuple[str, int, float]]:
        """``(sha, bytes, last_used)`` for every cached blob or tree."""
        shas: set[str] = set()
        for sub in ("sha256", "unpacked"):
            d = self.root / sub
            if d.is_dir():
                shas.update(n for n in os.listdir(d) if _HEX64.match(n))
        out = []
        for sha in shas:
            size = 0
            used = 0.0
            blob = self.blob_path(sha)
            with contextlib.suppress(OSError):
                st = blob.stat()
                size += st.st_size
                used = max(used, st.st_mtime)
            tree = self.unpacked_path(sha)
            if tree.is_dir():
                size += self._tree_bytes(sha)
                with contextlib.suppress(OSError):
                    used = max(used, tree.lstat().st_mtime)
            out.append((sha, size, used))
        return out

    def _tree_bytes(self, sha: str) -> int:
        try:
            data = json.loads((self._meta(sha) / "unpacked.json").read_text(encoding="utf-8"))
            return int(data["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            total = 0
            for dirpath, _dirs, files in os.walk(self.unpacked_path(sha)):
                for name in files:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(dirpath, name)).st_size
            return total

    def cache_bytes(self) -> int:
        """Bytes the cache holds (blobs and unpacked trees), for the cache-size metric."""
        return sum(size for _sha, size, _used in self._entries())

    def cached(self) -> list[str]:
        """The sha256s whose blob or unpacked tree is in the cache."""
        return sorted(sha for sha, _size, _used in self._entries())

    def gc(self, keep: Set[str]) -> GcReport:
        """Evict least recently used artifacts until the cache fits its limit.

        Never evicts a sha256 in ``keep`` (what the applied and the last known-good plans need);
        leftovers of interrupted downloads and unpacks are removed too.
        """
        pinned = {s for s in (normalize_sha256(k) for k in keep) if s is not None}
        evicted: list[str] = []
        freed = 0
        with self._locked(fcntl.LOCK_EX):
            tmp = self.root / "tmp"
            if tmp.is_dir():
                for name in os.listdir(tmp):
                    with contextlib.suppress(OSError):
                        (tmp / name).unlink()
            unpacked_root = self.root / "unpacked"
            if unpacked_root.is_dir():
                for name in os.listdir(unpacked_root):
                    if name.startswith(".staging-"):
                        remove_tree(unpacked_root / name)
            meta_root = self.root / "meta"
            if meta_root.is_dir():
                for name in os.listdir(meta_root):
                    if not self.blob_path(name).exists() and not self.unpacked_path(name).exists():
                        remove_tree(meta_root / name)  # signature files of nothing cached
            entries = self._entries()
            total = sum(size for _sha, size, _used in entries)
            limit = self.policy.cache_limit_bytes
            for sha, size, _used in sorted(entries, key=lambda e: (e[2], e[0])):
                if total <= limit:
                    break
                if sha in pinned:
                    continue
                self._evict(sha)
                evicted.append(sha)
                freed += size
                total -= size
        if evicted:
            logger.info("artifact cache GC: evicted {} artifact(s), {} bytes", len(evicted), freed)
        return GcReport(
            evicted=tuple(evicted),
            freed_bytes=freed,
            remaining_bytes=total,
            limit_bytes=limit,
            over_limit=total > limit,
        )

    def _evict(self, sha: str) -> None:
        self.blob_path(sha).unlink(missing_ok=True)
        remove_tree(self.unpacked_path(sha))
        remove_tree(self._meta(sha))


def _ensure_real_dir(path: Path) -> None:
    """Make ``path`` a real directory, replacing a symlink or file a component may have left."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)


def _place_file(src: Path, target_dir: Path, name: str, mode: int) -> None:
    """Copy ``src`` to ``target_dir/name`` through a fresh temp file and one rename."""
    tmp = target_dir / f".{name}.keystone-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            _copy_file(src, fd)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        dest = target_dir / name
        if dest.is_dir() and not dest.is_symlink():
            remove_tree(dest)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _place_symlink(target: str, target_dir: Path, name: str) -> None:
    tmp = target_dir / f".{name}.keystone-{secrets.token_hex(4)}"
    os.symlink(target, tmp)
    dest = target_dir / name
    if dest.is_dir() and not dest.is_symlink():
        remove_tree(dest)
    os.replace(tmp, dest)


# --- small entry points -------------------------------------------------------------------------


def clock_trusted(policy: ArtifactPolicy) -> bool:
    """Whether the system clock is at or after what this device has already seen.

    For the ``keystone_clock_trusted`` metric; reads the persisted high-water mark, changes
    nothing.
    """
    return TrustedClock(policy.state_dir, policy.clock_policy).read().trusted


def observe_trusted_time(policy: ArtifactPolicy, when: float) -> None:
    """Advance the clock's high-water mark to ``when`` (e.g. a verified commit's time)."""
    TrustedClock(policy.state_dir, policy.clock_policy).observe(when)


def serve_artifacts(root: Path, addr: str) -> None:
    """Serve ``root`` over HTTP until interrupted (see :func:`keystone.serve.serve_artifacts`)."""
    from keystone.serve import serve_artifacts as _serve

    _serve(root, addr)

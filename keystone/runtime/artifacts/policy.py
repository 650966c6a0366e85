"""The artifact policy and its pure checks: sha256 pins, URIs, headers, locations, backoff.

:class:`ArtifactPolicy` is read once from the environment (``from_env``) and says where the cache
lives and what every artifact must satisfy; the functions here are pure and table-tested.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
from collections.abc import Mapping, Set
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from keystone.errors import UsageError
from keystone.repopath import repo_path_problem
from keystone.runtime.archive import DEFAULT_MAX_EXTRACT_BYTES, DEFAULT_MAX_FILES
from keystone.runtime.clock import CLOCK_POLICIES, HIGH_WATER, TrustedClock
from keystone.units import parse_duration, parse_size

GIB = 1024**3
DEFAULT_MAX_BYTES = 2 * GIB
DEFAULT_CACHE_LIMIT = 2 * GIB
DEFAULT_DOWNLOAD_TIMEOUT = 30 * 60.0
GITHUB_HOSTS = frozenset({"github.com", "api.github.com"})
MAX_SIGNATURE_BYTES = 64 * 1024
MAX_CERT_BYTES = 1024 * 1024
MAX_REDIRECTS = 10
USER_AGENT = "keystone-agent"
#: Bytes read or written at a time when copying or hashing.
CHUNK = 1024 * 1024
HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Headers a recipe sets that may follow a redirect to another origin; every other one (an
# Authorization, a GitLab PRIVATE-TOKEN, an API key) stays with the host it was written for.
_CROSS_ORIGIN_HEADERS = frozenset({"accept", "accept-language", "user-agent"})

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
        insecure_skip_verify: ``KEYSTONE_INSECURE_SKIP_VERIFY`` (``--insecure-skip-verify``), as
            in the Go agent: the mandatory integrity requirements (``allow_unsigned = false``,
            a signed revision's sha256 pins) are dropped, with a WARNING for each artifact;
            a pin or a signature the recipe does give is still checked. Development only.
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
    insecure_skip_verify: bool = False
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
            "insecure_skip_verify": _env_flag(environ, "KEYSTONE_INSECURE_SKIP_VERIFY"),
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
            if name in (
                "cache_dir",
                "repo_root",
                "trust_bundle",
                "leaf_cert",
                "state_dir",
            ):
                values[name] = None if value is None else Path(value)
            elif name == "github_hosts":
                values[name] = frozenset(value)
            else:
                values[name] = value
        if "cache_dir" not in values or values["cache_dir"] is None:
            raise UsageError("the artifact policy needs a cache_dir")
        return cls(**values)


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
    if not HEX64.match(text):
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
                "unsupported-uri",
                f"file URIs name the local host only, not {parts.netloc!r}",
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

"""Artifact values: what a recipe asks for, what a prepare gives, GC reports, and the errors.

Plain frozen dataclasses and one Protocol; the worker moves them as JSON (``to_json``/``from_json``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from keystone import errors as errors_module
from keystone.errors import (
    ArtifactFetchError,
    ArtifactIntegrityError,
    KeystoneError,
    UnsafeArchiveError,
    UsageError,
)


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
    for cls in type(exc).__mro__:
        if cls.__module__ == errors_module.__name__:
            return cls.__name__
    return type(exc).__name__


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

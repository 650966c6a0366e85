"""Artifact values: what a recipe asks for, what a prepare gives, GC reports, and the errors.

Plain frozen dataclasses and one Protocol; the worker moves them as JSON (``to_json``/``from_json``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from keystone import errors as errors_module
from keystone.deltaspec import DeltaSpec, parse_delta_table
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
    delta: DeltaSpec | None = None

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
            delta=_delta_from_json(data.get("delta")),
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
            # Not part of ArtifactLike: an artifact without [artifacts.delta] has no such field.
            delta=getattr(artifact, "delta", None),
        )

    def to_json(self) -> dict[str, Any]:
        """The worker's JSON form (it carries the token: send it over a pipe, never argv)."""
        out = asdict(self)
        out["headers"] = dict(self.headers)
        if self.delta is not None:
            out["delta"] = _delta_to_json(self.delta)
        return out


def _delta_to_json(spec: DeltaSpec) -> dict[str, str]:
    return {"server": spec.server, "sha256": spec.sha256, "format": spec.format}


def _delta_from_json(data: Any) -> DeltaSpec | None:
    """The ``delta`` of an artifact's JSON form (``None`` when absent), validated again."""
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise UsageError("an artifact's 'delta' must be an object")
    try:
        return parse_delta_table({k: data[k] for k in ("server", "sha256", "format") if k in data})
    except KeystoneError as exc:
        raise UsageError(f"an artifact's 'delta': {exc}") from None


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
        via: how the bytes came: ``cache`` (already held), ``full`` (the whole artifact was
            fetched) or ``delta`` (patched from the previous version's tar; ``path`` then does
            not exist and ``unpacked`` holds the verified tree).
        wire_bytes: bytes fetched for it now (the artifact, or the patch).
        saved_bytes: for a delta, the bytes the full download would have taken beyond the
            patch (estimated by the previous version's archive size).
        delta_fallback: why a declared delta was not used and the whole artifact was fetched.
    """

    sha256: str
    path: Path
    size: int
    name: str
    unpacked: Path | None = None
    signed_by: str | None = None
    # How it came, not what it is: two prepares of the same artifact compare equal.
    via: str = field(default="cache", compare=False)
    wire_bytes: int = field(default=0, compare=False)
    saved_bytes: int = field(default=0, compare=False)
    delta_fallback: str = field(default="", compare=False)

    def to_json(self) -> dict[str, Any]:
        """JSON form for the worker's answer."""
        return {
            "sha256": self.sha256,
            "path": str(self.path),
            "size": self.size,
            "name": self.name,
            "unpacked": None if self.unpacked is None else str(self.unpacked),
            "signed_by": self.signed_by,
            "via": self.via,
            "wire_bytes": self.wire_bytes,
            "saved_bytes": self.saved_bytes,
            "delta_fallback": self.delta_fallback,
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
            via=str(data.get("via") or "cache"),
            wire_bytes=int(data.get("wire_bytes") or 0),
            saved_bytes=int(data.get("saved_bytes") or 0),
            delta_fallback=str(data.get("delta_fallback") or ""),
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

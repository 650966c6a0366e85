"""Artifacts: download, SHA-256, detached signatures, a content-addressed cache, safe unpack, GC.

The sha256 pinned in a (signed) recipe is the root of trust, so an artifact may come from any
medium: ``https``/``http`` (private GitHub releases included), ``file://`` or a path relative to the
fleet repo root. Every byte is hashed while it streams to a temp file; only a verified file is
renamed into the cache, under its hash (layout in :mod:`~keystone.runtime.artifacts.store`).

Downloads retry with backoff, resume with ``Range`` after a dropped connection, and are bounded in
size, total time and minimum throughput (a server dripping a byte a second cannot hold the agent).
A token is sent only to the GitHub hosts and never across a redirect to another host.

Modules: :mod:`.model` (the values and errors), :mod:`.policy` (the policy and its pure checks),
:mod:`.download` (HTTP with retries, resume and bounds), :mod:`.store` (the cache: prepare,
signatures, unpack, install, GC). ``httpx`` and ``cryptography`` are imported only inside the
functions that use them: the resident agent runs :mod:`keystone.runtime.artifact_worker` in a
child process instead.
"""

from __future__ import annotations

from keystone.runtime.artifacts.model import (
    ERROR_TYPES,
    ArtifactArchiveError,
    ArtifactDownloadError,
    ArtifactLike,
    ArtifactRefusedError,
    ArtifactSpec,
    GcReport,
    PreparedArtifact,
    public_error_type,
)
from keystone.runtime.artifacts.policy import (
    DEFAULT_CACHE_LIMIT,
    DEFAULT_DOWNLOAD_TIMEOUT,
    DEFAULT_MAX_BYTES,
    GIB,
    GITHUB_HOSTS,
    MAX_CERT_BYTES,
    MAX_REDIRECTS,
    MAX_SIGNATURE_BYTES,
    USER_AGENT,
    ArtifactPolicy,
    Location,
    artifact_name,
    backoff_delay,
    clock_trusted,
    locate,
    normalize_sha256,
    observe_trusted_time,
    redact_uri,
    request_headers,
)
from keystone.runtime.artifacts.store import ArtifactStore

__all__ = [
    "DEFAULT_CACHE_LIMIT",
    "DEFAULT_DOWNLOAD_TIMEOUT",
    "DEFAULT_MAX_BYTES",
    "ERROR_TYPES",
    "GIB",
    "GITHUB_HOSTS",
    "MAX_CERT_BYTES",
    "MAX_REDIRECTS",
    "MAX_SIGNATURE_BYTES",
    "USER_AGENT",
    "ArtifactArchiveError",
    "ArtifactDownloadError",
    "ArtifactLike",
    "ArtifactPolicy",
    "ArtifactRefusedError",
    "ArtifactSpec",
    "ArtifactStore",
    "GcReport",
    "Location",
    "PreparedArtifact",
    "artifact_name",
    "backoff_delay",
    "clock_trusted",
    "locate",
    "normalize_sha256",
    "observe_trusted_time",
    "public_error_type",
    "redact_uri",
    "request_headers",
]

"""Dataset manifests: the signed document that says which version of a dataset is current.

The Go Keystone's format (``internal/manifest``), TOML::

    schema    = 1
    name      = "com.example.cve-bundle"
    version   = "2026-08-15"            # a label for humans; never compared
    published = 2026-08-15T03:00:00Z    # the anti-replay anchor (an offset date-time)

    [artifact]
    uri    = "https://hub.plant.local/datasets/cve-2026-08-15.tar"
    sha256 = "9f86d081..."              # 64 hex characters: the payload's digest
    size   = 184320000

    [delta]                             # optional: a patch server, always a fallback
    server = "https://ota.example.com"
    from   = "..."
    format = "bsdiff+zstd"

A missing schema/name/version/published/artifact.uri/artifact.sha256 is fatal; an unknown key is
reported (``Manifest.unknown_fields``), so a manifest for a newer agent still works.

Anti-replay: a manifest is accepted only if its ``published`` is strictly after the last
accepted one (two signed values compared; the local clock is not consulted).

Signature: ``<manifest>.sig`` next to it, over the SHA-256 of the manifest file's exact bytes
(no canonical re-encoding: the published file is what is signed), in the format of
:mod:`keystone.sign`.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keystone.errors import ValidationError, VerificationError
from keystone.limits import BOUNDS, Limits, how_to_raise, human
from keystone.runtime.signing import sha256_file

SCHEMA_VERSION = 1
#: The default bound of a manifest (``KEYSTONE_MAX_MANIFEST_BYTES``, ``[limits]
#: max_manifest_bytes``); :func:`max_manifest_bytes` is the one in force.
MAX_MANIFEST_BYTES = BOUNDS["max_manifest_bytes"].default


def max_manifest_bytes() -> int:
    """The manifest bound in force (``KEYSTONE_MAX_MANIFEST_BYTES``, default 4 MiB)."""
    return Limits.from_env().max_manifest_bytes


_TOP = ("schema", "name", "version", "published", "artifact", "delta")
_ARTIFACT = ("uri", "sha256", "size")
_DELTA = ("server", "from", "format")


class ManifestError(ValidationError):
    """A manifest that does not parse or cannot be acted on (names the file and the field)."""


class ManifestReplayed(VerificationError):
    """A manifest not strictly newer than the one already accepted (a replay or a re-publication)."""


@dataclass(frozen=True)
class ManifestArtifact:
    """The dataset payload: where to get it, its SHA-256 (lowercase hex) and its size in bytes."""

    uri: str
    sha256: str
    size: int = 0


@dataclass(frozen=True)
class ManifestDelta:
    """A patch server that can turn the version a device has into this one (optional)."""

    server: str
    from_: str = ""
    format: str = ""


@dataclass(frozen=True)
class Manifest:
    """A dataset publication (see the module docstring for the format)."""

    schema: int
    name: str
    version: str
    published: datetime
    artifact: ManifestArtifact
    delta: ManifestDelta | None = None
    unknown_fields: tuple[str, ...] = field(default=(), compare=False)

    def is_newer_than(self, last_accepted: datetime | None) -> bool:
        """The anti-replay rule: strictly after the last accepted ``published`` (or nothing yet)."""
        return last_accepted is None or self.published > last_accepted


def _fail(source: str | None, fld: str | None, message: str) -> ManifestError:
    return ManifestError(message, file=source, field=fld)


def _check_digest(value: str, source: str | None) -> str:
    text = value.strip()
    if not text:
        raise _fail(
            source, "artifact.sha256", "required: without it the download cannot be verified"
        )
    if len(text) != 64:
        raise _fail(
            source,
            "artifact.sha256",
            f"{text!r} is {len(text)} characters, want 64 hex characters",
        )
    try:
        bytes.fromhex(text)
    except ValueError:
        raise _fail(source, "artifact.sha256", f"{text!r} is not hex") from None
    return text.lower()


def _string(table: Mapping[str, Any], key: str, where: str, source: str | None) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise _fail(source, where, f"must be a string, not {type(value).__name__}")
    return value


def parse_manifest(data: bytes, *, source: str | None = None) -> Manifest:
    """Parse and validate a manifest document.

    Args:
        data: the file's bytes.
        source: the file name, for messages.

    Raises:
        ManifestError: not TOML, a wrong type, or a field the manifest cannot do without.
    """
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _fail(source, None, f"invalid manifest: not UTF-8 ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise _fail(source, None, f"invalid manifest: {exc}") from exc
    unknown = [k for k in doc if k not in _TOP]
    schema = doc.get("schema", 0)
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise _fail(source, "schema", f"must be an integer, not {type(schema).__name__}")
    if schema != SCHEMA_VERSION:
        raise _fail(
            source,
            "schema",
            f"manifest schema {schema} is not supported (this build understands {SCHEMA_VERSION})",
        )
    name = _string(doc, "name", "name", source)
    if not name.strip():
        raise _fail(source, "name", "manifest has no name")
    version = _string(doc, "version", "version", source)
    if not version.strip():
        raise _fail(source, "version", f"manifest {name} has no version")
    published = doc.get("published")
    if published is None:
        raise _fail(
            source,
            "published",
            f"manifest {name} has no published timestamp, so a replay of an older one could "
            "not be detected",
        )
    if isinstance(published, str):
        # Go decodes a quoted RFC 3339 string into time.Time too.
        try:
            published = parse_time(published, what="published")
        except ValidationError as exc:
            raise _fail(source, "published", exc.reason) from None
    if not isinstance(published, datetime):
        raise _fail(
            source,
            "published",
            "must be a TOML offset date-time such as 2026-08-15T03:00:00Z, not "
            f"{type(published).__name__}",
        )
    if published.tzinfo is None:
        raise _fail(
            source,
            "published",
            f"{published.isoformat()} has no time zone; write it as 2026-08-15T03:00:00Z",
        )
    art = doc.get("artifact", {})
    if not isinstance(art, dict):
        raise _fail(source, "artifact", "must be a table")
    unknown += [f"artifact.{k}" for k in art if k not in _ARTIFACT]
    uri = _string(art, "uri", "artifact.uri", source)
    if not uri.strip():
        raise _fail(source, "artifact.uri", f"manifest {name} has no artifact.uri")
    sha = _check_digest(_string(art, "sha256", "artifact.sha256", source), source)
    size = art.get("size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _fail(source, "artifact.size", f"must be a byte count (an integer >= 0): {size!r}")
    delta: ManifestDelta | None = None
    if "delta" in doc:
        table = doc["delta"]
        if not isinstance(table, dict):
            raise _fail(source, "delta", "must be a table")
        unknown += [f"delta.{k}" for k in table if k not in _DELTA]
        server = _string(table, "server", "delta.server", source)
        if not server.strip():
            raise _fail(
                source, "delta.server", f"manifest {name} declares [delta] without a server"
            )
        delta = ManifestDelta(
            server=server,
            from_=_string(table, "from", "delta.from", source),
            format=_string(table, "format", "delta.format", source),
        )
    return Manifest(
        schema=schema,
        name=name,
        version=version,
        published=published,
        artifact=ManifestArtifact(uri=uri, sha256=sha, size=size),
        delta=delta,
        unknown_fields=tuple(unknown),
    )


def load_manifest(path: Path) -> Manifest:
    """Read and validate a manifest file (bounded by ``max_manifest_bytes``, 4 MiB).

    Raises:
        ManifestError: unreadable, too large, or invalid.
    """
    limit = max_manifest_bytes()
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise _fail(str(path), None, f"cannot read the manifest: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise _fail(
            str(path),
            None,
            f"larger than {human(limit)}: not a manifest ({how_to_raise('max_manifest_bytes')})",
        )
    return parse_manifest(data, source=str(path))


def format_time(when: datetime) -> str:
    """RFC 3339 to the second, ``Z`` for UTC (Go's ``time.RFC3339``)."""
    if when.utcoffset() == UTC.utcoffset(None):
        return when.strftime("%Y-%m-%dT%H:%M:%SZ")
    return when.replace(microsecond=0).isoformat()


def parse_time(text: str, *, what: str) -> datetime:
    """Parse an RFC 3339 time with an offset (``2026-08-15T03:00:00Z``).

    Raises:
        ValidationError: not RFC 3339 or no offset.
    """
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise ValidationError(
            f"{what} must be RFC 3339 with an offset (like 2026-08-15T03:00:00Z): {text!r}"
        )
    return when


def _toml_string(value: str) -> str:
    # A JSON string is a valid TOML basic string (\" \\ \n \t \uXXXX escapes).
    return json.dumps(value, ensure_ascii=False)


def render_manifest(m: Manifest) -> bytes:
    """The manifest file, in the Go tool's field order and layout (``keystonectl manifest new``)."""
    out = (
        f"schema    = {m.schema}\n"
        f"name      = {_toml_string(m.name)}\n"
        f"version   = {_toml_string(m.version)}\n"
        f"published = {format_time(m.published)}\n"
        "\n"
        "[artifact]\n"
        f"uri    = {_toml_string(m.artifact.uri)}\n"
        f"sha256 = {_toml_string(m.artifact.sha256)}\n"
        f"size   = {m.artifact.size}\n"
    )
    if m.delta is not None:
        out += f"\n[delta]\nserver = {_toml_string(m.delta.server)}\n"
    return out.encode()


def new_manifest(
    artifact: Path,
    *,
    name: str,
    uri: str,
    version: str | None = None,
    published: datetime | None = None,
    delta_server: str | None = None,
) -> Manifest:
    """Build a manifest for a dataset file: its digest and size come from the file itself.

    ``published`` defaults to now (UTC, to the second); ``version`` to its date.

    Raises:
        ManifestError: a missing name or uri, or an unreadable file.
    """
    try:
        size = os.stat(artifact).st_size
        digest = sha256_file(Path(artifact))
    except OSError as exc:
        raise _fail(str(artifact), None, f"cannot read the dataset file: {exc.strerror}") from exc
    when = (published or datetime.now(UTC)).replace(microsecond=0)
    m = Manifest(
        schema=SCHEMA_VERSION,
        name=name,
        version=version or when.strftime("%Y-%m-%d"),
        published=when,
        artifact=ManifestArtifact(uri=uri, sha256=digest, size=size),
        delta=ManifestDelta(server=delta_server) if delta_server else None,
    )
    # Round-trip through the parser: what is written is what an agent will accept.
    return parse_manifest(render_manifest(m), source="--name/--uri")


def check_not_replayed(m: Manifest, last_accepted: datetime | None) -> None:
    """Refuse ``m`` unless it is strictly newer than ``last_accepted``.

    Raises:
        ManifestReplayed: naming both publication times.
    """
    if not m.is_newer_than(last_accepted):
        assert last_accepted is not None
        raise ManifestReplayed(
            f"manifest {m.name} published {format_time(m.published)} is not newer than "
            f"{format_time(last_accepted)}, the one already accepted: refused as a replay"
        )


def sign_manifest(path: Path, key: Path, cert: Path | None = None) -> Path:
    """Validate the manifest, sign it and write ``<manifest>.sig``; return that path.

    The document is parsed first, so a broken one never gets a signature.

    Raises:
        ManifestError: the manifest is invalid.
        UsageError, SignatureRejected: from :func:`keystone.sign.sign_file`.
    """
    # lazy: signing loads cryptography; parsing a manifest does not need it
    from keystone import sign

    load_manifest(path)
    signature = sign.sign_file(path, key, cert)
    out = sign.sig_path_for(path)
    sign.write_signature(out, signature)
    return out


def verify_manifest(
    path: Path,
    *,
    trust_bundle: Path,
    cert: Path | None = None,
    since: datetime | None = None,
    at: datetime | None = None,
    environ: Mapping[str, str] | None = None,
) -> Manifest:
    """Check a manifest the way an agent does: document, signature and chain, then anti-replay.

    Args:
        path: the manifest; its signature is ``<manifest>.sig``.
        trust_bundle: PEM roots.
        cert: the signer's certificate (default ``<manifest>.crt``, else ``KEYSTONE_LEAF_CERT``).
        since: the ``published`` of the manifest already accepted, if any.
        at: the time certificate validity is judged at (default now).
        environ: where ``KEYSTONE_LEAF_CERT`` is read.

    Raises:
        ManifestError, SignatureRejected, ManifestReplayed, UsageError (no certificate).
    """
    # lazy: signing loads cryptography; parsing a manifest does not need it
    from keystone import sign

    m = load_manifest(path)
    sign.verify_detached(path, trust_bundle=trust_bundle, cert=cert, at=at, environ=environ)
    check_not_replayed(m, since)
    return m

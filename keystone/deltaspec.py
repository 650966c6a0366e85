"""A recipe's ``[artifacts.delta]`` table: the patch server and the target tar's SHA-256.

Only the parsing, which recipes and artifact records need. The patcher, :mod:`keystone.delta`
(with bz2, gzip, and bsdiff4, zstandard and httpx when used), is imported only where a patch is
fetched, applied or made, so the resident agent that reads recipes does not carry it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from keystone.errors import ValidationError

__all__ = ["DELTA_FORMAT", "DeltaSpec", "absolute_http", "is_sha256_hex", "parse_delta_table"]

DELTA_FORMAT = "bsdiff+zstd"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class DeltaSpec:
    """A recipe's ``[artifacts.delta]``: the patch server and the target tar's SHA-256."""

    server: str
    sha256: str
    format: str = DELTA_FORMAT
    unknown_fields: tuple[str, ...] = ()


def is_sha256_hex(value: str) -> bool:
    """64 lowercase hex characters: the only digest shape that reaches a delta URL."""
    return bool(_HEX64.match(value))


def absolute_http(url: str) -> bool:
    """An ``http(s)://host...`` URL (a delta server must not be relative)."""
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def parse_delta_table(
    table: Mapping[str, Any] | None,
    *,
    file: str | None = None,
    line: int | None = None,
    field: str = "artifacts.delta",
) -> DeltaSpec | None:
    """Validate a recipe's ``[artifacts.delta]`` table (``None`` when absent).

    ``server`` (an absolute http(s) URL) and ``sha256`` (of the uncompressed tar) are required;
    ``format`` defaults to ``bsdiff+zstd``. Another format is kept, not refused, as in Go: the
    client then falls back to the full download and says why. Unknown keys are reported in
    ``unknown_fields``.

    Raises:
        ValidationError: naming ``file:line`` and the field.
    """
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise ValidationError("must be a table", file=file, line=line, field=field)
    unknown = tuple(f"{field}.{k}" for k in table if k not in ("server", "sha256", "format"))
    server = table.get("server")
    if not isinstance(server, str) or not server.strip():
        raise ValidationError(
            "required: the base URL of the delta server (e.g. https://ota.example.com)",
            file=file,
            line=line,
            field=f"{field}.server",
        )
    if not absolute_http(server.strip()):
        raise ValidationError(
            f"{server!r} must be an absolute http(s) URL",
            file=file,
            line=line,
            field=f"{field}.server",
        )
    sha = table.get("sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha.strip()):
        raise ValidationError(
            "required: the SHA-256 of the uncompressed tar (64 hex characters; "
            "`gunzip -c X.tar.gz | sha256sum`)",
            file=file,
            line=line,
            field=f"{field}.sha256",
        )
    fmt = table.get("format", "")
    if not isinstance(fmt, str):
        raise ValidationError("must be a string", file=file, line=line, field=f"{field}.format")
    return DeltaSpec(
        server=server.strip(),
        sha256=sha.strip().lower(),
        format=fmt.strip() or DELTA_FORMAT,
        unknown_fields=unknown,
    )

"""Bounds on every input Keystone parses, in one place (docs/limits.md is the table).

Each bound has a name, a default, an environment variable and a key in the agent config's
``[limits]`` table. ``Limits.from_env`` reads them (environment over config file over default,
as every other setting); a layer that refuses an input raises ``LimitExceeded`` built by
``Limits.refuse``, whose message names the bound and how to raise it. The module imports only
the standard library, ``keystone.errors`` and ``keystone.units`` so that any layer (the sync worker, the API,
bundles) can import it cheaply.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace

from keystone.errors import LimitExceeded, UsageError, ValidationError
from keystone.units import parse_size

MiB = 1 << 20


@dataclass(frozen=True)
class Bound:
    """One documented bound: its default, where to raise it, and what it refuses."""

    name: str  # the field of ``Limits`` and the key of ``[limits]`` in agent.toml
    default: int
    env: str
    unit: str  # "bytes" or a plural noun ("components", "levels")
    refuses: str


BOUNDS: dict[str, Bound] = {
    b.name: b
    for b in (
        Bound(
            "max_recipe_bytes",
            1 * MiB,
            "KEYSTONE_MAX_RECIPE_BYTES",
            "bytes",
            "a recipe file larger than this, before it is read or parsed",
        ),
        Bound(
            "max_plan_bytes",
            1 * MiB,
            "KEYSTONE_MAX_PLAN_BYTES",
            "bytes",
            "a plan file larger than this, before it is read or parsed",
        ),
        Bound(
            "max_config_bytes",
            1 * MiB,
            "KEYSTONE_MAX_CONFIG_BYTES",
            "bytes",
            "an agent.toml larger than this, before it is read or parsed",
        ),
        Bound(
            "max_components",
            1000,
            "KEYSTONE_MAX_COMPONENTS",
            "components",
            "a plan file, or the merged plan of a device, with more components than this",
        ),
        Bound(
            "max_toml_depth",
            32,
            "KEYSTONE_MAX_TOML_DEPTH",
            "levels",
            "a TOML document nesting tables and arrays deeper than this",
        ),
        Bound(
            "max_ref_advertisement_bytes",
            1 * MiB,
            "KEYSTONE_MAX_REF_ADVERTISEMENT_BYTES",
            "bytes",
            "a git ref advertisement larger than this: the agent's own poll hands it to the "
            "sync worker, which refuses it as it arrives",
        ),
        Bound(
            "max_refs",
            100_000,
            "KEYSTONE_MAX_REFS",
            "refs",
            "a git server advertising more refs than this",
        ),
        Bound(
            "max_pack_bytes",
            512 * MiB,
            "KEYSTONE_MAX_PACK_BYTES",
            "bytes",
            "a git pack (from a git server or inside a bundle) larger than this, "
            "refused as it arrives",
        ),
        Bound(
            "max_bundle_bytes",
            4 << 30,
            "KEYSTONE_MAX_BUNDLE_BYTES",
            "bytes",
            "a bundle (downloaded, uploaded to the API or read from a file) larger than this",
        ),
        Bound(
            "max_manifest_bytes",
            4 * MiB,
            "KEYSTONE_MAX_MANIFEST_BYTES",
            "bytes",
            "a bundle, dataset or artifact manifest larger than this, before it is parsed",
        ),
        Bound(
            "max_header_line_bytes",
            8 << 10,
            "KEYSTONE_MAX_HEADER_LINE_BYTES",
            "bytes",
            "an HTTP header line (of an answer the agent reads, or of an API request) "
            "longer than this",
        ),
        Bound(
            "max_headers",
            100,
            "KEYSTONE_MAX_HEADERS",
            "headers",
            "an HTTP answer the agent reads, or an API request, with more header lines than this",
        ),
        Bound(
            "max_request_bytes",
            4 * MiB,
            "KEYSTONE_MAX_REQUEST_BYTES",
            "bytes",
            "an API request body larger than this (a bundle upload has max_bundle_bytes)",
        ),
        Bound(
            "max_api_connections",
            32,
            "KEYSTONE_MAX_API_CONNECTIONS",
            "connections",
            "API connections beyond this many at once: the oldest idle one is closed, "
            "else the new one is answered 503",
        ),
    )
}


def how_to_raise(name: str) -> str:
    """``raise it with KEYSTONE_... or [limits] name in agent.toml`` for bound ``name``."""
    return f"raise it with {BOUNDS[name].env} or [limits] {name} in agent.toml"


def human(value: int, unit: str = "bytes") -> str:
    if unit == "bytes":
        for div, suffix in ((1 << 30, "GiB"), (MiB, "MiB"), (1 << 10, "KiB")):
            if value >= div and value % div == 0:
                return f"{value // div} {suffix}"
        return f"{value} bytes"
    return f"{value} {unit}"


@dataclass(frozen=True)
class Limits:
    """The bounds in force; every field is named after its ``Bound``."""

    max_recipe_bytes: int = BOUNDS["max_recipe_bytes"].default
    max_plan_bytes: int = BOUNDS["max_plan_bytes"].default
    max_config_bytes: int = BOUNDS["max_config_bytes"].default
    max_components: int = BOUNDS["max_components"].default
    max_toml_depth: int = BOUNDS["max_toml_depth"].default
    max_ref_advertisement_bytes: int = BOUNDS["max_ref_advertisement_bytes"].default
    max_refs: int = BOUNDS["max_refs"].default
    max_pack_bytes: int = BOUNDS["max_pack_bytes"].default
    max_bundle_bytes: int = BOUNDS["max_bundle_bytes"].default
    max_manifest_bytes: int = BOUNDS["max_manifest_bytes"].default
    max_header_line_bytes: int = BOUNDS["max_header_line_bytes"].default
    max_headers: int = BOUNDS["max_headers"].default
    max_request_bytes: int = BOUNDS["max_request_bytes"].default
    max_api_connections: int = BOUNDS["max_api_connections"].default

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, base: Limits | None = None
    ) -> Limits:
        """``base`` (the config file's values, else the defaults) with environment overrides.

        Raises:
            UsageError: a variable that is not a positive whole number.
        """
        env = os.environ if environ is None else environ
        out = base or cls()
        for f in fields(cls):
            bound = BOUNDS[f.name]
            raw = env.get(bound.env)
            if raw is None or raw.strip() == "":
                continue
            out = replace(out, **{f.name: parse_bound(bound, raw, where=bound.env)})
        return out

    def environ(self) -> dict[str, str]:
        """Every bound as its environment variable, for a worker process to read back with
        ``from_env`` (so that ``[limits]`` in agent.toml reaches the sync and artifact workers)."""
        return {BOUNDS[f.name].env: str(getattr(self, f.name)) for f in fields(self)}

    def refuse(
        self,
        name: str,
        actual: int | str,
        *,
        what: str,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> LimitExceeded:
        """The refusal for ``what`` being over bound ``name`` (``actual`` as measured)."""
        bound = BOUNDS[name]
        limit = int(getattr(self, name))
        over = actual if isinstance(actual, str) else human(actual, bound.unit)
        return LimitExceeded(
            f"{what} is over the limit ({over}; the limit is {human(limit, bound.unit)}): "
            + how_to_raise(name),
            bound=name,
            limit=limit,
            file=file,
            line=line,
            field=field,
        )

    def check_headers(self, lines: Iterable[tuple[str | bytes, str | bytes]], *, what: str) -> None:
        """Refuse a header block with more than ``max_headers`` lines or a line longer than
        ``max_header_line_bytes`` (``name: value``, without the line end).

        Raises:
            LimitExceeded: naming the bound, the header and ``what`` sent it.
        """
        for count, (name, value) in enumerate(lines, 1):
            if count > self.max_headers:
                raise self.refuse(
                    "max_headers",
                    f"more than {self.max_headers} headers",
                    what=f"the header block of {what}",
                )
            size = len(name) + len(value) + 2
            if size > self.max_header_line_bytes:
                shown = name.decode("latin-1") if isinstance(name, bytes) else name
                raise self.refuse(
                    "max_header_line_bytes",
                    size,
                    what=f"the header line {shown[:64]!r} of {what}",
                )


def parse_bound(bound: Bound, raw: object, *, where: str) -> int:
    """A bound's value from the environment or the config: a whole number >= 1."""
    if isinstance(raw, bool):
        raise UsageError(f"{where}: expected a whole number >= 1 for {bound.name}, got {raw!r}")
    try:
        if isinstance(raw, str) and bound.unit == "bytes":
            value: object = parse_size(raw.strip())
        else:
            value = int(raw.strip(), 10) if isinstance(raw, str) else raw
    except ValueError:
        value = None
    if not isinstance(value, int) or value < 1:
        raise UsageError(f"{where}: expected a whole number >= 1 for {bound.name}, got {raw!r}")
    return value


def byte_length(text: str) -> int:
    """UTF-8 length of ``text`` without encoding it when it is ASCII."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def read_bounded(
    path: os.PathLike[str] | str,
    *,
    limits: Limits,
    bound: str,
    display: str,
    what: str,
    max_bytes: int | None = None,
) -> str:
    """Read a regular UTF-8 file of at most ``max_bytes`` (default: the value of ``bound``
    in ``limits``) without reading more than that.

    The size is checked with ``fstat`` before reading, and the read stops one byte past the
    bound, so a huge file is refused without being held in memory. A FIFO or device is refused
    (opened non-blocking, so a FIFO without a writer does not hang).

    Raises:
        ValidationError: the file is missing, unreadable, not a regular file or not UTF-8
            (naming ``display``); ``LimitExceeded`` when it is larger than ``max_bytes``.
    """
    if max_bytes is None:
        max_bytes = int(getattr(limits, bound))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ValidationError(f"{what} file not found", file=display) from None
    except ValueError as exc:  # a NUL byte in the path
        raise ValidationError(f"cannot open {what}: invalid path ({exc})", file=display) from None
    except OSError as exc:
        raise ValidationError(
            f"cannot open {what}: {exc.strerror or exc}", file=display[:512]
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ValidationError(f"cannot read {what}: {kind}", file=display)
        if st.st_size > max_bytes:
            raise limits.refuse(bound, st.st_size, what=f"{what} file", file=display)
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 16, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:  # the file grew after fstat
            raise limits.refuse(
                bound, f"more than {human(max_bytes, 'bytes')}", what=f"{what} file", file=display
            )
    except OSError as exc:
        raise ValidationError(f"cannot read {what}: {exc.strerror or exc}", file=display) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValidationError(
            f"not UTF-8 text (byte {exc.start}: {exc.reason})", file=display, line=line
        ) from None

"""API credentials and addresses: the bearer token, TLS settings, the listen address."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from loguru import logger

from keystone.errors import UsageError
from keystone.openssl import sha256, token_urlsafe
from keystone.state import atomic_write
from keystone.statefile import RECOVERIES, StateDamage, read_state, report_missing

TOKEN_FILE = "api.token"


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate and key (PEM); with ``client_ca``, clients must present a
    certificate issued by that CA (mTLS) or the TLS handshake fails."""

    cert: Path
    key: Path
    client_ca: Path | None = None


# --- token ----------------------------------------------------------------------------------


def read_token_file(path: Path) -> str | None:
    """The token stored in ``path``, or None when the file is missing or unreadable.

    A file that does not hold one token (not UTF-8, empty, whitespace or control characters
    inside, too long) is damaged: it is set aside and reported (:mod:`keystone.statefile`), and
    a new token is generated in its place.
    """
    return read_state(path, _token_schema, raw=True, max_bytes=MAX_TOKEN_BYTES)


MAX_TOKEN_BYTES = 4096


def _token_schema(data: bytes) -> str:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise StateDamage(f"is not UTF-8 text (byte {exc.start})") from None
    if not text:
        raise StateDamage("is empty")
    if any(c.isspace() or not c.isprintable() for c in text):
        raise StateDamage("holds more than one token (whitespace or control characters)")
    return text


def resolve_token(runtime_dir: Path, environ: Mapping[str, str]) -> str:
    """The API token: ``KEYSTONE_API_TOKEN`` if set, else ``runtime_dir/api.token``.

    At first start the file does not exist: a random token is generated and written atomically
    with mode 0600 (never readable by other users, whatever the umask). A file found with looser
    permissions is tightened, since the token grants full control of the device.
    """
    explicit = environ.get("KEYSTONE_API_TOKEN", "").strip()
    if explicit:
        return explicit
    return token_from_file(runtime_dir / TOKEN_FILE)


def token_from_file(path: Path) -> str:
    """The token stored in ``path``; a new random one (written 0600) when there is none."""
    token = read_token_file(path)
    if token is not None:
        try:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
                logger.warning("{}: permissions were wider than 0600; tightened", path)
        except OSError as exc:
            logger.warning("{}: cannot check permissions: {}", path, exc)
        return token
    reported = any(r.path == str(path) for r in RECOVERIES)
    if (path.parent / "state" / "agent.json").exists() and not path.exists() and not reported:
        report_missing(path, "the agent ran here before; a new token is generated")
    token = token_urlsafe(32)
    try:
        atomic_write(path, (token + "\n").encode(), mode=0o600)
    except OSError as exc:
        raise UsageError(
            f"cannot write the API token to {path}: {exc.strerror or exc}; make the runtime "
            "directory writable or set KEYSTONE_API_TOKEN"
        ) from exc
    logger.info("generated an API token in {} (mode 0600)", path)
    return token


def digest(token: str) -> bytes:
    # Comparing fixed-size digests keeps the comparison constant-time in the token's length too.
    return sha256(token.encode("utf-8", "surrogateescape")).digest()


# --- listen address -------------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``127.0.0.1:8080``, ``[::1]:8080``, ``localhost:8080`` or ``:8080`` (every interface,
    as in Go) into host and port. Raises UsageError naming the expected form."""
    text = listen.strip()
    if "://" in text:
        text = urlsplit(text).netloc
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^\[\]:]*)):(\d{1,5})", text)
    if not m or int(m.group(3)) > 65535:
        raise UsageError(
            f"API listen address {listen!r}: expected host:port, e.g. 127.0.0.1:8080 or [::1]:8080"
        )
    host = m.group(1) if m.group(1) is not None else (m.group(2) or "0.0.0.0")
    return host, int(m.group(3))


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

"""Git's signed objects: the exact payload git signs, the signature block and the committer time."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SIG_PREFIXES: tuple[tuple[str, bytes], ...] = (
    # git's get_format_by_sig(): the first format whose marker starts the signature wins.
    ("openpgp", b"-----BEGIN PGP SIGNATURE-----"),
    ("openpgp", b"-----BEGIN PGP MESSAGE-----"),
    ("x509", b"-----BEGIN SIGNED MESSAGE-----"),
    ("ssh", b"-----BEGIN SSH SIGNATURE-----"),
)
_C_SPACE = b" \t\n\v\f\r"


@dataclass(frozen=True)
class SignatureBlock:
    """The signature git extracted from a commit's ``gpgsig`` header.

    Attributes:
        armored: the signature text exactly as git hands it to the verifier (continuation lines
            joined, their leading space removed, ending in a newline).
        header: ``gpgsig`` (SHA-1 repositories) or ``gpgsig-sha256`` (SHA-256 repositories).
        format: ``ssh``, ``openpgp``, ``x509`` or ``unknown``, from the armor line as git decides.
    """

    armored: bytes
    header: str
    format: str


def _signature_format(armored: bytes) -> str:
    for name, prefix in _SIG_PREFIXES:
        if armored.startswith(prefix):
            return name
    return "unknown"


def split_signed_object(raw: bytes) -> tuple[bytes, SignatureBlock | None, int | None]:
    """Split a raw commit object into git's signed payload, its signature and the commit time.

    Args:
        raw: the object content as ``git cat-file commit REV`` prints it (no ``commit <len>\\0``
            header).

    Returns:
        ``(payload, signature, committer_time)``. ``payload`` is byte-identical to what
        ``git verify-commit`` feeds the verifier: the object without the ``gpgsig`` header of
        the repository's hash (``gpgsig-sha256`` for SHA-256 repositories) and without the other
        signature header either; ``mergetag`` and every other header stay. ``signature`` is
        ``None`` for an unsigned commit. ``committer_time`` is the committer timestamp in epoch
        seconds that git uses as the verification time, or ``None`` when the committer line
        has no usable date.
    """
    # git picks the header by the repository's hash; a commit's tree id tells which one it is.
    first = raw.split(b"\n", 1)[0]
    header = b"gpgsig-sha256" if len(first) == 5 + 64 and first.startswith(b"tree ") else b"gpgsig"
    payload = bytearray()
    signature = bytearray()
    in_signature = saw_signature = other_signature = False
    pos, tail = 0, len(raw)
    # This loop is git's parse_buffer_signed_by_header() (commit.c), kept in its shape on
    # purpose: the payload must be byte-identical for every odd object, not only tidy ones.
    while pos < tail:
        nl = raw.find(b"\n", pos)
        nxt = tail if nl < 0 else nl + 1
        line = raw[pos:nxt]
        sig_start = -1
        if in_signature and line[:1] == b" ":
            sig_start = pos + 1
        elif line.startswith(header) and line[len(header) : len(header) + 1] == b" ":
            sig_start = pos + len(header) + 1
            other_signature = False
        elif line.startswith(b"gpgsig"):
            other_signature = True
        elif other_signature and line[:1] != b" ":
            other_signature = False
        if sig_start >= 0:
            signature += raw[sig_start:nxt]
            saw_signature = in_signature = True
        else:
            if line[:1] == b"\n":
                nxt = tail  # the message: everything that follows is payload
            if not other_signature:
                payload += raw[pos:nxt]
            in_signature = False
        pos = nxt
    block = None
    if saw_signature:
        armored = bytes(signature)
        block = SignatureBlock(armored, header.decode(), _signature_format(armored))
    return bytes(payload), block, _committer_time(bytes(payload))


def _committer_time(payload: bytes) -> int | None:
    """The committer date as git's parse_payload_metadata() reads it, or None."""
    text = payload.split(b"\0", 1)[0]  # git searches a C string
    for line in text.split(b"\n"):
        if not line:
            return None  # end of headers
        if len(line) > len(b"committer") and line.startswith(b"committer "):
            return _ident_timestamp(line[len(b"committer ") :])
    return None


def _ident_timestamp(ident: bytes) -> int | None:
    """The date of ``Name <mail> 1700000000 +0000`` as git's split_ident_line() finds it."""
    lt = ident.find(b"<")
    if lt < 0 or ident.find(b">", lt + 1) < 0:
        return None
    cp = ident.rfind(b">") + 1
    while cp < len(ident) and ident[cp] in _C_SPACE:
        cp += 1
    m = re.match(rb"(\d+)[ \t\n\v\f\r]*[+-]\d", ident[cp:])
    if m is None:
        return None  # git: "person only", no date
    value = int(m.group(1))
    return value or None

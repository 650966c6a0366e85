"""Commit signature verification that reaches git's own verdict, without running git.

Git verifies an SSH-signed commit with ``ssh-keygen -Y find-principals`` and then
``ssh-keygen -Y verify -I <principal>`` for each principal found, at the commit's committer time
(``-Overify-time``); an OpenPGP-signed commit with ``gpg --verify``. This module re-creates that
decision on raw git object bytes:

* :func:`split_signed_object` cuts a commit into git's exact signed payload, its signature and
  the committer time;
* :func:`load_allowed_signers` reads an allowed-signers file (``man ssh-keygen``, ALLOWED
  SIGNERS) with OpenSSH's grammar, reporting a bad line with file and line number;
* SSHSIG signatures (PROTOCOL.sshsig) are checked with ``cryptography``: ssh-ed25519,
  ecdsa-sha2-nistp256/384/521 and ssh-rsa keys with rsa-sha2-256/512 signatures, plain keys or
  OpenSSH user certificates (``cert-authority``); sha256/sha512 message hashes only;
* OpenPGP signatures go through ``gpg --homedir <dedicated home> --status-fd``;
* :class:`CommitVerifier` joins them into a :class:`Verdict`.

The rules follow OpenSSH 9.2's ``sshsig.c`` and git 2.39's ``gpg-interface.c`` line by line where
they decide an outcome; the integration tests compare every verdict with ``git verify-commit``.
Where keystone is stricter than git it says so in the reason: a malformed allowed-signers or
revocation file refuses every SSH signature (ssh-keygen skips a bad allowed-signers line), a
configured revocation file that is missing refuses (git warns and ignores it), SHA-1 RSA
signatures are refused in certificates too, and a commit without a committer time is refused
(git then falls back to the wall clock).

Imports of ``cryptography`` happen inside the functions that need it: this module is loaded by
the short-lived sync worker and the CLI, never kept in the resident agent.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keystone.errors import SignatureError, ValidationError

__all__ = [
    "AllowedSigner",
    "CommitVerifier",
    "SignatureBlock",
    "SshCertificate",
    "SshKey",
    "SshSignature",
    "TrustPolicy",
    "Verdict",
    "load_allowed_signers",
    "load_revoked_keys",
    "match_pattern",
    "match_pattern_list",
    "parse_absolute_time",
    "parse_allowed_signers_line",
    "parse_public_key",
    "parse_ssh_signature",
    "split_signed_object",
]

# --------------------------------------------------------------------------------------------
# Git objects
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# OpenSSH patterns and times
# --------------------------------------------------------------------------------------------


def match_pattern(s: str, pattern: str) -> bool:
    """OpenSSH ``match_pattern()``: ``*`` matches any run, ``?`` one byte, the rest itself.

    Like OpenSSH it works on bytes (UTF-8), so ``?`` matches one byte, not one character.
    """
    return _match_bytes(
        s.encode(errors="surrogateescape"), pattern.encode(errors="surrogateescape")
    )


def _match_bytes(s: bytes, pattern: bytes) -> bool:
    # Iterative wildcard matching: the same language as OpenSSH's recursive version.
    si = pi = 0
    star_p = star_s = -1
    while si < len(s):
        if pi < len(pattern) and pattern[pi] in (0x3F, s[si]):  # "?" or the same byte
            si += 1
            pi += 1
        elif pi < len(pattern) and pattern[pi] == 0x2A:  # "*"
            star_p, star_s = pi, si
            pi += 1
        elif star_p >= 0:
            star_s += 1
            si, pi = star_s, star_p + 1
        else:
            return False
    while pi < len(pattern) and pattern[pi] == 0x2A:
        pi += 1
    return pi == len(pattern)


def match_pattern_list(s: str, patterns: str) -> int:
    """OpenSSH ``match_pattern_list()`` (case-sensitive).

    Returns:
        ``1`` when a positive pattern of the comma-separated list matches, ``-1`` when a
        negated one (``!pattern``) matches (negation wins), ``0`` when none does.
    """
    got_positive = 0
    target = s.encode(errors="surrogateescape")
    for sub in patterns.encode(errors="surrogateescape").split(b","):
        negated = sub.startswith(b"!")
        if negated:
            sub = sub[1:]
        if len(sub) >= 1023:
            return 0  # OpenSSH's subpattern buffer: an overlong pattern matches nothing
        if _match_bytes(target, sub):
            if negated:
                return -1
            got_positive = 1
    return got_positive


_TIME_RE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})(?:([0-9]{2})([0-9]{2})([0-9]{2})?)?")


def parse_absolute_time(text: str) -> int:
    """Parse an OpenSSH absolute time as ssh-keygen does: ``YYYYMMDD[HHMM[SS]]`` [``Z``|``UTC``].

    Without ``Z``/``UTC`` the time is local, with ``tm_isdst = 0`` as OpenSSH's
    ``parse_absolute_time()`` passes it to ``mktime()``.

    Raises:
        ValueError: the text is not such a time, or it is not after 1970-01-01 00:00:00 UTC.
    """
    s = text
    utc = False
    if len(s) > 1 and s[-1] in "Zz":
        utc, s = True, s[:-1]
    elif len(s) > 3 and s[-3:].upper() == "UTC":
        utc, s = True, s[:-3]
    m = _TIME_RE.fullmatch(s) if len(s) in (8, 12, 14) else None
    if m is None:
        raise ValueError(f"{text!r} is not YYYYMMDD, YYYYMMDDHHMM or YYYYMMDDHHMMSS (optional Z)")
    year, month, day = int(m[1]), int(m[2]), int(m[3])
    hour, minute, second = int(m[4] or 0), int(m[5] or 0), int(m[6] or 0)
    # strptime's ranges (glibc): %m 1-12, %d 1-31, %H 0-23, %M 0-59, %S 0-61.
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59 and second <= 61):
        raise ValueError(f"{text!r} has a field out of range")
    fields = (year, month, day, hour, minute, second)
    try:
        value = int(calendar.timegm((*fields, 0, 0, 0)) if utc else time.mktime((*fields, 0, 0, 0)))
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"{text!r} is out of range") from exc
    if value <= 0:
        raise ValueError(f"{text!r} is not after 1970-01-01")
    return value


def _ssh_verify_time(commit_time: int) -> int | None:
    """The verify time ssh-keygen ends up with when git passes it a commit's time.

    git formats the committer timestamp as local ``%Y%m%d%H%M%S`` (``-Overify-time=``) and
    ssh-keygen parses that back with ``mktime(tm_isdst = 0)``; in zones without daylight saving
    the result is the timestamp itself, during summer time it is one hour later. Emulated so
    that a verdict near a ``valid-before``/``valid-after`` edge is git's.
    """
    try:
        return parse_absolute_time(time.strftime("%Y%m%d%H%M%S", time.localtime(commit_time)))
    except (OverflowError, ValueError, OSError):
        return None


def _fmt_time(epoch: int) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
    except (OverflowError, ValueError, OSError):
        return str(epoch)


# --------------------------------------------------------------------------------------------
# SSH wire format and keys
# --------------------------------------------------------------------------------------------


class _WireError(ValueError):
    """Malformed SSH wire data."""


class _BadSignature(Exception):
    """A signature or key that does not verify or is not accepted; ``kind`` classifies it."""

    def __init__(self, reason: str, kind: str = "bad-signature") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _WireError("truncated data")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return int.from_bytes(self._take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self._take(8), "big")

    def string(self) -> bytes:
        return self._take(self.u32())

    def cstring(self) -> str:
        value = self.string()
        if b"\0" in value:
            raise _WireError("string with an embedded NUL")
        try:
            return value.decode()
        except UnicodeDecodeError as exc:
            raise _WireError("string that is not UTF-8") from exc

    def mpint(self) -> int:
        raw = self.string()
        if raw and raw[0] & 0x80:
            raise _WireError("negative integer")
        raw = raw.lstrip(b"\0")
        if len(raw) > 16384 // 8:
            raise _WireError("integer too large")
        return int.from_bytes(raw, "big")

    def done(self) -> bool:
        return self.pos == len(self.data)

    def end(self, what: str) -> None:
        if not self.done():
            raise _WireError(f"trailing data after {what}")


def _ssh_string(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def _mpint_bytes(value: int) -> bytes:
    """Canonical SSH mpint encoding of a non-negative integer."""
    if value == 0:
        return _ssh_string(b"")
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    if raw[0] & 0x80:
        raw = b"\0" + raw
    return _ssh_string(raw)


_CURVES = {
    "ecdsa-sha2-nistp256": ("nistp256", "SECP256R1", "SHA256"),
    "ecdsa-sha2-nistp384": ("nistp384", "SECP384R1", "SHA384"),
    "ecdsa-sha2-nistp521": ("nistp521", "SECP521R1", "SHA512"),
    "sk-ecdsa-sha2-nistp256@openssh.com": ("nistp256", "SECP256R1", "SHA256"),
}
_PLAIN_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "ssh-dss",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
_CERT_SUFFIX = "-cert-v01@openssh.com"
# Key types this module can check a signature of; the others parse (so a file that lists them
# is valid, as for ssh-keygen) but a signature made with them is refused with a reason.
_VERIFIABLE = frozenset(
    {"ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa"}
)
_RSA_MIN_BITS = 1024  # OpenSSH's SSH_RSA_MINIMUM_MODULUS_SIZE
_RSA_SIG_HASHES = {"rsa-sha2-256": "SHA256", "rsa-sha2-512": "SHA512"}


def _cert_type_name(name: str) -> str:
    # "sk-ssh-ed25519@openssh.com" -> "sk-ssh-ed25519-cert-v01@openssh.com"
    if name.endswith("@openssh.com"):
        return name[: -len("@openssh.com")] + _CERT_SUFFIX
    return name + _CERT_SUFFIX


_CERT_TYPES = {_cert_type_name(t): t for t in _PLAIN_TYPES}
KEY_TYPES = frozenset(_PLAIN_TYPES) | frozenset(_CERT_TYPES)


@dataclass(frozen=True)
class SshCertificate:
    """The fields of an OpenSSH certificate that verification looks at."""

    serial: int
    cert_type: int  # 1 user, 2 host
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    ca: SshKey
    signature_type: str


@dataclass(frozen=True)
class SshKey:
    """An SSH public key or certificate, parsed and validated.

    Attributes:
        type: the blob's type name (``ssh-ed25519``, ``ssh-ed25519-cert-v01@openssh.com``, ...).
        plain_type: the type of the key itself (a certificate's certified key).
        public: the canonical plain public key blob: what equality and fingerprints use.
        blob: the canonical blob (for a certificate, the certificate as it was given).
        params: the key material (``(pk,)``, ``(curve, point)``, ``(e, n)``, ...).
        cert: the certificate fields, or ``None`` for a plain key.
    """

    type: str
    plain_type: str
    public: bytes
    blob: bytes = field(repr=False)
    params: tuple[Any, ...] = field(repr=False)
    cert: SshCertificate | None = None

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` as ``ssh-keygen -lf`` prints it (of the plain key for a certificate)."""
        digest = hashlib.sha256(self.public).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def same_key(self, other: SshKey) -> bool:
        """OpenSSH ``sshkey_equal()``: same type, same certificate if any, same public key."""
        if self.type != other.type or self.public != other.public:
            return False
        return self.cert is None or self.blob == other.blob

    def same_public(self, other: SshKey) -> bool:
        """OpenSSH ``sshkey_equal_public()``: the same key material, certificate or not."""
        return self.public == other.public


def _read_plain_fields(r: _Reader, plain: str) -> tuple[bytes, tuple[Any, ...]]:
    """Read the key fields of ``plain`` from ``r``; return the canonical public blob and params."""
    head = _ssh_string(plain.encode())
    if plain in ("ssh-ed25519", "sk-ssh-ed25519@openssh.com"):
        pk = r.string()
        if len(pk) != 32:
            raise _WireError("ed25519 public key is not 32 bytes")
        if plain == "ssh-ed25519":
            return head + _ssh_string(pk), (pk,)
        app = r.string()
        return head + _ssh_string(pk) + _ssh_string(app), (pk, app)
    if plain in _CURVES:
        curve_name, curve_attr, _ = _CURVES[plain]
        if r.string() != curve_name.encode():
            raise _WireError("ECDSA curve does not match the key type")
        point = _canonical_point(curve_attr, r.string())
        body = head + _ssh_string(curve_name.encode()) + _ssh_string(point)
        if plain.startswith("sk-"):
            app = r.string()
            return body + _ssh_string(app), (curve_attr, point, app)
        return body, (curve_attr, point)
    if plain == "ssh-rsa":
        e, n = r.mpint(), r.mpint()
        if n.bit_length() < _RSA_MIN_BITS:
            raise _WireError(f"RSA key of {n.bit_length()} bits, below {_RSA_MIN_BITS}")
        if e < 3 or e % 2 == 0:
            raise _WireError("RSA public exponent is not valid")
        return head + _mpint_bytes(e) + _mpint_bytes(n), (e, n)
    if plain == "ssh-dss":
        p, q, g, y = r.mpint(), r.mpint(), r.mpint(), r.mpint()
        return head + b"".join(_mpint_bytes(x) for x in (p, q, g, y)), (p, q, g, y)
    raise _WireError(f"unknown key type {plain!r}")


def _canonical_point(curve_attr: str, encoded: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    curve = getattr(ec, curve_attr)()
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(curve, encoded)
    except ValueError as exc:
        raise _WireError("ECDSA public key is not a point on its curve") from exc
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def parse_public_key(blob: bytes) -> SshKey:
    """Parse an SSH public key or certificate blob, validating it as OpenSSH does.

    A certificate's CA signature is verified here, as OpenSSH does when it loads one.

    Raises:
        ValidationError: malformed, unknown type, RSA below 1024 bits, or a certificate whose
            CA signature does not verify.
    """
    try:
        return _parse_key(blob)
    except _WireError as exc:
        raise ValidationError(f"invalid SSH public key: {exc}") from exc
    except _BadSignature as exc:
        raise ValidationError(f"invalid SSH certificate: {exc.reason}") from exc


def _parse_key(blob: bytes) -> SshKey:
    r = _Reader(blob)
    name = r.cstring()
    if name in _PLAIN_TYPES:
        public, params = _read_plain_fields(r, name)
        r.end("the public key")
        return SshKey(name, name, public, public, params)
    plain = _CERT_TYPES.get(name)
    if plain is None:
        raise _WireError(f"unknown key type {name!r}")
    r.string()  # nonce
    public, params = _read_plain_fields(r, plain)
    serial, cert_type, key_id = r.u64(), r.u32(), r.cstring()
    principals_r = _Reader(r.string())
    valid_after, valid_before = r.u64(), r.u64()
    critical, extensions = _Reader(r.string()), _Reader(r.string())
    r.string()  # reserved
    ca_blob = r.string()
    signed_len = r.pos
    ca_sig = r.string()
    r.end("the certificate")
    if cert_type not in (1, 2):
        raise _WireError(f"unknown certificate type {cert_type}")
    principals: list[str] = []
    while not principals_r.done():
        if len(principals) >= 256:
            raise _WireError("certificate lists more than 256 principals")
        principals.append(principals_r.cstring())
    for section in (critical, extensions):
        while not section.done():
            section.string()
            section.string()
    ca = _parse_key(ca_blob)
    if ca.cert is not None or ca.plain_type not in _VERIFIABLE:
        raise _BadSignature(f"certificate signed by a {ca.type} CA key, which is not supported")
    sig_type = _verify_raw(ca, ca_sig, blob[:signed_len], what="certificate CA signature")
    cert = SshCertificate(
        serial, cert_type, key_id, tuple(principals), valid_after, valid_before, ca, sig_type
    )
    return SshKey(name, plain, public, blob, params, cert)


def _verify_raw(key: SshKey, sig_blob: bytes, data: bytes, *, what: str) -> str:
    """Verify an SSH signature blob (``string type, string sig``) over ``data`` with ``key``.

    Returns:
        The signature's algorithm name.

    Raises:
        _BadSignature: malformed, unsupported (e.g. SHA-1 ``ssh-rsa``) or not matching.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

    plain = key.plain_type
    try:
        r = _Reader(sig_blob)
        sig_type = r.cstring()
        if plain not in _VERIFIABLE:
            raise _BadSignature(
                f"{what}: {plain} signatures are not supported (use ssh-ed25519, ECDSA or RSA)",
                "unsupported",
            )
        if plain == "ssh-rsa":
            if sig_type == "ssh-rsa":
                raise _BadSignature(
                    f"{what}: RSA signature made with SHA-1 (ssh-rsa), which is refused; "
                    "sign with rsa-sha2-256 or rsa-sha2-512",
                    "unsupported",
                )
            hash_name = _RSA_SIG_HASHES.get(sig_type)
            if hash_name is None:
                raise _BadSignature(f"{what}: unknown RSA signature algorithm {sig_type!r}")
            sig = r.string()
            r.end("the signature")
            e, n = key.params
            modlen = (n.bit_length() + 7) // 8
            if len(sig) > modlen:
                raise _BadSignature(f"{what}: RSA signature longer than the modulus")
            rsa.RSAPublicNumbers(e, n).public_key().verify(
                sig.rjust(modlen, b"\0"), data, padding.PKCS1v15(), getattr(hashes, hash_name)()
            )
            return sig_type
        if sig_type != plain:
            raise _BadSignature(f"{what}: signature type {sig_type!r} does not match a {plain} key")
        if plain == "ssh-ed25519":
            sig = r.string()
            r.end("the signature")
            if len(sig) != 64:
                raise _BadSignature(f"{what}: Ed25519 signature is not 64 bytes")
            ed25519.Ed25519PublicKey.from_public_bytes(key.params[0]).verify(sig, data)
            return sig_type
        inner = _Reader(r.string())
        r.end("the signature")
        sig_r, sig_s = inner.mpint(), inner.mpint()
        inner.end("the ECDSA signature")
        if sig_r == 0 or sig_s == 0:
            raise _BadSignature(f"{what}: ECDSA signature with a zero component")
        curve_attr, point = key.params[0], key.params[1]
        pub = ec.EllipticCurvePublicKey.from_encoded_point(getattr(ec, curve_attr)(), point)
        hash_name = _CURVES[plain][2]
        pub.verify(
            utils.encode_dss_signature(sig_r, sig_s),
            data,
            ec.ECDSA(getattr(hashes, hash_name)()),
        )
        return sig_type
    except InvalidSignature as exc:
        raise _BadSignature(f"{what} does not verify") from exc
    except _WireError as exc:
        raise _BadSignature(f"{what} is malformed: {exc}") from exc


def _read_key_text(text: str) -> tuple[SshKey | None, str, str]:
    """OpenSSH ``sshkey_read()``: ``keytype base64 [...]`` at the start of ``text``.

    Returns:
        ``(key, rest, error)``: the key and the text after it (the comment), or ``None`` and why.
    """
    space = min((i for i in (text.find(" "), text.find("\t")) if i >= 0), default=-1)
    if space < 0:
        missing = "key data" if text.strip() in KEY_TYPES else "key type or key data"
        return None, text, f"missing {missing}"
    type_name = text[:space]
    if type_name not in KEY_TYPES:
        return None, text, f"unknown key type {type_name!r}"
    cp = text[space:].lstrip(" \t")
    if not cp:
        return None, text, "missing key data"
    end = min((i for i in (cp.find(" "), cp.find("\t")) if i >= 0), default=len(cp))
    b64 = "".join(cp[:end].split())
    try:
        blob = base64.b64decode(b64, validate=True)
    except ValueError:
        return None, text, "key data is not base64"
    try:
        key = _parse_key(blob)
    except (_WireError, _BadSignature) as exc:
        reason = exc.reason if isinstance(exc, _BadSignature) else str(exc)
        return None, text, f"invalid {type_name} key: {reason}"
    if key.type != type_name:
        return None, text, f"key type {type_name} does not match the key data ({key.type})"
    return key, cp[end:].lstrip(" \t"), ""


# --------------------------------------------------------------------------------------------
# SSHSIG signatures
# --------------------------------------------------------------------------------------------

_SSHSIG_BEGIN = b"-----BEGIN SSH SIGNATURE-----\n"
_SSHSIG_END = b"\n-----END SSH SIGNATURE-----"
_SSHSIG_HASHES = {"sha256": "sha256", "sha512": "sha512"}


@dataclass(frozen=True)
class SshSignature:
    """A parsed SSHSIG signature (PROTOCOL.sshsig)."""

    key: SshKey
    namespace: str
    hash_algorithm: str
    signature: bytes = field(repr=False)

    def verify(self, message: bytes, *, namespace: str = "git") -> None:
        """Check that this signature covers ``message`` in ``namespace``.

        Raises:
            SignatureError: wrong namespace, refused algorithm or a signature that does not match.
        """
        try:
            self._check(message, namespace)
        except _BadSignature as exc:
            raise SignatureError(exc.reason) from exc

    def _check(self, message: bytes, namespace: str) -> None:
        if self.namespace != namespace:
            raise _BadSignature(
                f'signature namespace is "{self.namespace}", not "{namespace}"', "namespace"
            )
        digest = hashlib.new(_SSHSIG_HASHES[self.hash_algorithm], message).digest()
        signed = (
            b"SSHSIG"
            + _ssh_string(namespace.encode())
            + _ssh_string(b"")
            + _ssh_string(self.hash_algorithm.encode())
            + _ssh_string(digest)
        )
        _verify_raw(self.key, self.signature, signed, what="signature")


def parse_ssh_signature(armored: bytes) -> SshSignature:
    """Parse an armored SSH signature (``-----BEGIN SSH SIGNATURE-----``).

    Checks the magic, the version (1), the hash algorithm (sha256 or sha512 only) and the
    signing key (a certificate's CA signature included); :meth:`SshSignature.verify` checks
    the rest.

    Raises:
        SignatureError: with the reason, for anything malformed or refused.
    """
    try:
        return _parse_ssh_signature(armored)
    except _BadSignature as exc:
        raise SignatureError(exc.reason) from exc


def _parse_ssh_signature(armored: bytes) -> SshSignature:
    if not armored.startswith(_SSHSIG_BEGIN):
        raise _BadSignature("SSH signature armor: missing header")
    end = armored.find(_SSHSIG_END, len(_SSHSIG_BEGIN))
    if end < 0:
        raise _BadSignature("SSH signature armor: missing footer")
    try:
        blob = base64.b64decode(b"".join(armored[len(_SSHSIG_BEGIN) : end].split()), validate=True)
    except ValueError as exc:
        raise _BadSignature("SSH signature armor: body is not base64") from exc
    try:
        r = _Reader(blob)
        if r._take(6) != b"SSHSIG":
            raise _BadSignature("not an SSHSIG signature (bad magic)")
        version = r.u32()
        if version != 1:
            raise _BadSignature(f"SSHSIG version {version} is not supported (only 1)")
        key_blob = r.string()
        namespace = r.cstring()
        r.string()  # reserved
        hash_alg = r.cstring()
        sig = r.string()
        r.end("the signature")
    except _WireError as exc:
        raise _BadSignature(f"SSH signature is malformed: {exc}") from exc
    if hash_alg not in _SSHSIG_HASHES:
        raise _BadSignature(
            f"SSH signature uses hash {hash_alg!r}; only sha256 and sha512 are accepted",
            "unsupported",
        )
    try:
        key = _parse_key(key_blob)
    except _WireError as exc:
        raise _BadSignature(f"signing key is malformed or not supported: {exc}") from exc
    return SshSignature(key, namespace, hash_alg, sig)


# --------------------------------------------------------------------------------------------
# Allowed signers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllowedSigner:
    """One line of an allowed-signers file.

    Attributes:
        principals: the comma-separated principal pattern list, as written.
        key: the public key (the CA key when ``cert_authority``).
        namespaces: the ``namespaces="..."`` pattern list, or ``None`` (any namespace).
        valid_after: ``valid-after`` in epoch seconds, or ``None``.
        valid_before: ``valid-before`` in epoch seconds, or ``None``.
        cert_authority: the key is a CA that certifies the signers.
        file: the file it came from. line: its line number (1-based).
    """

    principals: str
    key: SshKey
    namespaces: str | None = None
    valid_after: int | None = None
    valid_before: int | None = None
    cert_authority: bool = False
    file: str = ""
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


_WS = " \t\r\n"


def _strdelimw(s: str) -> tuple[str | None, str | None]:
    """OpenSSH ``strdelimw()``: the first whitespace-delimited (or quoted) token and the rest."""
    idx = next((i for i, c in enumerate(s) if c in _WS or c == '"'), -1)
    if idx < 0:
        return s, None
    if s[idx] == '"':
        s = s[:idx] + s[idx + 1 :]
        close = s.find('"', idx)
        if close < 0:
            return None, None
        return s[:close], s[close + 1 :].lstrip(_WS)
    return s[:idx], s[idx + 1 :].lstrip(_WS)


def _advance_past_options(s: str) -> int:
    """OpenSSH ``sshkey_advance_past_options()``: index of the first unquoted blank, or -1."""
    quoted = False
    i = 0
    while i < len(s) and (quoted or s[i] not in " \t"):
        if s[i] == "\\" and s[i + 1 : i + 2] == '"':
            i += 1
        elif s[i] == '"':
            quoted = not quoted
        i += 1
    return -1 if (i == len(s) and quoted) else i


def _dequote(opts: str, i: int) -> tuple[str, int]:
    """OpenSSH ``opt_dequote()`` from ``opts[i]``: the quoted value and the index after it."""
    if opts[i : i + 1] != '"':
        raise ValueError("missing start quote")
    i += 1
    out = []
    while i < len(opts) and opts[i] != '"':
        if opts[i] == "\\" and opts[i + 1 : i + 2] == '"':
            i += 1
        out.append(opts[i])
        i += 1
    if i >= len(opts):
        raise ValueError("missing end quote")
    return "".join(out), i + 1


def _parse_options(opts: str) -> tuple[str | None, int | None, int | None, bool]:
    """OpenSSH ``sshsigopt_parse()``: namespaces, valid-after, valid-before, cert-authority."""
    namespaces: str | None = None
    after: int | None = None
    before: int | None = None
    ca = False
    i = 0
    while i < len(opts) and opts[i] not in " \t":
        low = opts[i:].lower()
        if low.startswith("cert-authority"):
            ca = True
            i += len("cert-authority")
        elif low.startswith("namespaces="):
            if namespaces is not None:
                raise ValueError('multiple "namespaces" clauses')
            namespaces, i = _dequote(opts, i + len("namespaces="))
        elif low.startswith(("valid-after=", "valid-before=")):
            name = "valid-after" if low.startswith("valid-after=") else "valid-before"
            if (after if name == "valid-after" else before) is not None:
                raise ValueError(f'multiple "{name}" clauses')
            value, i = _dequote(opts, i + len(name) + 1)
            try:
                when = parse_absolute_time(value)
            except ValueError as exc:
                raise ValueError(f'invalid "{name}" time: {exc}') from exc
            if name == "valid-after":
                after = when
            else:
                before = when
        if i >= len(opts) or opts[i] in " \t":
            break
        if opts[i] != ",":
            raise ValueError(f"unknown key option at {opts[i:]!r}")
        i += 1
        if i >= len(opts):
            raise ValueError("unexpected end of options")
    if after is not None and before is not None and before <= after:
        raise ValueError('"valid-before" time is not after "valid-after"')
    return namespaces, after, before, ca


def parse_allowed_signers_line(text: str, *, file: str = "", line: int = 0) -> AllowedSigner | None:
    """Parse one allowed-signers line with OpenSSH's grammar.

    ``principal[,principal...] [options] keytype base64 [comment]``; blank lines and ``#``
    comments give ``None``.

    Raises:
        ValidationError: the line is malformed (with ``file`` and ``line``).
    """

    def bad(reason: str) -> ValidationError:
        return ValidationError(
            f"{reason}; expected 'principal[,principal] [options] keytype base64' "
            "(man ssh-keygen, ALLOWED SIGNERS)",
            file=file or None,
            line=line or None,
        )

    cp = text.lstrip(" \t")
    if not cp or cp[0] in "#\r\n":
        return None
    principals, rest = _strdelimw(cp)
    if principals is None or rest is None:
        raise bad("a line needs principals and a key")
    if not principals:
        raise bad("empty principal list")
    key, _comment, why = _read_key_text(rest)
    namespaces = after = before = None
    ca = False
    if key is None:
        first = rest.split(None, 1)[0] if rest.strip() else ""
        if not first:
            raise bad("missing key")
        if first in KEY_TYPES:  # no options: the key itself is wrong
            raise bad(f"invalid key: {why}")
        end = _advance_past_options(rest)
        if end < 0:
            raise bad("invalid options (unterminated quote)")
        opts = rest[:end]
        key_text = rest[end:].lstrip(" \t")
        if not key_text.strip(_WS):
            raise bad("missing key" if opts else why)
        key, _comment, why = _read_key_text(key_text)
        if key is None:
            raise bad(f"invalid key: {why}")
        try:
            namespaces, after, before, ca = _parse_options(opts)
        except ValueError as exc:
            raise bad(f"bad options: {exc}") from exc
    return AllowedSigner(principals, key, namespaces, after, before, ca, file, line)


def _read_lines(path: Path, what: str) -> list[str]:
    """The lines of a trust file, split on newlines only (as OpenSSH's getline() loop)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValidationError(
            f"cannot read the {what} ({exc.strerror or exc}); check [trust] in the agent config",
            file=str(path),
        ) from exc
    lines = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            lines.append(raw.decode() + "\n")
        except UnicodeDecodeError as exc:
            raise ValidationError(
                f"the {what} is not UTF-8 text", file=str(path), line=number
            ) from exc
    if lines and lines[-1] == "\n":
        lines.pop()  # the empty piece after the final newline
    return lines


def load_allowed_signers(path: Path | str) -> list[AllowedSigner]:
    """Read an allowed-signers file in git's/OpenSSH's format.

    Every line must parse: a bad line is reported rather than skipped, because a typo in a
    trust store should be fixed, not silently ignored. Time limits are not judged here: an
    expired line is valid and only matters for signatures it could have matched.

    Raises:
        ValidationError: unreadable file, or a bad line (``file`` and ``line`` set).
    """
    entries = []
    for number, text in enumerate(_read_lines(Path(path), "allowed signers file"), 1):
        entry = parse_allowed_signers_line(text, file=str(path), line=number)
        if entry is not None:
            entries.append(entry)
    return entries


def load_revoked_keys(path: Path | str) -> list[SshKey]:
    """Read a revocation list: one public key per line (``keytype base64 [comment]``).

    OpenSSH's binary KRL format is not read. As in OpenSSH, an RSA key below 1024 bits is
    skipped; any other bad line is an error (a revocation list that cannot be read fails
    closed).

    Raises:
        ValidationError: unreadable file, a KRL, or a bad line (``file`` and ``line`` set).
    """
    p = Path(path)
    try:
        if p.read_bytes().startswith(b"SSHKRL\n\0"):
            raise ValidationError(
                "binary KRL revocation lists are not supported; list the revoked public keys, "
                "one 'keytype base64' per line",
                file=str(p),
            )
    except OSError:
        pass  # reported with its reason by _read_lines
    keys = []
    for number, text in enumerate(_read_lines(p, "revoked keys file"), 1):
        cp = text.lstrip(" \t")
        if not cp or cp[0] in "#\r\n":
            continue
        key, _rest, why = _read_key_text(cp)
        if key is None:
            if "bits, below" in why:
                continue
            raise ValidationError(
                f"{why}; expected one 'keytype base64 [comment]' per line",
                file=str(p),
                line=number,
            )
        keys.append(key)
    return keys


# --------------------------------------------------------------------------------------------
# The allowed-signers decision (ssh-keygen -Y find-principals, then -Y verify per principal)
# --------------------------------------------------------------------------------------------


@dataclass
class _LineCheck:
    ok: bool
    principals: str = ""
    reason: str = ""  # why a line whose key matched was not accepted ("" = key did not match)
    kind: str = ""


def _cert_check(key: SshKey, verify_time: int, name: str | None) -> str | None:
    """OpenSSH ``sshkey_cert_check_authority()`` as sshsig uses it; None or the reason.

    A user certificate, valid at ``verify_time``, with principals, listing ``name`` exactly.
    """
    cert = key.cert
    assert cert is not None
    if cert.cert_type != 1:
        return "certificate is not a user certificate"
    if verify_time < cert.valid_after:
        return f"certificate is not valid before {_fmt_time(cert.valid_after)}"
    if verify_time >= cert.valid_before:
        return f"certificate expired at {_fmt_time(cert.valid_before)}"
    if not cert.principals:
        return "certificate lists no principals"
    if name is not None and name not in cert.principals:
        return f"certificate does not list principal {name}"
    return None


def _check_line(
    entry: AllowedSigner,
    key: SshKey,
    principal: str | None,
    namespace: str | None,
    verify_time: int,
    commit_time: int,
) -> _LineCheck:
    """OpenSSH ``check_allowed_keys_line()``."""
    plain_match = not entry.cert_authority and entry.key.same_key(key)
    ca_match = entry.cert_authority and key.cert is not None and key.cert.ca.same_public(entry.key)
    if principal is not None:
        hit = match_pattern_list(principal, entry.principals)
        if hit != 1:
            if hit == -1 and (plain_match or ca_match):
                return _LineCheck(
                    False,
                    reason=f"principal {principal} is excluded by a negated pattern in "
                    f'"{entry.principals}" ({entry.where})',
                    kind="untrusted",
                )
            return _LineCheck(False)
    principals = entry.principals
    who = principal or entry.principals
    if plain_match:
        pass
    elif ca_match:
        assert key.cert is not None
        if principal is not None:
            why = _cert_check(key, verify_time, principal)
            if why:
                return _LineCheck(False, reason=f"{why} ({entry.where})", kind="untrusted")
        else:
            # cert_filter_principals(): if the certificate is valid, those of its principals
            # that a pattern of the line matches (each pattern alone: "!" is not negation here;
            # the list ends at an empty item).
            why = _cert_check(key, verify_time, None)
            names: list[str] = []
            for pattern in [] if why else entry.principals.split(","):
                if not pattern:
                    break
                names += [p for p in key.cert.principals if match_pattern(p, pattern)]
            if not names:
                reason = why or "no principal of the certificate is allowed by this line"
                return _LineCheck(False, reason=f"{reason} ({entry.where})", kind="untrusted")
            principals = ",".join(names)
    else:
        return _LineCheck(False)
    if (
        namespace is not None
        and entry.namespaces is not None
        and match_pattern_list(namespace, entry.namespaces) != 1
    ):
        return _LineCheck(
            False,
            reason=f'signer {who} may not sign namespace "{namespace}" '
            f'(namespaces="{entry.namespaces}" at {entry.where})',
            kind="namespace",
        )
    when = f"commit time {_fmt_time(commit_time)}"
    if entry.valid_after is not None and verify_time < entry.valid_after:
        return _LineCheck(
            False,
            reason=f"signer {who} is not valid before {_fmt_time(entry.valid_after)} "
            f"({when}, {entry.where})",
            kind="not-yet-valid",
        )
    if entry.valid_before is not None and verify_time > entry.valid_before:
        return _LineCheck(
            False,
            reason=f"signer {who} expired at {_fmt_time(entry.valid_before)} "
            f"({when}, {entry.where})",
            kind="expired",
        )
    return _LineCheck(True, principals)


def _judge_allowed(
    entries: list[AllowedSigner], key: SshKey, verify_time: int, commit_time: int, file: str
) -> tuple[str | None, str, str]:
    """git's two ssh-keygen steps over ``entries``: the accepted principal, or the reason why not.

    Returns:
        ``(principal, reason, kind)``; ``principal`` is ``None`` when refused.
    """
    reasons: list[tuple[str, str]] = []
    found: str | None = None
    chosen: AllowedSigner | None = None
    for entry in entries:  # -Y find-principals: the first line with the key, in time
        check = _check_line(entry, key, None, None, verify_time, commit_time)
        if check.ok:
            found, chosen = check.principals, entry
            break
        if check.reason:
            reasons.append((check.reason, check.kind))
    if found is None or chosen is None:
        if reasons:
            return None, reasons[0][0], reasons[0][1]
        what = f"key {key.fingerprint}"
        if key.cert is not None:
            what = f"certificate {key.fingerprint} (CA {key.cert.ca.fingerprint})"
        return None, f"{what} is not in allowed signers {file}", "untrusted"
    candidates = []
    for name in found.split(","):  # ssh-keygen prints them one per line, up to an empty one
        if not name:
            break
        candidates.append(name)
    # The reason to report is the one of the line find-principals chose, if it has one.
    reasons = []
    own: list[tuple[str, str]] = []
    for name in candidates:  # -Y verify -n git -I name, for each until one is good
        for entry in entries:
            check = _check_line(entry, key, name, "git", verify_time, commit_time)
            if check.ok:
                return name, "good signature", "good"
            if check.reason:
                (own if entry is chosen else reasons).append((check.reason, check.kind))
    if own or reasons:
        return None, *(own or reasons)[0]
    return (
        None,
        f"key {key.fingerprint} matches allowed signers {file}, but no line accepts its "
        f"principals ({', '.join(candidates) or 'none'}) for namespace git",
        "untrusted",
    )


# --------------------------------------------------------------------------------------------
# OpenPGP through gpg
# --------------------------------------------------------------------------------------------

_TRUST_LEVELS = ("undefined", "never", "marginal", "fully", "ultimate")
_GPG_EXCLUSIVE = {
    "GOODSIG": "G",
    "BADSIG": "B",
    "ERRSIG": "E",
    "EXPSIG": "X",
    "EXPKEYSIG": "Y",
    "REVKEYSIG": "R",
}
GPG_TIMEOUT = 60.0


@dataclass(frozen=True)
class _GpgStatus:
    result: str = "N"
    key_id: str | None = None
    signer: str | None = None
    fingerprint: str | None = None
    primary_fingerprint: str | None = None
    trust: int = -1
    no_pubkey: bool = False
    multiple: bool = False


def _parse_gpg_status(text: str) -> _GpgStatus:
    """git's parse_gpg_output() over ``[GNUPG:]`` status lines."""
    result, key_id, signer, fpr, primary = "N", None, None, None, None
    trust, seen, no_pubkey = -1, 0, False
    for line in text.split("\n"):
        if not line.startswith("[GNUPG:] "):
            continue
        words = line[len("[GNUPG:] ") :].split(" ")
        status, args = words[0], words[1:]
        if status in _GPG_EXCLUSIVE:
            seen += 1
            if seen > 1:
                return _GpgStatus(result="E", multiple=True)
            result = _GPG_EXCLUSIVE[status]
            key_id = args[0] if args else None
            if status != "ERRSIG" and len(args) > 1:
                signer = " ".join(args[1:])
        elif status == "VALIDSIG" and args:
            fpr = args[0]
            primary = args[9] if len(args) > 9 else None
        elif status.startswith("TRUST_"):
            level = status[len("TRUST_") :].lower()
            if level not in _TRUST_LEVELS:
                return _GpgStatus(result="E")
            trust = _TRUST_LEVELS.index(level)
        elif status == "NO_PUBKEY":
            no_pubkey = True
    return _GpgStatus(result, key_id, signer, fpr, primary, trust, no_pubkey)


def _verify_openpgp(payload: bytes, armored: bytes, home: Path, min_trust: str) -> Verdict:
    gpg = shutil.which("gpg")
    if gpg is None:
        return _refused("openpgp", "gpg is not installed: install gnupg", "config")
    if not Path(home).is_dir():
        return _refused("openpgp", f"gpg_home {home} is not a directory", "config")
    env = {k: v for k, v in os.environ.items() if k != "GNUPGHOME"}
    env["LC_ALL"] = "C"
    with tempfile.TemporaryDirectory(prefix="keystone-gpg-") as tmp:
        sig_file, data_file = Path(tmp) / "commit.sig", Path(tmp) / "commit.payload"
        sig_file.write_bytes(armored)
        data_file.write_bytes(payload)
        cmd = [
            gpg,
            "--homedir",
            str(home),
            "--batch",
            "--no-tty",
            "--no-auto-key-retrieve",
            "--keyid-format=long",
            "--status-fd=1",
            "--verify",
            str(sig_file),
            str(data_file),
        ]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, env=env, timeout=GPG_TIMEOUT, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            return _refused("openpgp", f"gpg --verify took over {GPG_TIMEOUT:.0f}s", "error")
        except OSError as exc:
            return _refused("openpgp", f"cannot run gpg: {exc}", "config")
    out = proc.stdout.decode(errors="replace")
    st = _parse_gpg_status(out)
    fingerprint = st.primary_fingerprint or st.fingerprint
    signer = st.signer
    key = fingerprint or st.key_id or "?"

    def refuse(reason: str, kind: str) -> Verdict:
        return _refused("openpgp", reason, kind, fingerprint=fingerprint, signer=signer)

    if st.multiple:
        return refuse("more than one OpenPGP signature on the commit", "bad-signature")
    if st.result == "E" and st.no_pubkey:
        return refuse(f"OpenPGP key {st.key_id} is not in the keyring {home}", "untrusted")
    if st.result == "B":
        return refuse(
            f"bad OpenPGP signature by {key}: the commit does not match it", "bad-signature"
        )
    if st.result == "Y":
        return refuse(f"OpenPGP key {key} ({signer}) has expired", "expired")
    if st.result == "X":
        return refuse(f"OpenPGP signature by {key} has expired", "expired")
    if st.result == "R":
        return refuse(f"OpenPGP key {key} ({signer}) is revoked", "revoked")
    good = proc.returncode == 0 and "\n[GNUPG:] GOODSIG " in out and st.result == "G"
    if not good:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        detail = err[-1] if err else f"gpg exit status {proc.returncode}"
        return refuse(f"OpenPGP signature does not verify: {detail}", "bad-signature")
    need = _TRUST_LEVELS.index(min_trust)
    if st.trust < need:
        have = _TRUST_LEVELS[st.trust] if st.trust >= 0 else "unknown"
        why = f"OpenPGP key {key} ({signer}) has trust {have}, below gpg_min_trust {min_trust}"
        return refuse(f"{why}; set its ownertrust in {home}", "untrusted")
    return Verdict(True, "openpgp", signer, fingerprint, "good signature", "good")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The judgement of one commit's signature.

    Attributes:
        ok: the signature is good and made by a trusted signer.
        format: ``ssh``, ``openpgp`` or ``none`` (unsigned or unknown format).
        signer: the principal git reports (ssh) or the key's user id (openpgp).
        fingerprint: ``SHA256:...`` as ``ssh-keygen -lf`` prints it, or the gpg fingerprint.
        reason: ``good signature`` or why not.
        kind: a short class for metrics: ``good``, ``unsigned``, ``no-trust-store``,
            ``untrusted``, ``bad-signature``, ``namespace``, ``expired``, ``not-yet-valid``,
            ``revoked``, ``unsupported``, ``config`` or ``error``.
    """

    ok: bool
    format: str
    signer: str | None
    fingerprint: str | None
    reason: str
    kind: str = "good"


def _refused(
    fmt: str, reason: str, kind: str, *, fingerprint: str | None = None, signer: str | None = None
) -> Verdict:
    return Verdict(False, fmt, signer, fingerprint, reason, kind)


@dataclass(frozen=True)
class TrustPolicy:
    """Where the agent's own trust store lives.

    Attributes:
        allowed_signers: git/OpenSSH allowed-signers file for SSH signatures.
        gpg_home: a dedicated GnuPG home whose keyring holds the trusted OpenPGP keys.
        revoked_keys: public keys (``keytype base64`` per line) whose signatures never count.
        gpg_min_trust: the least gpg trust level a key needs (git's ``gpg.minTrustLevel``:
            ``undefined``, ``never``, ``marginal``, ``fully``, ``ultimate``); the default, as in
            git, accepts any key in ``gpg_home``.
    """

    allowed_signers: Path | None
    gpg_home: Path | None = None
    revoked_keys: Path | None = None
    gpg_min_trust: str = "undefined"


_HINTS = {
    "unsigned": "sign the commit (git commit -S) with a key in the trust store",
    "no-trust-store": "set [trust] allowed_signers (SSH) or gpg_home (OpenPGP) in the agent config",
    "untrusted": "sign with a trusted key, or add the signer to the trust store",
    "bad-signature": "the commit or its signature was altered; do not deploy it",
    "namespace": 'sign commits with git (namespace "git"), or allow that namespace for the signer',
    "expired": "re-sign with a currently valid key, or extend the signer's validity",
    "not-yet-valid": "check the signer's valid-after and the commit time",
    "revoked": "the signing key is revoked: sign with another key",
    "unsupported": "sign with ssh-ed25519, ECDSA or RSA (rsa-sha2-256/512), or OpenPGP",
    "config": "fix the trust store configuration",
    "error": "retry, and check the device's gpg installation",
}


class CommitVerifier:
    """Verify commit signatures against the agent's trust store, reaching git's verdict.

    Example::

        verifier = CommitVerifier(TrustPolicy(Path("/etc/keystone/allowed_signers")))
        verdict = verifier.require(raw_commit_bytes, revision=sha)  # raises SignatureError

    The trust files are read once, on first use, and kept for the verifier's life.
    """

    def __init__(self, policy: TrustPolicy) -> None:
        if policy.gpg_min_trust not in _TRUST_LEVELS:
            raise ValidationError(
                f"gpg_min_trust must be one of {', '.join(_TRUST_LEVELS)}, "
                f"got {policy.gpg_min_trust!r}",
                field="trust.gpg_min_trust",
            )
        self.policy = policy
        self._allowed: list[AllowedSigner] | None = None
        self._revoked: list[SshKey] | None = None

    def verify(self, raw_commit: bytes, *, revision: str = "") -> Verdict:
        """Judge the signature of one raw commit object (``git cat-file commit REV``).

        Never raises for a bad commit or trust store: every refusal is a verdict with a reason.
        ``revision`` is the caller's name for the commit; the verdict does not depend on it.
        """
        policy = self.policy
        if policy.allowed_signers is None and policy.gpg_home is None:
            return _refused("none", "no trust store configured", "no-trust-store")
        payload, block, commit_time = split_signed_object(raw_commit)
        if block is None:
            return _refused("none", "unsigned commit", "unsigned")
        if block.format == "openpgp":
            if policy.gpg_home is None:
                why = "OpenPGP-signed commit, but no gpg_home is configured to verify it"
                return _refused("openpgp", why, "untrusted")
            return _verify_openpgp(payload, block.armored, policy.gpg_home, policy.gpg_min_trust)
        if block.format == "x509":
            return _refused("none", "x509 (gpgsm) signatures are not supported", "unsupported")
        if block.format != "ssh":
            why = "signature in an unknown format (neither SSH nor OpenPGP)"
            return _refused("none", why, "bad-signature")
        return self._verify_ssh(payload, block.armored, commit_time)

    def require(self, raw_commit: bytes, *, revision: str) -> Verdict:
        """Return the verdict if good, else raise SignatureError naming the revision and reason."""
        verdict = self.verify(raw_commit, revision=revision)
        if not verdict.ok:
            hint = _HINTS.get(verdict.kind, "check the trust store")
            rev = revision[:12] or "(unnamed)"
            raise SignatureError(f"commit {rev}: signature refused: {verdict.reason}; {hint}")
        return verdict

    def _trust_files(self) -> tuple[list[AllowedSigner], list[SshKey]]:
        if self._allowed is None:
            assert self.policy.allowed_signers is not None
            self._allowed = load_allowed_signers(self.policy.allowed_signers)
        if self._revoked is None:
            path = self.policy.revoked_keys
            self._revoked = load_revoked_keys(path) if path is not None else []
        return self._allowed, self._revoked

    def _verify_ssh(self, payload: bytes, armored: bytes, commit_time: int | None) -> Verdict:
        allowed_file = self.policy.allowed_signers
        if allowed_file is None:
            why = "SSH-signed commit, but no allowed_signers is configured to verify it"
            return _refused("ssh", why, "untrusted")
        try:
            allowed, revoked = self._trust_files()
        except ValidationError as exc:
            return _refused("ssh", f"trust store: {exc}", "config")
        try:
            sig = _parse_ssh_signature(armored)
        except _BadSignature as exc:
            return _refused("ssh", exc.reason, exc.kind)
        fp = sig.key.fingerprint
        try:
            sig._check(payload, "git")
        except _BadSignature as exc:
            return _refused("ssh", exc.reason, exc.kind, fingerprint=fp)
        ca = sig.key.cert.ca if sig.key.cert else None
        for bad in revoked:
            if bad.same_public(sig.key) or (ca is not None and bad.same_public(ca)):
                which = "key" if bad.same_public(sig.key) else "certificate authority"
                why = f"{which} {bad.fingerprint} is revoked ({self.policy.revoked_keys})"
                return _refused("ssh", why, "revoked", fingerprint=fp)
        verify_time = None if commit_time is None else _ssh_verify_time(commit_time)
        if commit_time is None or verify_time is None:
            why = "the commit has no usable committer time to judge the signer at"
            return _refused("ssh", why, "bad-signature", fingerprint=fp)
        principal, reason, kind = _judge_allowed(
            allowed, sig.key, verify_time, commit_time, str(allowed_file)
        )
        return Verdict(principal is not None, "ssh", principal, fp, reason, kind)

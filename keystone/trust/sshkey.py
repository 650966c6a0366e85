"""SSH public keys and certificates on the wire, and checking a raw signature with them.

``cryptography`` is imported inside the functions that verify: importing this module stays cheap.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

from keystone.errors import ValidationError


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
    # lazy: cryptography is heavy; only a signature check needs it
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
    # lazy: cryptography is heavy; only a signature check needs it
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

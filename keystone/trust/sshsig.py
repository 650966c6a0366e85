"""SSHSIG signatures (PROTOCOL.sshsig): parsing the armored block and checking it over a message."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field

from keystone.errors import SignatureError
from keystone.trust.sshkey import (
    SshKey,
    _BadSignature,
    _parse_key,
    _Reader,
    _ssh_string,
    _verify_raw,
    _WireError,
)

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

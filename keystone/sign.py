"""Local signing and detached-signature checks in the Go Keystone's formats.

The scheme (Go's ``internal/signing`` and ``internal/security``), for every key type:

* the signed message is the file's 32-byte SHA-256 digest. ECDSA signs it as a prehashed
  SHA-256 (DER ``SEQUENCE{r, s}``), RSA as PKCS#1 v1.5 with SHA-256 (what ``openssl dgst
  -sha256 -sign`` writes), Ed25519 signs the 32 digest bytes themselves (not Ed25519ph: what
  ``openssl pkeyutl -sign -rawin -in DIGEST`` writes);
* ``<file>.sig`` holds the raw signature bytes, written 0644; a verifier also accepts base64;
* the signer's leaf certificate (PEM or DER) is ``<file>.crt`` when present, else
  ``KEYSTONE_LEAF_CERT``; it must chain to a CA of the trust bundle (``KEYSTONE_TRUST_BUNDLE``)
  and be valid at the time of the check (:mod:`keystone.runtime.signing` does the chain).

Private keys are PEM, unencrypted: PKCS#8 (``PRIVATE KEY``), PKCS#1 (``RSA PRIVATE KEY``) or
SEC1 (``EC PRIVATE KEY``), as openssl writes them depending on how it was asked.

The resident agent never signs: only the CLI imports the signing half of this module (it
loads ``cryptography`` inside the functions).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from keystone.errors import SignatureError, UsageError
from keystone.runtime import signing as _rs

SIG_SUFFIX = ".sig"
CERT_SUFFIX = ".crt"


class RecipeSignatureError(SignatureError):
    """A recipe file refused for its detached signature (missing, unverifiable, untrusted).

    Attributes:
        path: the recipe file.
        reason: ``no-trust-bundle``, ``missing-signature``, ``no-certificate`` or a
            :class:`keystone.runtime.signing.SignatureRejected` reason.
    """

    def __init__(self, message: str, *, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(message)


def sig_path_for(path: Path) -> Path:
    """``<file>.sig``: where a detached signature lives, next to the file."""
    return Path(path).with_name(Path(path).name + SIG_SUFFIX)


def default_cert_for(path: Path, environ: Mapping[str, str] | None = None) -> Path | None:
    """The signer certificate the Go agent uses for ``path``: ``<file>.crt``, else ``KEYSTONE_LEAF_CERT``."""
    sibling = Path(path).with_name(Path(path).name + CERT_SUFFIX)
    if sibling.is_file():
        return sibling
    env = os.environ if environ is None else environ
    value = env.get("KEYSTONE_LEAF_CERT", "")
    return Path(value) if value else None


def load_signing_key(path: Path) -> Any:
    """Load an unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1): RSA, ECDSA or Ed25519.

    Raises:
        UsageError: unreadable, not PEM, encrypted, or another key type.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the signing key: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise UsageError(f"{path} is not PEM: expected a private key block")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise UsageError(f"{path}: the key is encrypted; give an unencrypted PEM key") from exc
    except ValueError as exc:
        raise UsageError(f"{path}: cannot parse the signing key ({exc})") from exc
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise UsageError(
            f"{path}: unsupported key type {type(key).__name__} (supported: RSA, ECDSA, Ed25519)"
        )
    return key


def sign_digest(key: Any, digest: bytes) -> bytes:
    """Sign a 32-byte SHA-256 digest with ``key`` by the Go scheme (Ed25519: the digest is the message).

    Raises:
        ValueError: ``digest`` is not 32 bytes.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

    if len(digest) != _rs.DIGEST_SIZE:
        raise ValueError(f"digest is {len(digest)} bytes, want {_rs.DIGEST_SIZE}")
    prehashed = utils.Prehashed(hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(digest, ec.ECDSA(prehashed))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(digest, padding.PKCS1v15(), prehashed)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(digest)
    raise UsageError(f"unsupported key type {type(key).__name__} (supported: RSA, ECDSA, Ed25519)")


def sign_file(path: Path, key_path: Path, cert_path: Path | None = None) -> bytes:
    """Return the detached signature of ``path`` (raw bytes), as ``keystonectl sign`` makes it.

    When ``cert_path`` is given the signature is checked against that certificate's key first,
    so a key and certificate that do not belong together fail here, not on every device.

    Raises:
        UsageError: unreadable key or file.
        SignatureRejected: the signature does not verify under the certificate.
    """
    key = load_signing_key(key_path)
    try:
        digest = bytes.fromhex(_rs.sha256_file(Path(path)))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the file to sign: {exc.strerror or exc}") from exc
    signature = sign_digest(key, digest)
    if cert_path is not None:
        try:
            data = Path(cert_path).read_bytes()
        except OSError as exc:
            raise UsageError(f"{cert_path}: cannot read the certificate: {exc}") from exc
        leaf = _rs.load_certificates(data, what=str(cert_path))[0]
        try:
            _rs.verify_digest(digest, signature, leaf)
        except _rs.SignatureRejected as exc:
            raise _rs.SignatureRejected(
                f"the signature does not verify against the key in {cert_path}: the key and "
                "the certificate do not belong together",
                reason=exc.reason,
            ) from exc
    return signature


def write_signature(path: Path, signature: bytes) -> None:
    """Write a detached signature, mode 0644 (it is public; it is published next to the file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(signature)
    os.chmod(path, 0o644)


def verify_detached(
    path: Path,
    *,
    trust_bundle: Path,
    sig: Path | None = None,
    cert: Path | None = None,
    at: datetime | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """Verify ``path`` as the Go agent's ``VerifyDetachedAt``: signature, chain and dates.

    Args:
        path: the signed file.
        trust_bundle: PEM roots the leaf must chain to.
        sig: the signature (default ``<file>.sig``).
        cert: the leaf certificate (default :func:`default_cert_for`).
        at: the time validity is judged at (default now).
        environ: where ``KEYSTONE_LEAF_CERT`` is read (default ``os.environ``).

    Returns:
        The signer's subject (RFC 4514).

    Raises:
        UsageError: no certificate can be found.
        SignatureRejected: the signature, chain or dates do not verify (names the file).
    """
    sig_file = sig or sig_path_for(path)
    cert_file = cert or default_cert_for(path, environ)
    if cert_file is None:
        raise UsageError(
            f"no certificate for {path}: pass --cert, put one at {path}{CERT_SUFFIX}, "
            "or set KEYSTONE_LEAF_CERT"
        )
    return _rs.verify_file(Path(path), sig_file, cert_file, Path(trust_bundle), at=at)


def verify_recipe_signature(
    recipe: Path,
    trust_bundle: Path | None,
    *,
    insecure_skip_verify: bool = False,
    data: bytes | None = None,
    at: datetime | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """Refuse a recipe file that lacks a valid ``<recipe>.sig``, as the Go agent does (fail-closed).

    Recipes read from a signed git revision are covered by the commit signature and do not come
    here; recipes uploaded through the authenticated API do not either.

    Args:
        recipe: the recipe file.
        trust_bundle: the configured trust bundle; ``None`` refuses (no way to check).
        insecure_skip_verify: skip the check (the caller logs it loudly); returns ``None``.
        data: the recipe bytes the caller read and will parse; the signature is checked over
            these rather than over a second read of the file, so what is parsed is what was
            verified. ``None`` reads the file.
        at: the time validity is judged at (default now).
        environ: where ``KEYSTONE_LEAF_CERT`` is read.

    Returns:
        The signer's subject, or ``None`` when skipped.

    Raises:
        RecipeSignatureError: with the reason (``no-trust-bundle``, ``missing-signature``,
            ``no-certificate``, or the signature check's reason).
    """
    if insecure_skip_verify:
        return None
    recipe = Path(recipe)
    if trust_bundle is None:
        raise RecipeSignatureError(
            f"recipe {recipe} refused: a signature is required but no trust bundle is "
            "configured; set KEYSTONE_TRUST_BUNDLE (or --insecure-skip-verify for development)",
            path=recipe,
            reason="no-trust-bundle",
        )
    sig = sig_path_for(recipe)
    if not sig.is_file():
        raise RecipeSignatureError(
            f"recipe {recipe} refused: missing detached signature {sig.name} (sign it with "
            "keystonectl sign, or --insecure-skip-verify for development)",
            path=recipe,
            reason="missing-signature",
        )
    cert = default_cert_for(recipe, environ)
    if cert is None:
        raise RecipeSignatureError(
            f"recipe {recipe} refused: no certificate to check its signature with (set "
            f"KEYSTONE_LEAF_CERT or provide {recipe.name}{CERT_SUFFIX})",
            path=recipe,
            reason="no-certificate",
        )
    try:
        if data is None:
            return _rs.verify_file(recipe, sig, cert, Path(trust_bundle), at=at)
        return _verify_bytes(data, sig, cert, Path(trust_bundle), at)
    except _rs.SignatureRejected as exc:
        raise RecipeSignatureError(
            f"recipe {recipe} refused: its signature does not verify: {exc}",
            path=recipe,
            reason=exc.reason,
        ) from exc
    except OSError as exc:
        raise RecipeSignatureError(
            f"recipe {recipe} refused: cannot read {exc.filename}: {exc.strerror}",
            path=recipe,
            reason="bad-certificate",
        ) from exc


def _verify_bytes(data: bytes, sig: Path, cert: Path, bundle: Path, at: datetime | None) -> str:
    import hashlib
    from datetime import UTC

    chain = _rs.load_certificates(cert.read_bytes(), what=str(cert))
    roots = _rs.load_certificates(bundle.read_bytes(), what=str(bundle))
    signature = sig.read_bytes()[: _rs.MAX_SIGNATURE_BYTES + 1]
    if len(signature) > _rs.MAX_SIGNATURE_BYTES:
        raise _rs.SignatureRejected(
            f"{sig} is larger than a signature can be", reason="bad-signature-encoding"
        )
    check = _rs.SignatureCheck(tuple(chain), tuple(roots), at or datetime.now(UTC))
    return _rs.verify_signature(hashlib.sha256(data).digest(), signature, check)

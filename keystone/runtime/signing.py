"""Detached artifact signatures: the Go Keystone's format, checked with ``cryptography``.

A signature is over the artifact's SHA-256 digest, raw or base64:

* ECDSA (any curve; DER) and RSA PKCS#1 v1.5, exactly what ``openssl dgst -sha256 -sign KEY``
  writes, checked with ``utils.Prehashed(SHA256())`` over the streamed digest;
* Ed25519 (and Ed448) over the 32-byte digest itself (not Ed25519ph), as the Go Keystone signs.

The signer's leaf certificate is checked against the trust bundle with
``cryptography.x509.verification``. Its default end-entity policy demands a subjectAltName and the
clientAuth purpose, which code-signing certificates lack, so the extension policies are built
here: a leaf needs no SAN; if it has a keyUsage, digitalSignature must be in it; if it has an
extendedKeyUsage, codeSigning (or anyExtendedKeyUsage) must be in it. Validity dates, the chain to a
root of the bundle, CA basicConstraints and keyCertSign are still checked by the library.

A chain that policy refuses is walked once more by the Go Keystone's rules (``crypto/x509``):
that accepts what its ``scripts/dev-sign.sh`` makes with openssl, an X.509 v1 leaf and a CA
without keyUsage. Each issuer must still verify the certificate below it, be valid at the time,
be a CA when it is an intermediate, and carry keyCertSign if it has a keyUsage at all.

``cryptography`` is imported inside the functions: the resident agent never loads it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keystone.errors import SignatureError

if TYPE_CHECKING:
    from cryptography.x509 import Certificate

DIGEST_SIZE = 32
MAX_SIGNATURE_BYTES = 64 * 1024
MAX_CERT_BYTES = 1024 * 1024

_BASE64 = re.compile(rb"^[A-Za-z0-9+/=\s]+$")
_CODE_SIGNING = "1.3.6.1.5.5.7.3.3"
_ANY_EKU = "2.5.29.37.0"


class SignatureRejected(SignatureError):
    """A detached signature or its certificate chain that does not verify.

    Attributes:
        reason: a short machine-readable cause: ``bad-signature``, ``bad-signature-encoding``,
            ``expired``, ``not-yet-valid``, ``untrusted-chain``, ``key-usage``,
            ``bad-certificate``, ``unsupported-key``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message)


def sha256_file(path: Path) -> str:
    """Return the lowercase hex SHA-256 of a file, read in chunks (the keystonectl ``sha256``)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_certificates(data: bytes, *, what: str) -> list[Certificate]:
    """Parse PEM (one or more) or DER certificates; ``what`` names the source in errors."""
    # lazy: cryptography is heavy; only workers and the CLI check signatures
    from cryptography import x509

    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise SignatureRejected(
            f"{what} holds no readable X.509 certificate ({exc}); give a PEM or DER certificate",
            reason="bad-certificate",
        ) from exc
    if not certs:
        raise SignatureRejected(f"{what} holds no certificate", reason="bad-certificate")
    return certs


def signature_candidates(data: bytes) -> list[bytes]:
    """Return the ways to read a signature file: as raw bytes, then base64-decoded if it is text."""
    out = [data]
    if _BASE64.match(data):
        try:
            decoded = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        if decoded:
            out.append(decoded)
    return out


def _verify_with_key(public_key: Any, signature: bytes, digest: bytes) -> bool:
    # lazy: cryptography is heavy; only workers and the CLI check signatures
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa, utils

    prehashed = utils.Prehashed(hashes.SHA256())
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, digest, ec.ECDSA(prehashed))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, digest, padding.PKCS1v15(), prehashed)
        elif isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            public_key.verify(signature, digest)
        else:
            raise SignatureRejected(
                f"unsupported key type {type(public_key).__name__}: use ECDSA, RSA or Ed25519",
                reason="unsupported-key",
            )
    except InvalidSignature:
        return False
    except ValueError:
        # Malformed DER or a wrong length: not this reading of the file.
        return False
    return True


def verify_digest(digest: bytes, signature: bytes, leaf: Certificate) -> None:
    """Check a detached signature (raw or base64) over a SHA-256 digest against ``leaf``'s key.

    Raises:
        SignatureRejected: ``bad-signature`` when no reading of the file verifies.
    """
    if len(digest) != DIGEST_SIZE:
        raise ValueError("digest must be the 32-byte SHA-256")
    if not signature.strip():
        raise SignatureRejected("the signature file is empty", reason="bad-signature-encoding")
    key = leaf.public_key()
    for candidate in signature_candidates(signature):
        if _verify_with_key(key, candidate, digest):
            return
    raise SignatureRejected(
        "the signature does not match the artifact's sha256 under the key of "
        f"{leaf.subject.rfc4514_string()!r} (modified artifact, or signed by another key)",
        reason="bad-signature",
    )


def _oid_strings(ext: Any) -> set[str]:
    return {oid.dotted_string for oid in ext}


def check_leaf_usage(leaf: Certificate) -> None:
    """Refuse a leaf whose keyUsage or extendedKeyUsage forbids signing code.

    Raises:
        SignatureRejected: ``key-usage``.
    """
    # lazy: cryptography is heavy; only workers and the CLI check signatures
    from cryptography import x509

    subject = leaf.subject.rfc4514_string()
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.digital_signature:
        raise SignatureRejected(
            f"certificate {subject!r} may not sign: its keyUsage lacks digitalSignature",
            reason="key-usage",
        )
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and not ({_CODE_SIGNING, _ANY_EKU} & _oid_strings(eku)):
        raise SignatureRejected(
            f"certificate {subject!r} is not for code signing: its extendedKeyUsage lacks "
            "codeSigning",
            reason="key-usage",
        )
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is not None and bc.ca:
        raise SignatureRejected(
            f"certificate {subject!r} is a CA certificate; sign artifacts with a leaf",
            reason="key-usage",
        )


def check_validity(cert: Certificate, at: datetime, *, clock_note: str = "") -> None:
    """Refuse a certificate outside its validity window at ``at``.

    Raises:
        SignatureRejected: ``expired`` or ``not-yet-valid``.
    """
    subject = cert.subject.rfc4514_string()
    note = f" (judged at {clock_note})" if clock_note else f" (judged at {_iso(at)})"
    if at > cert.not_valid_after_utc:
        raise SignatureRejected(
            f"certificate {subject!r} expired on {_iso(cert.not_valid_after_utc)}{note}; "
            "sign the artifact again with a current certificate",
            reason="expired",
        )
    if at < cert.not_valid_before_utc:
        raise SignatureRejected(
            f"certificate {subject!r} is not valid before {_iso(cert.not_valid_before_utc)}{note}",
            reason="not-yet-valid",
        )


def _ca_eku_validator(_policy: Any, _cert: Certificate, ext: Any) -> None:
    if ext is not None and not ({_CODE_SIGNING, _ANY_EKU} & _oid_strings(ext)):
        raise ValueError("CA extendedKeyUsage does not allow codeSigning")


def verify_chain(
    leaf: Certificate,
    intermediates: Sequence[Certificate],
    roots: Sequence[Certificate],
    at: datetime,
    *,
    clock_note: str = "",
) -> None:
    """Validate ``leaf`` up to one of ``roots`` at time ``at`` (path validation, code signing).

    Raises:
        SignatureRejected: ``expired``/``not-yet-valid`` for the leaf, ``key-usage``,
            ``untrusted-chain`` when no path to a root validates.
    """
    # lazy: cryptography is heavy; only workers and the CLI check signatures
    from cryptography import x509
    from cryptography.x509 import verification as xv

    check_validity(leaf, at, clock_note=clock_note)
    check_leaf_usage(leaf)
    if not roots:
        raise SignatureRejected("the trust bundle holds no certificate", reason="untrusted-chain")
    # check_leaf_usage above judged keyUsage/extendedKeyUsage for code signing; the web-PKI
    # defaults would demand a SAN and the clientAuth purpose instead.
    ee_policy = (
        xv.ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, xv.Criticality.AGNOSTIC, None)
        .may_be_present(x509.ExtendedKeyUsage, xv.Criticality.AGNOSTIC, None)
    )
    ca_policy = xv.ExtensionPolicy.webpki_defaults_ca().may_be_present(
        x509.ExtendedKeyUsage, xv.Criticality.AGNOSTIC, _ca_eku_validator
    )
    verifier = (
        xv.PolicyBuilder()
        .store(xv.Store(list(roots)))
        .time(at)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, list(intermediates))
    except xv.VerificationError as exc:
        text = str(exc)
        subject = leaf.subject.rfc4514_string()
        # The web-PKI verifier refuses what the Go Keystone (crypto/x509) accepts and what its
        # scripts/dev-sign.sh makes with openssl: an X.509 v1 leaf, a CA without keyUsage.
        # Those chains are walked here, by the rules Go applies (see _go_chain_error).
        if _go_chain_error(leaf, intermediates, roots, at) is None:
            return
        if "not valid at validation time" in text:
            raise SignatureRejected(
                f"certificate {subject!r} chains only through a CA certificate that is not valid "
                f"at {clock_note or _iso(at)}: renew the CA or re-issue the leaf",
                reason="expired",
            ) from exc
        raise SignatureRejected(
            f"certificate {subject!r} (issued by {leaf.issuer.rfc4514_string()!r}) does not chain "
            f"to a CA in the trust bundle ({text}); add its CA to KEYSTONE_TRUST_BUNDLE or sign "
            "with a certificate from a trusted CA",
            reason="untrusted-chain",
        ) from exc


def _same_cert(a: Certificate, b: Certificate) -> bool:
    from cryptography.hazmat.primitives.serialization import Encoding

    return a.public_bytes(Encoding.DER) == b.public_bytes(Encoding.DER)


def _may_issue(issuer: Certificate, at: datetime, *, is_root: bool) -> bool:
    """Whether ``issuer`` may sign certificates at ``at``, as Go's crypto/x509 judges it.

    Go ignores keyUsage and requires basicConstraints CA only of intermediates; here a CA that
    carries a keyUsage without keyCertSign, or a basicConstraints saying it is no CA, is still
    refused (openssl never makes those for a CA), and the CA extendedKeyUsage rule of the
    web-PKI path applies too.
    """
    from cryptography import x509

    if not issuer.not_valid_before_utc <= at <= issuer.not_valid_after_utc:
        return False
    try:
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None and not is_root:
        return False
    if bc is not None and not bc.ca:
        return False
    try:
        ku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.key_cert_sign:
        return False
    try:
        eku = issuer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return bool({_CODE_SIGNING, _ANY_EKU} & _oid_strings(eku))


def _go_chain_error(
    leaf: Certificate,
    intermediates: Sequence[Certificate],
    roots: Sequence[Certificate],
    at: datetime,
    *,
    max_depth: int = 8,
) -> str | None:
    """Walk ``leaf`` up to a root by Go's rules; ``None`` when a path exists, else why not.

    Each step finds a certificate whose subject is the current issuer and whose key verifies the
    current certificate's signature (RSA, ECDSA, Ed25519), valid at ``at``. The leaf's dates and
    usage were checked by the caller.
    """
    from cryptography.exceptions import InvalidSignature

    current = leaf
    for _ in range(max_depth):
        if any(_same_cert(current, root) for root in roots):
            return None
        candidates = [(c, True) for c in roots] + [(c, False) for c in intermediates]
        for cand, is_root in candidates:
            if cand.subject != current.issuer or _same_cert(cand, current):
                continue
            try:
                current.verify_directly_issued_by(cand)
            except (InvalidSignature, ValueError, TypeError):
                continue  # another key, or an algorithm the issuer cannot have used
            if not _may_issue(cand, at, is_root=is_root):
                continue
            if is_root:
                return None
            current = cand
            break
        else:
            return f"no issuer of {current.subject.rfc4514_string()!r} in the trust bundle"
    return "the chain is longer than 8 certificates"


@dataclass(frozen=True)
class SignatureCheck:
    """What to check one detached signature against.

    Attributes:
        chain: the leaf certificate first, then any intermediates that came with it.
        roots: the trust bundle; ``None`` only when the leaf itself is pinned by the operator
            (``KEYSTONE_LEAF_CERT`` with no bundle): dates and usage are then still checked.
        at: the time to judge validity at (from the trusted clock).
        clock_note: how ``at`` was obtained, for messages.
    """

    chain: tuple[Certificate, ...]
    roots: tuple[Certificate, ...] | None
    at: datetime
    clock_note: str = ""


def verify_signature(digest: bytes, signature: bytes, check: SignatureCheck) -> str:
    """Verify a detached signature over ``digest`` and its certificate; return the signer subject.

    Raises:
        SignatureRejected: with the reason.
    """
    leaf = check.chain[0]
    verify_digest(digest, signature, leaf)
    if check.roots is None:
        check_validity(leaf, check.at, clock_note=check.clock_note)
        check_leaf_usage(leaf)
    else:
        verify_chain(leaf, check.chain[1:], check.roots, check.at, clock_note=check.clock_note)
    return leaf.subject.rfc4514_string()


def sign_digest(digest: bytes, key_pem: bytes) -> bytes:
    """Sign a SHA-256 digest the way ``openssl dgst -sha256 -sign`` (Ed25519: over the digest)."""
    # lazy: cryptography is heavy; only workers and the CLI check signatures
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa, utils

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureRejected(
            f"the signing key is not an unencrypted PEM private key ({exc})",
            reason="unsupported-key",
        ) from exc
    prehashed = utils.Prehashed(hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(digest, ec.ECDSA(prehashed))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(digest, padding.PKCS1v15(), prehashed)
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return key.sign(digest)
    raise SignatureRejected(
        f"unsupported key type {type(key).__name__}: use ECDSA, RSA or Ed25519",
        reason="unsupported-key",
    )


def sign_file(path: Path, key_pem_path: Path) -> bytes:
    """Return a detached signature of ``path`` (the keystonectl ``sign``), raw bytes.

    The same bytes ``openssl dgst -sha256 -sign KEY -out SIG FILE`` writes for ECDSA and RSA keys;
    for Ed25519 keys the signature is over the 32-byte digest, as the Go Keystone makes it.
    """
    digest = bytes.fromhex(sha256_file(path))
    return sign_digest(digest, Path(key_pem_path).read_bytes())


def verify_file(
    path: Path,
    sig_path: Path,
    cert_path: Path,
    trust_bundle: Path | None,
    *,
    at: datetime | None = None,
) -> str:
    """Verify ``path`` against a detached signature and certificate (the keystonectl ``verify``).

    Args:
        path: the artifact.
        sig_path: its signature (raw or base64).
        cert_path: the signer's certificate (PEM: leaf first, then intermediates; or DER).
        trust_bundle: PEM roots to validate the chain against; ``None`` checks only the signature,
            the leaf's dates and its key usage.
        at: the time to judge validity at (default: now).

    Returns:
        The signer's subject (RFC 4514).

    Raises:
        SignatureRejected: naming the file and the reason.
    """
    when = at or datetime.now(UTC)
    try:
        chain = load_certificates(Path(cert_path).read_bytes(), what=str(cert_path))
        roots = (
            None
            if trust_bundle is None
            else tuple(load_certificates(Path(trust_bundle).read_bytes(), what=str(trust_bundle)))
        )
        signature = Path(sig_path).read_bytes()[: MAX_SIGNATURE_BYTES + 1]
        if len(signature) > MAX_SIGNATURE_BYTES:
            raise SignatureRejected(
                f"{sig_path} is larger than a signature can be", reason="bad-signature-encoding"
            )
        digest = bytes.fromhex(sha256_file(path))
        return verify_signature(digest, signature, SignatureCheck(tuple(chain), roots, when))
    except SignatureRejected as exc:
        raise SignatureRejected(f"{path}: {exc}", reason=exc.reason) from exc

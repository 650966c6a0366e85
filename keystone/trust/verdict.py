"""The verdict on one commit's signature, shared by the SSH and OpenPGP checks."""

from __future__ import annotations

from dataclasses import dataclass


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

"""The commit verifier: the agent's trust policy applied to one raw commit, git's verdict reached."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from keystone.errors import SignatureError, ValidationError
from keystone.trust.allowed_signers import (
    AllowedSigner,
    _judge_allowed,
    load_allowed_signers,
    load_revoked_keys,
)
from keystone.trust.openpgp import _TRUST_LEVELS, _verify_openpgp
from keystone.trust.patterns import _ssh_verify_time
from keystone.trust.signed import split_signed_object
from keystone.trust.sshkey import SshKey, _BadSignature
from keystone.trust.sshsig import _parse_ssh_signature
from keystone.trust.verdict import Verdict, _refused


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

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

Imports of ``cryptography`` happen inside the functions that need it: this package is loaded by
the short-lived sync worker and the CLI, never kept in the resident agent.

Modules: :mod:`~keystone.trust.signed` (git's signed payload), :mod:`~keystone.trust.patterns`
(OpenSSH patterns and times), :mod:`~keystone.trust.sshkey` (SSH keys and certificates),
:mod:`~keystone.trust.sshsig` (SSHSIG), :mod:`~keystone.trust.allowed_signers` (allowed-signers
and revocation files, and the decision), :mod:`~keystone.trust.openpgp` (gpg),
:mod:`~keystone.trust.verdict` and :mod:`~keystone.trust.verifier` (:class:`CommitVerifier`).
Every public name is importable from ``keystone.trust`` itself.
"""

from __future__ import annotations

from keystone.trust.allowed_signers import (
    AllowedSigner,
    load_allowed_signers,
    load_revoked_keys,
    parse_allowed_signers_line,
)
from keystone.trust.openpgp import GPG_TIMEOUT
from keystone.trust.patterns import match_pattern, match_pattern_list, parse_absolute_time
from keystone.trust.signed import SignatureBlock, split_signed_object
from keystone.trust.sshkey import KEY_TYPES, SshCertificate, SshKey, parse_public_key
from keystone.trust.sshsig import SshSignature, parse_ssh_signature
from keystone.trust.verdict import Verdict
from keystone.trust.verifier import CommitVerifier, TrustPolicy

__all__ = [
    "GPG_TIMEOUT",
    "KEY_TYPES",
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

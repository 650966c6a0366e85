"""keystone's commit verdicts against ``git verify-commit`` (the oracle) on a real repository."""

from __future__ import annotations

import base64
import calendar
import hashlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keystone.trust import CommitVerifier, TrustPolicy, Verdict
from tests.integration.trust.conftest import (
    GpgHome,
    Repo,
    SshKeyFiles,
    base_env,
    embed_signature,
    ssh_certificate,
    ssh_key,
)

pytestmark = pytest.mark.integration

T_MARCH = calendar.timegm((2024, 3, 2, 10, 0, 0))  # 2024-03-02 10:00:00 UTC
T_2023 = calendar.timegm((2023, 6, 1, 12, 0, 0))


@dataclass(frozen=True)
class Case:
    """One commit judged under one trust store."""

    name: str
    repo: Repo
    rev: str
    allowed: Path
    expect: bool
    reason: str = ""  # a phrase keystone's reason must contain
    revoked: Path | None = None


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _armor(blob: bytes) -> bytes:
    b64 = base64.b64encode(blob).decode()
    body = "\n".join(b64[i : i + 70] for i in range(0, len(b64), 70))
    return f"-----BEGIN SSH SIGNATURE-----\n{body}\n-----END SSH SIGNATURE-----\n".encode()


def crafted_sshsig(
    key: SshKeyFiles, payload: bytes, *, hashalg: str = "sha512", rsa_sigtype: str = "ssh-rsa"
) -> bytes:
    """An SSHSIG made with cryptography, for what ssh-keygen will not produce (SHA-1, sha1 hash)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

    private = serialization.load_ssh_private_key(key.private.read_bytes(), None)
    pub_blob = base64.b64decode(key.public.split()[1])
    digest = hashlib.new(hashalg, payload).digest()
    signed = (
        b"SSHSIG" + _string(b"git") + _string(b"") + _string(hashalg.encode()) + _string(digest)
    )
    if isinstance(private, rsa.RSAPrivateKey):
        algo = {"ssh-rsa": hashes.SHA1(), "rsa-sha2-256": hashes.SHA256()}[rsa_sigtype]
        sig = _string(rsa_sigtype.encode()) + _string(
            private.sign(signed, padding.PKCS1v15(), algo)
        )
    else:
        assert isinstance(private, ed25519.Ed25519PrivateKey)
        sig = _string(b"ssh-ed25519") + _string(private.sign(signed))
    blob = (
        b"SSHSIG"
        + (1).to_bytes(4, "big")
        + _string(pub_blob)
        + _string(b"git")
        + _string(b"")
        + _string(hashalg.encode())
        + _string(sig)
    )
    return _armor(blob)


def keygen_sign(
    key: SshKeyFiles, payload: bytes, tmp: Path, *, namespace: str, opts: tuple[str, ...] = ()
) -> bytes:
    """``ssh-keygen -Y sign`` over ``payload``: the armored signature."""
    data = tmp / f"payload-{namespace}-{len(opts)}"
    data.write_bytes(payload)
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-Y",
            "sign",
            "-n",
            namespace,
            "-f",
            str(key.private),
            *opts,
            str(data),
        ],
        check=True,
        capture_output=True,
    )
    return data.with_name(data.name + ".sig").read_bytes()


def write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory, gpg_home: GpgHome) -> Iterator[list[Case]]:
    """A repository with every case of the table, and the allowed-signers files that judge them."""
    tmp = tmp_path_factory.mktemp("crosscheck")
    keys, files = tmp / "keys", tmp / "trust"
    files.mkdir()
    kinds = ("ed25519", "ecdsa-256", "ecdsa-384", "ecdsa-521", "rsa-3072")
    k = {kind: ssh_key(keys, kind.replace("-", ""), kind) for kind in kinds}
    ed, rsa = k["ed25519"], k["rsa-3072"]
    stranger, revkey, nskey = (ssh_key(keys, n) for n in ("stranger", "revkey", "nskey"))
    timed, patkey, negkey = (ssh_key(keys, n) for n in ("timed", "patkey", "negkey"))
    ca, other_ca = ssh_key(keys, "ca"), ssh_key(keys, "other-ca")
    certuser, old_user = ssh_key(keys, "certuser", "ecdsa-256"), ssh_key(keys, "old-certuser")

    def trust(name: str, *lines: str) -> Path:
        return write(files / name, *lines)

    main = trust(
        "main",
        "# the fleet's signers",
        "",
        *(f"{kind}@example.com {key.public} {kind}" for kind, key in k.items()),
        f"rev@example.com {revkey.public}",
    )
    repo = Repo(tmp / "repo", base_env(tmp))
    cases: list[Case] = []

    def case(
        name: str,
        rev: str,
        allowed: Path,
        expect: bool,
        reason: str = "",
        revoked: Path | None = None,
    ) -> None:
        cases.append(Case(name, repo, rev, allowed, expect, reason, revoked))

    def crafted(armored: bytes) -> str:
        return repo.write_commit(embed_signature(unsigned, armored))

    # Key types, unsigned, unknown key.
    for kind, key in k.items():
        case(f"{kind} good", repo.commit(kind, key=key.private), main, True, "good signature")
    unsigned_rev = repo.commit("unsigned")
    unsigned = repo.raw(unsigned_rev)
    case("unsigned", unsigned_rev, main, False, "unsigned commit")
    case(
        "unknown key", repo.commit("x", key=stranger.private), main, False, "not in allowed signers"
    )

    # namespaces=
    ns = repo.commit("namespaces", key=nskey.private)
    case(
        'namespaces="file" only',
        ns,
        trust("ns1", f'ns namespaces="file" {nskey.public}'),
        False,
        'may not sign namespace "git"',
    )
    case(
        'namespaces="file,git"', ns, trust("ns2", f'ns namespaces="file,git" {nskey.public}'), True
    )
    case('namespaces="g*"', ns, trust("ns3", f'ns namespaces="g*" {nskey.public}'), True)

    # valid-after / valid-before, judged at the commit time.
    march = repo.commit("march", key=timed.private, date=T_MARCH)
    late = repo.commit("a second later", key=timed.private, date=T_MARCH + 1)
    then = repo.commit("2023", key=timed.private, date=T_2023)
    edge = trust("edge", f'e valid-before="20240302100000Z" {timed.public}')
    case(
        "expired before the commit time",
        march,
        trust("t1", f'old valid-before="20240101" {timed.public}'),
        False,
        "expired at",
    )
    case(
        "not yet valid at the commit time",
        march,
        trust("t2", f'new valid-after="20240601" {timed.public}'),
        False,
        "not valid before",
    )
    case(
        "inside valid-after..valid-before",
        march,
        trust("t3", f'w valid-after="20240101",valid-before="20240401" {timed.public}'),
        True,
    )
    case("valid-before equal to the commit time", march, edge, True)
    case("valid-before one second before the commit", late, edge, False, "expired at")
    case(
        "valid-after equal to the commit time",
        march,
        trust("t4", f'e valid-after="20240302100000Z" {timed.public}'),
        True,
    )
    case(
        "valid at commit time, expired now",
        then,
        trust("t5", f'then valid-before="20240101" {timed.public}'),
        True,
    )

    # Revocation.
    revoked_rev = repo.commit("revoked", key=revkey.private)
    revoked = trust("revoked", "# revoked keys", f"{revkey.public} lost laptop")
    case("revoked key", revoked_rev, main, False, "revoked", revoked)
    case(
        "revocation list without the key",
        revoked_rev,
        main,
        True,
        "",
        trust("rev-other", stranger.public),
    )

    # Principal patterns.
    pat = repo.commit("pattern", key=patkey.private)
    neg = repo.commit("negation", key=negkey.private)
    case(
        "principal pattern *@example.com", pat, trust("p1", f"*@example.com {patkey.public}"), True
    )
    case("principal pattern a?ice", pat, trust("p2", f"a?ice {patkey.public}"), True)
    case(
        "negation excludes the only principal",
        neg,
        trust("p3", f"dave@example.com,!dave@example.com {negkey.public}"),
        False,
        "negated",
    )
    case(
        "negation that excludes someone else",
        neg,
        trust("p4", f"*@example.com,!mallory@example.com {negkey.public}"),
        True,
    )
    case("negated pattern list *,!*", neg, trust("p5", f"*,!* {negkey.public}"), False)

    # Several lines.
    ed_rev = cases[0].rev
    case(
        "unrelated expired line",
        ed_rev,
        trust("l1", f'old valid-before="20000101" {stranger.public}', f"alice {ed.public}"),
        True,
    )
    case(
        "same key: expired line, then a valid one",
        ed_rev,
        trust("l2", f'alice valid-before="20000101" {ed.public}', f"alice {ed.public}"),
        True,
    )
    case(
        "first matching line lacks namespace git (git's quirk)",
        ed_rev,
        trust("l3", f'alice namespaces="file" {ed.public}', f"bob {ed.public}"),
        False,
    )
    case(
        "git-capable line first",
        ed_rev,
        trust("l4", f"bob {ed.public}", f'alice namespaces="file" {ed.public}'),
        True,
    )

    # Tampering: a rewritten object that keeps the signature.
    raw = repo.raw(ed_rev)
    head = raw.partition(b"\n\n")[0]
    case(
        "tampered message, signature kept",
        repo.write_commit(head + b"\n\ndeploy evil\n"),
        main,
        False,
        "does not verify",
    )
    case(
        "tampered author, signature kept",
        repo.write_commit(raw.replace(b"author Keystone", b"author Mallory", 1)),
        main,
        False,
        "does not verify",
    )

    # Merges: a signed merge, and a signed merge of a signed tag (mergetag header).
    base = repo.git("rev-parse", "HEAD")
    sign = ("-c", "gpg.format=ssh", "-c", f"user.signingkey={ed.private}")
    repo.git("checkout", "-q", "-b", "side")
    repo.commit("side", key=ed.private)
    repo.git("checkout", "-q", "main")
    repo.commit("main moves on", key=ed.private)
    repo.git(*sign, "merge", "-q", "--no-ff", "-S", "-m", "merge side", "side")
    case("signed merge commit", repo.git("rev-parse", "HEAD"), main, True)
    repo.git("checkout", "-q", "-b", "tagged", base)
    repo.commit("tagged work", key=ed.private)
    repo.git(*sign, "tag", "-s", "-m", "release", "v1")
    repo.git("checkout", "-q", "main")
    repo.git(*sign, "merge", "-q", "--no-ff", "-S", "-m", "merge v1", "v1")
    mergetag = repo.git("rev-parse", "HEAD")
    assert b"\nmergetag object " in repo.raw(mergetag)
    case("signed merge of a signed tag (mergetag)", mergetag, main, True)

    # OpenPGP when only SSH signers are trusted (git runs gpg with an empty GNUPGHOME).
    gpg_rev = repo.commit("gpg", gpg_key=gpg_home.fingerprint, gnupghome=gpg_home.path)
    case("gpg-signed commit, SSH signers only", gpg_rev, main, False)

    # Signatures ssh-keygen would not make, and ones it makes with options.
    case(
        "RSA signature with SHA-1 (ssh-rsa)",
        crafted(crafted_sshsig(rsa, unsigned)),
        main,
        False,
        "SHA-1",
    )
    case(
        "RSA signature with rsa-sha2-256",
        crafted(crafted_sshsig(rsa, unsigned, rsa_sigtype="rsa-sha2-256")),
        main,
        True,
    )
    case(
        "message hash sha1",
        crafted(crafted_sshsig(ed, unsigned, hashalg="sha1")),
        main,
        False,
        "only sha256 and sha512",
    )
    case(
        "signed in namespace file",
        crafted(keygen_sign(ed, unsigned, tmp, namespace="file")),
        main,
        False,
        "namespace",
    )
    sha256_sig = keygen_sign(ed, unsigned, tmp, namespace="git", opts=("-O", "hashalg=sha256"))
    case("message hash sha256 (-O hashalg=sha256)", crafted(sha256_sig), main, True)

    # OpenSSH certificates.
    cert = ssh_certificate(
        ca, certuser, principals="alice,ops@example.com", validity="20200101:20991231"
    )
    old_cert = ssh_certificate(ca, old_user, principals="alice", validity="20240101:20240201")
    cert_rev = repo.commit("certificate", key=cert)
    ca_file = trust("ca", f"alice,carol cert-authority {ca.public}")
    case("certificate from a trusted CA", cert_rev, ca_file, True)
    case(
        "certificate, CA line with a pattern",
        cert_rev,
        trust("ca2", f"*@example.com cert-authority {ca.public}"),
        True,
    )
    case(
        "certificate, principal not on the CA line",
        cert_rev,
        trust("ca3", f"carol cert-authority {ca.public}"),
        False,
        "no principal",
    )
    case(
        "certificate from another CA",
        cert_rev,
        trust("ca4", f"alice cert-authority {other_ca.public}"),
        False,
    )
    case(
        "certificate, plain key line without cert-authority",
        cert_rev,
        trust("ca5", f"alice {certuser.public}"),
        False,
    )
    case("certificate, CA revoked", cert_rev, ca_file, False, "revoked", trust("rev-ca", ca.public))
    case(
        "certificate expired at the commit time",
        repo.commit("old cert", key=old_cert, date=T_MARCH),
        ca_file,
        False,
        "certificate expired",
    )
    case(
        "certificate valid at the commit time, expired now",
        repo.commit("cert then", key=old_cert, date=T_MARCH - 40 * 86400),
        ca_file,
        True,
    )

    # A SHA-256 repository signs with the gpgsig-sha256 header.
    sha256 = Repo(tmp / "repo256", base_env(tmp), object_format="sha256")
    cases.append(
        Case("sha256 repository, signed", sha256, sha256.commit("s", key=ed.private), main, True)
    )
    cases.append(Case("sha256 repository, unsigned", sha256, sha256.commit("u"), main, False))
    yield cases


def _verdict(case: Case) -> Verdict:
    policy = TrustPolicy(allowed_signers=case.allowed, revoked_keys=case.revoked)
    return CommitVerifier(policy).verify(case.repo.raw(case.rev), revision=case.rev)


class TestGitCrosscheck:
    def test_every_verdict_is_gits(self, table: list[Case]) -> None:
        """For every commit of the table keystone's ok equals git verify-commit's exit status."""
        rows, wrong = [], []
        for case in table:
            git_ok, git_out = case.repo.verify_commit(
                case.rev, allowed=case.allowed, revoked=case.revoked
            )
            verdict = _verdict(case)
            bad = git_ok != verdict.ok or git_ok != case.expect or case.reason not in verdict.reason
            mark = "!!" if bad else "  "
            rows.append(
                f"{mark} {case.name:<55} expect={case.expect!s:<5} git={git_ok!s:<5} "
                f"keystone={verdict.ok!s:<5} {verdict.reason}"
            )
            if bad:
                wrong.append(f"{case.name}: git said {git_out.splitlines()[-1:] or ['(nothing)']}")
        table_text = "\n".join(rows)
        assert not wrong, f"verdicts differ:\n{table_text}\n\n" + "\n".join(wrong)
        assert len(table) >= 15

    def test_good_verdicts_name_principal_and_fingerprint(self, table: list[Case]) -> None:
        """A good SSH verdict carries git's principal and ssh-keygen's SHA256 fingerprint."""
        first = table[0]
        verdict = _verdict(first)
        _, out = first.repo.verify_commit(first.rev, allowed=first.allowed)
        assert verdict.format == "ssh" and verdict.signer == "ed25519@example.com"
        assert (
            f'Good "git" signature for ed25519@example.com with ED25519 key {verdict.fingerprint}'
            in out
        )

    def test_require_raises_signature_error_with_revision(self, table: list[Case]) -> None:
        """require() returns a good verdict and raises SignatureError naming revision and reason."""
        from keystone.errors import SignatureError

        good = table[0]
        unsigned = next(c for c in table if c.name == "unsigned")
        verifier = CommitVerifier(TrustPolicy(good.allowed))
        assert verifier.require(good.repo.raw(good.rev), revision=good.rev).ok
        with pytest.raises(SignatureError, match=rf"commit {unsigned.rev[:12]}: .*unsigned commit"):
            verifier.require(unsigned.repo.raw(unsigned.rev), revision=unsigned.rev)


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the test in Europe/Berlin (summer time in July), restoring the zone afterwards."""
    if not Path("/usr/share/zoneinfo/Europe/Berlin").exists():
        pytest.skip("no tzdata for Europe/Berlin")
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


class TestLocalTime:
    def test_summer_time_edges_match_git(self, tmp_path: Path, berlin: None) -> None:
        """With summer time, the valid-after/valid-before edges fall where git puts them."""
        env = base_env(tmp_path)
        key = ssh_key(tmp_path / "keys", "dst")
        repo = Repo(tmp_path / "repo", env)
        rev = repo.commit("july", key=key.private, date=calendar.timegm((2024, 7, 1, 10, 0, 0)))
        rows, wrong = [], []
        for option in (
            'valid-before="20240701103000Z"',
            'valid-before="20240701110000Z"',
            'valid-after="20240701110000Z"',
            'valid-after="20240701110001Z"',
            'valid-before="20240701123000"',
            'valid-after="20240701120000"',
            'valid-after="20240701120001"',
        ):
            allowed = write(tmp_path / "allowed", f"alice {option} {key.public}")
            git_ok, _ = repo.verify_commit(rev, allowed=allowed)
            verdict = CommitVerifier(TrustPolicy(allowed)).verify(repo.raw(rev))
            rows.append(f"{option:<36} git={git_ok} keystone={verdict.ok} {verdict.reason}")
            if git_ok != verdict.ok:
                wrong.append(option)
        assert not wrong, "\n".join(rows)

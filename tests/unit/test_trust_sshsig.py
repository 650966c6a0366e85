"""SSHSIG checks and the allowed-signers decision on commits signed with cryptography keys."""

from __future__ import annotations

import base64
import calendar
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keystone.errors import SignatureError
from keystone.trust import CommitVerifier, TrustPolicy, Verdict, parse_ssh_signature

T_MARCH = calendar.timegm((2024, 3, 2, 10, 0, 0, 0, 0, 0))


def string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def mpint(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return string(b"\0" + raw if raw[:1] >= b"\x80" else raw)


@dataclass(frozen=True)
class Signer:
    """A private key and its OpenSSH public line."""

    key: Any
    public: str

    @classmethod
    def make(cls, kind: str) -> Signer:
        key: Any
        if kind == "ed25519":
            key = ed25519.Ed25519PrivateKey.generate()
        elif kind.startswith("ecdsa"):
            curve = {"256": ec.SECP256R1(), "384": ec.SECP384R1(), "521": ec.SECP521R1()}
            key = ec.generate_private_key(curve[kind[-3:]])
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pub = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
        return cls(key, pub)

    @property
    def blob(self) -> bytes:
        return base64.b64decode(self.public.split()[1])

    @property
    def fingerprint(self) -> str:
        return "SHA256:" + base64.b64encode(hashlib.sha256(self.blob).digest()).decode().rstrip("=")

    def raw_signature(self, data: bytes, rsa_alg: str) -> bytes:
        k = self.key
        if isinstance(k, ed25519.Ed25519PrivateKey):
            return string(b"ssh-ed25519") + string(k.sign(data))
        if isinstance(k, ec.EllipticCurvePrivateKey):
            algo = {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[
                k.curve.key_size
            ]
            r, s = utils.decode_dss_signature(k.sign(data, ec.ECDSA(algo)))
            return string(self.public.split()[0].encode()) + string(mpint(r) + mpint(s))
        algo = {
            "ssh-rsa": hashes.SHA1(),
            "rsa-sha2-256": hashes.SHA256(),
            "rsa-sha2-512": hashes.SHA512(),
        }
        return string(rsa_alg.encode()) + string(k.sign(data, padding.PKCS1v15(), algo[rsa_alg]))

    def sshsig(
        self,
        message: bytes,
        *,
        namespace: str = "git",
        hashalg: str = "sha512",
        rsa_alg: str = "rsa-sha2-512",
        magic: bytes = b"SSHSIG",
        version: int = 1,
        trailing: bytes = b"",
        signed_namespace: str | None = None,
    ) -> bytes:
        """An armored SSHSIG over ``message``; the keyword arguments make it wrong on purpose."""
        digest = hashlib.new(hashalg, message).digest()
        ns = (signed_namespace or namespace).encode()
        signed = b"SSHSIG" + string(ns) + string(b"") + string(hashalg.encode()) + string(digest)
        blob = (
            magic + version.to_bytes(4, "big") + string(self.blob) + string(namespace.encode())
            + string(b"") + string(hashalg.encode()) + string(self.raw_signature(signed, rsa_alg))
            + trailing
        )  # fmt: skip
        b64 = base64.b64encode(blob).decode()
        lines = "\n".join(b64[i : i + 70] for i in range(0, len(b64), 70))
        return f"-----BEGIN SSH SIGNATURE-----\n{lines}\n-----END SSH SIGNATURE-----\n".encode()


def payload(when: int = T_MARCH, message: bytes = b"deploy v2\n") -> bytes:
    who = b"Ops <ops@example.com> %d +0000" % when
    return b"tree " + b"4" * 40 + b"\nauthor " + who + b"\ncommitter " + who + b"\n\n" + message


def signed_commit(body: bytes, armored: bytes) -> bytes:
    head, _, message = body.partition(b"\n\n")
    lines = armored.rstrip(b"\n").split(b"\n")
    return head + b"\ngpgsig " + b"\n ".join(lines) + b"\n\n" + message


@pytest.fixture(scope="module")
def signers() -> dict[str, Signer]:
    return {k: Signer.make(k) for k in ("ed25519", "ecdsa-256", "ecdsa-384", "ecdsa-521", "rsa")}


def judge(
    tmp_path: Path, raw: bytes, *lines: str, revoked: tuple[str, ...] | None = None
) -> Verdict:
    allowed = tmp_path / "allowed_signers"
    allowed.write_text("".join(line + "\n" for line in lines))
    rev_path = None
    if revoked is not None:
        rev_path = tmp_path / "revoked"
        rev_path.write_text("".join(line + "\n" for line in revoked))
    return CommitVerifier(TrustPolicy(allowed, revoked_keys=rev_path)).verify(raw, revision="abc")


class TestSignatures:
    @pytest.mark.parametrize("kind", ["ed25519", "ecdsa-256", "ecdsa-384", "ecdsa-521", "rsa"])
    @pytest.mark.parametrize("hashalg", ["sha256", "sha512"])
    def test_good_signature(
        self, signers: dict[str, Signer], tmp_path: Path, kind: str, hashalg: str
    ) -> None:
        """Every supported key type verifies with sha256 and sha512 message hashes."""
        s = signers[kind]
        body = payload()
        v = judge(tmp_path, signed_commit(body, s.sshsig(body, hashalg=hashalg)), f"ops {s.public}")
        assert (v.ok, v.format, v.signer, v.fingerprint, v.kind) == (
            True,
            "ssh",
            "ops",
            s.fingerprint,
            "good",
        )

    def test_rsa_sha256_signature(self, signers: dict[str, Signer], tmp_path: Path) -> None:
        """RSA signatures made with rsa-sha2-256 are accepted."""
        s, body = signers["rsa"], payload()
        assert judge(
            tmp_path, signed_commit(body, s.sshsig(body, rsa_alg="rsa-sha2-256")), f"o {s.public}"
        ).ok

    @pytest.mark.parametrize(
        ("change", "reason", "kind"),
        [
            ({"rsa_alg": "ssh-rsa"}, "SHA-1", "unsupported"),
            ({"hashalg": "sha1"}, "only sha256 and sha512", "unsupported"),
            ({"hashalg": "md5"}, "only sha256 and sha512", "unsupported"),
            ({"magic": b"SSHSIX"}, "bad magic", "bad-signature"),
            ({"version": 2}, "version 2", "bad-signature"),
            ({"trailing": b"\0"}, "trailing data", "bad-signature"),
            ({"namespace": "file"}, 'namespace is "file"', "namespace"),
            ({"signed_namespace": "file"}, "does not verify", "bad-signature"),
        ],
    )
    def test_refused_signatures(
        self,
        signers: dict[str, Signer],
        tmp_path: Path,
        change: dict[str, Any],
        reason: str,
        kind: str,
    ) -> None:
        """Weak algorithms, wrong magic/version/namespace and trailing bytes are refused."""
        s, body = signers["rsa"], payload()
        v = judge(tmp_path, signed_commit(body, s.sshsig(body, **change)), f"ops {s.public}")
        assert (v.ok, v.kind) == (False, kind)
        assert reason in v.reason

    @pytest.mark.parametrize("kind", ["ed25519", "ecdsa-384", "rsa"])
    def test_tampered_payload(self, signers: dict[str, Signer], tmp_path: Path, kind: str) -> None:
        """A signature over other bytes does not verify."""
        s = signers[kind]
        sig = s.sshsig(payload(message=b"deploy v2\n"))
        v = judge(tmp_path, signed_commit(payload(message=b"deploy v3\n"), sig), f"ops {s.public}")
        assert (v.ok, v.kind, v.reason) == (False, "bad-signature", "signature does not verify")

    @pytest.mark.parametrize(
        "armored",
        [
            b"-----BEGIN SSH SIGNATURE-----\nnot base64!\n-----END SSH SIGNATURE-----\n",
            b"-----BEGIN SSH SIGNATURE-----\nU1NIU0lH\n-----END SSH SIGNATURE-----\n",
            b"-----BEGIN SSH SIGNATURE-----\nU1NIU0lHAAAAAQ==\n",
            b"-----BEGIN SSH SIGNATURE-----\n-----END SSH SIGNATURE-----\n",
        ],
    )
    def test_malformed_armor(self, armored: bytes) -> None:
        """Broken armor, base64 or structure raise SignatureError with a reason."""
        with pytest.raises(SignatureError):
            parse_ssh_signature(armored)


class TestDecision:
    def test_unknown_key(self, signers: dict[str, Signer], tmp_path: Path) -> None:
        """A good signature by a key not in the file names the key's fingerprint."""
        s, other, body = signers["ed25519"], signers["ecdsa-256"], payload()
        v = judge(tmp_path, signed_commit(body, s.sshsig(body)), f"ops {other.public}")
        assert (v.ok, v.kind) == (False, "untrusted")
        assert f"key {s.fingerprint} is not in allowed signers" in v.reason

    @pytest.mark.parametrize(
        ("options", "when", "ok", "reason"),
        [
            (
                'valid-before="20240101Z"',
                T_MARCH,
                False,
                "signer ops expired at 2024-01-01 00:00:00 UTC",
            ),
            ('valid-after="20240601Z"', T_MARCH, False, "not valid before 2024-06-01"),
            ('valid-before="20240101Z"', T_MARCH - 90 * 86400, True, "good signature"),
            ('valid-before="20240302100000Z"', T_MARCH, True, "good signature"),
            ('valid-before="20240302100000Z"', T_MARCH + 1, False, "expired"),
            ('valid-after="20240302100000Z"', T_MARCH, True, "good signature"),
            ('valid-after="20240302100001Z"', T_MARCH, False, "not valid before"),
        ],
    )
    def test_validity_at_commit_time(
        self,
        signers: dict[str, Signer],
        tmp_path: Path,
        options: str,
        when: int,
        ok: bool,
        reason: str,
    ) -> None:
        """valid-after/valid-before are judged at the committer time, edges inclusive."""
        s, body = signers["ed25519"], payload(when)
        v = judge(tmp_path, signed_commit(body, s.sshsig(body)), f"ops {options} {s.public}")
        assert v.ok is ok and reason in v.reason

    def test_expired_reason_names_commit_time(
        self, signers: dict[str, Signer], tmp_path: Path
    ) -> None:
        """An expired signer's reason gives both the limit and the commit time."""
        s, body = signers["ed25519"], payload()
        v = judge(
            tmp_path,
            signed_commit(body, s.sshsig(body)),
            f'ops valid-before="20240101Z" {s.public}',
        )
        assert "(commit time 2024-03-02 10:00:00 UTC" in v.reason and v.kind == "expired"

    def test_namespace_option(self, signers: dict[str, Signer], tmp_path: Path) -> None:
        """A signer restricted to other namespaces is refused for git."""
        s, body = signers["ed25519"], payload()
        v = judge(
            tmp_path, signed_commit(body, s.sshsig(body)), f'ops namespaces="file,ssh" {s.public}'
        )
        assert (v.ok, v.kind) == (False, "namespace")

    def test_git_takes_the_first_matching_line(
        self, signers: dict[str, Signer], tmp_path: Path
    ) -> None:
        """As in git, the principals come from the first line with the key, even if another fits."""
        s, body = signers["ed25519"], payload()
        raw = signed_commit(body, s.sshsig(body))
        assert not judge(tmp_path, raw, f'alice namespaces="file" {s.public}', f"bob {s.public}").ok
        v = judge(tmp_path, raw, f"bob {s.public}", f'alice namespaces="file" {s.public}')
        assert (v.ok, v.signer) == (True, "bob")

    def test_first_good_principal_is_the_signer(
        self, signers: dict[str, Signer], tmp_path: Path
    ) -> None:
        """With several principals on the line, the signer is the first one git accepts."""
        s, body = signers["ed25519"], payload()
        raw = signed_commit(body, s.sshsig(body))
        assert (
            judge(tmp_path, raw, f"alice@example.com,ops@example.com {s.public}").signer
            == "alice@example.com"
        )
        assert judge(tmp_path, raw, f"alice,!alice,bob {s.public}").signer == "bob"

    def test_revoked(self, signers: dict[str, Signer], tmp_path: Path) -> None:
        """A revoked key fails even when it is an allowed signer."""
        s, other, body = signers["ed25519"], signers["rsa"], payload()
        raw = signed_commit(body, s.sshsig(body))
        v = judge(tmp_path, raw, f"ops {s.public}", revoked=("# lost", s.public))
        assert (v.ok, v.kind) == (False, "revoked")
        assert judge(tmp_path, raw, f"ops {s.public}", revoked=(other.public,)).ok

    def test_broken_trust_store_refuses_with_file_and_line(
        self, signers: dict[str, Signer], tmp_path: Path
    ) -> None:
        """A bad allowed-signers line refuses every SSH signature, naming file and line."""
        s, body = signers["ed25519"], payload()
        raw = signed_commit(body, s.sshsig(body))
        v = judge(tmp_path, raw, f"ops {s.public}", "broken line")
        assert (v.ok, v.kind) == (False, "config")
        assert f"{tmp_path / 'allowed_signers'}:2" in v.reason
        with pytest.raises(SignatureError, match="allowed_signers:2"):
            CommitVerifier(TrustPolicy(tmp_path / "allowed_signers")).require(raw, revision="abc")

    def test_missing_revocation_file_refuses(
        self, signers: dict[str, Signer], tmp_path: Path
    ) -> None:
        """A configured revocation list that cannot be read fails closed."""
        s, body = signers["ed25519"], payload()
        allowed = tmp_path / "allowed"
        allowed.write_text(f"ops {s.public}\n")
        policy = TrustPolicy(allowed, revoked_keys=tmp_path / "missing")
        v = CommitVerifier(policy).verify(signed_commit(body, s.sshsig(body)))
        assert (v.ok, v.kind) == (False, "config") and "missing" in v.reason

    def test_no_committer_time(self, signers: dict[str, Signer], tmp_path: Path) -> None:
        """A commit whose committer line has no date is refused."""
        s = signers["ed25519"]
        body = payload().replace(b"> %d +0000\n\n" % T_MARCH, b">\n\n")
        v = judge(tmp_path, signed_commit(body, s.sshsig(body)), f"ops {s.public}")
        assert not v.ok and "committer time" in v.reason


class TestPolicy:
    def test_no_trust_store(self, signers: dict[str, Signer]) -> None:
        """Without allowed_signers and gpg_home everything is refused."""
        s, body = signers["ed25519"], payload()
        v = CommitVerifier(TrustPolicy(None)).verify(signed_commit(body, s.sshsig(body)))
        assert (v.ok, v.reason) == (False, "no trust store configured")

    def test_unsigned_never_accepted(self, tmp_path: Path, signers: dict[str, Signer]) -> None:
        """An unsigned commit is refused, and require() says which revision."""
        allowed = tmp_path / "allowed"
        allowed.write_text(f"ops {signers['ed25519'].public}\n")
        verifier = CommitVerifier(TrustPolicy(allowed))
        assert verifier.verify(payload()).reason == "unsigned commit"
        with pytest.raises(
            SignatureError, match="commit 0123456789ab: signature refused: unsigned commit"
        ):
            verifier.require(payload(), revision="0123456789abcdef")

    def test_bad_min_trust(self) -> None:
        """An unknown gpg_min_trust is a validation error naming the field."""
        from keystone.errors import ValidationError

        with pytest.raises(ValidationError, match="gpg_min_trust"):
            CommitVerifier(TrustPolicy(None, gpg_min_trust="total"))

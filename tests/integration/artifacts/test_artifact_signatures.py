"""Detached signatures made by the real openssl CLI: what verifies, and what is refused and why."""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keystone.errors import ArtifactIntegrityError, UsageError
from keystone.runtime.artifacts import (
    ArtifactPolicy,
    ArtifactRefusedError,
    ArtifactSpec,
    ArtifactStore,
    clock_trusted,
)
from keystone.runtime.signing import SignatureRejected, sign_file, verify_file

from .conftest import Pki

pytestmark = pytest.mark.integration


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    path = tmp_path / "pub" / "app-1.0.bin"
    path.parent.mkdir()
    path.write_bytes(os.urandom(100_000))
    return path


@pytest.fixture
def policy(tmp_path: Path, pki: Pki) -> ArtifactPolicy:
    return ArtifactPolicy(
        cache_dir=tmp_path / "runtime" / "artifacts",
        state_dir=tmp_path / "runtime" / "state",
        trust_bundle=pki.cert("ca"),
        allow_unsigned=False,
    )


def spec(artifact: Path, sig: Path, cert: Path | None, *, pin: bool = True) -> ArtifactSpec:
    return ArtifactSpec(
        uri=artifact.as_uri(),
        sha256=hashlib.sha256(artifact.read_bytes()).hexdigest() if pin else None,
        sig_uri=sig.as_uri(),
        cert_uri=None if cert is None else cert.as_uri(),
    )


class TestOpensslSignaturesVerify:
    @pytest.mark.parametrize("kind", ["p256", "p384", "rsa", "ed25519"])
    def test_each_key_type(
        self, pki: Pki, policy: ArtifactPolicy, artifact: Path, kind: str
    ) -> None:
        """openssl dgst -sha256 -sign (ECDSA P-256/P-384, RSA) and Ed25519 over the digest verify."""
        name = f"leaf-{kind}"
        sig = pki.sign(name, artifact)
        prepared = ArtifactStore(policy).prepare(
            spec(artifact, sig, pki.cert(name)), component="api"
        )
        assert prepared.signed_by == f"CN={name}"

    def test_base64_signature(self, pki: Pki, policy: ArtifactPolicy, artifact: Path) -> None:
        """A base64 signature file (as some pipelines store them) verifies too."""
        sig = pki.sign("leaf-p256", artifact, b64=True)
        assert sig.read_bytes()[:4].isalnum()
        prepared = ArtifactStore(policy).prepare(
            spec(artifact, sig, pki.cert("leaf-p256")), component="api"
        )
        assert prepared.signed_by == "CN=leaf-p256"

    def test_intermediate_in_cert_uri(
        self, pki: Pki, policy: ArtifactPolicy, artifact: Path
    ) -> None:
        """A cert_uri holding leaf + intermediate chains to the root in the bundle."""
        sig = pki.sign("leaf-chained", artifact)
        prepared = ArtifactStore(policy).prepare(
            spec(artifact, sig, pki.dir / "chain.pem"), component="api"
        )
        assert prepared.signed_by == "CN=leaf-chained"

    def test_leaf_cert_from_environment(
        self, pki: Pki, policy: ArtifactPolicy, artifact: Path
    ) -> None:
        """KEYSTONE_LEAF_CERT stands in for cert_uri; without a bundle it is a pinned leaf."""
        sig = pki.sign("leaf-p256", artifact)
        env_policy = ArtifactPolicy.from_env(
            policy.cache_dir,
            {"KEYSTONE_LEAF_CERT": str(pki.cert("leaf-p256"))},
            allow_unsigned=False,
        )
        prepared = ArtifactStore(env_policy).prepare(spec(artifact, sig, None), component="api")
        assert prepared.signed_by == "CN=leaf-p256"

    def test_signature_is_cached_for_offline_rollback(
        self, pki: Pki, policy: ArtifactPolicy, artifact: Path
    ) -> None:
        """Once verified, artifact, signature and certificate come from the cache (no medium)."""
        sig = pki.sign("leaf-p256", artifact)
        cert = artifact.with_name("leaf.pem")
        cert.write_bytes(pki.cert("leaf-p256").read_bytes())
        entry = spec(artifact, sig, cert)
        store = ArtifactStore(policy)
        store.prepare(entry, component="api")
        for path in (artifact, sig, cert):
            path.unlink()
        assert store.prepare(entry, component="api").signed_by == "CN=leaf-p256"


class TestRefusals:
    def refuse(self, store: ArtifactStore, entry: ArtifactSpec) -> ArtifactRefusedError:
        with pytest.raises(ArtifactRefusedError) as info:
            store.prepare(entry, component="payments")
        err = info.value
        assert isinstance(err, ArtifactIntegrityError)
        assert "'payments'" in str(err) and entry.uri in str(err)
        assert err.component == "payments"
        assert store.cached() == []
        return err

    def test_flipped_byte(self, pki: Pki, policy: ArtifactPolicy, artifact: Path) -> None:
        """An artifact changed after signing is refused: bad signature."""
        sig = pki.sign("leaf-p256", artifact)
        data = bytearray(artifact.read_bytes())
        data[5000] ^= 0x80
        artifact.write_bytes(bytes(data))
        err = self.refuse(
            ArtifactStore(policy), spec(artifact, sig, pki.cert("leaf-p256"), pin=False)
        )
        assert err.reason == "bad-signature"
        assert "does not match" in str(err)

    def test_signature_by_another_key(
        self, pki: Pki, policy: ArtifactPolicy, artifact: Path
    ) -> None:
        """A signature made with another (even trusted) key is refused."""
        sig = pki.sign("leaf-p384", artifact)
        err = self.refuse(ArtifactStore(policy), spec(artifact, sig, pki.cert("leaf-p256")))
        assert err.reason == "bad-signature"

    def test_expired_leaf(self, pki: Pki, policy: ArtifactPolicy, artifact: Path) -> None:
        """A leaf that expired is refused, with the date it expired."""
        sig = pki.sign("leaf-expired", artifact)
        err = self.refuse(ArtifactStore(policy), spec(artifact, sig, pki.cert("leaf-expired")))
        assert err.reason == "expired"
        assert "expired on 2020-02-01" in str(err)

    def test_leaf_from_untrusted_ca(self, pki: Pki, policy: ArtifactPolicy, artifact: Path) -> None:
        """A well-formed signature from a CA outside the bundle is refused."""
        sig = pki.sign("leaf-rogue", artifact)
        err = self.refuse(ArtifactStore(policy), spec(artifact, sig, pki.cert("leaf-rogue")))
        assert err.reason == "untrusted-chain"
        assert "KEYSTONE_TRUST_BUNDLE" in str(err)

    def test_missing_signature_under_strict(self, policy: ArtifactPolicy, artifact: Path) -> None:
        """Strict policy: no sig_uri, no deployment."""
        entry = ArtifactSpec(
            uri=artifact.as_uri(), sha256=hashlib.sha256(artifact.read_bytes()).hexdigest()
        )
        err = self.refuse(ArtifactStore(policy), entry)
        assert err.reason == "missing-signature"

    def test_leaf_not_for_code_signing(
        self, pki: Pki, policy: ArtifactPolicy, artifact: Path
    ) -> None:
        """A TLS server certificate of the same CA may not sign artifacts."""
        sig = pki.sign("leaf-tls", artifact)
        err = self.refuse(ArtifactStore(policy), spec(artifact, sig, pki.cert("leaf-tls")))
        assert err.reason == "key-usage"

    def test_cert_uri_without_trust_bundle(
        self, pki: Pki, policy: ArtifactPolicy, artifact: Path
    ) -> None:
        """A certificate fetched with the artifact proves nothing without a bundle to judge it."""
        sig = pki.sign("leaf-p256", artifact)
        err = self.refuse(
            ArtifactStore(replace(policy, trust_bundle=None)),
            spec(artifact, sig, pki.cert("leaf-p256")),
        )
        assert err.reason == "no-trust-bundle"

    def test_garbage_signature(self, pki: Pki, policy: ArtifactPolicy, artifact: Path) -> None:
        """A signature file that is neither DER nor base64 of one is a bad signature."""
        sig = artifact.with_name("junk.sig")
        sig.write_bytes(b"\x00\x01 not a signature")
        err = self.refuse(ArtifactStore(policy), spec(artifact, sig, pki.cert("leaf-p256")))
        assert err.reason == "bad-signature"

    def test_unreadable_trust_bundle_is_a_usage_error(
        self, pki: Pki, policy: ArtifactPolicy, artifact: Path, tmp_path: Path
    ) -> None:
        """A KEYSTONE_TRUST_BUNDLE that does not exist is a configuration error naming it."""
        sig = pki.sign("leaf-p256", artifact)
        with pytest.raises(UsageError, match="KEYSTONE_TRUST_BUNDLE"):
            ArtifactStore(replace(policy, trust_bundle=tmp_path / "missing.pem")).prepare(
                spec(artifact, sig, pki.cert("leaf-p256")), component="c"
            )


class FakeWall:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


JAN_2020 = datetime(2020, 1, 15, tzinfo=UTC).timestamp()


class TestDeadRtc:
    def test_expired_cert_stays_expired_when_the_clock_resets(
        self, pki: Pki, policy: ArtifactPolicy, artifact: Path
    ) -> None:
        """A device whose clock fell back to Jan 2020 still refuses a leaf that expired Feb 2020."""
        sig = pki.sign("leaf-old", artifact)
        # At the time the system clock claims, the certificate really was valid:
        assert verify_file(artifact, sig, pki.cert("leaf-old"), pki.cert("old-ca"), at=datetime.fromtimestamp(JAN_2020, UTC)) == "CN=leaf-old"  # fmt: skip
        p = replace(policy, trust_bundle=pki.cert("old-ca"))
        with pytest.raises(ArtifactRefusedError) as info:
            ArtifactStore(p, wall_clock=FakeWall(JAN_2020)).prepare(
                spec(artifact, sig, pki.cert("leaf-old")), component="api"
            )
        assert info.value.reason == "expired"
        assert "the system clock says 2020-01-15" in str(info.value)
        assert clock_trusted(p)  # the real clock of this machine is fine

    def test_strict_policy_refuses_to_judge(
        self, pki: Pki, policy: ArtifactPolicy, artifact: Path
    ) -> None:
        """Strict: with the clock behind what the device has seen, nothing is verified."""
        sig = pki.sign("leaf-p256", artifact)
        p = replace(policy, clock_policy="strict")
        with pytest.raises(ArtifactRefusedError) as info:
            ArtifactStore(p, wall_clock=FakeWall(JAN_2020)).prepare(
                spec(artifact, sig, pki.cert("leaf-p256")), component="api"
            )
        assert info.value.reason == "clock-behind"
        assert "KEYSTONE_CLOCK_POLICY" in str(info.value)


class TestLocalTools:
    @pytest.mark.parametrize("kind", ["p256", "rsa"])
    def test_sign_file_matches_openssl(self, pki: Pki, artifact: Path, kind: str) -> None:
        """keystone's sign makes what `openssl dgst -sha256 -verify` accepts."""
        name = f"leaf-{kind}"
        sig = artifact.with_name("k.sig")
        sig.write_bytes(sign_file(artifact, pki.key(name)))
        pub = artifact.with_name("pub.pem")
        subprocess.run(["openssl", "x509", "-in", str(pki.cert(name)), "-pubkey", "-noout", "-out", str(pub)], check=True)  # fmt: skip
        check = subprocess.run(
            [
                "openssl",
                "dgst",
                "-sha256",
                "-verify",
                str(pub),
                "-signature",
                str(sig),
                str(artifact),
            ],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert verify_file(artifact, sig, pki.cert(name), pki.cert("ca")) == f"CN={name}"

    def test_ed25519_sign_file_matches_openssl_pkeyutl(self, pki: Pki, artifact: Path) -> None:
        """keystone's Ed25519 signature is byte-identical to openssl pkeyutl over the digest."""
        ours = sign_file(artifact, pki.key("leaf-ed25519"))
        theirs = pki.sign("leaf-ed25519", artifact).read_bytes()
        assert ours == theirs  # Ed25519 is deterministic

    def test_verify_file_names_the_file(self, pki: Pki, artifact: Path) -> None:
        """The keystonectl verify refusal names the file and the reason."""
        sig = pki.sign("leaf-rogue", artifact)
        with pytest.raises(SignatureRejected) as info:
            verify_file(artifact, sig, pki.cert("leaf-rogue"), pki.cert("ca"))
        assert str(artifact) in str(info.value) and info.value.reason == "untrusted-chain"

"""Signatures, manifests and recipe signatures against material made the way the Go Keystone makes it.

``scripts/dev-sign.sh`` of the Go project: an Ed25519 CA (``openssl req -x509``, no keyUsage) and
an Ed25519 leaf issued by ``openssl x509 -req`` (an X.509 v1 certificate); its earlier version
made the same with RSA. Signatures in both directions: openssl's verify ours, we verify openssl's.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keystone import manifest, sign
from keystone.errors import UsageError
from keystone.runtime.signing import SignatureRejected, verify_chain

pytestmark = pytest.mark.integration


def openssl(*args: str, cwd: Path) -> bytes:
    """Run the openssl CLI; fail the test with its stderr."""
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True)
    if proc.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed: {proc.stderr.decode()}")
    return proc.stdout


_RSA_MATERIAL: dict[str, bytes] = {}
"""RSA 4096/3072 keys take seconds to make: the exact material of the old script is made once
per module and copied (tests that need two distinct CAs use Ed25519)."""


def dev_sign_material(d: Path, kind: str) -> tuple[Path, Path, Path]:
    """CA and leaf exactly as Go's dev-sign.sh makes them; returns (ca.pem, leaf.key, leaf.pem).

    ``ed25519``: the current script (commit 58674d8): ``genpkey -algorithm ed25519`` for both,
    ``req -x509 -new -nodes -days 3650`` for the CA, ``x509 -req -CAcreateserial -days 365``
    for the leaf. ``rsa``: its first version (commit fe5b584): ``genrsa 4096`` for the CA and
    ``genrsa 3072`` for the leaf, each step with ``-sha256``. Neither leaf has an extension
    (``x509 -req`` without ``-extfile`` writes an X.509 v1 certificate); the CA has only what
    openssl's default ``v3_ca`` section adds (basicConstraints CA:TRUE, key identifiers), no
    keyUsage.
    """
    d.mkdir(parents=True, exist_ok=True)
    names = ("ca.key", "ca.pem", "leaf.key", "leaf.pem")
    if kind == "rsa" and _RSA_MATERIAL:
        for name in names:
            (d / name).write_bytes(_RSA_MATERIAL[name])
        return d / "ca.pem", d / "leaf.key", d / "leaf.pem"
    sha = ["-sha256"] if kind == "rsa" else []
    if kind == "ed25519":
        openssl("genpkey", "-algorithm", "ed25519", "-out", "ca.key", cwd=d)
    else:
        openssl("genrsa", "-out", "ca.key", "4096", cwd=d)
    openssl(
        "req", "-x509", "-new", "-nodes", "-key", "ca.key", *sha, "-days", "3650",
        "-out", "ca.pem", "-subj", "/CN=KeystoneDevCA", cwd=d,
    )  # fmt: skip
    if kind == "ed25519":
        openssl("genpkey", "-algorithm", "ed25519", "-out", "leaf.key", cwd=d)
    else:
        openssl("genrsa", "-out", "leaf.key", "3072", cwd=d)
    openssl(
        "req", "-new", "-key", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=keystone-dev-signer",
        cwd=d,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "leaf.pem", "-days", "365", *sha, cwd=d,
    )  # fmt: skip
    (d / "leaf.csr").unlink()
    if kind == "rsa":
        _RSA_MATERIAL.update({name: (d / name).read_bytes() for name in names})
    return d / "ca.pem", d / "leaf.key", d / "leaf.pem"


def openssl_sign(d: Path, key: Path, target: Path, kind: str) -> Path:
    """The signature the Go scheme wants, made by openssl (Ed25519: pkeyutl -rawin over the digest)."""
    out = target.with_name(target.name + ".sig")
    if kind == "ed25519":
        digest = d / "digest.bin"
        digest.write_bytes(openssl("dgst", "-sha256", "-binary", str(target), cwd=d))
        openssl(
            "pkeyutl", "-sign", "-inkey", str(key), "-rawin", "-in", str(digest),
            "-out", str(out), cwd=d,
        )  # fmt: skip
    else:
        openssl("dgst", "-sha256", "-sign", str(key), "-out", str(out), str(target), cwd=d)
    return out


def openssl_verifies(d: Path, cert: Path, target: Path, sig: Path, kind: str) -> bool:
    """Whether openssl accepts ``sig`` over ``target`` under the key of ``cert``."""
    pub = d / "pub.pem"
    pub.write_bytes(openssl("x509", "-in", str(cert), "-pubkey", "-noout", cwd=d))
    if kind == "ed25519":
        digest = d / "digest.bin"
        digest.write_bytes(openssl("dgst", "-sha256", "-binary", str(target), cwd=d))
        argv = [
            "pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-rawin", "-in", str(digest),
            "-sigfile", str(sig),
        ]  # fmt: skip
    else:
        argv = ["dgst", "-sha256", "-verify", str(pub), "-signature", str(sig), str(target)]
    return subprocess.run(["openssl", *argv], cwd=d, capture_output=True).returncode == 0


KINDS = ["ed25519", "rsa"]


class TestDevSignMaterial:
    """What Go's dev-sign.sh makes verifies here, and what we sign verifies in openssl."""

    @pytest.mark.parametrize("kind", KINDS)
    def test_the_material_is_what_the_web_pki_path_refuses(self, tmp_path: Path, kind: str) -> None:
        """The premise: the leaf is X.509 v1 with no extension and the CA has no keyUsage, so
        cryptography's path validation alone refuses the chain; our Go-rules walk accepts it."""
        from cryptography import x509
        from cryptography.x509 import verification as xv

        ca_pem, _, leaf_pem = dev_sign_material(tmp_path / "trust", kind)
        ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        leaf = x509.load_pem_x509_certificate(leaf_pem.read_bytes())
        assert leaf.version is x509.Version.v1 and len(leaf.extensions) == 0
        assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        with pytest.raises(x509.ExtensionNotFound):
            ca.extensions.get_extension_for_class(x509.KeyUsage)
        verifier = xv.PolicyBuilder().store(xv.Store([ca])).build_client_verifier()
        with pytest.raises(xv.VerificationError):
            verifier.verify(leaf, [])
        verify_chain(leaf, [], [ca], datetime.now(UTC))

    @pytest.mark.parametrize("kind", KINDS)
    def test_openssl_signature_verifies_with_our_code(self, tmp_path: Path, kind: str) -> None:
        """An openssl-made signature under a dev-sign.sh v1 leaf chains to its CA and verifies."""
        ca, key, leaf = dev_sign_material(tmp_path / "trust", kind)
        target = tmp_path / "com.example.recipe.toml"
        target.write_text('[metadata]\nname = "com.example"\n')
        openssl_sign(tmp_path, key, target, kind)
        assert sign.verify_detached(target, trust_bundle=ca, cert=leaf) == "CN=keystone-dev-signer"

    @pytest.mark.parametrize("kind", KINDS)
    def test_our_signature_verifies_with_openssl(self, tmp_path: Path, kind: str) -> None:
        """sign_file writes the bytes openssl's verify accepts, and checks them against --cert."""
        ca, key, leaf = dev_sign_material(tmp_path / "trust", kind)
        target = tmp_path / "artifact.tar.gz"
        target.write_bytes(b"payload the fleet will run\n")
        sig = sign.sig_path_for(target)
        sign.write_signature(sig, sign.sign_file(target, key, leaf))
        assert sig.stat().st_mode & 0o777 == 0o644
        assert openssl_verifies(tmp_path, leaf, target, sig, kind)
        assert sign.verify_detached(target, trust_bundle=ca, cert=leaf)
        target.write_bytes(b"payload an attacker would rather run\n")
        assert not openssl_verifies(tmp_path, leaf, target, sig, kind)
        with pytest.raises(SignatureRejected) as info:
            sign.verify_detached(target, trust_bundle=ca, cert=leaf)
        assert info.value.reason == "bad-signature"

    def test_ecdsa_sec1_key_signs(self, tmp_path: Path) -> None:
        """An ``EC PRIVATE KEY`` (SEC1) from openssl ecparam signs; openssl verifies it."""
        d = tmp_path
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "k.key", cwd=d)
        openssl(
            "req", "-x509", "-new", "-key", "k.key", "-days", "2", "-out", "k.pem",
            "-subj", "/CN=self", cwd=d,
        )  # fmt: skip
        target = d / "f.bin"
        target.write_bytes(b"x" * 1000)
        sig = d / "f.bin.sig"
        sign.write_signature(sig, sign.sign_file(target, d / "k.key", d / "k.pem"))
        assert openssl_verifies(d, d / "k.pem", target, sig, "ecdsa")

    def test_key_and_cert_that_do_not_match_are_refused_at_signing(self, tmp_path: Path) -> None:
        """Signing with --cert of another key fails before anything is written."""
        _, key, _ = dev_sign_material(tmp_path / "a", "ed25519")
        _, _, other_leaf = dev_sign_material(tmp_path / "b", "ed25519")
        target = tmp_path / "f"
        target.write_bytes(b"x")
        with pytest.raises(SignatureRejected, match="do not belong together"):
            sign.sign_file(target, key, other_leaf)

    def test_a_ca_not_in_the_bundle_is_refused(self, tmp_path: Path) -> None:
        """A leaf of another dev CA does not chain to this bundle."""
        ca, _, _ = dev_sign_material(tmp_path / "a", "ed25519")
        _, key, leaf = dev_sign_material(tmp_path / "b", "ed25519")
        target = tmp_path / "f"
        target.write_bytes(b"x")
        openssl_sign(tmp_path, key, target, "ed25519")
        with pytest.raises(SignatureRejected) as info:
            sign.verify_detached(target, trust_bundle=ca, cert=leaf)
        assert info.value.reason == "untrusted-chain"

    def test_expired_leaf_is_refused_and_good_when_judged_inside_its_window(
        self, tmp_path: Path
    ) -> None:
        """Validity is judged at the time given: past the leaf's notAfter it is refused."""
        ca, key, leaf = dev_sign_material(tmp_path / "trust", "ed25519")
        target = tmp_path / "f"
        target.write_bytes(b"x")
        openssl_sign(tmp_path, key, target, "ed25519")
        later = datetime.now(UTC) + timedelta(days=400)
        with pytest.raises(SignatureRejected) as info:
            sign.verify_detached(target, trust_bundle=ca, cert=leaf, at=later)
        assert info.value.reason == "expired"
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        with pytest.raises(SignatureRejected) as info:
            sign.verify_detached(target, trust_bundle=ca, cert=leaf, at=epoch)
        assert info.value.reason == "not-yet-valid"

    def test_cert_defaults_to_sibling_then_environment(self, tmp_path: Path) -> None:
        """<file>.crt wins over KEYSTONE_LEAF_CERT; with neither, the error says what to do."""
        ca, key, leaf = dev_sign_material(tmp_path / "trust", "ed25519")
        target = tmp_path / "f"
        target.write_bytes(b"x")
        openssl_sign(tmp_path, key, target, "ed25519")
        assert sign.verify_detached(
            target, trust_bundle=ca, environ={"KEYSTONE_LEAF_CERT": str(leaf)}
        )
        with pytest.raises(UsageError, match="KEYSTONE_LEAF_CERT"):
            sign.verify_detached(target, trust_bundle=ca, environ={})
        (tmp_path / "f.crt").write_bytes(leaf.read_bytes())
        assert sign.verify_detached(target, trust_bundle=ca, environ={})


class TestManifests:
    """manifest new / sign / verify with openssl-made keys, both directions."""

    def test_new_sign_verify_round_trip_and_openssl_agrees(self, tmp_path: Path) -> None:
        """A manifest we make and sign verifies here and under openssl; a replay is refused."""
        ca, key, leaf = dev_sign_material(tmp_path / "trust", "ed25519")
        data = tmp_path / "cve.tar"
        data.write_bytes(b"dataset bytes" * 100)
        when = datetime(2026, 8, 15, 3, 0, tzinfo=UTC)
        m = manifest.new_manifest(
            data, name="com.example.cve-bundle", uri="https://hub/cve.tar", published=when
        )
        path = tmp_path / "com.example.cve-bundle.manifest.toml"
        path.write_bytes(manifest.render_manifest(m))
        sig = manifest.sign_manifest(path, key, leaf)
        assert sig == tmp_path / "com.example.cve-bundle.manifest.toml.sig"
        assert openssl_verifies(tmp_path, leaf, path, sig, "ed25519")
        got = manifest.verify_manifest(path, trust_bundle=ca, cert=leaf)
        assert got.published == when and got.artifact.size == 1300
        with pytest.raises(manifest.ManifestReplayed, match="replay"):
            manifest.verify_manifest(path, trust_bundle=ca, cert=leaf, since=when)

    def test_openssl_signed_manifest_verifies(self, tmp_path: Path) -> None:
        """A manifest written by hand and signed by openssl (RSA, v1 leaf) verifies."""
        ca, key, leaf = dev_sign_material(tmp_path / "trust", "rsa")
        path = tmp_path / "m.manifest.toml"
        path.write_text(
            'schema = 1\nname = "n"\nversion = "v"\npublished = 2026-08-15T03:00:00Z\n'
            '[artifact]\nuri = "https://x/y"\nsha256 = "' + "ab" * 32 + '"\nsize = 3\n'
        )
        openssl_sign(tmp_path, key, path, "rsa")
        assert manifest.verify_manifest(path, trust_bundle=ca, cert=leaf).name == "n"

    def test_a_tampered_manifest_is_refused(self, tmp_path: Path) -> None:
        """Editing one byte of a signed manifest breaks its signature."""
        ca, key, leaf = dev_sign_material(tmp_path / "trust", "ed25519")
        data = tmp_path / "d"
        data.write_bytes(b"x")
        path = tmp_path / "m.toml"
        m = manifest.new_manifest(data, name="n", uri="https://x/d")
        path.write_bytes(manifest.render_manifest(m))
        manifest.sign_manifest(path, key, leaf)
        path.write_bytes(path.read_bytes().replace(b'version   = "', b'version   = "9'))
        with pytest.raises(SignatureRejected):
            manifest.verify_manifest(path, trust_bundle=ca, cert=leaf)

    def test_an_invalid_manifest_gets_no_signature(self, tmp_path: Path) -> None:
        """sign_manifest parses first: a manifest without published is never signed."""
        _, key, leaf = dev_sign_material(tmp_path / "trust", "ed25519")
        path = tmp_path / "m.toml"
        path.write_text('schema = 1\nname = "n"\nversion = "v"\n')
        with pytest.raises(manifest.ManifestError, match="replay"):
            manifest.sign_manifest(path, key, leaf)
        assert not (tmp_path / "m.toml.sig").exists()


class TestRecipeSignatures:
    """verify_recipe_signature: fail-closed, as the Go agent's verifyRecipeFileSignature."""

    def _recipe(self, tmp_path: Path) -> Path:
        recipe = tmp_path / "com.example.api.recipe.toml"
        recipe.write_text('[metadata]\nname = "com.example.api"\nversion = "1.0.0"\n')
        return recipe

    def test_signed_recipe_is_accepted(self, tmp_path: Path) -> None:
        """A recipe signed by openssl with dev-sign material, cert from KEYSTONE_LEAF_CERT."""
        ca, key, leaf = dev_sign_material(tmp_path / "trust", "ed25519")
        recipe = self._recipe(tmp_path)
        openssl_sign(tmp_path, key, recipe, "ed25519")
        env = {"KEYSTONE_LEAF_CERT": str(leaf)}
        assert sign.verify_recipe_signature(recipe, ca, environ=env) == "CN=keystone-dev-signer"

    @pytest.mark.parametrize(
        ("case", "reason"),
        [
            ("no-bundle", "no-trust-bundle"),
            ("no-sig", "missing-signature"),
            ("no-cert", "no-certificate"),
            ("tampered", "bad-signature"),
            ("other-ca", "untrusted-chain"),
        ],
    )
    def test_refusals(self, tmp_path: Path, case: str, reason: str) -> None:
        """Every way a recipe signature can be missing or wrong is refused with its reason."""
        ca, key, leaf = dev_sign_material(tmp_path / "trust", "ed25519")
        other_ca, _, _ = dev_sign_material(tmp_path / "other", "ed25519")
        recipe = self._recipe(tmp_path)
        env = {"KEYSTONE_LEAF_CERT": str(leaf)}
        bundle: Path | None = ca
        if case != "no-sig":
            openssl_sign(tmp_path, key, recipe, "ed25519")
        if case == "no-bundle":
            bundle = None
        elif case == "no-cert":
            env = {}
        elif case == "tampered":
            recipe.write_text(recipe.read_text() + "# edited\n")
        elif case == "other-ca":
            bundle = other_ca
        with pytest.raises(sign.RecipeSignatureError) as info:
            sign.verify_recipe_signature(recipe, bundle, environ=env)
        assert info.value.reason == reason
        assert str(recipe) in str(info.value)

    def test_the_bytes_parsed_are_the_bytes_verified(self, tmp_path: Path) -> None:
        """With data=, the signature is judged over the bytes the caller read, not a re-read."""
        ca, key, leaf = dev_sign_material(tmp_path / "trust", "ed25519")
        recipe = self._recipe(tmp_path)
        openssl_sign(tmp_path, key, recipe, "ed25519")
        env = {"KEYSTONE_LEAF_CERT": str(leaf)}
        read = recipe.read_bytes()
        assert sign.verify_recipe_signature(recipe, ca, data=read, environ=env)
        with pytest.raises(sign.RecipeSignatureError) as info:
            sign.verify_recipe_signature(recipe, ca, data=read + b"# swapped\n", environ=env)
        assert info.value.reason == "bad-signature"

    def test_insecure_skip_verify_skips(self, tmp_path: Path) -> None:
        """--insecure-skip-verify returns None without looking for anything."""
        assert (
            sign.verify_recipe_signature(self._recipe(tmp_path), None, insecure_skip_verify=True)
            is None
        )

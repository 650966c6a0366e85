"""``keystonectl manifest new|sign|verify`` against openssl, both ways, for every key type.

A manifest made and signed by the CLI verifies with ``openssl`` (``dgst -verify`` for ECDSA and
RSA; ``pkeyutl -verify -rawin`` over the digest for Ed25519); one signed by openssl verifies with
``keystonectl manifest verify``; tampering, a rogue CA and a replay are refused (exit 3).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keystone import manifest
from tests.integration.artifacts.conftest import Pki, openssl

pytestmark = pytest.mark.integration

KINDS = ["p256", "rsa", "ed25519"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    p = Pki(tmp_path_factory.mktemp("manifest-pki"))
    p.root_ca("ca")
    p.root_ca("rogue-ca")
    for kind in KINDS:
        p.issue(f"leaf-{kind}", kind, "ca")
    p.issue("leaf-rogue", "p256", "rogue-ca")
    return p


def ctl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTONE_")}
    return subprocess.run(
        [sys.executable, "-m", "keystone", "manifest", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def openssl_verifies(pki: Pki, leaf: str, file: Path, sig: Path) -> bool:
    pub = pki.dir / f"{leaf}.pub"
    openssl("pkey", "-in", str(pki.key(leaf)), "-pubout", "-out", str(pub), cwd=pki.dir)
    if pki.kinds[leaf] == "ed25519":
        digest = file.with_name(file.name + ".digest")
        digest.write_bytes(hashlib.sha256(file.read_bytes()).digest())
        argv = ["pkeyutl", "-verify", "-rawin", "-pubin", "-inkey", str(pub)]
        argv += ["-in", str(digest), "-sigfile", str(sig)]
    else:
        argv = ["dgst", "-sha256", "-verify", str(pub), "-signature", str(sig), str(file)]
    done = subprocess.run(["openssl", *argv], capture_output=True, text=True, check=False)
    return done.returncode == 0


@pytest.mark.parametrize("kind", KINDS)
def test_cli_made_manifest_verifies_with_openssl_and_itself(
    tmp_path: Path, pki: Pki, kind: str
) -> None:
    leaf = f"leaf-{kind}"
    (tmp_path / "cve.tar").write_bytes(b"a dataset\n" * 100)
    made = ctl(
        "new", "cve.tar", "--name", "cve", "--uri", "https://hub/cve.tar",
        "--version", "v1", "--published", "2026-08-15T03:00:00Z", cwd=tmp_path,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    path = tmp_path / "cve.manifest.toml"
    m = manifest.load_manifest(path)
    assert (m.name, m.version, m.artifact.size) == ("cve", "v1", 1000)
    assert m.artifact.sha256 == hashlib.sha256((tmp_path / "cve.tar").read_bytes()).hexdigest()

    signed = ctl(
        "sign", str(path), "--key", str(pki.key(leaf)), "--cert", str(pki.cert(leaf)), cwd=tmp_path
    )
    assert signed.returncode == 0, signed.stderr
    assert "signed cve (v1, published 2026-08-15T03:00:00Z)" in signed.stdout
    sig = tmp_path / "cve.manifest.toml.sig"
    assert openssl_verifies(pki, leaf, path, sig)

    ok = ctl(
        "verify", str(path), "--cert", str(pki.cert(leaf)), "--trust-bundle", str(pki.cert("ca")),
        "--since", "2026-08-14T00:00:00Z", cwd=tmp_path,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "signature OK against" in ok.stdout and "agents will accept it" in ok.stdout

    replay = ctl(
        "verify", str(path), "--cert", str(pki.cert(leaf)), "--trust-bundle", str(pki.cert("ca")),
        "--since", "2026-08-15T03:00:00Z", cwd=tmp_path,
    )  # fmt: skip
    assert replay.returncode == 3 and "not newer" in replay.stderr

    path.write_bytes(path.read_bytes().replace(b'"v1"', b'"v2"'))
    tampered = ctl(
        "verify", str(path), "--cert", str(pki.cert(leaf)), "--trust-bundle", str(pki.cert("ca")),
        cwd=tmp_path,
    )  # fmt: skip
    assert tampered.returncode == 3, tampered.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_openssl_signed_manifest_verifies_with_the_cli(tmp_path: Path, pki: Pki, kind: str) -> None:
    leaf = f"leaf-{kind}"
    (tmp_path / "cve.tar").write_bytes(b"data")
    m = manifest.new_manifest(tmp_path / "cve.tar", name="cve", uri="https://hub/cve.tar")
    path = tmp_path / "cve.manifest.toml"
    path.write_bytes(manifest.render_manifest(m))
    pki.sign(leaf, path).rename(tmp_path / "cve.manifest.toml.sig")
    shutil.copy(pki.cert(leaf), tmp_path / "cve.manifest.toml.crt")  # the default certificate
    ok = ctl("verify", str(path), "--trust-bundle", str(pki.cert("ca")), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "signature OK" in ok.stdout
    rogue = tmp_path / "cve.manifest.toml.crt"
    pki.sign("leaf-rogue", path).rename(tmp_path / "cve.manifest.toml.sig")
    shutil.copy(pki.cert("leaf-rogue"), rogue)
    refused = ctl("verify", str(path), "--trust-bundle", str(pki.cert("ca")), cwd=tmp_path)
    assert refused.returncode == 3


def test_sign_refuses_a_broken_manifest(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "bad.manifest.toml"
    path.write_text('schema = 1\nname = "x"\n')
    done = ctl("sign", str(path), "--key", str(pki.key("leaf-p256")), cwd=tmp_path)
    assert done.returncode == 3
    assert not (tmp_path / "bad.manifest.toml.sig").exists()

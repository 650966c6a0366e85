"""Real git repositories, ssh-keygen keys and gpg homes for the commit-signature tests.

Nothing here reads the machine's git or gpg configuration: every git call runs with its own
HOME, GNUPGHOME, no system or global config, and a repository-local user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

KEY_KINDS = {
    "ed25519": ["-t", "ed25519"],
    "ecdsa-256": ["-t", "ecdsa", "-b", "256"],
    "ecdsa-384": ["-t", "ecdsa", "-b", "384"],
    "ecdsa-521": ["-t", "ecdsa", "-b", "521"],
    "rsa-3072": ["-t", "rsa", "-b", "3072"],
}


@dataclass(frozen=True)
class SshKeyFiles:
    """A key pair made by ssh-keygen: the private key path and the ``type base64`` public text."""

    private: Path
    public: str

    @property
    def pub_path(self) -> Path:
        return self.private.with_name(self.private.name + ".pub")


def ssh_key(directory: Path, name: str, kind: str = "ed25519") -> SshKeyFiles:
    """Make a key pair with ``ssh-keygen`` (no passphrase)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    subprocess.run(
        ["ssh-keygen", "-q", *KEY_KINDS[kind], "-N", "", "-C", name, "-f", str(path)], check=True
    )
    public = " ".join(path.with_name(name + ".pub").read_text().split()[:2])
    return SshKeyFiles(path, public)


def ssh_certificate(
    ca: SshKeyFiles, user: SshKeyFiles, *, principals: str, validity: str, ident: str = "id"
) -> Path:
    """Certify ``user`` with ``ca`` (``ssh-keygen -s``); returns the ``-cert.pub`` path."""
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(ca.private), "-I", ident, "-n", principals,
         "-V", validity, str(user.pub_path)],
        check=True,
    )  # fmt: skip
    return user.private.with_name(user.private.name + "-cert.pub")


def embed_signature(payload: bytes, armored: bytes, header: str = "gpgsig") -> bytes:
    """A commit object: ``payload`` with ``armored`` as its last header, as git writes it."""
    head, _, message = payload.partition(b"\n\n")
    lines = armored.rstrip(b"\n").split(b"\n")
    return head + b"\n" + header.encode() + b" " + b"\n ".join(lines) + b"\n\n" + message


def base_env(root: Path) -> dict[str, str]:
    """An environment for git, ssh-keygen and gpg that owns its HOME and GNUPGHOME."""
    home = root / "home"
    empty_gpg = root / "gnupg-empty"
    home.mkdir(parents=True, exist_ok=True)
    empty_gpg.mkdir(mode=0o700, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GNUPGHOME": str(empty_gpg),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": str(home / "gitconfig"),
        "LC_ALL": "C",
    }
    if "TZ" in os.environ:
        env["TZ"] = os.environ["TZ"]
    return env


class Repo:
    """A git work tree driven by the ``git`` CLI with a private environment."""

    def __init__(self, path: Path, env: dict[str, str], *, object_format: str = "sha1") -> None:
        self.path = path
        self.env = env
        self._n = 0
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main", f"--object-format={object_format}")
        self.git("config", "user.name", "Keystone Test")
        self.git("config", "user.email", "test@example.com")

    def git(self, *args: str, env: dict[str, str] | None = None, input: bytes | None = None) -> str:
        """Run git in the work tree; fail the test with git's stderr when it fails."""
        proc = subprocess.run(
            ["git", *args], cwd=self.path, env={**self.env, **(env or {})}, input=input,
            capture_output=True,
        )  # fmt: skip
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).decode(errors="replace")
            pytest.fail(f"git {' '.join(args)} failed: {out}")
        return proc.stdout.decode().strip()

    def commit(
        self,
        message: str,
        *,
        key: Path | None = None,
        date: int | None = None,
        gpg_key: str | None = None,
        gpg_program: str = "gpg",
        gnupghome: Path | None = None,
        extra: tuple[str, ...] = (),
    ) -> str:
        """Add a file and commit it: SSH-signed by ``key``, gpg-signed by ``gpg_key``, or not."""
        self._n += 1
        name = f"file-{self._n}.txt"  # a new file per commit: branches merge without conflicts
        (self.path / name).write_text(f"{message}\n")
        self.git("add", name)
        env: dict[str, str] = {}
        if date is not None:
            env["GIT_COMMITTER_DATE"] = env["GIT_AUTHOR_DATE"] = f"{date} +0000"
        if gnupghome is not None:
            env["GNUPGHOME"] = str(gnupghome)
        if key is not None:
            sign = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key}"]
            self.git(*sign, "commit", "-q", "-S", *extra, "-m", message, env=env)
        elif gpg_key is not None:
            sign = ["-c", "gpg.format=openpgp", "-c", f"gpg.program={gpg_program}",
                    "-c", f"user.signingkey={gpg_key}"]  # fmt: skip
            self.git(*sign, "commit", "-q", "-S", *extra, "-m", message, env=env)
        else:
            self.git("commit", "-q", "--no-gpg-sign", *extra, "-m", message, env=env)
        return self.git("rev-parse", "HEAD")

    def raw(self, rev: str) -> bytes:
        """The commit object's content, as ``git cat-file commit`` prints it."""
        return subprocess.run(
            ["git", "cat-file", "commit", rev], cwd=self.path, env=self.env, capture_output=True,
            check=True,
        ).stdout  # fmt: skip

    def write_commit(self, raw: bytes, *, literally: bool = True) -> str:
        """Store ``raw`` as a commit object (``git hash-object -t commit -w``); return its id."""
        args = ["hash-object", "-t", "commit", "-w", "--stdin"]
        return self.git(*args, *(["--literally"] if literally else []), input=raw)

    def verify_commit(
        self,
        rev: str,
        *,
        allowed: Path | None = None,
        revoked: Path | None = None,
        gnupghome: Path | None = None,
        config: tuple[str, ...] = (),
    ) -> tuple[bool, str]:
        """The oracle: ``git verify-commit`` with this trust store; (exit status == 0, output)."""
        args: list[str] = []
        if allowed is not None:
            args += ["-c", f"gpg.ssh.allowedSignersFile={allowed}"]
        if revoked is not None:
            args += ["-c", f"gpg.ssh.revocationFile={revoked}"]
        for item in config:
            args += ["-c", item]
        env = dict(self.env)
        if gnupghome is not None:
            env["GNUPGHOME"] = str(gnupghome)
        proc = subprocess.run(
            ["git", *args, "verify-commit", rev], cwd=self.path, env=env, capture_output=True
        )
        return proc.returncode == 0, proc.stderr.decode(errors="replace").strip()


@dataclass(frozen=True)
class GpgHome:
    """A temporary GnuPG home with a signing key (ultimately trusted there, as gpg makes it)."""

    path: Path
    uid: str
    fingerprint: str
    env: dict[str, str]

    def gpg(self, *args: str, input: bytes | None = None, home: Path | None = None) -> bytes:
        env = {**self.env, "GNUPGHOME": str(home or self.path)}
        proc = subprocess.run(["gpg", "--batch", *args], env=env, input=input, capture_output=True)
        if proc.returncode != 0:
            pytest.fail(f"gpg {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
        return proc.stdout

    def new_key(self, uid: str, *, expire: str = "never", faked_time: str | None = None) -> str:
        """Generate another ed25519 signing key in this home; return its fingerprint."""
        fake = [f"--faked-system-time={faked_time}"] if faked_time else []
        self.gpg(*fake, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", expire)
        listing = self.gpg("--with-colons", "--list-keys", uid).decode()
        return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))

    def revoke(self, fingerprint: str) -> None:
        """Import the revocation certificate gpg stored when it made the key."""
        cert = (self.path / "openpgp-revocs.d" / f"{fingerprint}.rev").read_text()
        self.gpg("--import", input=cert.replace(":-----BEGIN", "-----BEGIN").encode())

    def export_to(self, fingerprint: str, home: Path) -> None:
        """Copy the public key into another home (no ownertrust there: trust undefined)."""
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.gpg("--import", input=self.gpg("--export", fingerprint), home=home)
        kill_gpg_agent(home, self.env)  # the import started one there


def kill_gpg_agent(home: Path, env: dict[str, str]) -> None:
    """Stop the gpg-agent that gpg started for ``home`` (only that one)."""
    if shutil.which("gpgconf"):
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
            env=env, capture_output=True, check=False,
        )  # fmt: skip


@pytest.fixture(scope="module")
def gpg_home() -> Iterator[GpgHome]:
    """A GnuPG home with one ed25519 signing key, in a short path (gpg's socket path limit)."""
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    root = Path(tempfile.mkdtemp(prefix="ks-gpg-"))
    env = base_env(root)
    home = root / "h"
    home.mkdir(mode=0o700)
    uid = "Alice Signer <alice@example.com>"
    proc = subprocess.run(
        ["gpg", "--batch", "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never"],
        env={**env, "GNUPGHOME": str(home)}, capture_output=True,
    )  # fmt: skip
    try:
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        listing = subprocess.run(
            ["gpg", "--batch", "--with-colons", "--list-keys", uid],
            env={**env, "GNUPGHOME": str(home)}, capture_output=True, check=True,
        ).stdout.decode()  # fmt: skip
        fpr = next(ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:"))
        yield GpgHome(home, uid, fpr, env)
    finally:
        for sub in root.iterdir():
            if sub.is_dir():
                kill_gpg_agent(sub, env)
        shutil.rmtree(root, ignore_errors=True)

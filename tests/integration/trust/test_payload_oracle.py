"""split_signed_object() against the bytes git itself hands to ssh-keygen and gpg.

git is pointed at a recording program (``gpg.ssh.program`` / ``gpg.program``) that saves the
payload it receives on stdin, the signature file and the ``-Overify-time`` argument; keystone's
split of ``git cat-file commit`` must be byte-identical.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keystone.trust import split_signed_object
from tests.integration.trust.conftest import GpgHome, Repo, base_env, embed_signature, ssh_key

pytestmark = pytest.mark.integration

SSH_RECORDER = """#!/bin/sh
# Stands in for ssh-keygen: records what git passes, answers like a good verification.
mode="$2"; prev=""; sig=""
for a in "$@"; do
  [ "$prev" = "-s" ] && sig="$a"
  case "$a" in -Overify-time=*) printf '%s' "${a#-Overify-time=}" > "$KS_DUMP/verify-time";; esac
  prev="$a"
done
case "$mode" in
  find-principals) echo recorder ;;
  verify) cat > "$KS_DUMP/payload"; cp "$sig" "$KS_DUMP/signature"
          echo 'Good "git" signature for recorder with ED25519 key SHA256:x' ;;
  *) cat > /dev/null ;;
esac
exit 0
"""

GPG_RECORDER = """#!/bin/sh
# Stands in for gpg: records the payload and the detached signature git passes.
prev=""
for a in "$@"; do
  [ "$prev" = "--verify" ] && cp "$a" "$KS_DUMP/signature"
  prev="$a"
done
cat > "$KS_DUMP/payload"
printf '[GNUPG:] NEWSIG\\n[GNUPG:] GOODSIG 0000000000000000 recorder\\n'
exit 0
"""


@dataclass(frozen=True)
class Recorded:
    payload: bytes
    signature: bytes
    verify_time: str | None


@dataclass
class Recorder:
    root: Path
    seen: dict[str, Recorded] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, text in (("ssh", SSH_RECORDER), ("gpg", GPG_RECORDER)):
            path = self.root / f"record-{name}"
            path.write_text(text)
            path.chmod(0o755)

    def record(self, repo: Repo, rev: str) -> Recorded:
        """What git hands the verifier for ``rev`` (recorded once)."""
        if rev in self.seen:
            return self.seen[rev]
        dump = self.root / f"dump-{rev[:16]}"
        dump.mkdir()
        repo.git(
            "-c", f"gpg.ssh.program={self.root / 'record-ssh'}",
            "-c", f"gpg.program={self.root / 'record-gpg'}",
            "-c", f"gpg.ssh.allowedSignersFile={self.root / 'unused'}",
            "verify-commit", rev,
            env={"KS_DUMP": str(dump)},
        )  # fmt: skip
        vt = dump / "verify-time"
        self.seen[rev] = Recorded(
            (dump / "payload").read_bytes(),
            (dump / "signature").read_bytes(),
            vt.read_text() if vt.exists() else None,
        )
        return self.seen[rev]


Signed = tuple[Recorder, list[tuple[str, Repo, str]]]


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, gpg_home: GpgHome) -> Iterator[Signed]:
    """Signed commits of every shape, in a SHA-1 and a SHA-256 repository."""
    tmp = tmp_path_factory.mktemp("payload")
    key = ssh_key(tmp / "keys", "signer")
    env = base_env(tmp)
    repo = Repo(tmp / "repo", env)
    sign = ("-c", "gpg.format=ssh", "-c", f"user.signingkey={key.private}")
    shapes: list[tuple[str, Repo, str]] = []

    def add(name: str, rev: str, where: Repo = repo) -> None:
        shapes.append((name, where, rev))

    add("ssh, one line", repo.commit("one", key=key.private))
    body = "subject\n\ngpgsig in the body\n continued"
    add("ssh, message with a gpgsig line", repo.commit(body, key=key.private))
    july = calendar.timegm((2024, 7, 1, 10, 0, 0))
    add("ssh, dated", repo.commit("dated", key=key.private, date=july))
    add("ssh, encoding header", _latin1_commit(repo, sign))
    add("gpg", repo.commit("gpg", gpg_key=gpg_home.fingerprint, gnupghome=gpg_home.path))
    base = repo.git("rev-parse", "HEAD")
    repo.git("checkout", "-q", "-b", "side")
    repo.commit("side", key=key.private)
    repo.git(*sign, "tag", "-s", "-m", "signed tag", "v1")
    repo.git("checkout", "-q", "main")
    repo.git(*sign, "merge", "-q", "--no-ff", "-S", "-m", "merge side", "side")
    add("ssh, merge", repo.git("rev-parse", "HEAD"))
    repo.git("checkout", "-q", "-b", "other", base)
    repo.commit("other", key=key.private)
    repo.git(*sign, "merge", "-q", "--no-ff", "-S", "-m", "merge tag", "v1")
    add("ssh, mergetag", repo.git("rev-parse", "HEAD"))

    # Hand-made objects: both signature headers, and the signature header in the middle.
    signed_raw = repo.raw(shapes[0][2])
    payload, block, _ = split_signed_object(signed_raw)
    assert block is not None
    both = embed_signature(embed_signature(payload, block.armored, "gpgsig-sha256"), block.armored)
    add("sha1 repo, gpgsig and gpgsig-sha256", repo.write_commit(both))
    tree_line, rest = payload.split(b"\n", 1)
    lines = block.armored.rstrip(b"\n").split(b"\n")
    middle = tree_line + b"\ngpgsig " + b"\n ".join(lines) + b"\n" + rest
    add("signature header before the parents", repo.write_commit(middle))

    sha256 = Repo(tmp / "repo256", env, object_format="sha256")
    add("sha256 repo", sha256.commit("s", key=key.private), sha256)
    s_payload, s_block, _ = split_signed_object(sha256.raw(shapes[-1][2]))
    assert s_block is not None and s_block.header == "gpgsig-sha256"
    sha1_header = embed_signature(s_payload, s_block.armored, "gpgsig")
    both256 = embed_signature(sha1_header, s_block.armored, "gpgsig-sha256")
    add("sha256 repo, gpgsig and gpgsig-sha256", sha256.write_commit(both256), sha256)
    yield Recorder(tmp), shapes


def _latin1_commit(repo: Repo, sign: tuple[str, ...]) -> str:
    """A signed commit with an ``encoding ISO-8859-1`` header and a Latin-1 message."""
    (repo.path / "latin1.txt").write_text("x\n")
    repo.git("add", "latin1.txt")
    msg = repo.path.parent / "latin1-msg"
    msg.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    repo.git("-c", "i18n.commitEncoding=ISO-8859-1", *sign, "commit", "-q", "-S", "-F", str(msg))
    rev = repo.git("rev-parse", "HEAD")
    assert b"\nencoding ISO-8859-1\n" in repo.raw(rev)
    return rev


class TestSplitMatchesGit:
    def test_payload_and_signature_are_gits(self, signed: Signed) -> None:
        """For every shape, payload and signature are byte-identical to what git passes on."""
        recorder, shapes = signed
        wrong = []
        for name, repo, rev in shapes:
            seen = recorder.record(repo, rev)
            payload, block, _ = split_signed_object(repo.raw(rev))
            same_sig = block is not None and block.armored == seen.signature
            if payload != seen.payload or not same_sig:
                wrong.append(f"{name}: same payload {payload == seen.payload}, same sig {same_sig}")
        assert not wrong, "\n".join(wrong)
        assert len(shapes) >= 10

    def test_commit_time_is_gits_verify_time(self, signed: Signed) -> None:
        """The committer time is the -Overify-time git gives ssh-keygen (local %Y%m%d%H%M%S)."""
        recorder, shapes = signed
        for name, repo, rev in shapes:
            if name == "gpg":
                continue
            seen = recorder.record(repo, rev)
            _, _, when = split_signed_object(repo.raw(rev))
            assert when is not None, name
            assert seen.verify_time == time.strftime("%Y%m%d%H%M%S", time.localtime(when)), name

"""OpenPGP-signed commits through a dedicated gpg home, against git verify-commit with that home."""

from __future__ import annotations

import calendar
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keystone.trust import CommitVerifier, TrustPolicy, Verdict
from tests.integration.trust.conftest import GpgHome, Repo, base_env, kill_gpg_agent, ssh_key

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class World:
    repo: Repo
    signer: GpgHome
    imported: Path  # a home holding only Alice's public key, trust undefined
    empty: Path
    revs: dict[str, str]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, gpg_home: GpgHome) -> Iterator[World]:
    """Commits signed by a good, an expired and a revoked gpg key, one tampered, one by SSH."""
    tmp = tmp_path_factory.mktemp("openpgp")
    repo = Repo(tmp / "repo", base_env(tmp))
    home = gpg_home
    revs = {"good": repo.commit("good", gpg_key=home.fingerprint, gnupghome=home.path)}

    # A key that expired in 2020: made and used with gpg's clock set back.
    old = home.new_key("Old Signer <old@example.com>", expire="1d", faked_time="20200101T000000")
    old_gpg = tmp / "old-gpg"
    old_gpg.write_text('#!/bin/sh\nexec gpg --faked-system-time 20200101T120000 "$@"\n')
    old_gpg.chmod(0o755)
    revs["expired key"] = repo.commit(
        "old", gpg_key=old, gpg_program=str(old_gpg), gnupghome=home.path,
        date=calendar.timegm((2020, 1, 1, 12, 0, 0)),
    )  # fmt: skip

    gone = home.new_key("Gone Signer <gone@example.com>")
    revs["revoked key"] = repo.commit("gone", gpg_key=gone, gnupghome=home.path)
    home.revoke(gone)

    raw = repo.raw(revs["good"])
    revs["tampered"] = repo.write_commit(raw.replace(b"\n\ngood", b"\n\nevil", 1))
    key = ssh_key(tmp / "keys", "ssh-signer")
    revs["ssh-signed"] = repo.commit("ssh", key=key.private)
    revs["unsigned"] = repo.commit("unsigned")

    imported = tmp / "imported"
    home.export_to(home.fingerprint, imported)
    empty = tmp / "empty"
    empty.mkdir(mode=0o700)
    yield World(repo, home, imported, empty, revs)
    kill_gpg_agent(imported, home.env)


def verdict(world: World, rev: str, home: Path, min_trust: str = "undefined") -> Verdict:
    policy = TrustPolicy(allowed_signers=None, gpg_home=home, gpg_min_trust=min_trust)
    return CommitVerifier(policy).verify(world.repo.raw(world.revs[rev]), revision=rev)


def git_ok(world: World, rev: str, home: Path, min_trust: str = "undefined") -> bool:
    ok, _ = world.repo.verify_commit(
        world.revs[rev], gnupghome=home, config=(f"gpg.minTrustLevel={min_trust}",)
    )
    return ok


class TestOpenPgp:
    def test_good_signature_from_the_dedicated_home(self, world: World) -> None:
        """A commit signed by a key of the gpg home verifies, with its uid and fingerprint."""
        v = verdict(world, "good", world.signer.path)
        assert (v.ok, v.format, v.signer, v.fingerprint) == (
            True, "openpgp", world.signer.uid, world.signer.fingerprint,
        )  # fmt: skip
        assert git_ok(world, "good", world.signer.path)

    @pytest.mark.parametrize(
        ("rev", "home", "min_trust", "expect", "reason"),
        [
            ("good", "signer", "undefined", True, "good signature"),
            ("good", "signer", "ultimate", True, "good signature"),
            ("good", "imported", "undefined", True, "good signature"),
            ("good", "imported", "marginal", False, "below gpg_min_trust marginal"),
            ("good", "imported", "fully", False, "below gpg_min_trust fully"),
            ("good", "empty", "undefined", False, "is not in the keyring"),
            ("tampered", "signer", "undefined", False, "bad OpenPGP signature"),
            ("expired key", "signer", "undefined", False, "has expired"),
            ("revoked key", "signer", "undefined", False, "is revoked"),
        ],
    )
    def test_verdict_matches_git(
        self, world: World, rev: str, home: str, min_trust: str, expect: bool, reason: str
    ) -> None:
        """Each OpenPGP case is judged as git verify-commit judges it with the same home."""
        path = {"signer": world.signer.path, "imported": world.imported, "empty": world.empty}[home]
        v = verdict(world, rev, path, min_trust)
        assert (v.ok, git_ok(world, rev, path, min_trust)) == (expect, expect), v.reason
        assert reason in v.reason

    def test_ssh_signature_needs_allowed_signers(self, world: World) -> None:
        """An SSH-signed commit is refused when only a gpg home is configured."""
        v = verdict(world, "ssh-signed", world.signer.path)
        assert not v.ok and "no allowed_signers" in v.reason

    def test_unsigned_and_no_store(self, world: World) -> None:
        """An unsigned commit is refused; with no trust store at all everything is."""
        assert verdict(world, "unsigned", world.signer.path).reason == "unsigned commit"
        bare = CommitVerifier(TrustPolicy(allowed_signers=None))
        v = bare.verify(world.repo.raw(world.revs["good"]))
        assert (v.ok, v.reason, v.kind) == (False, "no trust store configured", "no-trust-store")

    def test_missing_home_is_a_refusal(self, world: World, tmp_path: Path) -> None:
        """A gpg_home that does not exist refuses with a reason instead of raising."""
        v = verdict(world, "good", tmp_path / "nowhere")
        assert not v.ok and v.kind == "config" and "nowhere" in v.reason

"""split_signed_object(): git's signed payload, signature and committer time from raw objects."""

from __future__ import annotations

import pytest

from keystone.trust import split_signed_object

TREE1 = b"tree " + b"a" * 40 + b"\n"
TREE256 = b"tree " + b"b" * 64 + b"\n"
PEOPLE = (
    b"author Alice <alice@example.com> 1709373600 +0100\n"
    b"committer Bob <bob@example.com> 1709373700 -0500\n"
)
SSH_SIG = b"-----BEGIN SSH SIGNATURE-----\nU1NIU0lH\n-----END SSH SIGNATURE-----\n"
PGP_SIG = b"-----BEGIN PGP SIGNATURE-----\n\niHUEABYKAB0\n-----END PGP SIGNATURE-----\n"


def header(name: bytes, sig: bytes) -> bytes:
    """A signature header as git writes it: continuation lines start with a space."""
    return name + b" " + b"\n ".join(sig.rstrip(b"\n").split(b"\n")) + b"\n"


class TestSplit:
    @pytest.mark.parametrize(
        ("raw", "payload", "sig", "hdr", "fmt"),
        [
            pytest.param(
                TREE1 + PEOPLE + b"\nunsigned\n", TREE1 + PEOPLE + b"\nunsigned\n",
                None, None, None, id="unsigned",
            ),
            pytest.param(
                TREE1 + PEOPLE + header(b"gpgsig", SSH_SIG) + b"\nmsg\n",
                TREE1 + PEOPLE + b"\nmsg\n", SSH_SIG, "gpgsig", "ssh", id="sha1 ssh",
            ),
            pytest.param(
                TREE1 + PEOPLE + header(b"gpgsig", PGP_SIG) + b"\nmsg\n",
                TREE1 + PEOPLE + b"\nmsg\n", PGP_SIG, "gpgsig", "openpgp", id="sha1 openpgp",
            ),
            pytest.param(
                TREE1 + PEOPLE + header(b"gpgsig-sha256", PGP_SIG) + header(b"gpgsig", SSH_SIG)
                + b"\nmsg\n",
                TREE1 + PEOPLE + b"\nmsg\n", SSH_SIG, "gpgsig", "ssh",
                id="sha1 object drops the other header too",
            ),
            pytest.param(
                TREE256 + PEOPLE + header(b"gpgsig", PGP_SIG) + header(b"gpgsig-sha256", SSH_SIG)
                + b"\nmsg\n",
                TREE256 + PEOPLE + b"\nmsg\n", SSH_SIG, "gpgsig-sha256", "ssh",
                id="sha256 object signs with gpgsig-sha256",
            ),
            pytest.param(
                TREE256 + PEOPLE + header(b"gpgsig", SSH_SIG) + b"\nmsg\n",
                TREE256 + PEOPLE + b"\nmsg\n", None, None, None,
                id="sha256 object with only a sha1 signature is unsigned",
            ),
            pytest.param(
                TREE1 + header(b"gpgsig", SSH_SIG) + PEOPLE + b"\nmsg\n",
                TREE1 + PEOPLE + b"\nmsg\n", SSH_SIG, "gpgsig", "ssh", id="header in the middle",
            ),
            pytest.param(
                TREE1 + PEOPLE + b"mergetag object " + b"c" * 40 + b"\n type commit\n tag v1\n"
                + b" \n tag message\n" + header(b"gpgsig", SSH_SIG) + b"\nmerge\n",
                TREE1 + PEOPLE + b"mergetag object " + b"c" * 40 + b"\n type commit\n tag v1\n"
                + b" \n tag message\n\nmerge\n",
                SSH_SIG, "gpgsig", "ssh", id="mergetag continuation lines stay",
            ),
            pytest.param(
                TREE1 + PEOPLE + header(b"gpgsig", SSH_SIG) + b"\nsubject\n\ngpgsig in body\n x\n",
                TREE1 + PEOPLE + b"\nsubject\n\ngpgsig in body\n x\n", SSH_SIG, "gpgsig", "ssh",
                id="message lines are never headers",
            ),
            pytest.param(
                TREE1 + PEOPLE + header(b"gpgsig", b"-----BEGIN SIGNED MESSAGE-----\nx\n") + b"\nm",
                TREE1 + PEOPLE + b"\nm", b"-----BEGIN SIGNED MESSAGE-----\nx\n", "gpgsig", "x509",
                id="x509 and no final newline",
            ),
            pytest.param(
                TREE1 + PEOPLE + b"gpgsigx nonsense\n" + header(b"gpgsig", b"junk") + b"\nm\n",
                TREE1 + PEOPLE + b"\nm\n", b"junk\n", "gpgsig", "unknown",
                id="other gpgsig-like header dropped, unknown format",
            ),
        ],
    )  # fmt: skip
    def test_table(
        self, raw: bytes, payload: bytes, sig: bytes | None, hdr: str | None, fmt: str | None
    ) -> None:
        """The payload is the object without signature headers; the signature is unindented."""
        got_payload, block, _ = split_signed_object(raw)
        assert got_payload == payload
        if sig is None:
            assert block is None
        else:
            assert block is not None
            assert (block.armored, block.header, block.format) == (sig, hdr, fmt)

    @pytest.mark.parametrize(
        ("people", "expect"),
        [
            (PEOPLE, 1709373700),
            (b"committer Bob <bob@example.com> 1709373700 +0000\n", 1709373700),
            (b"committer Bob <b>ob> <bob@example.com> 42 +0000\n", 42),
            (b"committer <bob@example.com> 42 -0700\n", 42),
            (b"committer Bob <bob@example.com>   42   +0000\n", 42),
            (b"author Alice <a@example.com> 5 +0000\n", None),
            (b"committer Bob <bob@example.com>\n", None),
            (b"committer Bob <bob@example.com> 42\n", None),
            (b"committer Bob <bob@example.com> 0 +0000\n", None),
            (b"committer Bob bob@example.com 42 +0000\n", None),
            (b"committer Bob <bob@example.com 42 +0000\n", None),
        ],
    )
    def test_committer_time(self, people: bytes, expect: int | None) -> None:
        """The time is the committer's, found as git's split_ident_line finds it, or None."""
        raw = TREE1 + people + header(b"gpgsig", SSH_SIG) + b"\ncommitter X <x> 99 +0000\n"
        assert split_signed_object(raw)[2] == expect

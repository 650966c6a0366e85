"""Allowed-signers grammar, OpenSSH patterns and times, revocation lists (keystone.trust)."""

from __future__ import annotations

import base64
import calendar
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keystone.errors import ValidationError
from keystone.trust import (
    load_allowed_signers,
    load_revoked_keys,
    match_pattern,
    match_pattern_list,
    parse_absolute_time,
    parse_allowed_signers_line,
)


def openssh(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


ED = openssh(ed25519.Ed25519PrivateKey.generate())
ED2 = openssh(ed25519.Ed25519PrivateKey.generate())
P256 = openssh(ec.generate_private_key(ec.SECP256R1()))
RSA = openssh(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))


@pytest.fixture
def zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Set the process time zone for one test; restore it afterwards."""

    def set_zone(name: str) -> None:
        if name != "UTC" and not Path(f"/usr/share/zoneinfo/{name}").exists():
            pytest.skip(f"no tzdata for {name}")
        monkeypatch.setenv("TZ", name)
        time.tzset()

    yield set_zone
    monkeypatch.undo()
    time.tzset()


class TestPatterns:
    @pytest.mark.parametrize(
        ("s", "pattern", "expect"),
        [
            ("alice", "alice", True),
            ("alice", "alicE", False),
            ("alice", "a*", True),
            ("alice", "*e", True),
            ("alice", "a?ice", True),
            ("alice", "a?ce", False),
            ("alice", "a**e", True),
            ("", "*", True),
            ("", "", True),
            ("a", "", False),
            ("alice@example.com", "*@example.com", True),
            ("alice@example.org", "*@example.com", False),
            ("*@example.com", "*@example.com", True),
            ("abcabd", "*abd", True),
            ("ab", "a?b", False),
            ("j\u00fcrgen", "j??rgen", True),  # ? is one byte, as in OpenSSH
            ("j\u00fcrgen", "j?rgen", False),
        ],
    )
    def test_match_pattern(self, s: str, pattern: str, expect: bool) -> None:
        """match_pattern follows OpenSSH: * any run, ? one character, everything else itself."""
        assert match_pattern(s, pattern) is expect

    @pytest.mark.parametrize(
        ("s", "patterns", "expect"),
        [
            ("bob@example.com", "*@example.com", 1),
            ("bob@example.com", "*@example.com,!bob@example.com", -1),
            ("bob@example.com", "!bob@example.com,*@example.com", -1),
            ("eve@example.com", "*@example.com,!bob@example.com", 1),
            ("bob", "!alice", 0),
            ("bob", "alice,carol", 0),
            ("!bob", "*,!bob", 1),
            ("bob", "alice,,bob", 1),
            ("x", "*,!*", -1),
        ],
    )
    def test_match_pattern_list(self, s: str, patterns: str, expect: int) -> None:
        """A negated match wins over a positive one; negations alone never match."""
        assert match_pattern_list(s, patterns) == expect


class TestAbsoluteTime:
    @pytest.mark.parametrize(
        ("text", "expect"),
        [
            ("20240101Z", utc(2024, 1, 1)),
            ("20240101z", utc(2024, 1, 1)),
            ("20240101UTC", utc(2024, 1, 1)),
            ("202401011230Z", utc(2024, 1, 1, 12, 30)),
            ("20240101123045Z", utc(2024, 1, 1, 12, 30, 45)),
            ("20240231Z", utc(2024, 3, 2)),  # strptime allows day 31, timegm carries over
            ("20240101235960Z", utc(2024, 1, 2)),
        ],
    )
    def test_utc_forms(self, text: str, expect: int) -> None:
        """YYYYMMDD[HHMM[SS]] with Z or UTC is UTC."""
        assert parse_absolute_time(text) == expect

    @pytest.mark.parametrize(
        "text",
        ["\u0662\u0660\u0662\u0664\u0660\u0661\u0660\u0661", "2024010", "2024010112", "202401011", "20241301Z", "20240100Z", "20240101240000Z",
         "20240101126000Z", "2024-1-01", "abcdefgh", "19690101Z", "19700101Z", "", "Z"],
    )  # fmt: skip
    def test_rejected(self, text: str) -> None:
        """Other lengths, fields out of range, and times not after the epoch are refused."""
        with pytest.raises(ValueError):
            parse_absolute_time(text)

    def test_local_time_without_z(self, zone: object) -> None:
        """Without Z the time is local, read as standard time even in summer (mktime isdst=0)."""
        set_zone = zone
        assert callable(set_zone)
        set_zone("UTC")
        assert parse_absolute_time("20240701120000") == utc(2024, 7, 1, 12)
        set_zone("Europe/Berlin")
        assert parse_absolute_time("20240101120000") == utc(2024, 1, 1, 11)
        assert parse_absolute_time("20240701120000") == utc(2024, 7, 1, 11)


class TestAllowedSignersLine:
    @pytest.mark.parametrize(
        ("line", "principals", "namespaces", "after", "before", "ca"),
        [
            (f"alice {ED}", "alice", None, None, None, False),
            (f"alice {ED} alice's laptop", "alice", None, None, None, False),
            (f"  alice\t{ED}\n", "alice", None, None, None, False),
            (f"alice,bob@example.com {P256}", "alice,bob@example.com", None, None, None, False),
            (f"*@x.org,!eve@x.org {RSA}", "*@x.org,!eve@x.org", None, None, None, False),
            (f'"alice smith" {ED}', "alice smith", None, None, None, False),
            (f'alice namespaces="git" {ED}', "alice", "git", None, None, False),
            (f'alice NAMESPACES="git,file" {ED}', "alice", "git,file", None, None, False),
            (f'alice valid-after="20240101Z",valid-before="20250101Z" {ED}', "alice", None,
             utc(2024, 1, 1), utc(2025, 1, 1), False),
            (f"alice cert-authority {ED}", "alice", None, None, None, True),
            (f'alice cert-authority,namespaces="git" {ED}', "alice", "git", None, None, True),
            (f'alice ,namespaces="git" {ED}', "alice", "git", None, None, False),
        ],
    )  # fmt: skip
    def test_good_lines(
        self,
        line: str,
        principals: str,
        namespaces: str | None,
        after: int | None,
        before: int | None,
        ca: bool,
    ) -> None:
        """Principals, options and key are read with OpenSSH's grammar."""
        entry = parse_allowed_signers_line(line, file="f", line=3)
        assert entry is not None
        assert (entry.principals, entry.namespaces, entry.valid_after, entry.valid_before) == (
            principals, namespaces, after, before,
        )  # fmt: skip
        assert entry.cert_authority is ca
        assert entry.key.fingerprint.startswith("SHA256:")

    @pytest.mark.parametrize("line", ["", "\n", "   \n", "# a comment\n", "  # indented comment"])
    def test_blank_and_comment_lines(self, line: str) -> None:
        """Blank lines and # comments are not entries."""
        assert parse_allowed_signers_line(line) is None

    @pytest.mark.parametrize(
        ("line", "reason"),
        [
            ("alice\n", "missing key"),
            ("alice", "principals and a key"),
            (f"alice {ED.split()[0]}\n", "invalid key"),
            ("alice ssh-ed25519 AAAA-not-base64\n", "invalid key"),
            (f"alice {ED.split()[0]} {P256.split()[1]}\n", "does not match"),
            (f"alice valid-before=20240101 {ED}", "missing start quote"),
            (f'alice valid-before="20240101 {ED}', "unterminated quote"),
            (f'alice valid-before="2024" {ED}', 'invalid "valid-before" time'),
            (f'alice valid-after="20250101Z",valid-before="20240101Z" {ED}', "not after"),
            (f'alice namespaces="git",namespaces="file" {ED}', 'multiple "namespaces"'),
            (f"alice foo {ED}", "unknown key option"),
            (f'alice namespaces="git", {ED}', "unexpected end of options"),
            (f'"alice {ED}', "principals and a key"),
            (f'"" {ED}', "empty principal list"),
            ("alice ssh-ed25519\n", "invalid key: missing key data"),
            ('alice namespaces="git"\n', "missing key"),
        ],
    )
    def test_bad_lines(self, line: str, reason: str) -> None:
        """A malformed line raises ValidationError with the file, the line and the reason."""
        with pytest.raises(ValidationError) as err:
            parse_allowed_signers_line(line, file="signers", line=7)
        assert (err.value.file, err.value.line) == ("signers", 7)
        assert reason in str(err.value)
        assert str(err.value).startswith("signers:7: ")


class TestLoadAllowedSigners:
    def test_reports_the_bad_line_number(self, tmp_path: Path) -> None:
        """load_allowed_signers names the file and the number of the first bad line."""
        path = tmp_path / "allowed_signers"
        path.write_text(f"# signers\n\nalice {ED}\nbob namespaces=git {ED2}\ncarol {P256}\n")
        with pytest.raises(ValidationError) as err:
            load_allowed_signers(path)
        assert (err.value.file, err.value.line) == (str(path), 4)

    def test_expired_line_is_valid(self, tmp_path: Path) -> None:
        """An expired line is not a parse error: it only matters for the signatures it matches."""
        path = tmp_path / "allowed_signers"
        path.write_text(f'old valid-before="20000101" {ED2}\nalice {ED}\n')
        entries = load_allowed_signers(path)
        assert [(e.principals, e.line) for e in entries] == [("old", 1), ("alice", 2)]
        assert entries[0].valid_before is not None

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file is a ValidationError naming it."""
        with pytest.raises(ValidationError, match="nothere"):
            load_allowed_signers(tmp_path / "nothere")

    def test_unsupported_but_valid_key_types_load(self, tmp_path: Path) -> None:
        """Key types keystone cannot verify (DSA) still load, as ssh-keygen reads them."""
        from cryptography.hazmat.primitives.asymmetric import dsa

        numbers = dsa.generate_private_key(key_size=1024).public_key().public_numbers()
        p, q, g = (
            numbers.parameter_numbers.p,
            numbers.parameter_numbers.q,
            numbers.parameter_numbers.g,
        )
        fields = [b"ssh-dss"] + [
            n.to_bytes(n.bit_length() // 8 + 1, "big") for n in (p, q, g, numbers.y)
        ]
        blob = b"".join(len(f).to_bytes(4, "big") + f for f in fields)  # string, then mpints
        dss = "ssh-dss " + base64.b64encode(blob).decode()
        path = tmp_path / "allowed_signers"
        path.write_text(f"legacy {dss}\nalice {ED}\n")
        assert [e.key.plain_type for e in load_allowed_signers(path)] == ["ssh-dss", "ssh-ed25519"]


class TestRevokedKeys:
    def test_keys_comments_and_blank_lines(self, tmp_path: Path) -> None:
        """One public key per line; comments and blank lines are skipped."""
        path = tmp_path / "revoked"
        path.write_text(f"# lost laptops\n\n{ED} old laptop\n  {P256}\n")
        assert len(load_revoked_keys(path)) == 2

    def test_bad_line_fails_closed(self, tmp_path: Path) -> None:
        """A line that is not a key is an error with its number, never silently skipped."""
        path = tmp_path / "revoked"
        path.write_text(f"{ED}\nalice {ED2}\n")
        with pytest.raises(ValidationError) as err:
            load_revoked_keys(path)
        assert err.value.line == 2

    def test_binary_krl_is_refused(self, tmp_path: Path) -> None:
        """A binary KRL is refused with a message saying what to write instead."""
        path = tmp_path / "revoked.krl"
        path.write_bytes(b"SSHKRL\n\0" + bytes(40))
        with pytest.raises(ValidationError, match="KRL"):
            load_revoked_keys(path)

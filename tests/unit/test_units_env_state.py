"""Durations, sizes, semver constraints, .env parsing and atomic state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keystone.env import SubstitutionError, parse_dotenv, substitute
from keystone.semver import Constraint
from keystone.state import History, atomic_write, read_json, write_json
from keystone.units import format_duration, go_duration, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("0", 0),
        ("10", 10),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Go duration strings parse to seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5 minutes", "s", "1d", "--1s"])
def test_bad_duration(text: str) -> None:
    """Anything Go would refuse is refused."""
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration() -> None:
    """Durations print the Go way."""
    assert [format_duration(x) for x in (0.25, 5, 90, 3725)] == ["250ms", "5s", "1m30s", "1h2m5s"]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512", 512),
        ("64K", 65536),
        ("128M", 128 << 20),
        ("2G", 2 << 30),
        ("1GiB", 1 << 30),
        ("1MB", 10**6),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    """Sizes parse with binary single-letter suffixes."""
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("constraint", "version", "ok"),
    [
        ("^1.2", "1.9.0", True),
        ("^1.2", "2.0.0", False),
        ("~1.2", "1.2.9", True),
        ("~1.2", "1.3.0", False),
        (">=1.0, <2.0", "1.5", True),
        ("1.x", "1.7.3", True),
        ("1.x", "2.0", False),
        ("", "0.0.1", True),
        ("1.2 - 1.4", "1.4.9", True),
        ("1.2 - 1.4", "1.5.0", False),
        ("<1.0 || >=3", "3.1", True),
        ("!=1.2.3", "1.2.3", False),
        ("^0.2.3", "0.3.0", False),
        ("1.2.3", "1.2.3", True),
    ],
)
def test_semver(constraint: str, version: str, ok: bool) -> None:
    """Constraints follow the Masterminds syntax the Go recipes use."""
    assert Constraint.parse(constraint).allows(version) is ok


def test_substitute() -> None:
    """${VAR} and ${VAR:-default} expand; $$ escapes; a bare $VAR is left for the shell."""
    env = {"A": "1", "EMPTY": ""}
    assert substitute("${A}-${B:-2}-${EMPTY:-3}-$$-$HOME", env) == "1-2-3-$-$HOME"
    with pytest.raises(SubstitutionError, match=r"\$\{B\} is not set"):
        substitute("${B}", env)


def test_dotenv() -> None:
    """.env lines: comments, export, quotes."""
    text = "# c\nexport A=1\nB=\"two words\"\nC='x y'\nD=plain # trailing\n\nbad line\n"
    assert parse_dotenv(text) == {"A": "1", "B": "two words", "C": "x y", "D": "plain"}


class TestState:
    def test_atomic_write_replaces(self, tmp_path: Path) -> None:
        """The target is replaced whole and no temp file is left."""
        p = tmp_path / "s" / "state.json"
        write_json(p, {"a": 1})
        write_json(p, {"a": 2})
        assert json.loads(p.read_text()) == {"a": 2}
        assert [f.name for f in p.parent.iterdir()] == ["state.json"]

    def test_corrupt_file_is_set_aside(self, tmp_path: Path) -> None:
        """A state file that does not parse does not stop the agent; it is kept aside."""
        p = tmp_path / "state.json"
        atomic_write(p, b"{not json")
        assert read_json(p, {"default": True}) == {"default": True}
        assert any(f.name.startswith("state.json.corrupt") for f in tmp_path.iterdir())

    def test_history_skips_torn_line(self, tmp_path: Path) -> None:
        """A torn last line (crash mid-append) is skipped; newest comes first."""
        h = History(tmp_path / "h.jsonl")
        h.append({"n": 1})
        h.append({"n": 2})
        with (tmp_path / "h.jsonl").open("a") as f:
            f.write('{"n": 3')
        assert [r["n"] for r in h.newest(10)] == [2, 1]


# Go's own table for time.Duration.String (src/time/time_test.go, durationTests), in seconds.
GO_DURATION_STRINGS = [
    ("0s", 0.0),
    ("1ns", 1e-9),
    ("1.1µs", 1100e-9),
    ("2.2ms", 2200e-6),
    ("3.3s", 3.3),
    ("4m5s", 4 * 60 + 5.0),
    ("4m5.001s", 4 * 60 + 5.001),
    ("5h6m7.001s", 5 * 3600 + 6 * 60 + 7.001),
    ("8m0.000000001s", 8 * 60 + 1e-9),
    ("-1.5s", -1.5),
    ("1h0m0s", 3600.0),
    ("100h0m0s", 360000.0),
    ("999.999µs", 999.999e-6),
    ("1m0s", 59.9999999999),  # rounded to whole nanoseconds first, as Go's int64 holds them
]


@pytest.mark.parametrize(("text", "seconds"), GO_DURATION_STRINGS)
def test_go_duration_matches_go(text: str, seconds: float) -> None:
    """units.go_duration prints what Go's time.Duration.String prints."""
    assert go_duration(seconds) == text

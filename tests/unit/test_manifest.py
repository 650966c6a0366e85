"""Dataset manifests: the Go Keystone's format, its validation and the anti-replay rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keystone import manifest

GOOD = """
schema    = 1
name      = "com.example.cve-bundle"
version   = "2026-08-15"
published = 2026-08-15T03:00:00Z

[artifact]
uri    = "https://hub.plant.local/datasets/cve-2026-08-15.tar"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
size   = 184320000
"""
DIGEST = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
PUBLISHED = datetime(2026, 8, 15, 3, 0, tzinfo=UTC)


class TestParse:
    """parse_manifest reads Go's manifests and refuses the ones that cannot be acted on."""

    def test_good_manifest(self) -> None:
        """Every field of Go's test manifest is read; no [delta], no unknown fields."""
        m = manifest.parse_manifest(GOOD.encode())
        assert (m.name, m.version, m.published) == (
            "com.example.cve-bundle",
            "2026-08-15",
            PUBLISHED,
        )
        assert m.artifact.size == 184320000 and m.artifact.sha256 == DIGEST
        assert m.delta is None and m.unknown_fields == ()

    @pytest.mark.parametrize(
        ("old", "new", "field", "want"),
        [
            ("schema    = 1", "schema    = 2", "schema", "schema 2 is not supported"),
            ('name      = "com.example.cve-bundle"', 'name      = ""', "name", "no name"),
            ('version   = "2026-08-15"', 'version   = ""', "version", "no version"),
            ("published = 2026-08-15T03:00:00Z", "", "published", "replay"),
            ("published = 2026-08-15T03:00:00Z", "published = 2026-08-15T03:00:00", "published", "time zone"),
            ('uri    = "https://hub.plant.local/datasets/cve-2026-08-15.tar"', 'uri    = ""', "artifact.uri", "no artifact.uri"),
            (f'sha256 = "{DIGEST}"', 'sha256 = ""', "artifact.sha256", "cannot be verified"),
            (DIGEST, "9f86d0", "artifact.sha256", "want 64 hex characters"),
            (DIGEST, "zz" + DIGEST[2:], "artifact.sha256", "is not hex"),
            ("size   = 184320000", "size   = -1", "artifact.size", "byte count"),
            ("size   = 184320000", 'size   = "big"', "artifact.size", "byte count"),
            ("schema    = 1", "schema    = true", "schema", "integer"),
        ],
    )  # fmt: skip
    def test_rejections(self, old: str, new: str, field: str, want: str) -> None:
        """Each broken manifest is refused, naming the file and the field."""
        with pytest.raises(manifest.ManifestError) as info:
            manifest.parse_manifest(GOOD.replace(old, new, 1).encode(), source="m.toml")
        assert info.value.field == field and want in str(info.value)
        assert str(info.value).startswith("m.toml: ")

    def test_delta_without_server(self) -> None:
        """A [delta] table without a server is refused, as in Go."""
        with pytest.raises(manifest.ManifestError, match="without a server"):
            manifest.parse_manifest((GOOD + '\n[delta]\nfrom = "2026-08-14"\n').encode())

    def test_delta_is_read(self) -> None:
        """server, from and format of [delta] are kept."""
        text = GOOD + '\n[delta]\nserver = "https://ota"\nfrom = "x"\nformat = "bsdiff+zstd"\n'
        m = manifest.parse_manifest(text.encode())
        assert m.delta == manifest.ManifestDelta("https://ota", "x", "bsdiff+zstd")

    def test_unknown_fields_are_reported_not_rejected(self) -> None:
        """Unknown keys at any level are listed with their path."""
        text = GOOD.replace("[artifact]", 'future_field = "x"\n[artifact]') + "mirror = 1\n"
        assert manifest.parse_manifest(text.encode()).unknown_fields == (
            "future_field",
            "artifact.mirror",
        )

    def test_not_toml(self) -> None:
        """A document that is not TOML says so."""
        with pytest.raises(manifest.ManifestError, match="invalid manifest"):
            manifest.parse_manifest(b"schema = = 1")

    def test_quoted_published_is_accepted(self) -> None:
        """A published written as an RFC 3339 string reads like the TOML date-time."""
        text = GOOD.replace("2026-08-15T03:00:00Z", '"2026-08-15T03:00:00Z"')
        assert manifest.parse_manifest(text.encode()).published == PUBLISHED


class TestReplay:
    """The anti-replay rule compares two signed values: strictly newer only."""

    @pytest.mark.parametrize(
        ("last", "want"),
        [
            (None, True),
            (PUBLISHED - timedelta(days=1), True),
            (PUBLISHED, False),
            (PUBLISHED + timedelta(seconds=1), False),
            (PUBLISHED + timedelta(days=180), False),
        ],
    )
    def test_is_newer_than(self, last: datetime | None, want: bool) -> None:
        """Equal or older than the accepted one is a replay."""
        m = manifest.parse_manifest(GOOD.encode())
        assert m.is_newer_than(last) is want

    def test_check_not_replayed_names_both_times(self) -> None:
        """The refusal names both publication times."""
        m = manifest.parse_manifest(GOOD.encode())
        with pytest.raises(manifest.ManifestReplayed, match="2026-08-15T03:00:00Z"):
            manifest.check_not_replayed(m, PUBLISHED)


class TestNew:
    """new_manifest + render_manifest write what Go's manifest new writes."""

    def test_render_matches_go_layout(self, tmp_path: Path) -> None:
        """The rendered file is Go's renderManifest byte for byte and parses back."""
        data = tmp_path / "cve.tar"
        data.write_bytes(b"abc")
        m = manifest.new_manifest(
            data, name="n", uri="https://x/cve.tar", published=PUBLISHED, delta_server="https://ota"
        )
        assert manifest.render_manifest(m).decode() == (
            'schema    = 1\nname      = "n"\nversion   = "2026-08-15"\n'
            "published = 2026-08-15T03:00:00Z\n\n[artifact]\n"
            'uri    = "https://x/cve.tar"\n'
            'sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"\n'
            'size   = 3\n\n[delta]\nserver = "https://ota"\n'
        )
        assert manifest.parse_manifest(manifest.render_manifest(m)) == m

    def test_new_needs_name_and_uri(self, tmp_path: Path) -> None:
        """An empty name is refused before anything is written."""
        data = tmp_path / "d"
        data.write_bytes(b"")
        with pytest.raises(manifest.ManifestError, match="no name"):
            manifest.new_manifest(data, name="", uri="https://x")

    def test_published_defaults_to_now_to_the_second(self, tmp_path: Path) -> None:
        """Without --published the manifest is stamped now, to the second, UTC."""
        data = tmp_path / "d"
        data.write_bytes(b"")
        m = manifest.new_manifest(data, name="n", uri="https://x")
        assert m.published.microsecond == 0 and m.published.tzinfo is not None
        assert abs(datetime.now(UTC) - m.published) < timedelta(minutes=1)

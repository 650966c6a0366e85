"""bsdiff+zstd deltas: URLs, the recipe table, and applying patches by streaming."""

from __future__ import annotations

import bz2
import hashlib
import random
import subprocess
from pathlib import Path

import bsdiff4
import pytest
import zstandard

from keystone import delta
from keystone.errors import ValidationError

A = "1" * 64
B = "2" * 64


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def next_release(base: bytes) -> bytes:
    """Mostly the same bytes, scattered changes, some growth (Go's mutate)."""
    out = bytearray(base)
    for i in range(0, len(out), 512):
        out[i] ^= 0x5A
    return bytes(out) + b"new section appended by the next build"


def go_style_patch(base: bytes, target: bytes) -> bytes:
    """What ota-updater's delta.Generate makes: BSDIFF40 (bzip2 blocks) in one zstd frame."""
    return zstandard.ZstdCompressor(level=19).compress(bsdiff4.diff(base, target))


class TestDeltaUrl:
    """delta_url builds Go's {server}/delta/{from}/{to}."""

    @pytest.mark.parametrize(
        ("server", "want"),
        [
            ("https://ota.example.com", f"https://ota.example.com/delta/{A}/{B}"),
            ("https://ota.example.com/", f"https://ota.example.com/delta/{A}/{B}"),
            ("https://ota.example.com/ota", f"https://ota.example.com/ota/delta/{A}/{B}"),
        ],
    )
    def test_good(self, server: str, want: str) -> None:
        """A trailing slash does not double; a base path is kept."""
        assert delta.delta_url(server, A, B) == want

    @pytest.mark.parametrize(
        ("server", "frm", "to"),
        [
            ("", A, B),
            ("ota.example.com", A, B),
            ("https://ota", "../../etc/passwd", B),
            ("https://ota", "abc", B),
            ("https://ota", A, "AB" * 32),
            ("https://ota", A, "z" * 64),
        ],
    )
    def test_bad(self, server: str, frm: str, to: str) -> None:
        """Relative servers and digests that are not lowercase hex never reach a URL."""
        with pytest.raises(delta.DeltaError):
            delta.delta_url(server, frm, to)


class TestDeltaTable:
    """parse_delta_table reads [artifacts.delta] for recipe.py."""

    def test_good(self) -> None:
        """server and sha256; format defaults to bsdiff+zstd; the digest is lowercased."""
        spec = delta.parse_delta_table({"server": "http://127.0.0.1:8099", "sha256": "AB" * 32})
        assert spec == delta.DeltaSpec("http://127.0.0.1:8099", "ab" * 32, "bsdiff+zstd")

    def test_absent(self) -> None:
        """No table, no delta."""
        assert delta.parse_delta_table(None) is None

    def test_other_format_is_kept_and_unknown_keys_reported(self) -> None:
        """As in Go, another format is not a recipe error: the client falls back."""
        spec = delta.parse_delta_table(
            {"server": "https://o", "sha256": A, "format": "xdelta3", "x": 1}
        )
        assert spec is not None and spec.format == "xdelta3"
        assert spec.unknown_fields == ("artifacts.delta.x",)

    @pytest.mark.parametrize(
        ("table", "field"),
        [
            ({"sha256": A}, "artifacts.delta.server"),
            ({"server": "ota.example.com", "sha256": A}, "artifacts.delta.server"),
            ({"server": "https://o"}, "artifacts.delta.sha256"),
            ({"server": "https://o", "sha256": "abc"}, "artifacts.delta.sha256"),
            ({"server": "https://o", "sha256": A, "format": 3}, "artifacts.delta.format"),
        ],
    )
    def test_bad(self, table: dict[str, object], field: str) -> None:
        """Each error names the file, the line and the field."""
        with pytest.raises(ValidationError) as info:
            delta.parse_delta_table(table, file="r.toml", line=12)
        assert info.value.field == field and str(info.value).startswith("r.toml:12: ")


class TestApplyPatch:
    """apply_patch reconstructs exactly what bsdiff4.patch does, in bounded pieces."""

    @pytest.mark.parametrize("chunk", [7, 4096, 1 << 22])
    def test_matches_the_reference(self, tmp_path: Path, chunk: int) -> None:
        """A Go-style patch applies with any piece size to the same bytes bsdiff4.patch makes."""
        rng = random.Random(7)
        base = rng.randbytes(256 << 10)
        target = next_release(base)
        raw = bsdiff4.diff(base, target)
        assert raw[:8] == b"BSDIFF40" and bsdiff4.patch(base, raw) == target
        (tmp_path / "base.tar").write_bytes(base)
        (tmp_path / "p.zst").write_bytes(go_style_patch(base, target))
        n = delta.apply_patch(
            tmp_path / "base.tar",
            tmp_path / "p.zst",
            tmp_path / "out.tar",
            sha(target),
            chunk=chunk,
        )
        assert n == len(target) and (tmp_path / "out.tar").read_bytes() == target

    def test_zstd_cli_patch_applies(self, tmp_path: Path) -> None:
        """A patch compressed by the zstd command line (another encoder) applies."""
        base = b"original contents, at length\n" * 400
        target = next_release(base)
        (tmp_path / "base.tar").write_bytes(base)
        (tmp_path / "p.bsdiff").write_bytes(bsdiff4.diff(base, target))
        subprocess.run(
            ["zstd", "-q", "-19", str(tmp_path / "p.bsdiff"), "-o", str(tmp_path / "p.zst")],
            check=True,
        )
        delta.apply_patch(tmp_path / "base.tar", tmp_path / "p.zst", tmp_path / "o", sha(target))
        assert (tmp_path / "o").read_bytes() == target

    def test_empty_base_and_empty_target(self, tmp_path: Path) -> None:
        """A first version from nothing, and a version that is empty, both apply."""
        for base, target in ((b"", b"all new"), (b"something", b"")):
            (tmp_path / "b").write_bytes(base)
            (tmp_path / "p").write_bytes(go_style_patch(base, target))
            delta.apply_patch(tmp_path / "b", tmp_path / "p", tmp_path / "o", sha(target))
            assert (tmp_path / "o").read_bytes() == target

    def test_make_patch_is_what_the_reference_applies(self, tmp_path: Path) -> None:
        """make_patch (the server's) output is a zstd frame bsdiff4.patch accepts."""
        base = random.Random(3).randbytes(50000)
        target = next_release(base)
        (tmp_path / "a.tar").write_bytes(base)
        (tmp_path / "b.tar").write_bytes(target)
        delta.make_patch(tmp_path / "a.tar", tmp_path / "b.tar", tmp_path / "p.zst")
        raw = zstandard.ZstdDecompressor().decompress((tmp_path / "p.zst").read_bytes())
        assert bsdiff4.patch(base, raw) == target
        # The layout gabstv/go-bsdiff's bspatch reads: magic, two block lengths and the new
        # size, then bzip2 streams at 32, 32+ctrl and 32+ctrl+diff.
        ctrl_len, diff_len, new_len = (
            int.from_bytes(raw[i : i + 8], "little") for i in (8, 16, 24)
        )
        assert raw[:8] == b"BSDIFF40" and new_len == len(target)
        for offset in (32, 32 + ctrl_len, 32 + ctrl_len + diff_len):
            assert raw[offset : offset + 3] == b"BZh"

    def _corrupt(self, base: bytes, target: bytes) -> dict[str, bytes]:
        raw = bsdiff4.diff(base, target)
        z = zstandard.ZstdCompressor().compress
        header = bytearray(raw[:32])
        header[24:32] = (len(target) + 10).to_bytes(8, "little")  # announces more than it holds
        return {
            "not zstd": raw,
            "not bsdiff": z(b"GARBAGE!" + raw[8:]),
            "truncated": z(raw[: len(raw) // 2]),
            "wrong size": z(bytes(header) + raw[32:]),
            "bad bzip2": z(raw[:32] + b"x" * (len(raw) - 32)),
            "no ctrl": z(raw[:8] + (0).to_bytes(8, "little") * 2 + raw[24:32] + bz2.compress(b"")),
        }

    @pytest.mark.parametrize(
        "case", ["not zstd", "not bsdiff", "truncated", "wrong size", "bad bzip2", "no ctrl"]
    )
    def test_corrupt_patches_are_refused(self, tmp_path: Path, case: str) -> None:
        """Every broken patch is corrupt-patch, and nothing is left behind."""
        base = random.Random(5).randbytes(20000)
        target = next_release(base)
        (tmp_path / "base").write_bytes(base)
        (tmp_path / "p").write_bytes(self._corrupt(base, target)[case])
        with pytest.raises(delta.DeltaError) as info:
            delta.apply_patch(tmp_path / "base", tmp_path / "p", tmp_path / "o", sha(target))
        assert info.value.reason == "corrupt-patch"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "p"]

    def test_wrong_base_or_digest_is_a_mismatch(self, tmp_path: Path) -> None:
        """A patch that applies to the wrong base gives bytes that are refused, never written."""
        base = b"original contents, at length\n" * 400
        target = next_release(base)
        (tmp_path / "other").write_bytes(b"a completely different base\n" * 400)
        (tmp_path / "p").write_bytes(go_style_patch(base, target))
        with pytest.raises(delta.DeltaError) as info:
            delta.apply_patch(tmp_path / "other", tmp_path / "p", tmp_path / "o", sha(target))
        assert info.value.reason == "digest-mismatch" and not (tmp_path / "o").exists()

    def test_output_bound(self, tmp_path: Path) -> None:
        """A patch announcing more than max_output is refused before it is applied."""
        (tmp_path / "b").write_bytes(b"x")
        (tmp_path / "p").write_bytes(go_style_patch(b"x", b"y" * 5000))
        with pytest.raises(delta.DeltaError) as info:
            delta.apply_patch(tmp_path / "b", tmp_path / "p", tmp_path / "o", A, max_output=1000)
        assert info.value.reason == "too-large"

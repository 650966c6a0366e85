"""Bundle container parsing: git bundle headers, ref choice, the tar reader, the manifest."""

from __future__ import annotations

import io
import tarfile

import pytest

from keystone.errors import BundleError, ValidationError
from keystone.sources import GitSource
from keystone.sources.bundle import (
    BundleArtifact,
    _choose_ref,
    _manifest_bytes,
    _parse_git_header,
    _scan_tar,
    _Section,
    _tar_header,
)

A = "a" * 40
B = "b" * 40


def _header(data: bytes) -> tuple[int, tuple[str, ...], tuple[tuple[str, str], ...], int]:
    h = _parse_git_header(_Section(io.BytesIO(data), 0, len(data)), "test.bundle")
    return h.version, h.prerequisites, h.references, h.length


class TestGitBundleHeader:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (
                f"# v2 git bundle\n{A} refs/heads/main\n\nPACK",
                (2, (), (("refs/heads/main", A),)),
            ),
            (
                f"# v2 git bundle\n-{B} old subject\n{A} refs/heads/main\n{A} HEAD\n\nPACK",
                (2, (B,), (("refs/heads/main", A), ("HEAD", A))),
            ),
            (
                f"# v3 git bundle\n@object-format=sha1\n-{B}\n{A} refs/heads/main\n\n",
                (3, (B,), (("refs/heads/main", A),)),
            ),
        ],
    )
    def test_valid_headers(self, text: str, expected: tuple[object, ...]) -> None:
        """Version, prerequisites and refs are read; the length stops at the blank line."""
        data = text.encode()
        version, prereqs, refs, length = _header(data)
        assert (version, prereqs, refs) == expected
        assert data[length:] in (b"PACK", b"")

    @pytest.mark.parametrize(
        ("text", "reason"),
        [
            ("# v4 git bundle\n", "not a git bundle"),
            (f"# v2 git bundle\n{A} refs/heads/main\n", "truncated"),
            ("# v2 git bundle\n\n", "no refs"),
            ("# v2 git bundle\nzz refs/heads/main\n\n", "malformed ref"),
            (f"# v2 git bundle\n{A}\n\n", "malformed ref"),
            (f"# v2 git bundle\n-{A[:39]}\n{A} r\n\n", "malformed prerequisite"),
            (f"# v2 git bundle\n{A} r\n-{B}\n\n", "malformed prerequisite"),
            (f"# v3 git bundle\n@object-format=sha256\n{A} r\n\n", "unsupported bundle capability"),
            (f"# v3 git bundle\n@filter=blob:none\n{A} r\n\n", "unsupported bundle capability"),
            (f"# v2 git bundle\n@object-format=sha1\n{A} r\n\n", "misplaced capability"),
        ],
    )
    def test_invalid_headers(self, text: str, reason: str) -> None:
        """Every malformed header is a BundleError naming the file and the problem."""
        with pytest.raises(BundleError, match=reason) as info:
            _header(text.encode())
        assert "test.bundle" in str(info.value)


class TestChooseRef:
    @pytest.mark.parametrize(
        ("refs", "wanted", "expected"),
        [
            ([("refs/heads/main", A)], None, ("refs/heads/main", A)),
            (
                [("refs/heads/x", B), ("refs/heads/main", A), ("HEAD", A)],
                None,
                ("refs/heads/main", A),
            ),
            ([("refs/heads/dev", B), ("refs/heads/main", A)], None, ("refs/heads/main", A)),
            ([("refs/heads/dev", B), ("refs/heads/main", A)], "dev", ("refs/heads/dev", B)),
            ([("refs/tags/v1", B)], "v1", ("refs/tags/v1", B)),
            ([("HEAD", A)], None, ("HEAD", A)),
        ],
    )
    def test_choice(
        self, refs: list[tuple[str, str]], wanted: str | None, expected: tuple[str, str]
    ) -> None:
        """HEAD's branch, the only ref, or main wins; a named ref is looked up like git."""
        assert _choose_ref(refs, wanted, "b") == expected

    @pytest.mark.parametrize(
        ("refs", "wanted"),
        [([("refs/heads/a", A), ("refs/heads/b", B)], None), ([("refs/heads/a", A)], "b")],
    )
    def test_ambiguous_or_missing(self, refs: list[tuple[str, str]], wanted: str | None) -> None:
        """Several refs and no rule to pick one, or an absent name, is a BundleError."""
        with pytest.raises(BundleError):
            _choose_ref(refs, wanted, "b")


def _tar(*members: tuple[str, bytes], kind: bytes = tarfile.REGTYPE) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.size, info.linkname = 0, "/etc/passwd"
                tar.addfile(info)
            else:
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class TestTarReader:
    def test_reads_what_tarfile_writes(self) -> None:
        """Members written by tarfile (long names use pax headers) are found with their data."""
        long_name = "artifacts/" + "x" * 150
        data = _tar(("keystone-bundle.json", b"{}"), (long_name, b"0123456789"))
        f = io.BytesIO(data)
        members = _scan_tar(f, len(data), "t")
        assert [(m.name, m.size) for m in members] == [("keystone-bundle.json", 2), (long_name, 10)]
        f.seek(members[1].offset)
        assert f.read(members[1].size) == b"0123456789"

    @pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.DIRTYPE, tarfile.LNKTYPE])
    def test_only_regular_files(self, kind: bytes) -> None:
        """Links and directories inside a bundle are refused."""
        data = _tar(("evil", b""), kind=kind)
        with pytest.raises(BundleError, match="regular files only"):
            _scan_tar(io.BytesIO(data), len(data), "t")

    def test_checksum_and_truncation(self) -> None:
        """A damaged header or a cut archive is a BundleError."""
        data = bytearray(_tar(("a", b"x" * 1000)))
        with pytest.raises(BundleError, match="truncated"):
            _scan_tar(io.BytesIO(bytes(data[:800])), 800, "t")
        data[5] ^= 1
        with pytest.raises(BundleError, match="checksum"):
            _scan_tar(io.BytesIO(bytes(data)), len(data), "t")

    def test_header_is_fixed(self) -> None:
        """Headers carry no time, owner or user name: the same name and size, the same bytes."""
        header = _tar_header("repo.bundle", 1234)
        info = tarfile.TarInfo.frombuf(header[:512], "utf-8", "strict")
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (
            0, 0, 0, "", "", 0o644)  # fmt: skip
        assert header == _tar_header("repo.bundle", 1234)


class TestManifest:
    def test_manifest_is_canonical_json(self) -> None:
        """The manifest is sorted, ASCII JSON: same inputs, same bytes."""
        arts = [BundleArtifact("c" * 64, 3, "x.tar.gz")]
        one = _manifest_bytes(A, "refs/heads/main", [B], 10, "d" * 64, arts)
        assert one == _manifest_bytes(A, "refs/heads/main", [B], 10, "d" * 64, arts)
        assert one.startswith(b'{\n "artifacts": [') and one.endswith(b"}\n")


class TestGitSourceSettings:
    @pytest.mark.parametrize(
        ("ref", "candidates"),
        [
            ("main", ["refs/heads/main", "refs/tags/main"]),
            ("refs/heads/prod", ["refs/heads/prod"]),
            ("HEAD", ["HEAD"]),
        ],
    )
    def test_ref_candidates(self, ref: str, candidates: list[str]) -> None:
        """Short names are looked up as a branch, then a tag; full names as given."""
        assert GitSource("/srv/fleet.git", ref, None).ref_candidates() == candidates  # type: ignore[arg-type]

    @pytest.mark.parametrize(("url", "ref"), [("", "main"), ("/srv/f.git", ""),
                                              ("/srv/f.git", "a b"), ("/srv/f.git", "a..b")])  # fmt: skip
    def test_bad_settings(self, url: str, ref: str) -> None:
        """An empty URL or a malformed ref is refused when the source is built."""
        with pytest.raises(ValidationError):
            GitSource(url, ref, None)  # type: ignore[arg-type]

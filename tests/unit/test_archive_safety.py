"""Safe unpacking: hostile tar and zip archives are refused and nothing lands outside the work dir."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from keystone.errors import UnsafeArchiveError
from keystone.runtime.archive import (
    ArchiveLimits,
    ArchiveRefused,
    detect_format,
    remove_tree,
    unpack,
)

Member = tuple[str, str, bytes | str]  # (kind, name, data or link target)


def make_tar(path: Path, members: list[Member], *, mode: str = "w:gz") -> Path:
    """Write a tar archive member by member (names are written as given, however hostile)."""
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o755 if kind in ("dir", "exe") else 0o644
            if kind in ("file", "exe"):
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "chr": tarfile.CHRTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[kind]
            if kind in ("symlink", "hardlink"):
                assert isinstance(payload, str)
                info.linkname = payload
            tf.addfile(info)
    return path


def make_zip(path: Path, members: list[Member]) -> Path:
    """Write a zip archive; symlinks and devices are encoded in the Unix mode bits."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for kind, name, payload in members:
            info = zipfile.ZipInfo(name)
            if kind == "symlink":
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, str(payload))
            elif kind == "chr":
                info.external_attr = (stat.S_IFCHR | 0o644) << 16
                zf.writestr(info, b"")
            elif kind == "dir":
                info.filename = name.rstrip("/") + "/"
                info.external_attr = (stat.S_IFDIR | 0o755) << 16
                zf.writestr(info, b"")
            else:
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                assert isinstance(payload, bytes)
                zf.writestr(info, payload)
    return path


@pytest.fixture
def arena(tmp_path: Path) -> Path:
    """A directory whose only child ``work/`` is where unpacking may write."""
    (tmp_path / "work").mkdir()
    return tmp_path


def listing(root: Path) -> set[str]:
    """Every path below ``root`` (links not followed)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


HOSTILE_TAR: list[tuple[str, list[Member], str]] = [
    ("dotdot", [("file", "../evil", b"x")], "parent-path"),
    ("dotdot-deep", [("file", "a/../../evil", b"x")], "parent-path"),
    ("absolute", [("file", "/tmp/evil", b"x")], "absolute-path"),
    ("symlink-absolute", [("symlink", "link", "/etc/passwd")], "link-escape"),
    ("symlink-dotdot", [("symlink", "link", "../../outside")], "link-escape"),
    (
        "symlink-then-write-through",
        [("symlink", "d", "."), ("file", "d/evil", b"x")],
        "link-escape",
    ),
    (
        "symlink-dir-out-then-file",
        [("symlink", "up", ".."), ("file", "up/evil", b"x")],
        "link-escape",
    ),
    (
        # each link is lexically inside, but resolving a/b/c/d then '..' twice leaves the tree
        "symlink-chain",
        [
            ("dir", "a/b/c", b""),
            ("symlink", "a/b/c/d", "../../../q"),
            ("dir", "q", b""),
            ("symlink", "x", "a/b/c/d/../.."),
        ],
        "link-escape",
    ),
    ("hardlink-outside", [("hardlink", "h", "../../etc/passwd")], "parent-path"),
    ("hardlink-absolute", [("hardlink", "h", "/etc/passwd")], "absolute-path"),
    ("hardlink-missing", [("hardlink", "h", "nothere")], "link-escape"),
    ("char-device", [("chr", "dev", b"")], "special-file"),
    ("fifo", [("fifo", "pipe", b"")], "special-file"),
    ("duplicate", [("file", "a", b"1"), ("file", "a", b"2")], "duplicate"),
    ("below-a-file", [("file", "a", b"1"), ("file", "a/b", b"2")], "link-escape"),
]


class TestTarRefusals:
    @pytest.mark.parametrize(
        ("members", "reason"),
        [pytest.param(m, r, id=i) for i, m, r in HOSTILE_TAR],
    )
    def test_hostile_tar_is_refused_and_nothing_is_written(
        self, arena: Path, members: list[Member], reason: str
    ) -> None:
        """A hostile member refuses the whole archive; no file appears anywhere."""
        archive = make_tar(arena / "a.tar.gz", members)
        before = listing(arena)
        with pytest.raises(ArchiveRefused) as info:
            unpack(archive, arena / "work" / "tree", what="test.tar.gz")
        assert info.value.reason == reason
        assert "test.tar.gz" in str(info.value)
        assert isinstance(info.value, UnsafeArchiveError)
        assert listing(arena) == before
        assert not Path("/tmp/evil").exists()

    def test_decompression_bomb_is_refused_from_its_headers(self, arena: Path) -> None:
        """A tiny tar.gz declaring 64 MiB of zeros is refused under a 1 MiB bound, unwritten."""
        archive = arena / "bomb.tar.gz"
        with tarfile.open(archive, "w:gz") as tf:
            info = tarfile.TarInfo("zeros")
            info.size = 64 * 1024 * 1024
            tf.addfile(info, io.BytesIO(bytes(info.size)))
        assert archive.stat().st_size < 1024 * 1024
        with pytest.raises(ArchiveRefused) as info_:
            unpack(archive, arena / "work" / "tree", ArchiveLimits(max_bytes=1024 * 1024))
        assert info_.value.reason == "too-large"
        assert listing(arena / "work") == set()

    def test_too_many_members_is_refused(self, arena: Path) -> None:
        """Member count is bounded."""
        members: list[Member] = [("file", f"f{i}", b"") for i in range(20)]
        archive = make_tar(arena / "many.tar", members, mode="w")
        with pytest.raises(ArchiveRefused) as info:
            unpack(archive, arena / "work" / "tree", ArchiveLimits(max_files=10))
        assert info.value.reason == "too-many-files"

    def test_truncated_archive_is_refused_as_damaged(self, arena: Path) -> None:
        """A cut-off tar.gz is damaged, not half-unpacked."""
        good = make_tar(arena / "g.tar.gz", [("file", "big", os.urandom(200_000))])
        cut = arena / "cut.tar.gz"
        cut.write_bytes(good.read_bytes()[:50_000])
        with pytest.raises(ArchiveRefused) as info:
            unpack(cut, arena / "work" / "tree")
        assert info.value.reason == "damaged"
        assert listing(arena / "work") == set()

    def test_not_an_archive_is_refused(self, arena: Path) -> None:
        """Plain bytes with unpack = true are refused with a hint."""
        f = arena / "plain.bin"
        f.write_bytes(b"just some bytes" * 100)
        with pytest.raises(ArchiveRefused) as info:
            detect_format(f)
        assert info.value.reason == "not-an-archive"


HOSTILE_ZIP: list[tuple[str, list[Member], str]] = [
    ("dotdot", [("file", "../evil", b"x")], "parent-path"),
    ("absolute", [("file", "/tmp/evil", b"x")], "absolute-path"),
    ("drive-letter", [("file", "C:/evil", b"x")], "absolute-path"),
    ("symlink-escape", [("symlink", "link", "../../etc")], "link-escape"),
    ("symlink-absolute", [("symlink", "link", "/etc")], "link-escape"),
    ("device", [("chr", "dev", b"")], "special-file"),
    ("duplicate", [("file", "a", b"1"), ("file", "a", b"2")], "duplicate"),
]


class TestZipRefusals:
    @pytest.mark.parametrize(
        ("members", "reason"),
        [pytest.param(m, r, id=i) for i, m, r in HOSTILE_ZIP],
    )
    def test_hostile_zip_is_refused_and_nothing_is_written(
        self, arena: Path, members: list[Member], reason: str
    ) -> None:
        """A hostile zip member refuses the whole archive; no file appears anywhere."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns on duplicate names
            archive = make_zip(arena / "a.zip", members)
        before = listing(arena)
        with pytest.raises(ArchiveRefused) as info:
            unpack(archive, arena / "work" / "tree")
        assert info.value.reason == reason
        assert listing(arena) == before

    def test_zip_bomb_is_refused(self, arena: Path) -> None:
        """A zip whose members inflate past the bound is refused before inflating."""
        archive = arena / "bomb.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for i in range(4):
                zf.writestr(f"z{i}", bytes(8 * 1024 * 1024))
        assert archive.stat().st_size < 200_000
        with pytest.raises(ArchiveRefused) as info:
            unpack(archive, arena / "work" / "tree", ArchiveLimits(max_bytes=10 * 1024 * 1024))
        assert info.value.reason == "too-large"
        assert listing(arena / "work") == set()


class TestGoodArchives:
    @pytest.mark.parametrize("maker", [make_tar, make_zip], ids=["tar.gz", "zip"])
    def test_files_dirs_and_inner_links_unpack_read_only(
        self, arena: Path, maker: Callable[[Path, list[Member]], Path]
    ) -> None:
        """Regular content and links that stay inside unpack, read-only, exec bits kept."""
        members: list[Member] = [
            ("dir", "bin", b""),
            ("exe", "bin/app", b"#!/bin/sh\necho hi\n"),
            ("file", "share/doc/README", b"readme"),
            ("symlink", "app", "bin/app"),
            ("symlink", "share/doc/up", "../.."),
        ]
        if maker is make_tar:
            members.append(("hardlink", "bin/app2", "bin/app"))
        archive = maker(arena / ("a.tar.gz" if maker is make_tar else "a.zip"), members)
        dest = arena / "work" / "tree"
        result = unpack(archive, dest)
        assert (dest / "bin" / "app").read_bytes().startswith(b"#!/bin/sh")
        assert (dest / "share" / "doc" / "README").read_bytes() == b"readme"
        assert os.readlink(dest / "app") == "bin/app"
        assert (dest / "app").resolve() == (dest / "bin" / "app").resolve()
        for dirpath, dirnames, filenames in os.walk(dest):
            for name in filenames + dirnames:
                st = os.lstat(os.path.join(dirpath, name))
                if not stat.S_ISLNK(st.st_mode):
                    assert st.st_mode & 0o222 == 0, name
                    assert st.st_mode & (stat.S_ISUID | stat.S_ISGID) == 0
        if maker is make_tar:
            assert os.stat(dest / "bin" / "app").st_mode & 0o111
            assert (dest / "bin" / "app2").read_bytes() == (dest / "bin" / "app").read_bytes()
        assert result.bytes > 0
        assert [p.name for p in (arena / "work").iterdir()] == ["tree"]
        remove_tree(dest)
        assert not dest.exists()

    def test_plain_tar_and_dot_slash_names(self, arena: Path) -> None:
        """An uncompressed tar made like ``tar -C dir .`` (``./`` prefixes) unpacks."""
        archive = make_tar(arena / "a.tar", [("dir", "./", b""), ("file", "./x/y", b"1")], mode="w")
        unpack(archive, arena / "work" / "tree")
        assert (arena / "work" / "tree" / "x" / "y").read_bytes() == b"1"

    def test_existing_destination_is_not_touched(self, arena: Path) -> None:
        """Unpacking never merges into an existing tree."""
        archive = make_tar(arena / "a.tar.gz", [("file", "f", b"1")])
        (arena / "work" / "tree").mkdir()
        with pytest.raises(FileExistsError):
            unpack(archive, arena / "work" / "tree")

    def test_gzip_of_non_tar_is_refused(self, arena: Path) -> None:
        """A gzip file that is not a tar is refused, not half-read."""
        path = arena / "x.gz"
        path.write_bytes(gzip.compress(b"hello" * 1000))
        with pytest.raises(ArchiveRefused):
            unpack(path, arena / "work" / "tree")
        assert listing(arena / "work") == set()

"""Log rotation by copy-then-truncate: when it rotates, how backups shift, what is kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keystone.runtime.logs import rotate_if_needed, rotate_logs


def write(path: Path, data: str) -> Path:
    path.write_text(data)
    return path


class TestRotateIfNeeded:
    def test_missing_file(self, tmp_path: Path) -> None:
        """A log that does not exist yet is not rotated."""
        assert not rotate_if_needed(tmp_path / "stdout.log", 10, 3)

    def test_small_file(self, tmp_path: Path) -> None:
        """A log below max_bytes is left alone."""
        log = write(tmp_path / "stdout.log", "123456789")
        assert not rotate_if_needed(log, 10, 3)
        assert log.read_text() == "123456789"

    def test_disabled(self, tmp_path: Path) -> None:
        """max_bytes <= 0 disables rotation."""
        log = write(tmp_path / "stdout.log", "x" * 100)
        assert not rotate_if_needed(log, 0, 3)

    def test_rotates_in_place(self, tmp_path: Path) -> None:
        """At max_bytes the content moves to .1 and the same inode is truncated (a writer's fd stays valid)."""
        log = write(tmp_path / "stdout.log", "0123456789")
        log.chmod(0o640)
        inode = log.stat().st_ino
        assert rotate_if_needed(log, 10, 3)
        assert log.read_text() == ""
        assert log.stat().st_ino == inode
        backup = tmp_path / "stdout.log.1"
        assert backup.read_text() == "0123456789"
        assert backup.stat().st_mode & 0o777 == 0o640
        assert not (tmp_path / "stdout.log.1.tmp").exists()

    def test_backups_shift_and_oldest_drops(self, tmp_path: Path) -> None:
        """Each rotation shifts .1 -> .2 -> ... and keeps at most `backups` files."""
        log = tmp_path / "stdout.log"
        for i in range(5):
            write(log, f"gen{i}-" + "x" * 10)
            assert rotate_if_needed(log, 10, 3)
        kept = sorted(p.name for p in tmp_path.iterdir())
        assert kept == ["stdout.log", "stdout.log.1", "stdout.log.2", "stdout.log.3"]
        assert [(tmp_path / f"stdout.log.{n}").read_text()[:4] for n in (1, 2, 3)] == [
            "gen4",
            "gen3",
            "gen2",
        ]

    def test_zero_backups_truncates_only(self, tmp_path: Path) -> None:
        """With backups = 0 the log is truncated and no copy is kept."""
        log = write(tmp_path / "stdout.log", "x" * 20)
        assert rotate_if_needed(log, 10, 0)
        assert log.read_text() == ""
        assert sorted(os.listdir(tmp_path)) == ["stdout.log"]

    def test_appending_fd_continues_at_start(self, tmp_path: Path) -> None:
        """A writer holding an O_APPEND fd writes at the start of the truncated file, no hole."""
        log = tmp_path / "stdout.log"
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, b"before\n" * 4)
            assert rotate_if_needed(log, 10, 2)
            os.write(fd, b"after\n")
        finally:
            os.close(fd)
        assert log.read_bytes() == b"after\n"
        assert (tmp_path / "stdout.log.1").read_bytes() == b"before\n" * 4


class TestBigFiles:
    @pytest.mark.parametrize("collapse", [True, False])
    def test_backup_plus_live_is_the_original(self, tmp_path: Path, collapse: bool) -> None:
        """Several blocks of log: what moved to .1 plus what stayed is exactly what was there."""
        log = tmp_path / "stdout.log"
        original = b"".join(b"line %06d\n" % i for i in range(3000))  # ~33 KB, many blocks
        log.write_bytes(original)
        assert rotate_if_needed(log, 1024, 2, collapse=collapse)
        backup, live = (tmp_path / "stdout.log.1").read_bytes(), log.read_bytes()
        assert backup + live == original
        assert len(live) < os.statvfs(tmp_path).f_frsize
        if not collapse:
            assert live == b""


class TestRotateLogs:
    def test_both_streams(self, tmp_path: Path) -> None:
        """rotate_logs handles stdout.log and stderr.log independently."""
        write(tmp_path / "stdout.log", "x" * 50)
        write(tmp_path / "stderr.log", "x" * 5)
        assert rotate_logs(tmp_path, 10, 2) == [tmp_path / "stdout.log"]

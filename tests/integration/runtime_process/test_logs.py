"""Log rotation while a real component keeps writing through its O_APPEND fd."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest

from keystone.runtime import logs
from keystone.runtime.logs import rotate_if_needed
from keystone.runtime.process import ProcessRunner

from .conftest import Bench, run, until

pytestmark = pytest.mark.integration

# Writes numbered lines, one write(2) each, as fast as it can until it is stopped.
WRITER = "import itertools, os\nfor i in itertools.count():\n    os.write(1, b'%d\\n' % i)\n"
MAX_BYTES = 64 * 1024
ROTATIONS = 5


def rotate_under_load(bench: Bench, *, collapse: bool) -> list[tuple[int, int]]:
    """Spawn the writer, rotate its stdout.log ROTATIONS times, stop it; return (before, after) sizes."""
    log = bench.logs / "stdout.log"
    sizes: list[tuple[int, int]] = []

    async def body() -> None:
        runner = ProcessRunner()
        handle = await bench.spawn(runner, bench.spec(sys.executable, "-c", WRITER))
        for _ in range(ROTATIONS):
            await until(lambda: log.exists() and log.stat().st_size >= MAX_BYTES, what="growth")
            before = log.stat().st_size
            assert rotate_if_needed(log, MAX_BYTES, ROTATIONS, collapse=collapse)
            sizes.append((before, log.stat().st_size))
        await until(lambda: log.stat().st_size > 4096, what="writes after the last rotation")
        await runner.stop(handle, timeout=5)

    run(body())
    return sizes


def files(bench: Bench) -> list[Path]:
    """Backups oldest first, then the live log."""
    names = [f"stdout.log.{n}" for n in range(ROTATIONS, 0, -1)] + ["stdout.log"]
    return [bench.logs / name for name in names]


def collapse_supported(directory: Path) -> bool:
    scratch = directory / "collapse-probe"
    fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        block = os.fstatvfs(fd).f_frsize
        os.write(fd, b"x" * (2 * block + 1))
        return logs._collapse(fd, block)
    finally:
        os.close(fd)
        scratch.unlink()


class TestRotationWithALiveWriter:
    def test_collapse_loses_nothing(self, bench: Bench) -> None:
        """With FALLOC_FL_COLLAPSE_RANGE, backups plus the live log hold every line, in order."""
        bench.logs.mkdir()
        if not collapse_supported(bench.logs):
            pytest.skip(
                f"the filesystem of {bench.logs} cannot collapse ranges (not ext4/xfs/f2fs)"
            )
        sizes = rotate_under_load(bench, collapse=True)
        assert all(after < before for before, after in sizes), sizes
        data = b"".join(p.read_bytes() for p in files(bench))
        lines = data.split(b"\n")[
            :-1
        ]  # a last line cut by the final SIGTERM is not a rotation loss
        assert [int(x) for x in lines] == list(range(len(lines)))
        assert len(lines) > ROTATIONS * MAX_BYTES // 8

    def test_copy_truncate_loses_only_the_window(self, bench: Bench) -> None:
        """Copy-then-truncate keeps order; losses are at most one short run (and one torn line) per rotation."""
        sizes = rotate_under_load(bench, collapse=False)
        assert all(after < before for before, after in sizes), sizes
        numbers: list[int] = []
        for path in files(bench):
            lines = path.read_bytes().split(b"\n")
            # A missing final newline is a line caught half-written by the last read (a backup)
            # or by the final SIGTERM (the live log): part of the loss, not data to parse.
            numbers += [int(x) for x in lines[:-1]]
        assert numbers[0] == 0
        assert all(b > a for a, b in itertools.pairwise(numbers)), "lines duplicated or reordered"
        gaps = [(a, b) for a, b in itertools.pairwise(numbers) if b != a + 1]
        assert len(gaps) <= ROTATIONS, gaps

"""Rotation of component logs while the component keeps writing to them.

Components write ``stdout.log``/``stderr.log`` through file descriptors opened ``O_APPEND`` by the
runner and kept across agent restarts, so the agent cannot reopen them the way logrotate's
``create`` mode needs. The file is rotated in place instead, keeping its inode:

1. Older backups shift (``.1`` -> ``.2`` ... the oldest beyond ``backups`` is dropped).
2. The file's head is copied to ``<name>.1``.
3. That head is removed from the live file:

   * with ``fallocate(FALLOC_FL_COLLAPSE_RANGE)`` where the filesystem supports it (ext4, xfs,
     f2fs): the kernel cuts the first whole blocks out under the inode lock, atomically with
     respect to the writer's appends, so **nothing is lost**. The cut is at a filesystem block
     boundary, so the last line of ``.1`` may continue at the start of the live file; up to one
     block stays in the live file.
   * otherwise by copy-then-truncate: the rest of the file is copied and the file truncated to 0;
     the child's next ``O_APPEND`` write lands at offset 0. Writes that land between the last
     read and the truncation (one ``read`` call) are lost, and a write caught half-way by that
     read (buffered reads do not wait for writers) leaves a torn last line in ``.1``.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 20
LOG_NAMES = ("stdout.log", "stderr.log")
FALLOC_FL_COLLAPSE_RANGE = 0x08
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV, errno.EPERM)

_fallocate: Callable[[int, int, int, int], None] | None = None


def _collapse(fd: int, length: int) -> bool:
    """Cut the first ``length`` bytes out of ``fd``'s file; False if the filesystem cannot."""
    global _fallocate
    if _fallocate is None:
        import ctypes  # lazy: ctypes costs the resident agent memory; only a rotation needs it

        libc = ctypes.CDLL(None, use_errno=True)
        raw = libc.fallocate
        raw.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        raw.restype = ctypes.c_int

        def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
            if raw(fd, mode, offset, length) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))

        _fallocate = fallocate
    try:
        _fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, length)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    return True


def _backup(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate_if_needed(path: Path, max_bytes: int, backups: int, *, collapse: bool = True) -> bool:
    """Rotate ``path`` when it has reached ``max_bytes``; keep ``backups`` old copies.

    Backups are ``path.1`` (newest) to ``path.<backups>`` (oldest); the oldest is dropped.
    With ``backups`` 0 the file is only truncated. ``collapse=False`` forces copy-then-truncate
    even where the filesystem could collapse the copied range (see the module docstring).

    Returns:
        True when the file was rotated; False when it is missing or still small
        (``max_bytes`` <= 0 disables rotation).

    Raises:
        OSError: the copy or the truncation failed (the live file is then left as it was,
            apart from older backups having been shifted).
    """
    if max_bytes <= 0:
        return False
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size < max_bytes:
        return False
    if backups <= 0:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        return True
    for n in range(backups - 1, 0, -1):
        older = _backup(path, n)
        if older.exists():
            os.replace(older, _backup(path, n + 1))
    tmp = path.with_name(f"{path.name}.1.tmp")
    fd_in = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        st = os.fstat(fd_in)
        fd_out = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, st.st_mode & 0o777
        )
        try:
            _rotate(fd_in, fd_out, st.st_size, _block_size(fd_in) if collapse else 0)
        except BaseException:
            os.close(fd_out)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd_out)
    finally:
        os.close(fd_in)
    os.replace(tmp, _backup(path, 1))
    return True


def _block_size(fd: int) -> int:
    try:
        vfs = os.fstatvfs(fd)
    except OSError:
        return 0
    return vfs.f_frsize or vfs.f_bsize


def _rotate(fd_in: int, fd_out: int, size: int, block: int) -> None:
    """Copy the head of ``fd_in`` to ``fd_out`` and remove it from ``fd_in``."""
    # Collapse needs a block-aligned range that ends before EOF. Bytes below the size seen by
    # fstat are fully written, so the copied head cannot contain a half-finished append.
    cut = (size - 1) // block * block if block > 0 else 0
    if cut > 0:
        _copy(fd_in, fd_out, cut)
        if _collapse(fd_in, cut):
            return
    while True:
        chunk = os.read(fd_in, CHUNK)
        if not chunk:
            # Truncate right after the read that saw the end: that is the loss window.
            os.ftruncate(fd_in, 0)
            return
        _write_all(fd_out, chunk)


def _copy(fd_in: int, fd_out: int, length: int) -> None:
    left = length
    while left > 0:
        chunk = os.read(fd_in, min(CHUNK, left))
        if not chunk:
            raise OSError(errno.EIO, "log shrank while it was being rotated")
        _write_all(fd_out, chunk)
        left -= len(chunk)


def rotate_logs(log_dir: Path, max_bytes: int, backups: int) -> list[Path]:
    """Rotate a component's ``stdout.log`` and ``stderr.log`` as needed; return those rotated."""
    paths = [log_dir / name for name in LOG_NAMES]
    return [p for p in paths if rotate_if_needed(p, max_bytes, backups)]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]

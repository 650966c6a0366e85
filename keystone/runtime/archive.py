"""Safe unpacking of tar (plain, gz, bz2, xz) and zip artifacts.

``tarfile``'s ``filter="data"`` has had several bypasses, so it is not relied on. Instead:

1. **Pre-scan** every member before anything is written: the name must be relative, without
   ``..`` and without a NUL; only regular files, directories, symlinks and hard links are accepted
   (no devices, FIFOs or sockets); a hard link must name an earlier regular file; a symlink's target
   must be relative and stay inside the tree; no member may sit below a file or a link; names are
   unique; the count and the declared sizes are bounded (a decompression bomb is refused from its
   headers, before it is inflated).
2. **Extract into a fresh staging directory** next to the destination, with our own code (never
   ``extractall``): files are created with ``O_EXCL | O_NOFOLLOW``, copied with a byte budget, and
   symlinks are created last, so no write can pass through one. Each symlink is then resolved by the
   kernel's rules (``realpath``) and must land inside the staging directory.
3. Modes lose setuid/setgid/sticky and every write bit; the staging directory is renamed to the
   destination in one step. A failure removes the staging directory: nothing is left behind, and
   nothing is ever written outside it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import posixpath
import secrets
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from keystone.errors import UnsafeArchiveError
from keystone.state import fsync_dir

DEFAULT_MAX_EXTRACT_BYTES = 2 * 1024**3
DEFAULT_MAX_FILES = 100_000
MAX_NAME_BYTES = 4096
MAX_SYMLINK_TARGET = 4096
_COPY_CHUNK = 1024 * 1024

FILE = "file"
DIR = "dir"
SYMLINK = "symlink"
HARDLINK = "hardlink"


class ArchiveRefused(UnsafeArchiveError):
    """An archive refused by the pre-scan or during extraction.

    Attributes:
        reason: ``absolute-path``, ``parent-path``, ``bad-name``, ``special-file``,
            ``link-escape``, ``duplicate``, ``too-many-files``, ``too-large``, ``encrypted``,
            ``damaged`` or ``not-an-archive``.
        member: the offending member name, if one.
    """

    def __init__(self, message: str, *, reason: str, member: str | None = None) -> None:
        self.reason = reason
        self.member = member
        super().__init__(message)


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what one archive may unpack to.

    Attributes:
        max_bytes: total of the members' sizes (``KEYSTONE_MAX_EXTRACT_BYTES``, 2 GiB).
        max_files: number of members of any kind.
    """

    max_bytes: int = DEFAULT_MAX_EXTRACT_BYTES
    max_files: int = DEFAULT_MAX_FILES


@dataclass(frozen=True)
class UnpackResult:
    """What an unpack wrote: the member count and the bytes of regular files."""

    files: int
    bytes: int


@dataclass(frozen=True)
class _Entry:
    name: str  # normalized, relative, "/"-separated
    kind: str
    size: int
    mode: int
    target: str | None  # symlink target (as written) or hard-link source (normalized)
    ref: object  # the TarInfo / ZipInfo to read the data from
    mtime: float | None


def detect_format(path: Path) -> str:
    """Return ``zip`` or ``tar`` (any compression ``tarfile`` reads) from the file's magic bytes.

    Raises:
        ArchiveRefused: ``not-an-archive``.
    """
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, EOFError, zlib.error, tarfile.TarError):
        pass
    raise ArchiveRefused(
        "neither a tar (plain, gz, bz2, xz) nor a zip archive; set unpack = false to keep it "
        "as a file",
        reason="not-an-archive",
    )


def _normalize(raw: str) -> str:
    """Return the safe relative form of a member name, or raise with the reason."""
    if "\x00" in raw:
        raise ArchiveRefused(f"member {raw!r} has a NUL in its name", reason="bad-name", member=raw)
    if len(raw.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise ArchiveRefused(
            f"member {raw[:80]!r}... has a name longer than {MAX_NAME_BYTES} bytes",
            reason="bad-name",
            member=raw,
        )
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":" and raw[0].isalpha()):
        raise ArchiveRefused(
            f"member {raw!r} has an absolute path", reason="absolute-path", member=raw
        )
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveRefused(
            f"member {raw!r} has a '..' component (would write outside the directory)",
            reason="parent-path",
            member=raw,
        )
    return "/".join(parts)


def _check_symlink_target(name: str, target: str) -> None:
    if not target or "\x00" in target or len(target) > MAX_SYMLINK_TARGET:
        raise ArchiveRefused(
            f"symlink {name!r} has an empty or malformed target", reason="bad-name", member=name
        )
    if target.startswith("/"):
        raise ArchiveRefused(
            f"symlink {name!r} points to the absolute path {target!r}",
            reason="link-escape",
            member=name,
        )
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    if resolved == ".." or resolved.startswith("../"):
        raise ArchiveRefused(
            f"symlink {name!r} points outside the archive ({target!r})",
            reason="link-escape",
            member=name,
        )


class _Scan:
    """Accumulates the pre-scan verdict over a member stream."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.entries: list[_Entry] = []
        self.by_name: dict[str, _Entry] = {}
        self.total = 0

    def add(self, entry: _Entry) -> None:
        if len(self.entries) >= self.limits.max_files:
            raise ArchiveRefused(
                f"has more than {self.limits.max_files} members (a bound on unpacking; raise "
                "KEYSTONE_MAX_EXTRACT_FILES if this archive is genuine)",
                reason="too-many-files",
            )
        if entry.kind == FILE:
            self.total += entry.size
            if self.total > self.limits.max_bytes:
                raise ArchiveRefused(
                    f"unpacks to more than {self.limits.max_bytes} bytes (at member "
                    f"{entry.name!r}; decompression bomb or bound too low: raise "
                    "KEYSTONE_MAX_EXTRACT_BYTES if it is genuine)",
                    reason="too-large",
                    member=entry.name,
                )
        if entry.name == "":
            if entry.kind == DIR:
                return  # "./" itself
            raise ArchiveRefused(
                "a non-directory member is named like the archive root",
                reason="bad-name",
                member=entry.name,
            )
        previous = self.by_name.get(entry.name)
        if previous is not None:
            if previous.kind == DIR and entry.kind == DIR:
                return
            raise ArchiveRefused(
                f"has member {entry.name!r} twice (a later copy would replace the first)",
                reason="duplicate",
                member=entry.name,
            )
        if entry.kind == SYMLINK:
            assert entry.target is not None
            _check_symlink_target(entry.name, entry.target)
        if entry.kind == HARDLINK:
            source = self.by_name.get(entry.target or "")
            if source is None or source.kind != FILE:
                raise ArchiveRefused(
                    f"hard link {entry.name!r} does not point to an earlier regular file of the "
                    f"archive ({entry.target!r})",
                    reason="link-escape",
                    member=entry.name,
                )
        self.entries.append(entry)
        self.by_name[entry.name] = entry

    def finish(self) -> None:
        """Refuse members that would be written below a file or a link."""
        for entry in self.entries:
            parts = entry.name.split("/")
            for i in range(1, len(parts)):
                parent = self.by_name.get("/".join(parts[:i]))
                if parent is not None and parent.kind != DIR:
                    raise ArchiveRefused(
                        f"member {entry.name!r} lies below {parent.name!r}, which is a "
                        f"{parent.kind}, not a directory (a write through a link)",
                        reason="link-escape",
                        member=entry.name,
                    )


def _scan_tar(tf: tarfile.TarFile, limits: ArchiveLimits) -> _Scan:
    scan = _Scan(limits)
    while True:
        info = tf.next()
        if info is None:
            break
        if info.isreg():
            kind = FILE
        elif info.isdir():
            kind = DIR
        elif info.issym():
            kind = SYMLINK
        elif info.islnk():
            kind = HARDLINK
        else:
            what = (
                "a character device"
                if info.ischr()
                else "a block device"
                if info.isblk()
                else "a FIFO"
                if info.isfifo()
                else f"an entry of tar type {info.type!r}"
            )
            raise ArchiveRefused(
                f"member {info.name!r} is {what}; only files, directories and links are allowed",
                reason="special-file",
                member=info.name,
            )
        name = _normalize(info.name)
        target: str | None = None
        if kind == SYMLINK:
            target = info.linkname
        elif kind == HARDLINK:
            target = _normalize(info.linkname)
        size = info.size if kind == FILE else 0
        if size < 0:
            raise ArchiveRefused(
                f"member {info.name!r} has a negative size", reason="damaged", member=info.name
            )
        scan.add(_Entry(name, kind, size, info.mode, target, info, float(info.mtime)))
    scan.finish()
    return scan


def _scan_zip(zf: zipfile.ZipFile, limits: ArchiveLimits) -> _Scan:
    scan = _Scan(limits)
    infos = zf.infolist()
    if len(infos) > limits.max_files:
        raise ArchiveRefused(
            f"has {len(infos)} members, more than the bound of {limits.max_files}",
            reason="too-many-files",
        )
    for info in infos:
        if info.flag_bits & 0x1:
            raise ArchiveRefused(
                f"member {info.filename!r} is encrypted", reason="encrypted", member=info.filename
            )
        unix_mode = info.external_attr >> 16
        fmt = stat.S_IFMT(unix_mode)
        if info.is_dir() or fmt == stat.S_IFDIR:
            kind = DIR
        elif fmt == stat.S_IFLNK:
            kind = SYMLINK
        elif fmt in (0, stat.S_IFREG):
            kind = FILE
        else:
            raise ArchiveRefused(
                f"member {info.filename!r} is a special file (mode {oct(unix_mode)}); only files, "
                "directories and links are allowed",
                reason="special-file",
                member=info.filename,
            )
        name = _normalize(info.filename)
        target: str | None = None
        if kind == SYMLINK:
            if info.file_size > MAX_SYMLINK_TARGET:
                raise ArchiveRefused(
                    f"symlink {info.filename!r} has an oversized target",
                    reason="bad-name",
                    member=info.filename,
                )
            target = zf.read(info).decode("utf-8", "surrogateescape")
        mode = (unix_mode & 0o7777) or (0o755 if kind == DIR else 0o644)
        mtime = None
        with contextlib.suppress(ValueError, OverflowError):
            mtime = datetime.datetime(*info.date_time).timestamp()
        size = info.file_size if kind == FILE else 0
        scan.add(_Entry(name, kind, size, mode, target, info, mtime))
    scan.finish()
    return scan


def _copy_bounded(src: IO[bytes], dst_fd: int, expected: int, name: str) -> int:
    written = 0
    while True:
        chunk = src.read(_COPY_CHUNK)
        if not chunk:
            break
        written += len(chunk)
        if written > expected:
            raise ArchiveRefused(
                f"member {name!r} holds more data than its header declares",
                reason="too-large",
                member=name,
            )
        view = memoryview(chunk)
        while view:
            n = os.write(dst_fd, view)
            view = view[n:]
    if written != expected:
        raise ArchiveRefused(
            f"member {name!r} is truncated ({written} of {expected} bytes)",
            reason="damaged",
            member=name,
        )
    return written


def _open_member(archive: tarfile.TarFile | zipfile.ZipFile, entry: _Entry) -> IO[bytes]:
    if isinstance(archive, tarfile.TarFile):
        assert isinstance(entry.ref, tarfile.TarInfo)
        fh = archive.extractfile(entry.ref)
        if fh is None:
            raise ArchiveRefused(
                f"member {entry.name!r} has no data", reason="damaged", member=entry.name
            )
        return fh
    assert isinstance(entry.ref, zipfile.ZipInfo)
    return archive.open(entry.ref)


def _file_mode(mode: int) -> int:
    """Read-only, no setuid/setgid/sticky; execute bits are kept."""
    return 0o444 | (mode & 0o111)


def _extract(
    archive: tarfile.TarFile | zipfile.ZipFile, scan: _Scan, staging: Path
) -> UnpackResult:
    total = 0
    files = 0
    root_real = os.path.realpath(staging)
    dirs: list[Path] = []
    links: list[_Entry] = []
    for entry in scan.entries:
        dest = staging / entry.name
        if entry.kind == DIR:
            dest.mkdir(parents=True, exist_ok=True)
            dirs.append(dest)
            continue
        if entry.kind == SYMLINK:
            links.append(entry)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if entry.kind == HARDLINK:
            assert entry.target is not None
            os.link(staging / entry.target, dest, follow_symlinks=False)
            files += 1
            continue
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with _open_member(archive, entry) as src:
                total += _copy_bounded(src, fd, entry.size, entry.name)
            os.fsync(fd)
        finally:
            os.close(fd)
        if entry.mtime is not None:
            with contextlib.suppress(OSError, OverflowError, ValueError):
                os.utime(dest, (entry.mtime, entry.mtime))
        os.chmod(dest, _file_mode(entry.mode))
        files += 1
    # Symlinks last: no file above was written through one.
    for entry in links:
        assert entry.target is not None
        dest = staging / entry.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(entry.target, dest)
        files += 1
    for entry in links:
        real = os.path.realpath(staging / entry.name)
        if real != root_real and not real.startswith(root_real + os.sep):
            raise ArchiveRefused(
                f"symlink {entry.name!r} resolves outside the archive (through other links)",
                reason="link-escape",
                member=entry.name,
            )
    # Every directory read-only, those the archive lists and those made for a member's parents.
    for dirpath, _dirnames, _filenames in os.walk(staging, topdown=False):
        if dirpath != str(staging):
            os.chmod(dirpath, 0o555)
    return UnpackResult(files=files + len(dirs), bytes=total)


@contextlib.contextmanager
def _open_archive(path: Path, fmt: str) -> Iterator[tarfile.TarFile | zipfile.ZipFile]:
    if fmt == "zip":
        with zipfile.ZipFile(path) as zf:
            yield zf
    else:
        with tarfile.open(path, mode="r:*") as tf:
            yield tf


def make_writable(path: Path) -> None:
    """Give the owner write access to every directory below ``path`` (before removing it)."""
    if path.is_symlink() or not path.is_dir():
        return
    for dirpath, _dirnames, _files in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o755)


def remove_tree(path: Path) -> None:
    """Remove an unpacked (read-only) tree or a staging directory; missing is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    make_writable(path)
    shutil.rmtree(path, ignore_errors=True)


def unpack(
    archive_path: Path,
    dest: Path,
    limits: ArchiveLimits | None = None,
    *,
    what: str | None = None,
) -> UnpackResult:
    """Unpack ``archive_path`` into the new directory ``dest``, safely, all or nothing.

    The archive is pre-scanned, then extracted into a fresh staging directory beside ``dest`` that
    is renamed to ``dest`` when complete. The tree is left read-only.

    Args:
        archive_path: a tar (plain, gz, bz2, xz) or zip file; the format is read from its bytes.
        dest: must not exist yet; its parent must.
        limits: bounds on members and bytes.
        what: how messages name the archive (default: its path).

    Raises:
        ArchiveRefused: an unsafe, oversized or damaged archive (nothing is left on disk).
        FileExistsError: ``dest`` already exists.
    """
    limits = limits or ArchiveLimits()
    label = what or str(archive_path)
    if dest.exists():
        raise FileExistsError(dest)
    try:
        fmt = detect_format(archive_path)
    except ArchiveRefused as exc:
        raise ArchiveRefused(f"archive {label}: {exc}", reason=exc.reason) from None
    staging = dest.parent / f".staging-{dest.name}-{secrets.token_hex(6)}"
    staging.mkdir(mode=0o700)
    try:
        try:
            with _open_archive(archive_path, fmt) as archive:
                scan = (
                    _scan_tar(archive, limits)
                    if isinstance(archive, tarfile.TarFile)
                    else (_scan_zip(archive, limits))
                )
                result = _extract(archive, scan, staging)
        except ArchiveRefused as exc:
            raise ArchiveRefused(
                f"archive {label}: {exc}; nothing was unpacked",
                reason=exc.reason,
                member=exc.member,
            ) from None
        except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
            raise ArchiveRefused(
                f"archive {label}: damaged ({type(exc).__name__}: {exc}); nothing was unpacked",
                reason="damaged",
            ) from exc
        except (NotImplementedError, RuntimeError) as exc:
            # zipfile: unsupported compression method or encryption.
            raise ArchiveRefused(
                f"archive {label}: cannot be read ({exc}); nothing was unpacked", reason="damaged"
            ) from exc
        os.chmod(staging, 0o555)
        try:
            os.rename(staging, dest)
        except OSError:
            if dest.is_dir():  # another process unpacked the same archive meanwhile
                raise FileExistsError(dest) from None
            raise
    except BaseException:
        remove_tree(staging)
        raise
    with contextlib.suppress(OSError):
        fsync_dir(dest.parent)
    return result

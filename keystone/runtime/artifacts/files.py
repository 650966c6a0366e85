"""Small file-system steps of the artifact store: durable writes, hashing, placing installed files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path

from loguru import logger

from keystone.runtime.archive import (
    remove_tree,
)
from keystone.runtime.artifacts.policy import (
    CHUNK,
)
from keystone.state import fsync_dir

CACHE_DIRS = frozenset({"sha256", "unpacked", "meta", "tmp"})
"""The cache's own directories under ``runtime/artifacts``: never a Go-view recipe name."""


def fsync_dir_quietly(path: Path) -> None:
    """fsync a directory; a file system that cannot is not an error (the rename stands)."""
    with contextlib.suppress(OSError):
        fsync_dir(path)


def copy_file(src: Path, dst_fd: int) -> None:
    """Copy a file into an empty open descriptor, in the kernel where it can (reflink on
    btrfs/XFS through ``copy_file_range``), else with plain reads and writes."""
    with open(src, "rb") as fh:
        in_fd = fh.fileno()
        size = os.fstat(in_fd).st_size
        offset = 0
        with contextlib.suppress(OSError):  # EXDEV/ENOSYS/EINVAL: fall back below
            while offset < size:
                n = os.copy_file_range(in_fd, dst_fd, size - offset, offset, offset)
                if n == 0:
                    break
                offset += n
        fh.seek(offset)
        os.lseek(dst_fd, offset, os.SEEK_SET)
        while chunk := fh.read(CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst_fd, view) :]


def hash_file(path: Path) -> tuple[str, int]:
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256")
        return digest.hexdigest(), fh.tell()


def ensure_real_dir(path: Path) -> None:
    """Make ``path`` a real directory, replacing a symlink or file a component may have left."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)


def place_file(src: Path, target_dir: Path, name: str, mode: int) -> None:
    """Copy ``src`` to ``target_dir/name`` through a fresh temp file and one rename."""
    tmp = target_dir / f".{name}.keystone-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            copy_file(src, fd)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        dest = target_dir / name
        if dest.is_dir() and not dest.is_symlink():
            remove_tree(dest)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def place_symlink(target: str, target_dir: Path, name: str) -> None:
    tmp = target_dir / f".{name}.keystone-{secrets.token_hex(4)}"
    os.symlink(target, tmp)
    dest = target_dir / name
    if dest.is_dir() and not dest.is_symlink():
        remove_tree(dest)
    os.replace(tmp, dest)


def link_go_view(root: Path, blob: Path, name: str, recipe: str, version: str) -> Path | None:
    """Link ``root/<recipe>/<version>/<name>`` to the cached ``blob`` (relative, read-only).

    The Go agent keeps each download at ``runtime/artifacts/<name>/<version>/<file>``, and its
    recipes' install scripts copy from there (``cp ../../../artifacts/<name>/<version>/<file>
    .`` from the work dir ``runtime/components/<name>/<version>``); our cache is
    content-addressed, so this link makes those scripts work unchanged. The blob is 0444: a
    script can copy it, not change the cache through the link. Returns the link, or None when
    there is no blob to point at (an artifact rebuilt from a delta patch has only its unpacked
    tree) or the recipe name would shadow one of the cache's own directories.
    """
    if recipe in CACHE_DIRS or recipe.startswith(".") or version.startswith("."):
        logger.warning(
            "artifact {} of recipe {!r}: no Go-style link {}/{}/{}: the name is one of the "
            "artifact cache's own directories",
            name,
            recipe,
            recipe,
            version,
            name,
        )
        return None
    if not blob.is_file():
        return None
    target_dir = root / recipe / version
    ensure_real_dir(root / recipe)
    ensure_real_dir(target_dir)
    place_symlink(os.path.relpath(blob, target_dir), target_dir, name)
    return target_dir / name


def prune_go_view(root: Path) -> None:
    """Remove the Go-view links whose blob was evicted, and the directories left empty."""
    for recipe in os.listdir(root):
        top = root / recipe
        if recipe in CACHE_DIRS or recipe.startswith(".") or top.is_symlink() or not top.is_dir():
            continue
        for version in os.listdir(top):
            vdir = top / version
            if vdir.is_symlink() or not vdir.is_dir():
                continue
            for entry in os.listdir(vdir):
                link = vdir / entry
                if link.is_symlink() and not link.exists():
                    link.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                vdir.rmdir()  # only when empty
        with contextlib.suppress(OSError):
            top.rmdir()

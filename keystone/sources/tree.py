"""Reading one commit's tree from the mirror: :class:`TreeReader`, and exporting files out of it."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Protocol

from keystone.errors import UnsafeArchiveError, ValidationError
from keystone.sources.base import IncompleteHistory, split_repo_path
from keystone.sources.pack import _hex, _is_gitlink

__all__ = ["ObjectStore", "TreeReader"]


class ObjectStore(Protocol):
    """What a :class:`TreeReader` reads of the mirror that made it (a ``GitMirror``).

    A protocol, not the class: the mirror makes tree readers, so naming it here would be a cycle.
    """

    def resolve(self, ref_or_rev: str) -> str: ...

    def _commit_fields(self, sha: str) -> tuple[tuple[str, ...], int, str]: ...

    def _object(self, sha: str) -> Any: ...


def _entry_name(raw: bytes, where: str) -> str:
    """Decode a tree entry name, refusing names that could not be a safe path segment."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(f"{where}: entry {raw!r} is not valid UTF-8", field="path") from exc
    # ".git" is refused too (git itself never stores one): an exported work dir must not carry
    # a git config that a later `git` command there would obey.
    if name in ("", ".", "..") or name.casefold() == ".git" or any(c in name for c in "/\\\0"):
        raise ValidationError(
            f"{where}: tree entry {name!r} is not a safe file name; the commit is malformed",
            field="path",
        )
    return name


class TreeReader:
    """Read-only access to the tree of one commit in a ``GitMirror``.

    It implements :class:`keystone.sources.base.FileSource`. Symlinks and submodules are never
    followed: reading one is refused, and they list with ``is_dir`` False.
    """

    def __init__(self, mirror: ObjectStore, rev: str) -> None:
        self.mirror = mirror
        self.revision = mirror.resolve(rev)
        self._tree = mirror._commit_fields(self.revision)[2]
        # Trees are immutable: keep the parsed ones, so reading every file of a large directory
        # does not parse that directory again for each file (quadratic in its size).
        self._trees: dict[str, Any] = {}

    def _where(self, path: str) -> str:
        return f"{path or '/'} at {self.revision[:12]}"

    def _lookup(self, parts: list[str]) -> tuple[int, str] | None:
        """Return (mode, sha) of the entry at ``parts``; None if absent or behind a non-dir."""
        # lazy: dulwich is heavy; the resident agent imports this module without it
        from dulwich.objects import Tree

        mode, sha = stat.S_IFDIR, self._tree
        for part in parts:
            if not stat.S_ISDIR(mode):
                return None
            tree = self._trees.get(sha)
            if tree is None:
                tree = self.mirror._object(sha)
                if not isinstance(tree, Tree):
                    raise IncompleteHistory(f"object {sha} should be a tree but is not")
                if len(self._trees) < 4096:
                    self._trees[sha] = tree
            try:
                mode, raw_sha = tree[part.encode("utf-8")]
            except KeyError:
                return None
            sha = _hex(raw_sha)
        return mode, sha

    def blob_id(self, path: str) -> str | None:
        """The blob id of the regular file at ``path`` (None: absent, or not a regular file).

        Reads only trees: a blob id names the content, so a reader that has seen it (a parsed
        recipe cache) needs no read at all.
        """
        found = self._lookup(split_repo_path(path))
        if found is None or not stat.S_ISREG(found[0]):
            return None
        return found[1]

    def read(self, path: str) -> bytes | None:
        """Return the content of the regular file at ``path``, or None when there is none.

        Raises:
            keystone.errors.ValidationError: the path is unsafe, or names a directory, a symlink
                or a submodule.
        """
        # lazy: dulwich is heavy; the resident agent imports this module without it
        from dulwich.objects import Blob

        parts = split_repo_path(path)
        found = self._lookup(parts)
        if found is None:
            return None
        mode, sha = found
        if stat.S_ISDIR(mode):
            raise ValidationError(
                f"{self._where(path)} is a directory, expected a file", field="path"
            )
        if stat.S_ISLNK(mode):
            raise ValidationError(
                f"{self._where(path)} is a symlink; Keystone reads only regular files from the "
                "repository",
                field="path",
            )
        if _is_gitlink(mode):
            raise ValidationError(
                f"{self._where(path)} is a submodule; Keystone does not read submodules",
                field="path",
            )
        blob = self.mirror._object(sha)
        if not isinstance(blob, Blob):
            raise IncompleteHistory(f"object {sha} ({self._where(path)}) is not a blob")
        return bytes(blob.data)

    def listdir(self, path: str) -> list[tuple[str, bool]]:
        """Return sorted ``(name, is_dir)`` entries of the directory at ``path`` (``""`` = root).

        An absent directory yields ``[]``; a path that names a file is refused.
        """
        # lazy: dulwich is heavy; the resident agent imports this module without it
        from dulwich.objects import Tree

        parts = split_repo_path(path, allow_root=True)
        found = self._lookup(parts)
        if found is None:
            return []
        mode, sha = found
        if not stat.S_ISDIR(mode):
            raise ValidationError(f"{self._where(path)} is not a directory", field="path")
        tree = self.mirror._object(sha)
        assert isinstance(tree, Tree)
        out = []
        for entry in tree.iteritems():
            assert entry.path is not None and entry.mode is not None
            out.append((_entry_name(entry.path, self._where(path)), stat.S_ISDIR(entry.mode)))
        return sorted(out)

    def export(
        self,
        subpath: str,
        dest: Path,
        *,
        max_bytes: int | None = None,
        max_files: int | None = None,
    ) -> None:
        """Write file or directory ``subpath`` to ``dest``; see :meth:`GitMirror.export_tree`.

        Raises:
            keystone.errors.ValidationError: ``subpath`` is absent or unsafe, or ``dest`` exists.
            keystone.errors.UnsafeArchiveError: a symlink, submodule or unsafe name below
                ``subpath``, or the export is over ``max_bytes`` / ``max_files``.
        """
        parts = split_repo_path(subpath, allow_root=True)
        found = self._lookup(parts)
        if found is None:
            raise ValidationError(f"{self._where(subpath)} does not exist", field="path")
        dest = Path(dest)
        if os.path.lexists(dest):
            raise ValidationError(f"export destination {dest} already exists", field="path")
        budget = _ExportBudget(max_bytes, max_files, self._where(subpath))
        dest.parent.mkdir(parents=True, exist_ok=True)
        mode, sha = found
        try:
            self._export_entry(mode, sha, dest, subpath or ".", budget)
        except BaseException:
            if os.path.isdir(dest) and not os.path.islink(dest):
                shutil.rmtree(dest, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(dest)
            raise

    def _export_entry(
        self, mode: int, sha: str, dest: Path, rel: str, budget: _ExportBudget
    ) -> None:
        # lazy: dulwich is heavy; the resident agent imports this module without it
        from dulwich.objects import Blob, Tree

        if stat.S_ISDIR(mode):
            tree = self.mirror._object(sha)
            assert isinstance(tree, Tree)
            budget.add_file(rel)
            os.mkdir(dest, 0o755)
            for entry in tree.iteritems():
                assert entry.path is not None and entry.mode is not None
                assert entry.sha is not None
                try:
                    name = _entry_name(entry.path, self._where(rel))
                except ValidationError as exc:
                    raise UnsafeArchiveError(str(exc)) from exc
                self._export_entry(
                    entry.mode, _hex(entry.sha), dest / name, f"{rel}/{name}", budget
                )
            return
        if stat.S_ISLNK(mode) or _is_gitlink(mode) or not stat.S_ISREG(mode):
            kind = (
                "a symlink"
                if stat.S_ISLNK(mode)
                else ("a submodule" if _is_gitlink(mode) else f"mode {mode:o}")
            )
            raise UnsafeArchiveError(
                f"{rel} at {self.revision[:12]} is {kind}; only regular files and directories "
                "are exported from the repository"
            )
        blob = self.mirror._object(sha)
        assert isinstance(blob, Blob)
        data = blob.as_raw_string()
        budget.add_file(rel, len(data))
        perm = 0o755 if mode & 0o111 else 0o644
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, perm)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


class _ExportBudget:
    def __init__(self, max_bytes: int | None, max_files: int | None, where: str) -> None:
        self.max_bytes, self.max_files, self.where = max_bytes, max_files, where
        self.bytes = 0
        self.files = 0

    def add_file(self, rel: str, size: int = 0) -> None:
        self.files += 1
        self.bytes += size
        if self.max_files is not None and self.files > self.max_files:
            raise UnsafeArchiveError(
                f"export of {self.where} has more than {self.max_files} entries (at {rel})"
            )
        if self.max_bytes is not None and self.bytes > self.max_bytes:
            raise UnsafeArchiveError(
                f"export of {self.where} is larger than {self.max_bytes} bytes (at {rel})"
            )

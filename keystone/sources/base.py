"""What every source yields, and the small seams between sources and the sync engine.

A source (a git remote, an HTTP bundle, a USB bundle) turns "go and look" into a
:class:`FetchResult`: the commit id of the tip it found, whether that differs from what the
device already had, and what it cost on the wire. The commit and its tree are then read from the
local mirror through a :class:`FileSource` bound to that one revision.

This module is imported by the resident agent, so it imports nothing heavy (no dulwich).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from keystone.errors import Refused, SourceUnreachable, ValidationError

__all__ = [
    "DirectoryReader",
    "FetchResult",
    "FileSource",
    "HistoryLimitExceeded",
    "IncompleteHistory",
    "PackTooLarge",
    "RemoteRefNotFound",
    "Source",
    "UnknownRevision",
    "redact_url",
    "split_repo_path",
]


@dataclass(frozen=True)
class FetchResult:
    """The outcome of one :meth:`Source.fetch`.

    Attributes:
        revision: Hex commit id of the fetched ref's tip (tags are peeled to their commit).
        changed: False when the tip equals what the mirror held from the previous fetch; then no
            pack was requested.
        bytes_received: Pack bytes received on the wire (0 when no pack was requested).
        source: Where the revision came from (a URL with any password removed, or a file path).
    """

    revision: str
    changed: bool
    bytes_received: int
    source: str


@runtime_checkable
class Source(Protocol):
    """Anything that can bring the desired revision into the local mirror."""

    def fetch(self) -> FetchResult:
        """Fetch the tip into the mirror and say what was found.

        Raises:
            keystone.errors.SourceUnreachable: the remote did not answer (retry later).
            keystone.errors.Refused: the remote answered with something unusable.
        """
        ...


@runtime_checkable
class FileSource(Protocol):
    """Read-only access to the files of one revision (or of one checkout).

    Paths are relative to the repository root, ``/``-separated, and may not leave the root
    (see :func:`split_repo_path`).
    """

    def read(self, path: str) -> bytes | None:
        """Return the content of the regular file at ``path``, or None when there is none."""
        ...

    def listdir(self, path: str) -> list[tuple[str, bool]]:
        """Return ``(name, is_dir)`` for each entry of the directory at ``path``, sorted by name.

        An absent directory yields an empty list; ``""`` is the repository root.
        """
        ...


class UnknownRevision(ValidationError, KeyError):
    """A ref or revision that the mirror does not have.

    It is also a ``KeyError`` so that callers that treat the mirror like a mapping can catch it.
    """

    def __init__(self, message: str, *, rev: str) -> None:
        self.rev = rev
        super().__init__(message, field="revision")

    def __str__(self) -> str:
        # KeyError would print the message quoted; keep the readable form.
        return ValidationError.__str__(self)


class RemoteRefNotFound(SourceUnreachable):
    """The remote answered but does not serve the configured ref.

    Retryable: somebody may push the branch again; meanwhile the device keeps what it runs.
    """

    def __init__(self, message: str, *, ref: str, url: str) -> None:
        self.ref = ref
        self.url = url
        super().__init__(message)


class PackTooLarge(Refused):
    """A pack (from a remote or inside a bundle) that exceeds its configured size bound."""


class HistoryLimitExceeded(Refused):
    """A history walk (ancestry, commits since a revision) went past its bound."""


class IncompleteHistory(Refused):
    """A commit in the mirror whose parent or tree is missing."""


_SCHEME_LESS = re.compile(r"^[A-Za-z0-9._~-]+@[^/:]+:")


def redact_url(url: str) -> str:
    """Return ``url`` without a password, fit for logs, errors and status.

    ``https://user:secret@host/repo`` becomes ``https://user@host/repo``; scp-like SSH locations
    and plain paths are returned unchanged.
    """
    if "://" not in url or _SCHEME_LESS.match(url):
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def split_repo_path(path: str, *, allow_root: bool = False, file: str | None = None) -> list[str]:
    """Split a repository-relative path into its segments, refusing anything that could escape.

    ``a/b.toml`` and ``a//b.toml/`` give ``["a", "b.toml"]``; ``.`` segments are dropped. An
    absolute path, a ``..`` segment, a backslash, a NUL or a control character is refused, as is
    the empty path unless ``allow_root`` (then ``[]`` is the root).

    Raises:
        keystone.errors.ValidationError: naming the path and what is wrong with it.
    """
    if not isinstance(path, str):
        raise ValidationError(
            f"repository path must be a string, got {type(path).__name__}", file=file, field="path"
        )
    if path.startswith("/"):
        raise ValidationError(
            f"{path!r} is absolute; paths in the fleet repository are relative to its root",
            file=file,
            field="path",
        )
    if "\\" in path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise ValidationError(
            f"{path!r} contains a backslash or a control character; use plain '/'-separated names",
            file=file,
            field="path",
        )
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValidationError(
            f"{path!r} contains '..'; paths may not leave the repository root",
            file=file,
            field="path",
        )
    if not parts and not allow_root:
        raise ValidationError(
            "empty path; name a file inside the repository", file=file, field="path"
        )
    return parts


class DirectoryReader:
    """A :class:`FileSource` over a directory on disk, such as a fleet checkout.

    It gives the same answers as a tree read from the mirror: symlinks are refused rather than
    followed (git stores them as links, and a link could point outside the checkout), and the
    ``.git`` directory is not listed.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _walk(self, path: str, *, allow_root: bool) -> tuple[Path, os.stat_result | None]:
        parts = split_repo_path(path, allow_root=allow_root)
        current = self.root
        st: os.stat_result | None = os.stat(current)
        for part in parts:
            current = current / part
            try:
                st = os.lstat(current)
            except (FileNotFoundError, NotADirectoryError):
                return current, None
            if stat.S_ISLNK(st.st_mode):
                raise ValidationError(
                    f"{self.root}/{path}: {current.relative_to(self.root)} is a symlink; "
                    "Keystone reads only regular files and directories from the repository",
                    field="path",
                )
        return current, st

    def read(self, path: str) -> bytes | None:
        """Return the file's bytes, None if absent; a directory or symlink is refused."""
        target, st = self._walk(path, allow_root=False)
        if st is None:
            return None
        if stat.S_ISDIR(st.st_mode):
            raise ValidationError(
                f"{self.root}/{path} is a directory, expected a file", field="path"
            )
        if not stat.S_ISREG(st.st_mode):
            raise ValidationError(f"{self.root}/{path} is not a regular file", field="path")
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def listdir(self, path: str) -> list[tuple[str, bool]]:
        """List a directory as ``(name, is_dir)``; symlinks appear with ``is_dir`` False."""
        target, st = self._walk(path, allow_root=True)
        if st is None:
            return []
        if not stat.S_ISDIR(st.st_mode):
            raise ValidationError(f"{self.root}/{path} is not a directory", field="path")
        out: list[tuple[str, bool]] = []
        with os.scandir(target) as it:
            for entry in it:
                if entry.name == ".git" and target == self.root:
                    continue
                out.append((entry.name, entry.is_dir(follow_symlinks=False)))
        return sorted(out)

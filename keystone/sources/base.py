"""What every source yields, and the small seams between sources and the sync engine.

A source (a git remote, an HTTP bundle, a bundle file from USB, a staging directory or an API
upload) turns "go and look" into a :class:`FetchResult`: the commit id of the tip it found,
whether that differs from what the device already had, and what it cost on the wire. The commit
and its tree are then read from the local mirror through a :class:`FileSource` bound to that one
revision.

How a consumer (the sync worker) uses a source, in this order:

1. ``result = source.fetch()``: the objects are in the mirror and ``result.revision`` names the
   tip. A source raises :class:`~keystone.errors.SourceUnreachable` (retry later) or
   :class:`~keystone.errors.Refused` (unusable); it never decides whether to deploy.
   ``result.revision_known`` is False only for an unchanged HTTP bundle with nothing kept from
   before (a 304 after a refused bundle): there is nothing to verify.
2. Gate (the consumer's): a tip that is already applied, or known bad, stops here unless the
   operator forces it. :class:`~keystone.sources.http.HttpBundleSource` takes the same rule as
   its ``settled`` predicate, so that an unchanged bundle is not imported again only to be
   dropped by this gate.
3. Verify the tip (signature, ancestry, freshness) and resolve the plan from the mirror.
4. Only after verification: when ``result.bundle`` carries artifacts, copy them into the
   artifact cache with :func:`keystone.sources.bundle.cache_bundle_artifacts` (all or none).

This module is imported by the resident agent, so it imports nothing heavy (no dulwich).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from keystone.errors import Refused, SourceUnreachable, ValidationError
from keystone.repopath import split_repo_path

__all__ = [
    "DirectoryReader",
    "FetchResult",
    "FileSource",
    "HistoryLimitExceeded",
    "ImportedBundle",
    "IncompleteHistory",
    "PackTooLarge",
    "RemoteRefNotFound",
    "Source",
    "UnknownRevision",
    "redact_url",
    "split_repo_path",
]


@dataclass(frozen=True)
class ImportedBundle:
    """A bundle file whose objects a fetch has just added to the mirror.

    Attributes:
        kind: ``"keystone"`` (it may carry artifacts) or ``"git"`` (a plain git bundle).
        path: The bundle file, kept where the source keeps it; the artifacts are copied out of
            it after verification (:func:`keystone.sources.bundle.cache_bundle_artifacts`).
        artifacts: The sha256 of every artifact it carries, in manifest order.
        datasets: The dataset members it carries (``datasets/<name>/<file>``), sorted.
        images: The sha256 of every container image archive it carries.
    """

    kind: str
    path: Path
    artifacts: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class FetchResult:
    """The outcome of one :meth:`Source.fetch`.

    Attributes:
        revision: Hex commit id of the fetched ref's tip (tags are peeled to their commit);
            ``""`` when the source found nothing new and knows no revision (see
            :attr:`revision_known`).
        changed: False when nothing new entered the mirror: a git tip equal to what the mirror
            held from the previous fetch (then no pack was requested), or an unchanged HTTP
            bundle that was not imported again. A bundle whose objects were imported is True.
        bytes_received: Bytes received on the wire (0 when nothing was downloaded); for a bundle
            file, the size of the file.
        source: Where the revision came from (a URL with any password removed, or a file path).
        requests: Requests made on the wire, for sources that count them (0 otherwise).
        detail: Wire statistics a source reports as they are (for HTTP: ``status``,
            ``requests``, ``bytes``, ``resumed_from``); empty when it has none.
        bundle: The bundle file whose objects were imported, or None (git, or an unchanged
            HTTP bundle that needed no import).
    """

    revision: str
    changed: bool
    bytes_received: int
    source: str
    requests: int = 0
    detail: Mapping[str, int | str | None] = field(default_factory=dict, hash=False)
    bundle: ImportedBundle | None = None

    @property
    def revision_known(self) -> bool:
        """False for "unchanged, and no revision known": nothing to gate or verify."""
        return bool(self.revision)


@runtime_checkable
class Source(Protocol):
    """Anything that can bring the desired revision into the local mirror.

    Implementations: :class:`keystone.sources.git.GitSource` (a git remote),
    :class:`keystone.sources.http.HttpBundleSource` (a bundle URL, polled conditionally) and
    :class:`keystone.sources.file.BundleFileSource` (a bundle file on disk). See the module
    docstring for the order in which a consumer fetches, gates, verifies and caches.
    """

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

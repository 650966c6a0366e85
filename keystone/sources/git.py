"""The fleet repository over git: a bare local mirror and a fetcher, both on dulwich.

:class:`GitMirror` is the device's copy of the fleet repository (``runtime/repo``). Only objects
ever enter it: nothing from a fetched repository's config, hooks or submodules is read or run,
and every pack is received into a quarantine directory and checked (pack checksum, every object
parses, every commit/tree/tag it adds points only at objects that exist) before it joins the
mirror. A damaged or incomplete pack therefore never leaves a half-usable mirror behind.

:class:`GitSource` fetches one ref from a remote (``http(s)://``, ``ssh://`` or ``user@host:path``,
``git://``, ``file://`` or a plain path) into the mirror and records the tip under
``refs/keystone/fetched``. When the remote tip is already in the mirror it asks for no pack.

dulwich is imported inside the functions that use it, so importing this module stays cheap; the
fetch itself is meant to run in a short-lived worker process (DESIGN section 12).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import os
import re
import shlex
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from keystone.errors import (
    KeystoneError,
    SourceUnreachable,
    UnsafeArchiveError,
    ValidationError,
)
from keystone.sources.base import (
    FetchResult,
    HistoryLimitExceeded,
    IncompleteHistory,
    PackTooLarge,
    RemoteRefNotFound,
    UnknownRevision,
    redact_url,
    split_repo_path,
)

if TYPE_CHECKING:
    from dulwich.client import GitClient
    from dulwich.object_store import BaseObjectStore
    from dulwich.objects import ObjectID, ShaFile
    from dulwich.pack import Pack
    from dulwich.repo import Repo

__all__ = [
    "DEFAULT_MAX_PACK_BYTES",
    "DEFAULT_WALK_LIMIT",
    "FETCHED_REF",
    "GitMirror",
    "GitSource",
    "PackRejected",
    "TreeReader",
]

MiB = 1024 * 1024
DEFAULT_MAX_PACK_BYTES = 512 * MiB
DEFAULT_WALK_LIMIT = 100_000
FETCHED_REF = "refs/keystone/fetched"

_COMMIT, _TREE, _BLOB, _TAG = 1, 2, 3, 4
_TYPE_NAMES = {_COMMIT: "commit", _TREE: "tree", _BLOB: "blob", _TAG: "tag"}
_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX_PREFIX = re.compile(r"[0-9a-f]{4,39}")
_SCP_LIKE = re.compile(r"(?:(?P<user>[^@/:]+)@)?(?P<host>[^/:]+):(?P<path>.*)")
_INCOMING_PREFIX = "keystone-incoming-"
_LOCK_NAME = "keystone.lock"
_MAX_TAG_DEPTH = 16
_S_IFGITLINK = 0o160000


class PackRejected(KeystoneError):
    """A pack that failed the quarantine checks; callers translate it for their medium."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _hex(sha: bytes) -> str:
    return sha.decode("ascii")


def _is_gitlink(mode: int) -> bool:
    return (mode & 0o170000) == _S_IFGITLINK


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


class GitMirror:
    """A bare local mirror under ``runtime/repo``, read and written with dulwich.

    Nothing from a fetched repository's config, hooks or submodules is ever read or run: only
    objects enter the mirror, through :meth:`ingest_pack`. Writers (fetch, bundle import,
    :meth:`set_ref`) take an exclusive ``flock`` on ``keystone.lock`` inside the mirror, so two
    workers never interleave; readers need no lock. Close the mirror (or use it as a context
    manager) when done: dulwich keeps pack files mapped.

    Args:
        path: Directory of the mirror. With ``create`` (the default) a missing or empty directory
            becomes a new bare repository; without it, ``path`` must already be a git repository
            (bare or a checkout, as for ``keystone bundle create``).
        create: Whether to create the mirror when it does not exist.

    Raises:
        keystone.errors.ValidationError: ``path`` exists but is not a git repository.
    """

    def __init__(self, path: Path, *, create: bool = True) -> None:
        from dulwich.errors import NotGitRepository
        from dulwich.repo import Repo

        self.path = Path(path)
        if create and (not self.path.exists() or not any(self.path.iterdir())):
            self._init_bare(self.path)
        try:
            self._repo: Repo = Repo(str(self.path))
        except (NotGitRepository, FileNotFoundError, NotADirectoryError) as exc:
            raise ValidationError(
                f"{self.path} is not a git repository; point Keystone at a bare mirror or a "
                "checkout, or remove the directory so a fresh mirror can be created",
                field="path",
            ) from exc
        if self._repo.object_format.name != "sha1":
            self._repo.close()
            raise ValidationError(
                f"{self.path} uses {self._repo.object_format.name} object ids; Keystone reads "
                "sha1 repositories only",
                field="path",
            )

    @staticmethod
    def _init_bare(path: Path) -> None:
        """Create a bare repository atomically: a crash leaves no half-made mirror."""
        from dulwich.repo import Repo

        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.init-", dir=path.parent))
        try:
            Repo.init_bare(str(staging)).close()
            os.chmod(staging, 0o755)
            # rename() replaces an empty directory but never a populated one.
            os.rename(staging, path)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # Another process created the mirror first; use theirs.
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the repository's open pack files."""
        self._repo.close()

    def __enter__(self) -> GitMirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GitMirror({str(self.path)!r})"

    @property
    def repo(self) -> Repo:
        """The underlying dulwich repository (for code inside ``keystone.sources``)."""
        return self._repo

    @property
    def objects_dir(self) -> Path:
        """The mirror's object directory."""
        return Path(self._repo.object_store.path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the mirror's writer lock (blocking) for the duration of the block."""
        lock_dir = Path(self._repo.controldir())
        fd = os.open(lock_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- objects ------------------------------------------------------------------------------

    def _raw(self, sha: str) -> tuple[int, bytes]:
        from dulwich.objects import ObjectID

        try:
            type_num, raw = self._repo.object_store.get_raw(ObjectID(sha.encode("ascii")))
        except KeyError as exc:
            raise UnknownRevision(
                f"object {sha} is not in the mirror at {self.path}", rev=sha
            ) from exc
        return type_num, raw

    def _object(self, sha: str) -> ShaFile:
        from dulwich.objects import ObjectID

        try:
            return self._repo.object_store[ObjectID(sha.encode("ascii"))]
        except KeyError as exc:
            raise UnknownRevision(
                f"object {sha} is not in the mirror at {self.path}", rev=sha
            ) from exc

    def _peel(self, sha: str, what: str) -> str:
        """Follow annotated tags from ``sha`` to a commit; anything else is refused."""
        from dulwich.objects import Tag

        for _ in range(_MAX_TAG_DEPTH):
            type_num, _raw = self._raw(sha)
            if type_num == _COMMIT:
                return sha
            if type_num != _TAG:
                raise ValidationError(
                    f"{what} points to a {_TYPE_NAMES.get(type_num, 'object')} ({sha}), "
                    "not a commit",
                    field="revision",
                )
            tag = self._object(sha)
            assert isinstance(tag, Tag)
            sha = _hex(tag.object[1])
        raise ValidationError(f"{what}: tag chain longer than {_MAX_TAG_DEPTH}", field="revision")

    def _contains(self, sha: str) -> bool:
        from dulwich.objects import ObjectID

        return ObjectID(sha.encode("ascii")) in self._repo.object_store

    def _commit_fields(self, sha: str) -> tuple[tuple[str, ...], int, str]:
        """Return (parents, commit time, tree) of commit ``sha``."""
        from dulwich.objects import Commit

        obj = self._object(sha)
        if not isinstance(obj, Commit):
            raise ValidationError(
                f"{sha} is a {obj.type_name.decode()}, not a commit", field="revision"
            )
        return tuple(_hex(p) for p in obj.parents), int(obj.commit_time), _hex(obj.tree)

    # -- refs and revisions -------------------------------------------------------------------

    def ref(self, name: str) -> str | None:
        """Return the object id a ref points to, or None when the ref does not exist."""
        from dulwich.refs import Ref

        try:
            return _hex(self._repo.refs[Ref(name.encode("utf-8"))])
        except KeyError:
            return None

    def refs(self) -> dict[str, str]:
        """Return every ref of the mirror (``HEAD`` excluded) as name -> object id."""
        from dulwich.refs import Ref

        return {
            "refs/" + name.decode("utf-8", "replace"): _hex(sha)
            for name, sha in self._repo.refs.as_dict(Ref(b"refs")).items()
        }

    def resolve(self, ref_or_rev: str) -> str:
        """Resolve a ref name or a (short) commit id to a full commit id.

        Accepts a full or abbreviated (4+ hex digits) commit id, a full ref name
        (``refs/heads/main``), a short one (``main``, tried as ``refs/``, ``refs/tags/``,
        ``refs/heads/``, ``refs/remotes/`` like git) or ``HEAD``. Annotated tags are peeled.

        Raises:
            UnknownRevision: nothing by that name (it is also a ``KeyError``).
            keystone.errors.ValidationError: the name is malformed, ambiguous or names a tree.
        """
        return self.resolve_named(ref_or_rev)[1]

    def resolve_named(self, ref_or_rev: str) -> tuple[str | None, str]:
        """Like :meth:`resolve`, but also return the full ref name that matched.

        Returns:
            ``(ref_name, commit_id)``; ``ref_name`` is None when a commit id was given, and the
            branch ``HEAD`` points to when ``HEAD`` was given.
        """
        from dulwich.refs import Ref

        text = ref_or_rev
        if (
            not isinstance(text, str)
            or not text
            or len(text) > 1024
            or any(c.isspace() or ord(c) < 0x20 for c in text)
        ):
            raise ValidationError(f"{text!r} is not a ref name or commit id", field="revision")
        where = f"the mirror at {self.path}"
        if _HEX40.fullmatch(text) and self._contains(text):
            return None, self._peel(text, text)
        for name in self._ref_candidates(text):
            sha = self.ref(name)
            if sha is not None:
                if not self._contains(sha):
                    raise IncompleteHistory(
                        f"ref {name} in {where} points to missing object {sha}; "
                        "fetch again or re-import a full bundle"
                    )
                if name == "HEAD":
                    chain, _sha = self._repo.refs.follow(Ref(b"HEAD"))
                    name = chain[-1].decode("utf-8", "replace") if chain else name
                return name, self._peel(sha, name)
        if _HEX_PREFIX.fullmatch(text):
            matches = sorted(
                {_hex(sha) for sha in self._repo.object_store.iter_prefix(text.encode("ascii"))}
            )
            commits = {self._peel(m, m) for m in matches if self._raw(m)[0] in (_COMMIT, _TAG)}
            if len(commits) == 1:
                return None, commits.pop()
            if len(commits) > 1:
                raise ValidationError(
                    f"{text!r} is ambiguous in {where} ({', '.join(sorted(commits))}); "
                    "give more digits",
                    field="revision",
                )
        raise UnknownRevision(
            f"{text!r} is neither a ref nor a commit in {where}; fetch first or check the name",
            rev=text,
        )

    @staticmethod
    def _ref_candidates(text: str) -> list[str]:
        if text == "HEAD" or text.startswith("refs/"):
            return [text]
        return [
            f"refs/{text}",
            f"refs/tags/{text}",
            f"refs/heads/{text}",
            f"refs/remotes/{text}",
            f"refs/remotes/{text}/HEAD",
        ]

    def has(self, rev: str) -> bool:
        """Return whether ``rev`` (a commit id or ref) resolves to a commit in the mirror."""
        try:
            self.resolve(rev)
        except (ValidationError, IncompleteHistory):
            return False
        return True

    def set_ref(self, name: str, rev: str) -> None:
        """Point ref ``name`` (``refs/...``) at the commit ``rev`` resolves to.

        Raises:
            keystone.errors.ValidationError: a malformed ref name, or ``rev`` unknown.
        """
        from dulwich.objects import ObjectID
        from dulwich.refs import Ref, check_ref_format

        raw = name.encode("utf-8")
        if not name.startswith("refs/") or not check_ref_format(Ref(raw)):
            raise ValidationError(
                f"{name!r} is not a valid ref name (expected refs/..., as git check-ref-format)",
                field="ref",
            )
        sha = self.resolve(rev)
        with self.lock():
            self._repo.refs[Ref(raw)] = ObjectID(sha.encode("ascii"))

    def delete_ref(self, name: str) -> None:
        """Remove ref ``name`` if it exists."""
        from dulwich.refs import Ref

        with self.lock(), contextlib.suppress(KeyError):
            del self._repo.refs[Ref(name.encode("utf-8"))]

    # -- commits ------------------------------------------------------------------------------

    def raw_commit(self, rev: str) -> bytes:
        """Return the commit object's exact bytes, as ``git cat-file commit`` prints them.

        This is what signature verification needs: the stored bytes, never a re-serialisation.
        """
        sha = self.resolve(rev)
        _type, raw = self._raw(sha)
        return raw

    def commit_time(self, rev: str) -> int:
        """Return the committer timestamp (seconds since the epoch) of ``rev``."""
        return self._commit_fields(self.resolve(rev))[1]

    def parents(self, rev: str) -> tuple[str, ...]:
        """Return the parent commit ids of ``rev``, first parent first."""
        return self._commit_fields(self.resolve(rev))[0]

    def _parents_checked(self, sha: str) -> tuple[tuple[str, ...], int]:
        """Return (parents, commit time) of ``sha``; a missing commit is IncompleteHistory."""
        try:
            parents, when, _tree = self._commit_fields(sha)
        except UnknownRevision as exc:
            raise IncompleteHistory(
                f"the mirror at {self.path} lacks commit {sha}, an ancestor of the revision "
                "being checked; fetch again or import a full bundle"
            ) from exc
        return parents, when

    def is_ancestor(
        self, ancestor: str, descendant: str, *, limit: int = DEFAULT_WALK_LIMIT
    ) -> bool:
        """Return whether ``ancestor`` is ``descendant`` or one of its ancestors.

        Same answer as ``git merge-base --is-ancestor``. The walk goes newest commit first, so a
        true answer costs about the number of commits made since ``ancestor``; a false one
        walks the whole history of ``descendant``. It visits at most ``limit`` commits and
        raises :class:`HistoryLimitExceeded` rather than guess.
        """
        target = self.resolve(ancestor)
        start = self.resolve(descendant)
        if target == start:
            return True
        seen = {start}
        heap = [(-self._parents_checked(start)[1], start)]
        while heap:
            _t, sha = heapq.heappop(heap)
            for parent in self._parents_checked(sha)[0]:
                if parent == target:
                    return True
                if parent not in seen:
                    seen.add(parent)
                    if len(seen) > limit:
                        raise HistoryLimitExceeded(
                            f"ancestry check {target[:12]}..{start[:12]}: walked more than "
                            f"{limit} commits without an answer; raise the walk limit"
                        )
                    heapq.heappush(heap, (-self._parents_checked(parent)[1], parent))
        return False

    def commits_between(
        self, old: str | None, new: str, *, limit: int = DEFAULT_WALK_LIMIT
    ) -> list[str]:
        """Return the commits reachable from ``new`` and not from ``old``, newest first.

        The answer of ``git rev-list new ^old`` (``git rev-list new`` when ``old`` is None), in
        the same order: by committer time, newest first. Used to check every commit since the
        applied revision (``verify = "all"``).

        Both sides are walked together, newest first, marking what each reaches (git's own
        method), and the walk stops once nothing left to visit is newer than the oldest commit
        found: the cost is about the number of new commits, not the length of the history.
        Should committer clocks have gone backwards, the error is on the safe side: a commit
        may be listed that ``old`` already had, never the other way round.

        Raises:
            HistoryLimitExceeded: more than ``limit`` commits would be visited.
        """
        new_bit, old_bit = 1, 2
        flags: dict[str, int] = {}
        times: dict[str, int] = {}
        queued: set[str] = set()
        heap: list[tuple[int, int, str]] = []
        order: list[str] = []
        listed: set[str] = set()
        counter = 0
        interesting = 0  # queued commits not (yet) reachable from old
        oldest_new: int | None = None
        parents_of: dict[str, tuple[str, ...]] = {}

        def load(sha: str) -> None:
            parents_of[sha], times[sha] = self._parents_checked(sha)

        def mark(sha: str, bit: int) -> None:
            nonlocal counter, interesting
            prev = flags.get(sha, 0)
            if prev | bit == prev:
                return
            flags[sha] = prev | bit
            if sha in queued:
                if bit == old_bit:
                    interesting -= 1
                return
            if prev & old_bit:
                return  # already excluded, and its parents with it
            if sha not in times:
                load(sha)
            counter += 1
            heapq.heappush(heap, (-times[sha], counter, sha))
            queued.add(sha)
            if not flags[sha] & old_bit:
                interesting += 1

        mark(self.resolve(new), new_bit)
        if old is not None:
            mark(self.resolve(old), old_bit)
        visits = 0
        while heap:
            newest = -heap[0][0]
            if interesting == 0 and (oldest_new is None or newest < oldest_new):
                break
            _t, _n, sha = heapq.heappop(heap)
            queued.discard(sha)
            bits = flags[sha]
            if not bits & old_bit:
                interesting -= 1
                if sha not in listed:
                    listed.add(sha)
                    order.append(sha)
                    oldest_new = times[sha] if oldest_new is None else min(oldest_new, times[sha])
            visits += 1
            if visits > 2 * limit:
                raise HistoryLimitExceeded(
                    f"commits_between {old}..{new}: walked more than {limit} commits; raise "
                    "the walk limit"
                )
            for parent in parents_of[sha]:
                mark(parent, bits)
        return [sha for sha in order if flags[sha] == new_bit]

    # -- trees --------------------------------------------------------------------------------

    def file_source(self, rev: str) -> TreeReader:
        """Return a :class:`TreeReader` bound to the tree of commit ``rev``."""
        return TreeReader(self, rev)

    def read_file(self, rev: str, path: str) -> bytes | None:
        """Return the regular file at ``path`` in ``rev``, or None when there is none."""
        return TreeReader(self, rev).read(path)

    def list_dir(self, rev: str, path: str) -> list[tuple[str, bool]]:
        """List the directory at ``path`` in ``rev`` as sorted ``(name, is_dir)`` pairs."""
        return TreeReader(self, rev).listdir(path)

    def export_tree(
        self,
        rev: str,
        subpath: str,
        dest: Path,
        *,
        max_bytes: int | None = None,
        max_files: int | None = None,
    ) -> None:
        """Write the file or directory ``subpath`` of ``rev`` to ``dest`` (which must not exist).

        Only regular files (mode 0644, or 0755 when executable in git) and directories are
        written; a symlink or submodule anywhere below ``subpath`` refuses the whole export.
        """
        TreeReader(self, rev).export(subpath, dest, max_bytes=max_bytes, max_files=max_files)

    # -- packs --------------------------------------------------------------------------------

    def ingest_pack(self, read: Callable[[int], bytes], *, max_bytes: int, what: str) -> int:
        """Add the pack that ``read`` yields to the mirror, all or nothing.

        The pack is written into a quarantine directory inside the mirror, its checksum and
        every object verified, deltas against mirror objects resolved, and every commit, tree
        and tag it brings checked to point only at objects that exist. Only then are the pack
        and its index moved into ``objects/pack``. Refs are never touched.

        Args:
            read: A blocking read function positioned at the ``PACK`` header.
            max_bytes: Upper bound on the pack bytes read.
            what: Names the pack in error messages ("pack from https://...").

        Returns:
            The number of objects the pack carried.

        Raises:
            PackTooLarge: the pack is longer than ``max_bytes``.
            PackRejected: the pack is damaged, truncated or incomplete (with the reason).
        """
        from dulwich.object_store import DiskObjectStore, PackInputTooLarge

        with self.lock():
            self._sweep_incoming()
            qdir = Path(tempfile.mkdtemp(prefix=_INCOMING_PREFIX, dir=self.path))
            try:
                (qdir / "pack").mkdir()
                (qdir / "info").mkdir()
                quarantine = DiskObjectStore(
                    str(qdir), alternates=[str(self.objects_dir)], fsync_object_files=True
                )
                try:
                    try:
                        pack = quarantine.add_thin_pack(read, None, max_input_size=max_bytes)
                    except PackInputTooLarge as exc:
                        raise PackTooLarge(
                            f"{what} is larger than its bound of {max_bytes} bytes; raise the "
                            "limit if the repository really is that large"
                        ) from exc
                    except KeystoneError:
                        raise
                    except Exception as exc:
                        raise PackRejected(_describe_pack_error(exc)) from exc
                    count = len(pack)
                    if count:
                        try:
                            _check_connected(quarantine, pack)
                        except PackRejected:
                            raise
                        except Exception as exc:
                            raise PackRejected(_describe_pack_error(exc)) from exc
                finally:
                    quarantine.close()
                if count:
                    self._adopt_packs(qdir / "pack")
                return count
            finally:
                shutil.rmtree(qdir, ignore_errors=True)

    def _adopt_packs(self, source: Path) -> None:
        target = self.objects_dir / "pack"
        names = sorted(os.listdir(source))
        # The .pack goes first: dulwich and git only open a pack once its .idx exists.
        ordered = [n for n in names if n.endswith(".pack")] + [
            n for n in names if n.endswith(".idx")
        ]
        for name in ordered:
            dst = target / name
            if dst.exists():
                continue  # the same objects already arrived under the same name
            os.rename(source / name, dst)
        dir_fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _sweep_incoming(self) -> None:
        """Remove quarantines left by a crashed writer (we hold the lock, so none is live)."""
        for entry in self.path.iterdir():
            if entry.name.startswith(_INCOMING_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)


def _describe_pack_error(exc: BaseException) -> str:
    from dulwich.errors import ApplyDeltaError, ChecksumMismatch, ObjectFormatException

    if isinstance(exc, ChecksumMismatch):
        return f"pack checksum mismatch ({exc}): the data was damaged or cut short"
    if isinstance(exc, ApplyDeltaError):
        return f"a delta in the pack does not apply ({exc})"
    if isinstance(exc, ObjectFormatException):
        return f"an object in the pack is malformed ({exc})"
    if isinstance(exc, KeyError):
        return f"the pack refers to object {exc} which neither it nor the mirror has"
    text = str(exc) or type(exc).__name__
    if "zlib" in type(exc).__module__ or "decompress" in text.lower():
        return f"a compressed object in the pack is corrupt ({text})"
    return f"the pack is damaged or truncated ({type(exc).__name__}: {text})"


def _check_connected(store: BaseObjectStore, pack: Pack) -> None:
    """Refuse a pack whose commits, trees or tags point at objects that do not exist.

    Objects already in the mirror were checked when they arrived, so only the links leaving
    the new pack need a lookup. The pack is read once, sequentially.
    """
    from dulwich.objects import Commit, ObjectID, Tag, Tree

    new = set(pack)

    def present(sha: bytes) -> bool:
        return sha in new or ObjectID(sha) in store

    for obj in pack.iterobjects():
        missing: list[tuple[str, bytes]] = []
        if isinstance(obj, Commit):
            missing += [("tree", obj.tree)] if not present(obj.tree) else []
            missing += [("parent", p) for p in obj.parents if not present(p)]
        elif isinstance(obj, Tree):
            for entry in obj.iteritems():
                assert entry.mode is not None and entry.sha is not None
                if not _is_gitlink(entry.mode) and not present(entry.sha):
                    missing.append((f"entry {entry.path!r}", entry.sha))
        elif isinstance(obj, Tag):
            target = obj.object[1]
            if not present(target):
                missing.append(("target", target))
        if missing:
            what, sha = missing[0]
            raise PackRejected(
                f"{obj.type_name.decode()} {_hex(obj.id)} refers to {what} {_hex(sha)}, which "
                "is neither in the pack nor in the mirror (an incomplete pack or a missing "
                "prerequisite)"
            )


class TreeReader:
    """Read-only access to the tree of one commit in a :class:`GitMirror`.

    It implements :class:`keystone.sources.base.FileSource`. Symlinks and submodules are never
    followed: reading one is refused, and they list with ``is_dir`` False.
    """

    def __init__(self, mirror: GitMirror, rev: str) -> None:
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

    def read(self, path: str) -> bytes | None:
        """Return the content of the regular file at ``path``, or None when there is none.

        Raises:
            keystone.errors.ValidationError: the path is unsafe, or names a directory, a symlink
                or a submodule.
        """
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


# -- fetching ------------------------------------------------------------------------------------


class GitSource:
    """Fetch one ref of a remote repository into a :class:`GitMirror`.

    Implements :class:`keystone.sources.base.Source`. Supported locations: ``http://`` and
    ``https://`` (smart HTTP through urllib3; credentials may be given in the URL; proxies from
    the usual environment variables), ``ssh://`` and ``[user@]host:path`` (the ``ssh`` client,
    non-interactive), ``git://``, ``file://`` and plain paths.

    An unchanged remote costs one ref advertisement and no pack: over HTTP that is a single GET
    (protocol v0/v1 is used there for that reason); over ssh and git:// protocol v2 with a
    ref-prefix so the server sends only the one ref.

    Args:
        url: Where the fleet repository lives.
        ref: ``refs/heads/main``, or a short name (``main``: tried as ``refs/heads/main`` then
            ``refs/tags/main``), or ``HEAD``.
        mirror: The local mirror that receives the objects.
        timeout: Seconds allowed for connecting and for each read.
        max_pack_bytes: Largest pack accepted; more is refused with :class:`PackTooLarge`.
        total_timeout: Wall-clock bound for the whole fetch, checked as data arrives (default
            ten times ``timeout``). A hard kill is the worker process's job.
        ssh_command: The ssh client to run (default ``ssh``); Keystone adds ``BatchMode`` and
            keep-alive options.
        ssh_key: An identity file for ssh.
        protocol_version: Force git protocol 0, 1 or 2 (default: as described above).
    """

    def __init__(
        self,
        url: str,
        ref: str,
        mirror: GitMirror,
        *,
        timeout: float = 60,
        max_pack_bytes: int = DEFAULT_MAX_PACK_BYTES,
        total_timeout: float | None = None,
        ssh_command: str | None = None,
        ssh_key: Path | None = None,
        protocol_version: int | None = None,
    ) -> None:
        if not url:
            raise ValidationError("the source URL is empty", field="source.url")
        if not ref or any(c.isspace() for c in ref) or ".." in ref:
            raise ValidationError(f"{ref!r} is not a valid ref", field="source.ref")
        self.url = url
        self.ref = ref
        self.mirror = mirror
        self.timeout = float(timeout)
        self.max_pack_bytes = int(max_pack_bytes)
        self.total_timeout = float(total_timeout) if total_timeout else 10 * self.timeout
        self.ssh_command = ssh_command
        self.ssh_key = ssh_key
        self.protocol_version = protocol_version
        self.display_url = redact_url(url)

    def __repr__(self) -> str:
        return f"GitSource({self.display_url!r}, ref={self.ref!r})"

    def ref_candidates(self) -> list[str]:
        """Return the remote ref names tried for :attr:`ref`, in order."""
        if self.ref == "HEAD" or self.ref.startswith("refs/"):
            return [self.ref]
        return [f"refs/heads/{self.ref}", f"refs/tags/{self.ref}"]

    def fetch(self) -> FetchResult:
        """Fetch the ref's tip into the mirror and record it under ``refs/keystone/fetched``.

        Raises:
            keystone.errors.SourceUnreachable: the remote did not answer, timed out, is not a
                git repository, or sent a damaged pack (retry later).
            RemoteRefNotFound: the remote has no such ref (a SourceUnreachable).
            PackTooLarge: the pack is over ``max_pack_bytes``.
            keystone.errors.ValidationError: the URL is not usable or the ref names no commit.
        """
        deadline = time.monotonic() + self.total_timeout
        client, path, http = self._client()
        with tempfile.TemporaryFile(dir=self.mirror.path, prefix=_INCOMING_PREFIX) as spool:
            try:
                tip, received = self._fetch_into(client, path, http, spool, deadline)
            finally:
                _close_client(client)
        if not self.mirror._contains(tip):
            raise SourceUnreachable(
                f"{self.display_url} advertised {tip} for {self.ref} but did not send it"
            )
        revision = self.mirror._peel(tip, f"{self.ref} at {self.display_url}")
        previous = self.mirror.ref(FETCHED_REF)
        self.mirror.set_ref(FETCHED_REF, revision)
        return FetchResult(
            revision=revision,
            changed=previous != revision,
            bytes_received=received,
            source=self.display_url,
        )

    def _fetch_into(
        self, client: GitClient, path: str, http: bool, spool: IO[bytes], deadline: float
    ) -> tuple[str, int]:
        """Run the protocol exchange, spool and ingest any pack; return (tip, pack bytes)."""
        from dulwich.refs import Ref

        names = self.ref_candidates()
        state: dict[str, Any] = {"tip": None, "wanted": False, "received": 0}

        def check_deadline() -> None:
            if time.monotonic() > deadline:
                raise SourceUnreachable(
                    f"fetch from {self.display_url} took longer than {self.total_timeout:g}s; "
                    "it was abandoned and will be retried"
                )

        def determine_wants(
            refs: Mapping[Ref, ObjectID], depth: int | None = None
        ) -> list[ObjectID]:
            check_deadline()
            if http and getattr(client, "dumb", False):
                raise SourceUnreachable(
                    f"{self.display_url} speaks only the dumb HTTP protocol; serve the "
                    "repository with smart HTTP (git http-backend or any git forge)"
                )
            for name in names:
                sha = refs.get(Ref(name.encode("utf-8")))
                if sha is not None:
                    break
            else:
                raise RemoteRefNotFound(
                    f"{self.display_url} has no ref {self.ref!r} (looked for "
                    f"{', '.join(names)}); check source.ref or push the branch",
                    ref=self.ref,
                    url=self.display_url,
                )
            tip = sha.decode("ascii", "replace")
            if not _HEX40.fullmatch(tip):
                raise ValidationError(
                    f"{self.display_url} advertises {name} as {tip!r}; only sha1 repositories "
                    "are supported",
                    field="source.url",
                )
            state["tip"] = tip
            if self.mirror._contains(tip):
                return []
            state["wanted"] = True
            return [sha]

        def on_pack(data: bytes) -> int:
            if not state["wanted"]:
                # dulwich's local client writes an empty pack even when nothing was asked for.
                return len(data)
            state["received"] += len(data)
            if state["received"] > self.max_pack_bytes:
                raise PackTooLarge(
                    f"the pack from {self.display_url} is larger than {self.max_pack_bytes} "
                    "bytes; raise source max_pack_bytes if the repository really is that large"
                )
            check_deadline()
            spool.write(data)
            return len(data)

        def on_progress(_msg: bytes) -> None:
            check_deadline()

        try:
            if _is_local(client):
                # dulwich's local client walks the whole pack even when nothing is wanted;
                # reading the refs first keeps an unchanged poll cheap.
                advertised = client.get_refs(os.fsencode(path)).refs
                known = {k: v for k, v in advertised.items() if v is not None}
                if not determine_wants(known):
                    return str(state["tip"]), 0
            client.fetch_pack(
                path,
                determine_wants,
                self._graph_walker(),
                on_pack,
                progress=on_progress,
                ref_prefix=[n.encode("utf-8") for n in names],
                protocol_version=self._protocol_version(http),
            )
        except KeystoneError:
            raise
        except Exception as exc:
            raise self._unreachable(exc) from exc
        tip = state["tip"]
        if tip is None:
            raise RemoteRefNotFound(
                f"{self.display_url} advertises no refs (an empty repository?); push "
                f"{self.ref} to it",
                ref=self.ref,
                url=self.display_url,
            )
        if state["wanted"]:
            if spool.tell() == 0:
                raise SourceUnreachable(
                    f"{self.display_url} advertised {tip} but sent no pack; retrying later"
                )
            spool.seek(0)
            try:
                self.mirror.ingest_pack(
                    spool.read,
                    max_bytes=self.max_pack_bytes,
                    what=f"the pack from {self.display_url}",
                )
            except PackRejected as exc:
                raise SourceUnreachable(
                    f"{self.display_url} sent a pack that was refused: {exc.reason}; "
                    "the mirror is unchanged and the fetch will be retried"
                ) from exc
        return str(tip), int(state["received"])

    # -- helpers ---------------------------------------------------------------------------

    def _protocol_version(self, http: bool) -> int | None:
        if self.protocol_version is not None:
            return self.protocol_version
        return 1 if http else 2

    def _graph_walker(self) -> Any:
        """What the mirror has: every ref that points to a commit we hold."""
        from dulwich.objects import ObjectID

        repo = self.mirror.repo
        heads = sorted(
            {
                ObjectID(sha.encode("ascii"))
                for sha in self.mirror.refs().values()
                if self.mirror._contains(sha)
            }
        )
        return repo.get_graph_walker(heads=heads)

    def _client(self) -> tuple[GitClient, str, bool]:
        """Build the dulwich client for :attr:`url`; returns (client, path, is_http)."""
        url = self.url
        if "://" in url:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme in ("http", "https"):
                return self._http_client(url), "", True
            if not parts.hostname and scheme != "file":
                raise ValidationError(f"{self.display_url} names no host", field="source.url")
            if scheme == "git":
                return (
                    _tcp_client(parts.hostname or "", parts.port, self.timeout),
                    parts.path,
                    False,
                )
            if scheme in ("ssh", "git+ssh"):
                user = unquote(parts.username) if parts.username else None
                return self._ssh_client(parts.hostname or "", parts.port, user), parts.path, False
            if scheme == "file":
                if parts.netloc not in ("", "localhost"):
                    raise ValidationError(
                        f"{self.display_url}: file:// URLs must name a local path",
                        field="source.url",
                    )
                return _local_client(), unquote(parts.path), False
            raise ValidationError(
                f"{self.display_url}: unsupported scheme {scheme!r} (use https, http, ssh, git, "
                "file or a path)",
                field="source.url",
            )
        scp = _SCP_LIKE.fullmatch(url)
        if scp and not url.startswith(("/", "./", "../")):
            return self._ssh_client(scp["host"], None, scp["user"]), scp["path"], False
        return _local_client(), url, False

    def _http_client(self, url: str) -> GitClient:
        import urllib3
        from dulwich.client import Urllib3HttpGitClient, default_urllib3_manager

        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        base = parts._replace(netloc=netloc).geturl()
        pool = default_urllib3_manager(None, base_url=base, timeout=self.timeout)
        # urllib3 retries a failed connect three times by default; the sync loop has its own
        # backoff, so fail fast and let it decide.
        pool.connection_pool_kw["retries"] = urllib3.Retry(
            total=None, connect=0, read=0, status=0, other=0, redirect=5
        )
        # dulwich does not release the response when it raises on an HTTP error status; track
        # every connection so that _close_client can close them all.
        opened: list[Any] = []
        assert isinstance(pool, urllib3.PoolManager)  # no auth callbacks, so no wrapper
        pool.pool_classes_by_scheme = _tracking_pool_classes(opened)
        client = Urllib3HttpGitClient(
            base,
            pool_manager=pool,
            timeout=self.timeout,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )
        client._keystone_connections = opened  # type: ignore[attr-defined]
        return client

    def _ssh_client(self, host: str, port: int | None, user: str | None) -> GitClient:
        from dulwich.client import SSHGitClient, SubprocessSSHVendor

        if not host or host.startswith("-"):
            raise ValidationError(
                f"{self.display_url}: {host!r} is not a host name", field="source.url"
            )
        alive = max(1, int(self.timeout // 3))
        options = [
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, int(self.timeout))}",
            "-o", f"ServerAliveInterval={alive}",
            "-o", "ServerAliveCountMax=3",
        ]  # fmt: skip
        command = " ".join([self.ssh_command or "ssh", *map(shlex.quote, options)])
        opened: list[Any] = []

        class _SSHClient(SSHGitClient):
            # dulwich leaves the connection (and the ssh process) open when the remote hangs
            # up before the first packet; remember each one so that _close_client closes it.
            def _connect(self, *args: Any, **kwargs: Any) -> Any:
                connection = super()._connect(*args, **kwargs)
                opened.append(connection[0])
                return connection

        client = _SSHClient(
            host,
            port=port,
            username=user,
            vendor=SubprocessSSHVendor(),
            ssh_command=command,
            key_filename=str(self.ssh_key) if self.ssh_key else None,
        )
        client._keystone_connections = opened  # type: ignore[attr-defined]
        return client

    def _unreachable(self, exc: BaseException) -> SourceUnreachable:
        from dulwich.client import HTTPProxyUnauthorized, HTTPUnauthorized
        from dulwich.errors import HangupException, NotGitRepository

        where = self.display_url
        then = "the device keeps its current revision and will retry"
        if isinstance(exc, NotGitRepository):
            return SourceUnreachable(f"{where} is not a git repository (check source.url); {then}")
        if isinstance(exc, (HTTPUnauthorized, HTTPProxyUnauthorized)):
            return SourceUnreachable(
                f"{where} asks for credentials (HTTP 401/407); give them in source.url; {then}"
            )
        if isinstance(exc, HangupException):
            detail = "; ".join(
                line.decode("utf-8", "replace").strip() for line in (exc.stderr_lines or [])
            )
            return SourceUnreachable(f"{where} hung up{': ' + detail if detail else ''}; {then}")
        if isinstance(exc, socket.timeout | TimeoutError):
            return SourceUnreachable(f"{where} did not answer within {self.timeout:g}s; {then}")
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc) or errno.errorcode.get(exc.errno or 0, "error")
            return SourceUnreachable(f"cannot reach {where}: {reason}; {then}")
        text = str(exc) or type(exc).__name__
        return SourceUnreachable(f"fetch from {where} failed: {text}; {then}")


def _is_local(client: GitClient) -> bool:
    from dulwich.client import LocalGitClient

    return isinstance(client, LocalGitClient)


def _local_client() -> GitClient:
    from dulwich.client import LocalGitClient

    return LocalGitClient()


def _close_client(client: GitClient) -> None:
    with contextlib.suppress(Exception):
        client.close()
    # dulwich's HTTP client leaves its urllib3 pool open; close the sockets now.
    pool = getattr(client, "pool_manager", None)
    if pool is not None:
        with contextlib.suppress(Exception):
            pool.clear()
    for conn in getattr(client, "_keystone_connections", ()):
        with contextlib.suppress(Exception):
            conn.close()


def _tracking_pool_classes(opened: list[Any]) -> dict[str, type]:
    """urllib3 pool classes whose connections are appended to ``opened`` when they connect."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class _Conn(HTTPConnection):
        def connect(self) -> None:
            opened.append(self)
            super().connect()

    class _TLSConn(HTTPSConnection):
        def connect(self) -> None:
            opened.append(self)
            super().connect()

    class _Pool(HTTPConnectionPool):
        ConnectionCls = _Conn

    class _TLSPool(HTTPSConnectionPool):
        ConnectionCls = _TLSConn

    return {"http": _Pool, "https": _TLSPool}


def _tcp_client(host: str, port: int | None, timeout: float) -> GitClient:
    """A git:// client whose socket has connect and read timeouts (dulwich's has none)."""
    from dulwich.client import TCPGitClient, _fileno_can_read
    from dulwich.protocol import (
        DEFAULT_GIT_PROTOCOL_VERSION_FETCH,
        DEFAULT_GIT_PROTOCOL_VERSION_SEND,
        Protocol,
    )

    class _TimeoutTCPGitClient(TCPGitClient):
        # Mirrors TCPGitClient._connect (dulwich 1.2) with socket.create_connection(timeout=).
        # dulwich does not close the connection when the first read fails, so each one is
        # remembered for _close_client.
        _keystone_connections: list[Protocol]

        def _connect(
            self,
            cmd: bytes,
            path: str | bytes,
            protocol_version: int | None = None,
        ) -> tuple[Protocol, Callable[[], bool], IO[bytes] | None]:
            if not isinstance(path, bytes):
                path = path.encode(self._remote_path_encoding)
            s = socket.create_connection((self._host, self._port), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rfile = s.makefile("rb", -1)
            wfile = s.makefile("wb", 0)

            def close() -> None:
                rfile.close()
                wfile.close()
                s.close()

            def shutdown_write() -> None:
                wfile.flush()
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_WR)

            proto = Protocol(
                rfile.read,
                wfile.write,
                close,
                report_activity=self._report_activity,
                shutdown_write=shutdown_write,
            )
            self._keystone_connections.append(proto)
            if path.startswith(b"/~"):
                path = path[1:]
            if cmd == b"upload-pack":
                self.protocol_version = (
                    DEFAULT_GIT_PROTOCOL_VERSION_FETCH
                    if protocol_version is None
                    else protocol_version
                )
            else:
                self.protocol_version = DEFAULT_GIT_PROTOCOL_VERSION_SEND
            version = b""
            if cmd == b"upload-pack" and self.protocol_version == 2:
                version = b"\0\0version=%d\0" % self.protocol_version
            proto.send_cmd(b"git-" + cmd, path, b"host=" + self._host.encode("ascii") + version)
            return proto, lambda: _fileno_can_read(s.fileno()), None

    client = _TimeoutTCPGitClient(host, port)
    client._keystone_connections = []
    return client

"""The device's copy of the fleet repository: :class:`GitMirror`, a bare mirror on dulwich.

Only objects ever enter it: nothing from a fetched repository's config, hooks or submodules is
read or run, and every pack is received into a quarantine directory and checked (pack checksum,
every object parses, every commit/tree/tag it adds points only at objects that exist; see
:mod:`keystone.sources.pack`) before it joins the mirror. A damaged or incomplete pack therefore
never leaves a half-usable mirror behind.

dulwich is imported inside the methods that use it, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from keystone.errors import KeystoneError, ValidationError
from keystone.limits import BOUNDS
from keystone.sources.base import (
    HistoryLimitExceeded,
    IncompleteHistory,
    PackTooLarge,
    UnknownRevision,
)
from keystone.sources.pack import (
    _COMMIT,
    _TAG,
    _TYPE_NAMES,
    PackRejected,
    _check_connected,
    _describe_pack_error,
    _hex,
)
from keystone.sources.tree import TreeReader

if TYPE_CHECKING:
    from dulwich.objects import ShaFile
    from dulwich.repo import Repo

__all__ = ["DEFAULT_MAX_PACK_BYTES", "DEFAULT_WALK_LIMIT", "FETCHED_REF", "GitMirror"]


MiB = 1024 * 1024
DEFAULT_MAX_PACK_BYTES = BOUNDS["max_pack_bytes"].default  # see keystone.limits
DEFAULT_WALK_LIMIT = 100_000
FETCHED_REF = "refs/keystone/fetched"


_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX_PREFIX = re.compile(r"[0-9a-f]{4,39}")


_INCOMING_PREFIX = "keystone-incoming-"
_LOCK_NAME = "keystone.lock"
_MAX_TAG_DEPTH = 16


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
        # lazy: dulwich is heavy; the resident agent imports this module without it
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
        # lazy: dulwich is heavy; the resident agent imports this module without it
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
    def git_dir(self) -> Path:
        """The repository's git directory (a checkout's ``.git``; a bare mirror itself)."""
        return Path(self._repo.controldir())

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
        # lazy: dulwich is heavy; the resident agent imports this module without it
        from dulwich.objects import ObjectID

        try:
            type_num, raw = self._repo.object_store.get_raw(ObjectID(sha.encode("ascii")))
        except KeyError as exc:
            raise UnknownRevision(
                f"object {sha} is not in the mirror at {self.path}", rev=sha
            ) from exc
        return type_num, raw

    def _object(self, sha: str) -> ShaFile:
        # lazy: dulwich is heavy; the resident agent imports this module without it
        from dulwich.objects import ObjectID

        try:
            return self._repo.object_store[ObjectID(sha.encode("ascii"))]
        except KeyError as exc:
            raise UnknownRevision(
                f"object {sha} is not in the mirror at {self.path}", rev=sha
            ) from exc

    def _peel(self, sha: str, what: str) -> str:
        """Follow annotated tags from ``sha`` to a commit; anything else is refused."""
        # lazy: dulwich is heavy; the resident agent imports this module without it
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
        # lazy: dulwich is heavy; the resident agent imports this module without it
        from dulwich.objects import ObjectID

        return ObjectID(sha.encode("ascii")) in self._repo.object_store

    def _commit_fields(self, sha: str) -> tuple[tuple[str, ...], int, str]:
        """Return (parents, commit time, tree) of commit ``sha``."""
        # lazy: dulwich is heavy; the resident agent imports this module without it
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
        # lazy: dulwich is heavy; the resident agent imports this module without it
        from dulwich.refs import Ref

        try:
            return _hex(self._repo.refs[Ref(name.encode("utf-8"))])
        except KeyError:
            return None

    def refs(self) -> dict[str, str]:
        """Return every ref of the mirror (``HEAD`` excluded) as name -> object id."""
        # lazy: dulwich is heavy; the resident agent imports this module without it
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
        # lazy: dulwich is heavy; the resident agent imports this module without it
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
        # lazy: dulwich is heavy; the resident agent imports this module without it
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
        # lazy: dulwich is heavy; the resident agent imports this module without it
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
        # lazy: dulwich is heavy; the resident agent imports this module without it
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

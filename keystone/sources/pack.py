"""Packs entering the mirror: object type numbers, and the quarantine's checks and refusals."""

from __future__ import annotations

from typing import TYPE_CHECKING

from keystone.errors import KeystoneError

if TYPE_CHECKING:
    from dulwich.object_store import BaseObjectStore
    from dulwich.pack import Pack

__all__ = ["PackRejected"]


_COMMIT, _TREE, _BLOB, _TAG = 1, 2, 3, 4
_TYPE_NAMES = {_COMMIT: "commit", _TREE: "tree", _BLOB: "blob", _TAG: "tag"}


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


def _describe_pack_error(exc: BaseException) -> str:
    # lazy: dulwich is heavy; the resident agent imports this module without it
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
    # lazy: dulwich is heavy; the resident agent imports this module without it
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

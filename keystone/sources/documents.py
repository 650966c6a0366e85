"""Parsed recipe documents kept in a repository's git directory, by git blob id.

``keystone plan diff`` and ``plan render`` run in a fresh process each time; without this every
run reads and parses every recipe of both revisions again. A blob id names the file's content,
so what was parsed from it once holds for every later run: ``DocumentFile`` keeps the text and
the parsed document (``keystone.tomlsrc.Parsed``, before validation, which runs every time with
the bounds and variables then in force) in one file, ``keystone-documents`` in the git
directory (docs/state.md).

The file is only a cache, and never trusted further than it checks:

* bounded: at most ``MAX_ENTRIES`` documents and ``MAX_BYTES`` bytes, the least recently used
  dropped first (use is recorded when the file is written: by a run that parsed something new);
* damage-tolerant: each entry carries a BLAKE2b digest of itself and its text must hash to its
  blob id; an entry that fails either, a truncated tail or a file of another format is ignored
  (that recipe is parsed from git as if never kept) and the file written again without it;
* written atomically (a temporary file in the same directory, then a rename) and only when it
  changes; a file that cannot be read or written (a read-only repository) only costs the parse.

Deleting it is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import marshal
import os
import struct
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from keystone.tomlsrc import Parsed

FILE_NAME = "keystone-documents"
MAX_ENTRIES = 4096
MAX_BYTES = 16 << 20
"""Bounds of the file: documents, and bytes with their framing."""

# The format, and the Python whose marshal wrote it: another of either is a file to replace.
_MAGIC = f"keystone-documents 1 marshal {marshal.version} py{sys.version_info[0]}.{sys.version_info[1]}\n".encode()
_HEAD = struct.Struct(">I16s40s")  # payload length, digest of id + payload, blob id (hex)


def _digest(blob_id: bytes, payload: bytes) -> bytes:
    return hashlib.blake2b(blob_id + payload, digest_size=16).digest()


def _git_blob_id(text: str) -> str:
    data = text.encode("utf-8")
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


class DocumentFile:
    """The parsed documents of one git directory (a ``keystone.plan.Documents``).

    ``load`` reads the file once; ``get`` and ``put`` work in memory; ``save`` writes it back if
    anything changed. Content ids are ``git:<sha1 blob id>``; any other id is never kept.
    """

    def __init__(
        self, git_dir: Path, *, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES
    ) -> None:
        self.path = Path(git_dir) / FILE_NAME
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()  # blob id -> payload, LRU order
        self._size = 0
        self._changed = False

    @classmethod
    def load(
        cls, git_dir: Path, *, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES
    ) -> DocumentFile:
        """The documents kept in ``git_dir`` (none when the file is absent or unreadable)."""
        docs = cls(git_dir, max_entries=max_entries, max_bytes=max_bytes)
        try:
            with docs.path.open("rb") as f:
                raw = f.read(len(_MAGIC) + max_bytes + 1)
        except OSError:
            return docs
        docs._parse(raw)
        return docs

    def _parse(self, raw: bytes) -> None:
        if not raw.startswith(_MAGIC) or len(raw) > len(_MAGIC) + self.max_bytes:
            self._changed = bool(raw)  # another format or over the bound: replace it
            return
        pos, end = len(_MAGIC), len(raw)
        while pos < end:
            if end - pos < _HEAD.size:
                self._changed = True  # a truncated tail
                return
            length, digest, key = _HEAD.unpack_from(raw, pos)
            start = pos + _HEAD.size
            payload = raw[start : start + length]
            pos = start + length
            if len(payload) != length:
                self._changed = True
                return
            if _digest(key, payload) != digest:
                self._changed = True  # damaged: the framing may be too, so what follows is
                continue  # only ever kept if its own digest holds
            blob_id = key.decode("ascii", "replace")
            self._drop(blob_id)
            self._entries[blob_id] = payload
            self._size += _HEAD.size + length

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, blob_id: str) -> None:
        old = self._entries.pop(blob_id, None)
        if old is not None:
            self._size -= _HEAD.size + len(old)

    def get(self, content_id: str) -> tuple[str, Parsed] | None:
        """The text and parsed document kept for ``content_id``, or None."""
        blob_id = content_id.removeprefix("git:")
        payload = self._entries.get(blob_id)
        if payload is None:
            return None
        found = _decode(payload)
        if found is None or _git_blob_id(found[0]) != blob_id:
            self._drop(blob_id)  # digest right, content wrong: written by a bug, never used
            self._changed = True
            return None
        self._entries.move_to_end(blob_id)
        return found

    def put(self, content_id: str, text: str, parsed: Parsed) -> None:
        """Keep ``text`` and its parsed document under ``content_id`` (serialised at once)."""
        if not content_id.startswith("git:"):
            return
        blob_id = content_id[4:]
        if len(blob_id) != 40:
            return
        try:
            payload = marshal.dumps(
                (text, parsed.data, parsed.lines, parsed.max_depth, parsed.depth_line)
            )
        except ValueError:  # a value marshal cannot write (a TOML date): parsed every time
            return
        if _HEAD.size + len(payload) > self.max_bytes:
            return
        self._drop(blob_id)
        self._entries[blob_id] = payload
        self._size += _HEAD.size + len(payload)
        self._changed = True

    def save(self) -> None:
        """Write the file if anything changed, within its bounds (best effort: a cache)."""
        if not self._changed:
            return
        while self._entries and (
            len(self._entries) > self.max_entries or self._size > self.max_bytes
        ):
            self._drop(next(iter(self._entries)))
        chunks = [_MAGIC]
        for blob_id, payload in self._entries.items():
            key = blob_id.encode("ascii")
            chunks.append(_HEAD.pack(len(payload), _digest(key, payload), key))
            chunks.append(payload)
        tmp = ""
        try:
            fd, tmp = tempfile.mkstemp(prefix=f"{FILE_NAME}.", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o644)  # as git's own files: others may read it too
                f.write(b"".join(chunks))
            os.replace(tmp, self.path)
            tmp = ""
        except OSError:
            pass  # a read-only repository: the next run parses again
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        self._changed = False


def _decode(payload: bytes) -> tuple[str, Parsed] | None:
    """An entry's text and document, or None when it is not what ``put`` writes."""
    try:
        value: Any = marshal.loads(payload)
    except (ValueError, EOFError, TypeError):
        return None
    if not (isinstance(value, tuple) and len(value) == 5):
        return None
    text, data, lines, max_depth, depth_line = value
    if not (
        isinstance(text, str)
        and isinstance(data, dict)
        and isinstance(lines, dict)
        and isinstance(max_depth, int)
        and (depth_line is None or isinstance(depth_line, int))
    ):
        return None
    return text, Parsed(data, lines, max_depth, depth_line)

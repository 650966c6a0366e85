"""Installed-file manifests and drift: what an artifact install put in a work dir, and what
changed in it since.

At install time ``record`` writes a manifest of the files that came from artifacts (path,
size, mode, sha256; a symlink's target) next to the work dir::

    runtime/components/<name>/<version>/            the work dir
    runtime/components/<name>/<version>.files.json  its manifest

``check`` hashes those files again and answers a ``Drift``: files ``changed`` (content, size,
mode or kind), ``removed``, and ``added``. Additions are looked for only inside directories
that came from artifacts (never in the work dir's root, where a component keeps its own
files: it is its ``HOME``). Names keystone itself writes (``.keystone-*``) are not drift.

These are plain blocking functions with bounded memory (files are hashed in 1 MiB chunks):
the agent runs them in a worker thread, one component at a time.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keystone.state import read_json, write_json

CHUNK = 1 << 20
MANIFEST_VERSION = 1
MAX_LISTED = 50
"""How many paths of each kind a drift report names (the counts are always exact)."""


def manifest_path(workdir: Path) -> Path:
    """Where the manifest of ``workdir`` lives: beside it, out of the component's reach."""
    return workdir.with_name(workdir.name + ".files.json")


def _ignored(name: str) -> bool:
    return name.startswith((".keystone-", ".keystone."))


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, read in chunks (never the whole file in memory)."""
    import hashlib  # lazy: OpenSSL's speed for files, loaded by the first (keystone.openssl)

    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _entry(path: Path) -> dict[str, Any] | None:
    """What a manifest keeps of one work dir file; None if it is gone."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return {"kind": "symlink", "target": os.readlink(path)}
    if not stat.S_ISREG(st.st_mode):
        return {"kind": "other"}
    return {
        "kind": "file",
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "sha256": sha256_of(path),
    }


def tree_paths(tree: Path) -> tuple[list[str], list[str]]:
    """The relative file (and symlink) paths and the directory paths of an unpacked tree."""
    files: list[str] = []
    dirs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(tree):
        rel = Path(dirpath).relative_to(tree)
        for name in list(dirnames):
            if (Path(dirpath) / name).is_symlink():
                dirnames.remove(name)
                files.append(str(rel / name))
            else:
                dirs.append(str(rel / name))
        files.extend(str(rel / name) for name in filenames)
    return sorted(files), sorted(dirs)


def record(workdir: Path, files: Iterable[str], dirs: Iterable[str] = ()) -> dict[str, Any]:
    """Hash the installed ``files`` (relative to ``workdir``) and write the manifest.

    ``dirs`` are the directories that came from artifacts: ``check`` reports a new file in one
    of them as added. Returns the manifest written.
    """
    entries: dict[str, Any] = {}
    for rel in sorted(set(files)):
        e = _entry(workdir / rel)
        if e is not None:
            entries[rel] = e
    manifest = {
        "version": MANIFEST_VERSION,
        "recorded_at": time.time(),
        "files": entries,
        "dirs": sorted({d for d in dirs if d not in ("", ".")}),
    }
    write_json(manifest_path(workdir), manifest)
    return manifest


def load(workdir: Path) -> dict[str, Any] | None:
    """The manifest of ``workdir``, or None (nothing came from artifacts, or an old install)."""
    data = read_json(manifest_path(workdir))
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    return data


@dataclass(frozen=True)
class Drift:
    """What differs in a work dir from its manifest (each list sorted)."""

    changed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    checked: int = 0
    checked_at: float = field(default_factory=time.time)

    @property
    def drifted(self) -> bool:
        return bool(self.changed or self.added or self.removed)

    def counts(self) -> dict[str, int]:
        """``{changed, added, removed}`` file counts."""
        return {
            "changed": len(self.changed),
            "added": len(self.added),
            "removed": len(self.removed),
        }

    def to_json(self) -> dict[str, Any]:
        """The status form: counts, up to ``MAX_LISTED`` paths of each kind, when checked."""
        return {
            "drifted": self.drifted,
            **self.counts(),
            "files": {
                "changed": list(self.changed[:MAX_LISTED]),
                "added": list(self.added[:MAX_LISTED]),
                "removed": list(self.removed[:MAX_LISTED]),
            },
            "checked": self.checked,
            "checked_at": round(self.checked_at, 3),
        }


def _walk_added(workdir: Path, dirs: Iterable[str], known: set[str]) -> Iterator[str]:
    for d in dirs:
        base = workdir / d
        if base.is_symlink() or not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(workdir)
            for name in list(dirnames):
                if (Path(dirpath) / name).is_symlink():
                    dirnames.remove(name)
                    filenames.append(name)
            for name in filenames:
                path = str(rel / name)
                if path not in known and not _ignored(name):
                    yield path


def check(workdir: Path, manifest: dict[str, Any] | None = None) -> Drift | None:
    """Hash ``workdir``'s installed files again; None when it has no manifest."""
    manifest = manifest if manifest is not None else load(workdir)
    if manifest is None:
        return None
    files: dict[str, Any] = manifest["files"]
    changed: list[str] = []
    removed: list[str] = []
    for rel, want in files.items():
        have = _entry(workdir / rel)
        if have is None:
            removed.append(rel)
        elif have != want:
            changed.append(rel)
    dirs = [str(d) for d in manifest.get("dirs") or []]
    added = sorted(set(_walk_added(workdir, dirs, set(files))))
    return Drift(tuple(sorted(changed)), tuple(added), tuple(sorted(removed)), checked=len(files))


def clear_added(workdir: Path, drift: Drift) -> None:
    """Remove the files a drift found added (before a repair reinstalls the rest)."""
    for rel in drift.added:
        path = workdir / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

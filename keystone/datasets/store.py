"""The on-disk life of a dataset: one directory per version, a ``current`` link, retention, state.

The layout is the Go Keystone's (``internal/dataset/store.go``)::

    runtime/datasets/<name>/2026-08-14/     kept: the rollback target
    runtime/datasets/<name>/2026-08-15/     the new one
    runtime/datasets/<name>/current -> 2026-08-15

plus what this agent keeps beside it under dot names (never taken for a version)::

    runtime/datasets/<name>/.state.json     accepted publication, versions, bad manifests, last refresh
    runtime/datasets/<name>/.staging-*      a version being placed (removed on the next start)
    runtime/datasets/<name>/.cache/         the verified payload blobs (content-addressed)

The component reads through ``current`` and never learns a version number. A version directory
appears complete or not at all (it is built under a staging name and renamed); ``current`` is
switched by renaming a fresh relative link over it, which is atomic: a reader sees the old target
or the new one, never neither. ``runtime/`` must be one filesystem for that rename.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keystone.datasets.spec import check_name
from keystone.errors import ValidationError
from keystone.manifest import format_time, parse_time
from keystone.runtime.archive import ArchiveLimits, detect_format, remove_tree, unpack
from keystone.runtime.archive import ArchiveRefused as ArchiveRefused
from keystone.state import fsync_dir, read_json, write_json

CURRENT_LINK = "current"
STATE_FILE = ".state.json"
CACHE_DIR = ".cache"
_STAGING = ".staging-"


@dataclass(frozen=True)
class VersionRecord:
    """What is known of one version on disk: its publication, payload digest and size."""

    published: datetime
    sha256: str
    size: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"published": format_time(self.published), "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VersionRecord:
        return cls(
            published=parse_time(str(data["published"]), what="published"),
            sha256=str(data["sha256"]),
            size=int(data.get("size", 0)),
        )


@dataclass(frozen=True)
class BadRecord:
    """A manifest that was activated and rolled back: never activated again on this device."""

    version: str
    published: datetime
    sha256: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "published": format_time(self.published),
            "sha256": self.sha256,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BadRecord:
        return cls(
            version=str(data["version"]),
            published=parse_time(str(data["published"]), what="published"),
            sha256=str(data["sha256"]),
            reason=str(data.get("reason", "")),
        )


@dataclass(frozen=True)
class DatasetState:
    """What a dataset has accepted and is serving; persisted so it survives restarts.

    Attributes:
        accepted_published: the ``published`` of the newest manifest ever accepted: the
            anti-replay anchor (it stays after a rollback, so the rolled-back manifest and
            anything older are refused).
        accepted_sha256: that manifest's payload digest (the same document fetched again is
            "unchanged", not a replay).
        last_refresh: wall time of the last refresh attempt (epoch seconds), any outcome.
        last_result: ``ok``, ``unchanged`` or a short failure description (Go's ``LastResult``).
        versions: version label -> record, for every version directory this store made.
        bad: manifests rolled back on this device.
    """

    name: str
    manifest_uri: str = ""
    accepted_published: datetime | None = None
    accepted_sha256: str = ""
    last_refresh: float | None = None
    last_result: str = ""
    versions: dict[str, VersionRecord] = field(default_factory=dict)
    bad: tuple[BadRecord, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "manifest_uri": self.manifest_uri,
            "accepted_published": format_time(self.accepted_published)
            if self.accepted_published
            else None,
            "accepted_sha256": self.accepted_sha256,
            "last_refresh": self.last_refresh,
            "last_result": self.last_result,
            "versions": {v: r.to_json() for v, r in sorted(self.versions.items())},
            "bad": [b.to_json() for b in self.bad],
        }

    @classmethod
    def from_json(cls, name: str, data: Any) -> DatasetState:
        """Read a persisted state; anything unreadable yields an empty state for ``name``."""
        if not isinstance(data, dict):
            return cls(name=name)
        try:
            accepted = data.get("accepted_published")
            return cls(
                name=name,
                manifest_uri=str(data.get("manifest_uri") or ""),
                accepted_published=parse_time(str(accepted), what="accepted_published")
                if accepted
                else None,
                accepted_sha256=str(data.get("accepted_sha256") or ""),
                last_refresh=None
                if data.get("last_refresh") is None
                else float(data["last_refresh"]),
                last_result=str(data.get("last_result") or ""),
                versions={
                    str(v): VersionRecord.from_json(r)
                    for v, r in dict(data.get("versions") or {}).items()
                },
                bad=tuple(BadRecord.from_json(b) for b in data.get("bad") or ()),
            )
        except (AttributeError, KeyError, TypeError, ValueError, ValidationError):
            return cls(name=name)

    def is_bad(self, published: datetime, sha256: str) -> BadRecord | None:
        """The bad record for this publication, if it was rolled back here."""
        for b in self.bad:
            if b.published == published and b.sha256 == sha256:
                return b
        return None


class DatasetStore:
    """The dataset tree under one root (``runtime/datasets``).

    The root is made absolute once: the paths handed out end up in a component's environment,
    and the component runs in its own working directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))

    # --- layout ---------------------------------------------------------------------------------

    def dir(self, name: str) -> Path:
        """Where a dataset's versions live."""
        why = check_name(name)
        if why:
            raise ValidationError(f"dataset name {name!r}: {why}")
        return self.root / name

    def version_dir(self, name: str, version: str) -> Path:
        """Where one version's files live."""
        why = check_name(version)
        if why:
            raise ValidationError(
                f"dataset {name}: version {version!r} cannot name a directory: {why}"
            )
        return self.dir(name) / version

    def path(self, name: str) -> Path:
        """What the component reads: the stable ``current`` link (absolute)."""
        return self.dir(name) / CURRENT_LINK

    def cache_dir(self, name: str) -> Path:
        """Where the verified payload blobs of a dataset are cached."""
        return self.dir(name) / CACHE_DIR

    def active(self, name: str) -> str:
        """The version ``current`` points at, or ``""`` when there is none (or it dangles)."""
        try:
            target = os.readlink(self.path(name))
        except OSError:
            return ""
        version = os.path.basename(target)
        return version if (self.dir(name) / version).is_dir() else ""

    def versions(self, name: str) -> list[str]:
        """The version directories on disk, oldest first (by recorded publication, then name)."""
        try:
            entries = list(os.scandir(self.dir(name)))
        except OSError:
            return []
        names = [
            e.name
            for e in entries
            if e.is_dir(follow_symlinks=False)
            and not e.name.startswith(".")
            and e.name != CURRENT_LINK
        ]
        records = self.load_state(name).versions
        epoch = datetime.min.replace(tzinfo=UTC)
        return sorted(names, key=lambda v: (records[v].published if v in records else epoch, v))

    # --- state ----------------------------------------------------------------------------------

    def load_state(self, name: str) -> DatasetState:
        """The persisted state of ``name`` (an empty one when there is none)."""
        return DatasetState.from_json(name, read_json(self.dir(name) / STATE_FILE))

    def save_state(self, state: DatasetState) -> None:
        """Persist ``state`` atomically."""
        write_json(self.dir(state.name) / STATE_FILE, state.to_json())

    # --- placing and switching ------------------------------------------------------------------

    def recover(self, name: str) -> list[str]:
        """Remove what an interrupted run left (staging directories, a stray link); return them."""
        removed: list[str] = []
        try:
            entries = os.listdir(self.dir(name))
        except OSError:
            return removed
        for entry in entries:
            if entry.startswith(_STAGING) or entry == CURRENT_LINK + ".tmp":
                remove_tree(self.dir(name) / entry)
                removed.append(entry)
        return removed

    def place(
        self, name: str, version: str, payload: Path, *, file_name: str, limits: ArchiveLimits
    ) -> Path:
        """Build the directory of ``version`` from a verified payload, all or nothing.

        A tar or zip payload is unpacked (safely, bounded); any other file is placed as
        ``file_name``. A directory of the same version left by an earlier attempt that never
        became active is replaced: extracting over it would mix two versions.

        Raises:
            ArchiveRefused: an unsafe or damaged archive (nothing is left behind).
            ValidationError: ``version`` is active already, or cannot name a directory.
        """
        dest = self.version_dir(name, version)
        if self.active(name) == version:
            raise ValidationError(
                f"dataset {name}: version {version!r} is active with other content; publish "
                "the new data under a new version label"
            )
        if dest.exists() or dest.is_symlink():
            remove_tree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            fmt: str | None = detect_format(payload)
        except ArchiveRefused:
            fmt = None
        if fmt is not None:
            unpack(payload, dest, limits, what=f"dataset {name} {version}")
            return dest
        staging = dest.parent / f"{_STAGING}{version}-{secrets.token_hex(6)}"
        staging.mkdir(mode=0o700)
        try:
            target = staging / file_name
            shutil.copyfile(payload, target)
            os.chmod(target, 0o444)
            with open(target, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(staging, 0o555)
            os.rename(staging, dest)
        except BaseException:
            remove_tree(staging)
            raise
        fsync_dir(dest.parent)
        return dest

    def activate(self, name: str, version: str) -> None:
        """Point ``current`` at ``version``, atomically (a relative link renamed over the old one).

        Raises:
            ValidationError: the version directory does not exist (the link would dangle).
            OSError: the link cannot be made or renamed.
        """
        target = self.version_dir(name, version)
        if not target.is_dir():
            raise ValidationError(f"cannot activate dataset {name} {version}: {target} is missing")
        link = self.path(name)
        tmp = link.with_name(CURRENT_LINK + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(version, tmp)
        try:
            os.replace(tmp, link)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(link.parent)

    def prune(self, name: str, keep: int, protect: tuple[str, ...] = ()) -> list[str]:
        """Remove versions, oldest first, until ``keep`` remain; never the active or ``protect``.

        Go's rule: protected versions count towards ``keep`` (more remain only when the
        protected ones alone exceed it). Returns the removed versions, oldest first. ``protect`` exists because the active version
        is not always the newest: after a rollback the newest directory is the one that failed.
        """
        keep = max(keep, 1)
        versions = self.versions(name)
        protected = {p for p in protect if p}
        active = self.active(name)
        if active:
            protected.add(active)
        removed: list[str] = []
        remaining = len(versions)
        for v in versions:
            if remaining <= keep:
                break
            if v in protected:
                continue
            remove_tree(self.version_dir(name, v))
            removed.append(v)
            remaining -= 1
        if removed:
            state = self.load_state(name)
            kept = {v: r for v, r in state.versions.items() if v not in removed}
            self.save_state(replace(state, versions=kept))
        return removed

"""The agent's snapshot on disk and the ledger of revisions inside it, as typed records.

The snapshot (``runtime/state/agent.json``) is one atomic file: the applied plan, the processes
that run it (so a restarted agent adopts them), and the sync ledger (applied and last known-good
revisions, failed revisions, the journal of a deployment in flight). Its JSON layout is the one
every earlier version wrote, so either version reads the other's file; keys this version does
not know are kept as they were.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keystone.state import read_json, write_json

JSON = dict[str, Any]
SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class FailedRevision:
    """A revision that was refused or rolled back; not retried until a new commit arrives."""

    reason: str
    kind: str
    time: float

    def to_json(self) -> JSON:
        return {"reason": self.reason, "kind": self.kind, "time": self.time}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> FailedRevision:
        return cls(str(doc.get("reason") or ""), str(doc.get("kind") or ""), _num(doc, "time"))


@dataclass(frozen=True)
class Journal:
    """A deployment in flight: after a crash it is retried once more, then marked failed."""

    revision: str
    attempts: int
    started: float

    def to_json(self) -> JSON:
        return {"revision": self.revision, "attempts": self.attempts, "started": self.started}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Journal:
        return cls(
            str(doc.get("revision") or ""), int(doc.get("attempts") or 1), _num(doc, "started")
        )


@dataclass(frozen=True)
class LastSync:
    """The outcome of the newest sync (``status --revision``)."""

    time: float
    result: str
    revision: str | None = None
    error: str | None = None
    trigger: str | None = None
    duration: float = 0.0

    def to_json(self) -> JSON:
        return {
            "time": self.time,
            "result": self.result,
            "revision": self.revision,
            "error": self.error,
            "trigger": self.trigger,
            "duration": self.duration,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LastSync:
        return cls(
            time=_num(doc, "time"),
            result=str(doc.get("result") or ""),
            revision=doc.get("revision"),
            error=doc.get("error"),
            trigger=doc.get("trigger"),
            duration=_num(doc, "duration"),
        )


@dataclass(frozen=True)
class ImportedBundle:
    """A bundle file the USB watcher imported (by its sha256), so it is imported once."""

    path: str
    time: float
    result: str | None = None

    def to_json(self) -> JSON:
        out: JSON = {"path": self.path, "time": self.time}
        if self.result is not None:
            out["result"] = self.result
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ImportedBundle:
        return cls(str(doc.get("path") or ""), _num(doc, "time"), doc.get("result"))


LEDGER_KEYS = (
    "applied",
    "last_known_good",
    "signer",
    "fingerprint",
    "source",
    "applied_at",
    "applied_plan_checkout",
    "lkg_plan",
    "lkg_checkout",
    "failed",
    "journal",
    "last_sync",
    "suspended",
    "imported_bundles",
)


@dataclass
class Ledger:
    """The sync engine's memory of revisions (the snapshot's ``sync`` object).

    Mutable: the engine updates it as a sync goes; its entries are frozen records.
    """

    applied: str | None = None
    last_known_good: str | None = None
    signer: str | None = None
    fingerprint: str | None = None
    source: str | None = None
    applied_at: float | None = None
    applied_plan_checkout: str | None = None
    lkg_plan: JSON | None = None
    lkg_checkout: str | None = None
    failed: dict[str, FailedRevision] = field(default_factory=dict)
    journal: Journal | None = None
    last_sync: LastSync | None = None
    suspended: bool = False
    imported_bundles: dict[str, ImportedBundle] = field(default_factory=dict)
    extra: JSON = field(default_factory=dict)
    """Keys written by another version, kept as they were."""

    def mark_failed(self, revision: str | None, reason: str, kind: str, now: float) -> None:
        """Remember that ``revision`` failed (nothing for an unknown revision)."""
        if revision:
            self.failed[revision] = FailedRevision(reason, kind, now)

    def failed_json(self) -> JSON:
        return {rev: f.to_json() for rev, f in self.failed.items()}

    def to_json(self) -> JSON:
        out: JSON = dict(self.extra)
        for key in ("applied", "last_known_good", "signer", "fingerprint", "source"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        for key in ("applied_at", "applied_plan_checkout", "lkg_plan", "lkg_checkout"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out["failed"] = self.failed_json()
        if self.journal is not None:
            out["journal"] = self.journal.to_json()
        if self.last_sync is not None:
            out["last_sync"] = self.last_sync.to_json()
        out["suspended"] = self.suspended
        if self.imported_bundles:
            out["imported_bundles"] = {d: b.to_json() for d, b in self.imported_bundles.items()}
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> Ledger:
        doc = dict(doc or {})
        journal = doc.get("journal")
        last = doc.get("last_sync")
        return cls(
            applied=doc.get("applied") or None,
            last_known_good=doc.get("last_known_good") or None,
            signer=doc.get("signer"),
            fingerprint=doc.get("fingerprint"),
            source=doc.get("source"),
            applied_at=doc.get("applied_at"),
            applied_plan_checkout=doc.get("applied_plan_checkout"),
            lkg_plan=doc.get("lkg_plan") or None,
            lkg_checkout=doc.get("lkg_checkout"),
            failed={
                str(rev): FailedRevision.from_json(f)
                for rev, f in (doc.get("failed") or {}).items()
                if isinstance(f, Mapping)
            },
            journal=Journal.from_json(journal) if isinstance(journal, Mapping) else None,
            last_sync=LastSync.from_json(last) if isinstance(last, Mapping) else None,
            suspended=bool(doc.get("suspended")),
            imported_bundles={
                str(d): ImportedBundle.from_json(b)
                for d, b in (doc.get("imported_bundles") or {}).items()
                if isinstance(b, Mapping)
            },
            extra={k: v for k, v in doc.items() if k not in LEDGER_KEYS},
        )


@dataclass(frozen=True)
class ProcessRecord:
    """A component running the applied plan, as the next agent adopts it.

    ``runner`` is the runner's own description of what runs (for processes: pid, process
    group, start ticks, cgroup; for another runner whatever it needs to find its work again):
    the ledger never looks inside it. On disk the runner's keys sit beside ``version`` and
    ``hash`` in one object, as they always have.
    """

    runner: Mapping[str, object]
    version: str
    hash: str

    @property
    def pid(self) -> int:
        """The pid the runner recorded (0 when its record has none)."""
        pid = self.runner.get("pid")
        return pid if isinstance(pid, int) else 0

    def to_json(self) -> JSON:
        return {**self.runner, "version": self.version, "hash": self.hash}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ProcessRecord:
        if not isinstance(doc, Mapping) or not doc.get("hash"):
            # Adoption needs the component's hash: a record without one can never be adopted.
            raise ValueError("process record without the component's hash")
        runner = {k: v for k, v in doc.items() if k not in ("version", "hash")}
        return cls(runner=runner, version=str(doc.get("version") or ""), hash=str(doc["hash"]))


@dataclass(frozen=True)
class Snapshot:
    """The agent's state file: applied plan, its processes, the ledger (``state/agent.json``)."""

    plan: JSON | None = None
    plan_path: str = ""
    stopped: bool = False
    processes: Mapping[str, ProcessRecord] = field(default_factory=dict)
    ledger: JSON = field(default_factory=dict)
    saved_at: float = 0.0
    version: int = SNAPSHOT_VERSION

    def to_json(self) -> JSON:
        return {
            "version": self.version,
            "plan": self.plan,
            "plan_path": self.plan_path,
            "stopped": self.stopped,
            "processes": {name: p.to_json() for name, p in self.processes.items()},
            "sync": self.ledger,
            "saved_at": self.saved_at,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> Snapshot:
        doc = doc or {}
        processes = {}
        for name, rec in (doc.get("processes") or {}).items():
            try:
                processes[str(name)] = ProcessRecord.from_json(rec)
            except (KeyError, TypeError, ValueError):
                continue  # a torn or foreign record: that process is not adopted
        return cls(
            plan=doc.get("plan") or None,
            plan_path=str(doc.get("plan_path") or ""),
            stopped=bool(doc.get("stopped")),
            processes=processes,
            ledger=dict(doc.get("sync") or {}),
            saved_at=_num(doc, "saved_at"),
            version=int(doc.get("version") or SNAPSHOT_VERSION),
        )

    @classmethod
    def read(cls, path: Path) -> Snapshot:
        """The snapshot at ``path`` (an empty one when there is none)."""
        return cls.from_json(read_json(path, {}) or {})

    def write(self, path: Path) -> None:
        """Replace the snapshot at ``path`` atomically."""
        write_json(path, self.to_json())


def _num(doc: Mapping[str, Any], key: str) -> float:
    value = doc.get(key)
    return float(value) if isinstance(value, int | float) else 0.0

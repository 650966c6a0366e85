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

from keystone.state import write_json
from keystone.statefile import (
    StateDamage,
    boolean,
    integer,
    number,
    obj,
    opt_number,
    opt_obj,
    opt_string,
    read_state,
    string,
    version,
)

JSON = dict[str, Any]
SNAPSHOT_VERSION = 1
SNAPSHOT_FILE = "agent.json"


@dataclass(frozen=True)
class FailedRevision:
    """A revision that was refused or rolled back; not retried until a new commit arrives."""

    reason: str
    kind: str
    time: float

    def to_json(self) -> JSON:
        return {"reason": self.reason, "kind": self.kind, "time": self.time}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str = "failed") -> FailedRevision:
        doc = obj(doc, where)
        return cls(
            string(doc.get("reason"), f"{where}.reason", optional=True),
            string(doc.get("kind"), f"{where}.kind", optional=True),
            number(doc.get("time"), f"{where}.time", default=0.0),
        )


@dataclass(frozen=True)
class Journal:
    """A deployment in flight: after a crash it is retried once more, then marked failed."""

    revision: str
    attempts: int
    started: float

    def to_json(self) -> JSON:
        return {"revision": self.revision, "attempts": self.attempts, "started": self.started}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str = "journal") -> Journal:
        doc = obj(doc, where)
        return cls(
            string(doc.get("revision"), f"{where}.revision"),
            integer(doc.get("attempts"), f"{where}.attempts", default=1),
            number(doc.get("started"), f"{where}.started", default=0.0),
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
    def from_json(cls, doc: Mapping[str, Any], where: str = "last_sync") -> LastSync:
        doc = obj(doc, where)
        return cls(
            time=number(doc.get("time"), f"{where}.time", default=0.0),
            result=string(doc.get("result"), f"{where}.result", optional=True),
            revision=opt_string(doc.get("revision"), f"{where}.revision"),
            error=opt_string(doc.get("error"), f"{where}.error"),
            trigger=opt_string(doc.get("trigger"), f"{where}.trigger"),
            duration=number(doc.get("duration"), f"{where}.duration", default=0.0),
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
    def from_json(cls, doc: Mapping[str, Any], where: str = "imported_bundles") -> ImportedBundle:
        doc = obj(doc, where)
        return cls(
            string(doc.get("path"), f"{where}.path", optional=True),
            number(doc.get("time"), f"{where}.time", default=0.0),
            opt_string(doc.get("result"), f"{where}.result"),
        )


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
    def from_json(cls, doc: Mapping[str, Any] | None, where: str = "sync") -> Ledger:
        """The ledger of a snapshot's ``sync`` object.

        Raises:
            StateDamage: a field of the wrong type, naming it (``sync.failed: expected an
                object, got a list``); the snapshot is then damaged as a whole.
        """
        doc = obj(doc if doc is not None else {}, where)
        journal = doc.get("journal")
        last = doc.get("last_sync")
        failed = obj(_or_empty(doc.get("failed")), f"{where}.failed")
        bundles = obj(_or_empty(doc.get("imported_bundles")), f"{where}.imported_bundles")
        applied_at = opt_number(doc.get("applied_at"), f"{where}.applied_at")
        return cls(
            applied=opt_string(doc.get("applied"), f"{where}.applied") or None,
            last_known_good=opt_string(doc.get("last_known_good"), f"{where}.last_known_good")
            or None,
            signer=opt_string(doc.get("signer"), f"{where}.signer"),
            fingerprint=opt_string(doc.get("fingerprint"), f"{where}.fingerprint"),
            source=opt_string(doc.get("source"), f"{where}.source"),
            applied_at=applied_at,
            applied_plan_checkout=opt_string(
                doc.get("applied_plan_checkout"), f"{where}.applied_plan_checkout"
            ),
            lkg_plan=opt_obj(doc.get("lkg_plan"), f"{where}.lkg_plan") or None,
            lkg_checkout=opt_string(doc.get("lkg_checkout"), f"{where}.lkg_checkout"),
            failed={
                str(rev): FailedRevision.from_json(f, f"{where}.failed.{rev}")
                for rev, f in failed.items()
            },
            journal=Journal.from_json(journal, f"{where}.journal") if journal is not None else None,
            last_sync=LastSync.from_json(last, f"{where}.last_sync") if last is not None else None,
            suspended=boolean(doc.get("suspended"), f"{where}.suspended", default=False),
            imported_bundles={
                str(d): ImportedBundle.from_json(b, f"{where}.imported_bundles.{d}")
                for d, b in bundles.items()
            },
            extra={k: v for k, v in doc.items() if k not in LEDGER_KEYS},
        )


@dataclass(frozen=True)
class ProcessRecord:
    """A component running the applied plan, as the next agent adopts it.

    ``runner`` is the runner's own description of what runs (for processes: pid, process
    group, start ticks, cgroup; for another runner whatever it needs to find its work again):
    the ledger never looks inside it. On disk the runner's keys sit beside ``version`` and
    ``hash`` in one object, as they always have. ``stopping`` marks a process that was being
    stopped (an old version during an upgrade): the next agent finishes stopping it before its
    successor starts, and never adopts it.
    """

    runner: Mapping[str, object]
    version: str
    hash: str
    stopping: bool = False

    @property
    def pid(self) -> int:
        """The pid the runner recorded (0 when its record has none)."""
        pid = self.runner.get("pid")
        return pid if isinstance(pid, int) else 0

    def to_json(self) -> JSON:
        out = {**self.runner, "version": self.version, "hash": self.hash}
        if self.stopping:
            out["stopping"] = True
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str = "process") -> ProcessRecord:
        """Raises StateDamage for a record without the component's hash (never adoptable)."""
        doc = obj(doc, where)
        if not doc.get("hash"):
            # Adoption needs the component's hash: a record without one can never be adopted.
            raise StateDamage(f"{where}: process record without the component's hash")
        runner = {k: v for k, v in doc.items() if k not in ("version", "hash", "stopping")}
        return cls(
            runner=runner,
            version=string(doc.get("version"), f"{where}.version", optional=True),
            hash=string(doc["hash"], f"{where}.hash"),
            stopping=boolean(doc.get("stopping"), f"{where}.stopping", default=False),
        )


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
    problems: tuple[str, ...] = ()
    """What was dropped while reading (a torn process record): reported, never fatal."""

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
        """The snapshot of a decoded ``agent.json`` (its typed schema).

        A process record that cannot be adopted is dropped and named in ``problems``; anything
        else of the wrong shape (not an object, a field of the wrong type, a ledger that does
        not validate) raises.

        Raises:
            StateDamage: naming the field and what was expected.
        """
        doc = obj(doc if doc is not None else {}, "agent.json")
        ver = version(doc, "agent.json", SNAPSHOT_VERSION)
        processes: dict[str, ProcessRecord] = {}
        problems: list[str] = []
        for name, rec in obj(_or_empty(doc.get("processes")), "processes").items():
            try:
                processes[str(name)] = ProcessRecord.from_json(rec, f"processes.{name}")
            except StateDamage as exc:
                problems.append(str(exc))  # that process is not adopted from here
        ledger = obj(_or_empty(doc.get("sync")), "sync")
        Ledger.from_json(ledger)  # validated here, so a damaged ledger damages the file
        return cls(
            plan=opt_obj(doc.get("plan"), "plan") or None,
            plan_path=string(doc.get("plan_path"), "plan_path", optional=True),
            stopped=boolean(doc.get("stopped"), "stopped", default=False),
            processes=processes,
            ledger=dict(ledger),
            saved_at=number(doc.get("saved_at"), "saved_at", default=0.0),
            version=ver,
            problems=tuple(problems),
        )

    @classmethod
    def read(cls, path: Path) -> Snapshot:
        """The snapshot at ``path``; an empty one when there is none or it was damaged.

        A damaged file is set aside and reported (:mod:`keystone.statefile`).
        """
        return cls.load(path) or cls()

    @classmethod
    def load(cls, path: Path) -> Snapshot | None:
        """The snapshot at ``path``; None when there is none or it was damaged (set aside)."""
        return read_state(path, cls.from_json, name=SNAPSHOT_FILE)

    def write(self, path: Path) -> None:
        """Replace the snapshot at ``path`` atomically."""
        write_json(path, self.to_json())


def _or_empty(value: Any) -> Any:
    """An absent (null) object is an empty one; anything else is checked as it is."""
    return {} if value is None else value

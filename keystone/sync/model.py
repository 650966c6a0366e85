"""The values one sync passes along: request, worker request and answer, tip, verified revision,
desired state and result.

Every value is a frozen dataclass; the outcome is an Enum. The worker request and answer cross
the process boundary as JSON (``to_json`` / ``from_json``); the result record keeps the keys
the API, the CLI and the history have always shown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from keystone.workerproc import ErrorInfo

if TYPE_CHECKING:
    # Annotations only: the worker process loads this module and needs no runtime code.
    from keystone.plan import DesiredPlan
    from keystone.runtime.deployer import PlannedChanges

JSON = dict[str, Any]


class Outcome(Enum):
    """How one sync ended (the ``result`` of its record)."""

    APPLIED = "applied"
    UP_TO_DATE = "up-to-date"
    DRY_RUN = "dry-run"
    ROLLED_BACK = "rolled-back"
    REFUSED = "refused"
    KNOWN_BAD = "known-bad"
    UNREACHABLE = "unreachable"
    ERROR = "error"
    SUSPENDED = "suspended"
    SUPERSEDED = "superseded"
    WAITING = "waiting"  # verified, not deployed yet: a rollout wave, a window or a deferral
    HALTED = "halted"  # verified, not deployed: the rollout is halted

    @property
    def exit_code(self) -> int:
        """The CLI's exit code (DESIGN section 8)."""
        return EXIT_CODES[self]

    @property
    def quiet(self) -> bool:
        """Nothing happened worth a history entry when a scheduled poll ends so."""
        return self in (
            Outcome.UP_TO_DATE,
            Outcome.KNOWN_BAD,
            Outcome.DRY_RUN,
            Outcome.WAITING,  # the rollout step writes its own entry when the wait changes
            Outcome.HALTED,
        )

    @property
    def good(self) -> bool:
        """Logged as information, not as a warning."""
        return self in (
            Outcome.APPLIED,
            Outcome.UP_TO_DATE,
            Outcome.DRY_RUN,
            Outcome.WAITING,
            Outcome.HALTED,
        )


EXIT_CODES = {
    Outcome.APPLIED: 0,
    Outcome.UP_TO_DATE: 0,
    Outcome.DRY_RUN: 0,
    Outcome.ROLLED_BACK: 4,
    Outcome.REFUSED: 3,
    Outcome.UNREACHABLE: 1,
    Outcome.ERROR: 1,
    Outcome.KNOWN_BAD: 3,
    Outcome.SUSPENDED: 0,
    Outcome.SUPERSEDED: 0,
    Outcome.WAITING: 0,
    Outcome.HALTED: 0,
}

EXIT_BY_RESULT = {o.value: code for o, code in EXIT_CODES.items()}
"""Exit code by the ``result`` string of a record."""


class RequestKind(Enum):
    """What a sync request asks for."""

    SYNC = "sync"  # fetch the source's tip
    IMPORT = "import"  # a bundle file
    ROLLBACK = "rollback"  # a revision the mirror has (last known-good, or one named)


@dataclass(frozen=True)
class SyncRequest:
    """One request to the sync engine.

    Attributes:
        kind: fetch, import a bundle, or go back to a revision.
        trigger: who asked: ``schedule``, ``manual``, ``bundle``, ``rollback``.
        dry_run: stop after the diff.
        allow_rollback: accept a revision that does not descend from the applied one.
        retry: try a revision that failed before again.
        bundle: the bundle file of an import.
        to: the revision of a rollback (None: last known-good).
        operation: the slot's operation id (set when the slot runs it).
    """

    kind: RequestKind = RequestKind.SYNC
    trigger: str = "manual"
    dry_run: bool = False
    allow_rollback: bool = False
    retry: bool = False
    bundle: Path | None = None
    to: str | None = None
    operation: str = ""

    @property
    def force(self) -> bool:
        """Verify the tip even when it is applied or known bad."""
        return self.allow_rollback or self.retry


class WorkerOp(Enum):
    """The operations of ``python -m keystone.sync.worker``."""

    FETCH = "fetch"
    HTTP_FETCH = "http-fetch"
    VERIFY_REV = "verify-rev"
    IMPORT_BUNDLE = "import-bundle"
    MARK_APPLIED = "mark-applied"


def sync_deadline_message(seconds: float) -> str:
    """What a sync past its deadline says (``[source] deadline``, ``KEYSTONE_SYNC_DEADLINE``)."""
    return (
        f"the sync did not finish within its deadline of {seconds:g}s (a slow or drip-feeding "
        "source?); the sync worker was stopped and nothing was applied; raise it with "
        "KEYSTONE_SYNC_DEADLINE or [source] deadline in agent.toml"
    )


@dataclass(frozen=True)
class SourceSpec:
    """The configured source as the worker needs it."""

    type: str
    url: str
    ref: str = "refs/heads/main"
    timeout: float = 60.0
    deadline: float = 300.0  # the whole fetch; the worker is killed past it

    def to_json(self) -> JSON:
        return {
            "type": self.type,
            "url": self.url,
            "ref": self.ref,
            "timeout": self.timeout,
            "deadline": self.deadline,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> SourceSpec | None:
        if not doc:
            return None
        return cls(
            type=str(doc.get("type") or "git"),
            url=str(doc.get("url") or ""),
            ref=str(doc.get("ref") or "refs/heads/main"),
            timeout=float(doc.get("timeout") or 60),
            deadline=float(doc.get("deadline") or 300),
        )


@dataclass(frozen=True)
class TrustSpec:
    """The trust policy as the worker needs it (paths as strings)."""

    allowed_signers: str | None = None
    gpg_home: str | None = None
    revoked_keys: str | None = None
    verify: str = "tip"
    max_age: float = 0.0

    def to_json(self) -> JSON:
        return {
            "allowed_signers": self.allowed_signers,
            "gpg_home": self.gpg_home,
            "revoked_keys": self.revoked_keys,
            "verify": self.verify,
            "max_age": self.max_age,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> TrustSpec:
        doc = doc or {}
        return cls(
            allowed_signers=doc.get("allowed_signers") or None,
            gpg_home=doc.get("gpg_home") or None,
            revoked_keys=doc.get("revoked_keys") or None,
            verify=str(doc.get("verify") or "tip"),
            max_age=float(doc.get("max_age") or 0),
        )


@dataclass(frozen=True)
class WorkerRequest:
    """One request to the sync worker (stdin, as JSON)."""

    op: WorkerOp
    runtime: str
    source: SourceSpec | None = None
    trust: TrustSpec = field(default_factory=TrustSpec)
    applied: str | None = None
    device_id: str = ""
    labels: tuple[str, ...] = ()
    environ: Mapping[str, str] = field(default_factory=dict)
    allow_rollback: bool = False
    known_bad: frozenset[str] = frozenset()
    force: bool = False
    rev: str | None = None
    bundle: str | None = None
    max_bytes: int | None = None
    source_label: str | None = None
    refuse_unknown: bool = True

    def to_json(self) -> JSON:
        return {
            "op": self.op.value,
            "runtime": self.runtime,
            "source": self.source.to_json() if self.source else None,
            "trust": self.trust.to_json(),
            "applied": self.applied,
            "device": {"id": self.device_id, "labels": list(self.labels)},
            "environ": dict(self.environ),
            "allow_rollback": self.allow_rollback,
            "known_bad": sorted(self.known_bad),
            "force": self.force,
            "rev": self.rev,
            "bundle": self.bundle,
            "max_bytes": self.max_bytes,
            "source_label": self.source_label,
            "refuse_unknown": self.refuse_unknown,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> WorkerRequest:
        device = doc.get("device") or {}
        return cls(
            op=WorkerOp(doc["op"]),
            runtime=str(doc["runtime"]),
            source=SourceSpec.from_json(doc.get("source")),
            trust=TrustSpec.from_json(doc.get("trust")),
            applied=doc.get("applied") or None,
            device_id=str(device.get("id") or ""),
            labels=tuple(device.get("labels") or ()),
            environ=dict(doc.get("environ") or {}),
            allow_rollback=bool(doc.get("allow_rollback")),
            # A list, or (an older agent) the ledger's dict of failed revisions.
            known_bad=frozenset(doc.get("known_bad") or ()),
            force=bool(doc.get("force")),
            rev=doc.get("rev") or None,
            bundle=doc.get("bundle") or None,
            max_bytes=int(doc["max_bytes"]) if doc.get("max_bytes") else None,
            source_label=doc.get("source_label") or None,
            refuse_unknown=doc.get("refuse_unknown", True) is not False,
        )


class Gate(Enum):
    """Why a tip was not verified at all."""

    UP_TO_DATE = "up_to_date"
    KNOWN_BAD = "known_bad"


def gate(req: WorkerRequest, tip: str | None) -> Gate | None:
    """The one up-to-date / known-bad check: skip a tip that is applied or failed before.

    ``force`` (``--allow-rollback``, ``--retry``) verifies it anyway.
    """
    if tip is None or req.force:
        return None
    if tip == req.applied:
        return Gate.UP_TO_DATE
    if tip in req.known_bad:
        return Gate.KNOWN_BAD
    return None


@dataclass(frozen=True)
class FetchedTip:
    """What a source yielded: a revision and how it came.

    Attributes:
        revision: the tip commit (None when the source did not answer).
        source: the URL or ``bundle:<name>`` it came from.
        bytes: bytes received.
        changed: the source moved since the last fetch.
        wire: further facts about the transfer (``http`` stats, ``bundle_kind``...), as JSON.
    """

    revision: str | None = None
    source: str | None = None
    bytes: int = 0
    changed: bool = False
    wire: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VerifiedRevision:
    """A revision whose signature, ancestry and freshness were proven, and its provenance."""

    revision: str
    signer: str | None = None
    fingerprint: str | None = None
    signature: str | None = None
    commit_time: float | None = None
    source: str | None = None
    checkout: str | None = None
    warnings: tuple[str, ...] = ()
    rollout: str | None = None  # the revision's rollout.toml, validated by the worker


TIP_KEYS = ("revision", "source", "bytes", "changed")
VERIFIED_KEYS = (
    "signer",
    "fingerprint",
    "signature",
    "commit_time",
    "checkout",
    "warnings",
    "rollout",
)
ANSWER_KEYS = {"ok", "up_to_date", "known_bad", "plan", "error", *TIP_KEYS, *VERIFIED_KEYS}


@dataclass(frozen=True)
class WorkerAnswer:
    """The sync worker's answer (stdout, as JSON).

    Attributes:
        ok: False when the worker refused or failed (``error`` says why).
        tip: the fetched tip.
        gate: set when the tip was not verified because it is applied or known bad.
        verified: the verified revision (with ``plan``).
        plan: the resolved desired plan as JSON (``plan_to_json``).
        error: why not ok.
    """

    ok: bool
    tip: FetchedTip = field(default_factory=FetchedTip)
    gate: Gate | None = None
    verified: VerifiedRevision | None = None
    plan: Mapping[str, Any] | None = None
    error: ErrorInfo | None = None

    @classmethod
    def failed(cls, error: ErrorInfo, tip: FetchedTip | None = None) -> WorkerAnswer:
        return cls(ok=False, tip=tip or FetchedTip(), error=error)

    def to_json(self) -> JSON:
        out: JSON = {"ok": self.ok, **dict(self.tip.wire)}
        out.update({"source": self.tip.source, "bytes": self.tip.bytes})
        out["changed"] = self.tip.changed
        if self.tip.revision is not None:
            out["revision"] = self.tip.revision
        if self.gate is not None:
            out[self.gate.value] = True
        v = self.verified
        if v is not None:
            out.update(
                {
                    "revision": v.revision,
                    "signer": v.signer,
                    "fingerprint": v.fingerprint,
                    "signature": v.signature,
                    "commit_time": v.commit_time,
                    "checkout": v.checkout,
                    "warnings": list(v.warnings),
                }
            )
            if v.rollout is not None:
                out["rollout"] = v.rollout
        if self.plan is not None:
            out["plan"] = dict(self.plan)
        if self.error is not None:
            out["error"] = self.error.to_json()
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> WorkerAnswer:
        tip = FetchedTip(
            revision=doc.get("revision"),
            source=doc.get("source"),
            bytes=int(doc.get("bytes") or 0),
            changed=bool(doc.get("changed")),
            wire={k: v for k, v in doc.items() if k not in ANSWER_KEYS},
        )
        gate_ = (
            Gate.UP_TO_DATE
            if doc.get("up_to_date")
            else Gate.KNOWN_BAD
            if doc.get("known_bad")
            else None
        )
        verified = None
        if doc.get("ok") and gate_ is None and doc.get("plan") is not None:
            verified = VerifiedRevision(
                revision=str(doc.get("revision") or ""),
                signer=doc.get("signer"),
                fingerprint=doc.get("fingerprint"),
                signature=doc.get("signature"),
                commit_time=doc.get("commit_time"),
                source=doc.get("source"),
                checkout=doc.get("checkout"),
                warnings=tuple(doc.get("warnings") or ()),
                rollout=doc.get("rollout"),
            )
        return cls(
            ok=bool(doc.get("ok")),
            tip=tip,
            gate=gate_,
            verified=verified,
            plan=doc.get("plan"),
            error=ErrorInfo.from_json(doc["error"]) if doc.get("error") else None,
        )


@dataclass(frozen=True)
class DesiredState:
    """The plan a verified revision asks for, where it came from, and its diff.

    Attributes:
        plan: the validated desired plan.
        verified: the revision and signer it came from (provenance).
        planned: the change set and actions from the applied plan, computed once.
    """

    plan: DesiredPlan
    verified: VerifiedRevision
    planned: PlannedChanges


@dataclass(frozen=True)
class SyncResult:
    """The record of one sync: what the API answers, the CLI prints and the history keeps."""

    outcome: Outcome
    trigger: str
    revision: str | None = None
    previous: str | None = None
    source: str | None = None
    bytes: int = 0
    signer: str | None = None
    fingerprint: str | None = None
    changes: Mapping[str, Any] | None = None
    actions: tuple[Mapping[str, Any], ...] | None = None
    warnings: tuple[str, ...] | None = None
    error: str | None = None
    error_type: str | None = None
    failed_component: str | None = None
    time: float = 0.0
    duration: float = 0.0
    operation: str | None = None
    superseded_by: str | None = None
    datasets: tuple[Mapping[str, Any], ...] | None = None  # a bundle's datasets, as imported
    rollout: Mapping[str, Any] | None = None  # the device's wave, window or deferral

    OPTIONAL: ClassVar[tuple[str, ...]] = (
        "signer",
        "fingerprint",
        "error",
        "error_type",
        "failed_component",
        "operation",
        "superseded_by",
    )

    @property
    def exit_code(self) -> int:
        return self.outcome.exit_code

    def to_json(self) -> JSON:
        """The record (optional keys only when set); ``exit_code`` included."""
        out: JSON = {
            "revision": self.revision,
            "previous": self.previous,
            "trigger": self.trigger,
            "source": self.source,
            "bytes": self.bytes,
            "result": self.outcome.value,
            "time": self.time,
            "duration": self.duration,
        }
        for key in self.OPTIONAL:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.changes is not None:
            out["changes"] = dict(self.changes)
        if self.actions is not None:
            out["actions"] = [dict(a) for a in self.actions]
        if self.warnings is not None:
            out["warnings"] = list(self.warnings)
        if self.datasets is not None:
            out["datasets"] = [dict(d) for d in self.datasets]
        if self.rollout is not None:
            out["rollout"] = dict(self.rollout)
        out["exit_code"] = self.exit_code
        return out

    def event(self) -> JSON:
        """The history entry of this sync."""
        record = self.to_json()
        record.pop("exit_code")
        return {"kind": "sync", **record}

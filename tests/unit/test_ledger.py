"""The snapshot and ledger records: the previous version's files read, and round trips."""

from __future__ import annotations

import json
from pathlib import Path

from keystone.ledger import (
    FailedRevision,
    ImportedBundle,
    Journal,
    LastSync,
    Ledger,
    ProcessRecord,
    Snapshot,
)

OLD_SNAPSHOT = {
    "version": 1,
    "plan": {"sources": ["plans/default.toml"], "components": []},
    "plan_path": "git:abc",
    "stopped": False,
    "processes": {
        "db": {
            "pid": 10,
            "pgid": 10,
            "start_ticks": 555,
            "cgroup": None,
            "version": "1.0.0",
            "hash": "h1",
        },
        "torn": {"pgid": 3},
    },
    "sync": {
        "failed": {"bad": {"reason": "unhealthy", "kind": "rolled-back", "time": 5.0}},
        "applied": "abc",
        "applied_at": 7.0,
        "signer": "ops@example.com",
        "fingerprint": "SHA256:x",
        "source": "https://git/fleet.git",
        "applied_plan_checkout": "/rt/checkouts/abc",
        "last_known_good": "abc",
        "lkg_plan": {"components": []},
        "lkg_checkout": "/rt/checkouts/abc",
        "journal": {"revision": "def", "attempts": 1, "started": 9.0},
        "last_sync": {
            "time": 8.0,
            "result": "applied",
            "revision": "abc",
            "error": None,
            "trigger": "manual",
            "duration": 1.5,
        },
        "suspended": True,
        "imported_bundles": {"d1": {"path": "/media/x.ksb", "time": 3.0, "result": "applied"}},
        "future_key": {"kept": True},
    },
    "saved_at": 11.0,
}


class TestOldFiles:
    def test_a_previous_snapshot_reads_into_typed_records(self, tmp_path: Path) -> None:
        """Every ledger entry of a snapshot the previous version wrote comes back typed."""
        path = tmp_path / "agent.json"
        path.write_text(json.dumps(OLD_SNAPSHOT))
        snap = Snapshot.read(path)
        assert snap.plan_path == "git:abc" and snap.saved_at == 11.0
        runner = {"pid": 10, "pgid": 10, "start_ticks": 555, "cgroup": None}
        assert snap.processes == {"db": ProcessRecord(runner, "1.0.0", "h1")}
        assert snap.processes["db"].pid == 10
        led = Ledger.from_json(snap.ledger)
        assert led.applied == "abc" and led.suspended is True
        assert led.failed == {"bad": FailedRevision("unhealthy", "rolled-back", 5.0)}
        assert led.journal == Journal("def", 1, 9.0)
        assert led.last_sync == LastSync(8.0, "applied", "abc", None, "manual", 1.5)
        assert led.imported_bundles == {"d1": ImportedBundle("/media/x.ksb", 3.0, "applied")}

    def test_the_ledger_writes_what_the_previous_version_reads(self) -> None:
        """Round trip: the same JSON object, keys this version does not know included."""
        led = Ledger.from_json(OLD_SNAPSHOT["sync"])  # type: ignore[arg-type]
        assert led.to_json() == OLD_SNAPSHOT["sync"]

    def test_the_snapshot_layout_is_unchanged(self) -> None:
        """A snapshot written now has the previous layout (a torn process record dropped)."""
        snap = Snapshot.from_json(OLD_SNAPSHOT)
        doc = snap.to_json()
        expected = json.loads(json.dumps(OLD_SNAPSHOT))
        del expected["processes"]["torn"]
        assert doc == expected

    def test_missing_or_empty_files(self, tmp_path: Path) -> None:
        """No snapshot at all is an empty one; an empty ledger writes only its defaults."""
        snap = Snapshot.read(tmp_path / "none.json")
        assert snap.plan is None and snap.processes == {} and snap.ledger == {}
        assert Ledger.from_json({}).to_json() == {"failed": {}, "suspended": False}


class TestLedger:
    def test_mark_failed_ignores_unknown_revisions(self) -> None:
        """Only a known revision is marked failed."""
        led = Ledger()
        led.mark_failed(None, "x", "refused", 1.0)
        led.mark_failed("", "x", "refused", 1.0)
        led.mark_failed("abc", "x", "refused", 1.0)
        assert led.failed_json() == {"abc": {"reason": "x", "kind": "refused", "time": 1.0}}

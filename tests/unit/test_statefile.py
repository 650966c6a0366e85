"""The validating reader of state files, and the schemas of each file the agent keeps.

The four tracebacks the issue reports at start (UnicodeDecodeError, AttributeError in the
engine, TypeError in plan.py, KeyError in _restore) are each reproduced here as a damaged
snapshot that is now set aside and reported instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from keystone.api.auth import read_token_file
from keystone.ledger import Ledger, Snapshot
from keystone.recovery import closed_subset, read_anchor
from keystone.runtime.clock import TrustedClock
from keystone.runtime.markers import read_markers, write_marker
from keystone.state import History
from keystone.statefile import RECOVERIES, StateDamage, read_state


def recovered(path: Path) -> list[str]:
    return [r.problem for r in RECOVERIES if r.path == str(path)]


def corrupt_copies(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


SNAPSHOTS = {
    # UnicodeDecodeError at start
    "random bytes": os.urandom(64) + b"\xff\xfe",
    # AttributeError in SyncEngine.__init__ (the snapshot was a list)
    "a list": b"[1, 2, 3]",
    # TypeError in plan.py / dict() of a list
    "sync is a list": json.dumps({"version": 1, "sync": [["a", 1]]}).encode(),
    "processes is a list": json.dumps({"version": 1, "processes": [1]}).encode(),
    "failed is a list": json.dumps({"version": 1, "sync": {"failed": [1]}}).encode(),
    "applied is a number": json.dumps({"version": 1, "sync": {"applied": 7}}).encode(),
    "stopped is a string": json.dumps({"version": 1, "stopped": "yes"}).encode(),
    "a future version": json.dumps({"version": 99}).encode(),
    "truncated": b'{"version": 1, "plan": {"compo',
    "empty": b"",
    "nested too deep": b"[" * 100_000 + b"]" * 100_000,
}


class TestSnapshot:
    @pytest.mark.parametrize("case", list(SNAPSHOTS))
    def test_a_damaged_snapshot_is_set_aside_and_reported(self, tmp_path: Path, case: str) -> None:
        """No exception: the file goes to agent.json.corrupt-<time>, the problem is named."""
        path = tmp_path / "agent.json"
        path.write_bytes(SNAPSHOTS[case])
        assert Snapshot.load(path) is None
        assert not path.exists()
        [copy] = corrupt_copies(path)
        assert copy.read_bytes() == SNAPSHOTS[case]
        [problem] = recovered(path)
        assert problem

    def test_the_problem_names_the_field(self, tmp_path: Path) -> None:
        path = tmp_path / "agent.json"
        path.write_text(json.dumps({"version": 1, "sync": {"failed": []}}))
        Snapshot.load(path)
        assert recovered(path) == ["sync.failed: expected an object, got a list"]

    @pytest.mark.parametrize(
        ("data", "problem"),
        [
            (
                b'{"version": 1,\n "plan": {"compo',
                "Unterminated string starting at line 2 column 11",
            ),
            (b'{"version": 1,\n  ', "Expecting property name enclosed in double quotes at line 2"),
            (b'{"version": 1,\n "x": }', "Expecting value at line 2 column 7"),
        ],
    )
    def test_a_json_error_names_its_line_once(
        self, tmp_path: Path, data: bytes, problem: str
    ) -> None:
        """The line and column are said once, in plain words ("starting at at" was printed)."""
        path = tmp_path / "agent.json"
        path.write_bytes(data)
        Snapshot.load(path)
        [said] = recovered(path)
        assert said.startswith(f"is not JSON: {problem}")
        assert " at at " not in said

    def test_a_process_record_missing_its_hash_is_dropped_and_named(self, tmp_path: Path) -> None:
        """KeyError in _restore before: now the record is dropped, the rest is trusted."""
        path = tmp_path / "agent.json"
        doc = {"version": 1, "processes": {"db": {"pid": 1}}, "sync": {"applied": "abc"}}
        path.write_text(json.dumps(doc))
        snap = Snapshot.load(path)
        assert snap is not None and snap.processes == {}
        assert Ledger.from_json(snap.ledger).applied == "abc"
        assert snap.problems == ("processes.db: process record without the component's hash",)

    def test_a_stopping_record_round_trips(self, tmp_path: Path) -> None:
        doc = {"pid": 5, "pgid": 5, "start_ticks": 1, "version": "1", "hash": "h", "stopping": True}
        snap = Snapshot.from_json({"version": 1, "processes": {"api": doc}})
        assert snap.processes["api"].stopping
        assert snap.to_json()["processes"]["api"] == doc

    def test_a_file_over_the_bound_is_damaged(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("KEYSTONE_MAX_STATE_BYTES", "100")
        path = tmp_path / "agent.json"
        path.write_text(json.dumps({"version": 1, "plan_path": "x" * 200}))
        assert Snapshot.load(path) is None
        assert "larger than the bound of 100 bytes" in recovered(path)[0]
        assert "KEYSTONE_MAX_STATE_BYTES" in recovered(path)[0]

    def test_no_file_is_no_snapshot_and_no_report(self, tmp_path: Path) -> None:
        assert Snapshot.load(tmp_path / "agent.json") is None
        assert recovered(tmp_path / "agent.json") == []


class TestReader:
    def test_a_schema_bug_is_damage_not_a_crash(self, tmp_path: Path) -> None:
        path = tmp_path / "x.json"
        path.write_text("{}")

        def schema(doc: object) -> int:
            raise KeyError("oops")

        assert read_state(path, schema) is None
        assert "KeyError" in recovered(path)[0]

    def test_a_directory_in_place_of_a_file(self, tmp_path: Path) -> None:
        path = tmp_path / "x.json"
        path.mkdir()
        assert read_state(path, lambda d: d) is None
        assert recovered(path)

    def test_damage_raises_state_damage_from_schemas(self) -> None:
        with pytest.raises(StateDamage, match=r"journal\.attempts: expected an integer"):
            Ledger.from_json({"journal": {"revision": "a", "attempts": "two"}})


class TestHistory:
    def test_intact_records_are_kept_and_the_damaged_file_set_aside(self, tmp_path: Path) -> None:
        path = tmp_path / "history.jsonl"
        path.write_bytes(b'{"time": 1, "kind": "sync"}\n\xff\xfe garbage\n[1]\n{"time": 2}\n{"ti')
        h = History(path)
        h.check()
        assert [r["time"] for r in h.records()] == [1, 2]
        [copy] = corrupt_copies(path)
        assert b"garbage" in copy.read_bytes()
        assert "line(s) 2, 3, 5 are not JSON records (2 intact record(s) kept)" in recovered(path)

    def test_an_intact_history_is_left_as_it_is(self, tmp_path: Path) -> None:
        path = tmp_path / "history.jsonl"
        h = History(path)
        h.append({"kind": "sync"})
        before = path.read_bytes()
        h.check()
        assert path.read_bytes() == before and recovered(path) == []

    def test_records_never_raise_on_bytes_that_are_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "history.jsonl"
        path.write_bytes(b"\xff\xfe\n" + b'"just a string"\n')
        assert list(History(path).records()) == []


class TestOtherFiles:
    @pytest.mark.parametrize("data", [b"", b"\xff\xfe\xfd", b"two\ntokens\n", b"   \n"], ids=repr)
    def test_a_damaged_token_file_is_set_aside(self, tmp_path: Path, data: bytes) -> None:
        path = tmp_path / "api.token"
        path.write_bytes(data)
        assert read_token_file(path) is None
        assert recovered(path) and corrupt_copies(path)

    def test_a_good_token_is_read(self, tmp_path: Path) -> None:
        path = tmp_path / "api.token"
        path.write_text("abc-DEF_123\n")
        assert read_token_file(path) == "abc-DEF_123"

    @pytest.mark.parametrize(
        "data", [b"", b"\x00\x01", b'{"high_water": "soon"}', b'{"high_water": -5}', b"[]"]
    )
    def test_a_damaged_trust_clock_mark_is_set_aside(self, tmp_path: Path, data: bytes) -> None:
        path = tmp_path / "trust-clock.json"
        path.write_bytes(data)
        clock = TrustedClock(tmp_path, wall=lambda: 100.0, build=50.0)
        assert clock.mark() == 0.0
        assert recovered(path) and not path.exists()
        clock.observe(200.0)
        assert clock.mark() == 200.0

    def test_markers_round_trip_and_a_damaged_one_is_set_aside(self, tmp_path: Path) -> None:
        work = tmp_path / "components" / "db" / "1.0.0"
        work.mkdir(parents=True)
        record = {"runner": "process", "pid": 10, "pgid": 10, "start_ticks": 5, "cgroup": None}
        write_marker(
            work, "aa", component="db", version="1.0.0", hash="h", record=record, stop_timeout=3
        )
        bad = work / ".keystone-process-bb.json"
        bad.write_text('{"version": 1, "instance": "bb"}')
        markers = read_markers(tmp_path / "components")
        assert list(markers) == ["aa"]
        m = markers["aa"]
        assert (m.component, m.hash, m.pid, m.stop_timeout) == ("db", "h", 10, 3.0)
        assert recovered(bad) and not bad.exists()

    def test_the_anchor_is_read_loose_or_packed(self, tmp_path: Path) -> None:
        sha = "a" * 40
        assert read_anchor(tmp_path) is None
        (tmp_path / "packed-refs").write_text(f"# pack-refs\n{sha} refs/keystone/applied\n")
        assert read_anchor(tmp_path) == sha
        loose = tmp_path / "refs" / "keystone" / "applied"
        loose.parent.mkdir(parents=True)
        loose.write_text("b" * 40 + "\n")
        assert read_anchor(tmp_path) == "b" * 40
        loose.write_text("not a commit\n")
        assert read_anchor(tmp_path) is None


class TestClosedSubset:
    def test_a_dependent_is_kept_only_with_its_dependency(self) -> None:
        from keystone.plan import plan_from_json

        def comp(name: str, deps: str = "") -> dict[str, str]:
            text = f'[metadata]\nname = "{name}"\nversion = "1.0.0"\n{deps}'
            text += '\n[lifecycle.run.exec]\ncommand = "/bin/true"\n'
            return {"name": name, "recipe_ref": f"{name}.toml", "recipe_text": text}

        dep = '\n[[dependencies]]\nname = "db"\ntype = "hard"\n'
        plan = plan_from_json(
            {"components": [comp("db"), comp("api", dep), comp("tool")]}, environ={}
        )
        assert set(closed_subset(plan, ["api", "tool"]).components) == {"tool"}
        assert set(closed_subset(plan, ["api", "db"]).components) == {"api", "db"}

"""Snapshot records of the process runner: old entries (no kind) and new ones both adopt."""

from __future__ import annotations

from pathlib import Path

import pytest

from keystone.runtime.process import ProcessHandle, ProcessRecord, ProcessRunner
from keystone.runtime.runner import record_kind

#: An entry as agents wrote it before runners had kinds (``state/agent.json``).
LEGACY = {
    "pid": 4242,
    "pgid": 4242,
    "start_ticks": 991,
    "cgroup": None,
    "version": "1",
    "hash": "h",
}


class TestProcessRecord:
    @pytest.mark.parametrize(
        ("entry", "expected"),
        [
            (LEGACY, ProcessRecord(4242, 4242, 991, None)),
            ({**LEGACY, "runner": "process"}, ProcessRecord(4242, 4242, 991, None)),
            (
                {**LEGACY, "cgroup": "/sys/fs/cgroup/keystone/app.1.1"},
                ProcessRecord(4242, 4242, 991, Path("/sys/fs/cgroup/keystone/app.1.1")),
            ),
            ({**LEGACY, "cgroup": ""}, ProcessRecord(4242, 4242, 991, None)),
        ],
    )
    def test_parses(self, entry: dict[str, object], expected: ProcessRecord) -> None:
        """Old and new entries parse to the same record; agent-side keys are ignored."""
        assert ProcessRecord.from_json(entry) == expected

    @pytest.mark.parametrize(
        ("entry", "match"),
        [
            ({**LEGACY, "runner": "container"}, "not a process entry"),
            ({k: v for k, v in LEGACY.items() if k != "pgid"}, "pgid"),
            ({**LEGACY, "pid": "4242"}, "pid"),
            ({**LEGACY, "start_ticks": True}, "start_ticks"),
            ({**LEGACY, "pid": -1}, "pid"),
            ({**LEGACY, "cgroup": 3}, "cgroup"),
        ],
    )
    def test_refuses(self, entry: dict[str, object], match: str) -> None:
        """A malformed entry or one of another runner is refused with the field named."""
        with pytest.raises(ValueError, match=match):
            ProcessRecord.from_json(entry)

    def test_round_trip_keeps_the_old_shape(self) -> None:
        """The written entry has every key old agents read, plus the kind."""
        record = ProcessRecord(7, 7, 123, Path("/cg/app"))
        data = record.to_json()
        assert data == {
            "runner": "process",
            "pid": 7,
            "pgid": 7,
            "start_ticks": 123,
            "cgroup": "/cg/app",
        }
        assert ProcessRecord.from_json(data) == record
        assert record.kind == record_kind(data) == record_kind(LEGACY) == "process"


class TestAdoptRecord:
    def test_describe(self) -> None:
        """``describe`` gives the record of a handle."""
        runner = ProcessRunner()
        handle = ProcessHandle("app", 10, 9, 55, None)
        assert runner.describe(handle) == ProcessRecord(10, 9, 55, None)

    @pytest.mark.parametrize(
        "entry",
        [
            {**LEGACY, "runner": "container"},
            {**LEGACY, "pid": "x"},
            # A pid above the kernel's maximum (4194304) names no process.
            {**LEGACY, "pid": 1 << 23, "pgid": 1 << 23},
        ],
    )
    def test_nothing_to_adopt(self, entry: dict[str, object]) -> None:
        """Another runner's entry, a malformed one and a gone process all give None."""
        runner = ProcessRunner()
        try:
            assert runner.adopt_record("app", entry) is None
        finally:
            runner.close()

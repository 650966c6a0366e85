"""The snapshot writer spares the flash: no write for an unchanged snapshot, one write for a
burst of changes, quiet polls batched, and ``now`` always writes a real change at once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from keystone.ledger import Snapshot
from keystone.node import SnapshotSaver


def snap(rev: str = "a" * 40, *, sync_time: float = 1.0, result: str = "unchanged") -> Snapshot:
    return Snapshot(
        plan={"components": []},
        ledger={
            "applied": rev,
            "last_sync": {"time": sync_time, "result": result, "duration": 0.1},
        },
        saved_at=sync_time,
    )


async def settled(saver: SnapshotSaver) -> None:
    """Wait (on the loop, bounded) until no write is scheduled sooner than the quiet delay."""
    for _ in range(1000):
        if saver._handle is None or saver._due - saver._written_at >= saver.quiet - 1:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the scheduled write never ran")


class TestSnapshotSaver:
    def test_unchanged_is_not_written(self, tmp_path: Path) -> None:
        """The same state (only saved_at differs) is written once."""
        saver = SnapshotSaver(tmp_path / "agent.json", batch=0.01, quiet=3600)
        saver.now(snap())
        saver.now(Snapshot(**{**snap().__dict__, "saved_at": 99.0}))
        assert saver.writes == 1
        doc = json.loads((tmp_path / "agent.json").read_text())
        assert doc["sync"]["applied"] == "a" * 40

    def test_a_deleted_file_is_written_again(self, tmp_path: Path) -> None:
        """An unchanged state is written again when the file is gone."""
        saver = SnapshotSaver(tmp_path / "agent.json", batch=0.01, quiet=3600)
        saver.now(snap())
        (tmp_path / "agent.json").unlink()
        saver.now(snap())
        assert saver.writes == 2 and (tmp_path / "agent.json").exists()

    def test_burst_is_one_write_and_quiet_polls_wait(self, tmp_path: Path) -> None:
        """A burst of changes in one turn is one write; a change of the last sync's time alone
        waits for the quiet delay; a real change after it is written within the batch."""
        saver = SnapshotSaver(tmp_path / "agent.json", batch=0.02, quiet=3600)
        state = {"rev": "a" * 40, "t": 1.0, "result": "unchanged"}

        def build() -> Snapshot:
            return snap(str(state["rev"]), sync_time=float(state["t"]), result=str(state["result"]))

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for i in range(100):
                state["rev"] = f"{i:040d}"
                saver.soon(loop, build)
            await settled(saver)
            assert saver.writes == 1
            for t in range(2, 50):  # quiet polls
                state["t"] = float(t)
                saver.soon(loop, build)
                await settled(saver)
            assert saver.writes == 1
            state["result"] = "unreachable"  # a real change
            saver.soon(loop, build)
            await settled(saver)
            assert saver.writes == 2
            saver.now(build())  # nothing new
            assert saver.writes == 2

        asyncio.run(main())
        doc = json.loads((tmp_path / "agent.json").read_text())
        assert doc["sync"]["last_sync"]["result"] == "unreachable"
        assert doc["sync"]["applied"] == f"{99:040d}"

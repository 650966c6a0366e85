"""Fuzzing the state readers: the snapshot (with its plan and ledger), the history, the API
token, the trust clock mark and the process markers.

The property, for every damaged file: the reader returns a trusted value or sets the file aside
(None); it never raises, and what it returns is what the agent then uses without a traceback
(the snapshot's ledger and plan are read as ``Node.restore`` reads them).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keystone.api.auth import read_token_file
from keystone.errors import KeystoneError
from keystone.ledger import Ledger, Snapshot
from keystone.plan import plan_from_json
from keystone.runtime.clock import TrustedClock
from keystone.runtime.markers import read_markers
from keystone.state import History
from tests.fuzz.conftest import EXAMPLES
from tests.unit.test_ledger import OLD_SNAPSHOT

pytestmark = pytest.mark.fuzz

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_docs(draw: st.DrawFn, doc: Any) -> bytes:
    """``doc`` with one value replaced, one key removed, or its JSON text cut or garbled."""
    doc = json.loads(json.dumps(doc))
    how = draw(st.sampled_from(["replace", "delete", "truncate", "bytes"]))
    text = json.dumps(doc).encode()
    if how == "truncate":
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if how == "bytes":
        return draw(st.binary(max_size=200))
    path = draw(st.sampled_from(_paths(doc)))
    if not path:
        return json.dumps(draw(JSON_VALUES)).encode()
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if how == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return json.dumps(doc).encode()


SNAPSHOT = {
    **OLD_SNAPSHOT,
    "plan": {
        "sources": ["plans/default.toml"],
        "components": [
            {
                "name": "db",
                "recipe_ref": "db.toml",
                "origin": "plans/default.toml",
                "recipe_source": "db.toml",
                "recipe_text": '[metadata]\nname = "db"\nversion = "1.0.0"\n\n'
                '[lifecycle.run.exec]\ncommand = "/bin/true"\n',
            }
        ],
    },
}


@given(mutated_docs(SNAPSHOT))
def test_a_damaged_snapshot_never_raises(data: bytes) -> None:
    EXAMPLES["state: snapshot"] += 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "agent.json"
        path.write_bytes(data)
        snap = Snapshot.load(path)
        if snap is None:
            assert not path.exists()
            return
        Ledger.from_json(snap.ledger)
        if snap.plan:
            with contextlib.suppress(KeystoneError):  # Node.restore sets the file aside then
                plan_from_json(snap.plan, environ={})


@given(st.lists(mutated_docs({"time": 1.0, "kind": "sync", "result": "applied"}), max_size=5))
def test_a_damaged_history_never_raises(lines: list[bytes]) -> None:
    EXAMPLES["state: history"] += 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "history.jsonl"
        path.write_bytes(b"\n".join(lines))
        h = History(path)
        h.check()
        assert all(isinstance(r, dict) for r in h.records())
        h.newest(10)


@given(st.binary(max_size=300))
def test_a_damaged_token_or_clock_never_raises(data: bytes) -> None:
    EXAMPLES["state: token, clock"] += 1
    with tempfile.TemporaryDirectory() as d:
        token = Path(d) / "api.token"
        token.write_bytes(data)
        got = read_token_file(token)
        assert got is None or (got and not any(c.isspace() for c in got))
        (Path(d) / "trust-clock.json").write_bytes(data)
        assert TrustedClock(Path(d), wall=lambda: 1.0, build=0.0).mark() >= 0.0


MARKER = {
    "version": 1,
    "instance": "aa",
    "component": "db",
    "component_version": "1.0.0",
    "hash": "h",
    "record": {"runner": "process", "pid": 1, "pgid": 1, "start_ticks": 1, "cgroup": None},
    "stop_timeout": 3.0,
    "started": 1.0,
}


@given(mutated_docs(MARKER))
def test_a_damaged_marker_never_raises(data: bytes) -> None:
    EXAMPLES["state: marker"] += 1
    with tempfile.TemporaryDirectory() as d:
        work = Path(d) / "components" / "db" / "1.0.0"
        work.mkdir(parents=True)
        (work / ".keystone-process-aa.json").write_bytes(data)
        for m in read_markers(Path(d) / "components").values():
            assert isinstance(m.pid, int) and isinstance(m.stop_timeout, float)

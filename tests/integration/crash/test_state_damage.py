"""The state-damage table: each state file truncated, emptied, random bytes, wrong types,
replaced by an older copy, deleted, under a real agent that is SIGKILLed and restarted.

Every time the agent starts; what can be told from an intact file is reported (a WARNING line
naming the file, a ``damaged state`` entry in status, ``keystone_state_recovered_total{file}``)
and the damaged file is kept aside; and nothing older than the newest verified revision runs.
"""

from __future__ import annotations

import json
import random
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until

from .campaign import COMPONENTS, component_processes, fleet_revision, sync_once

pytestmark = pytest.mark.integration

FILES = {
    "agent.json": "state/agent.json",
    "history.jsonl": "state/history.jsonl",
    "trust-clock.json": "state/trust-clock.json",
    "api.token": "api.token",
}
KINDS = ("truncated", "emptied", "random", "wrong-types", "older", "deleted")
WRONG_TYPES = {
    "agent.json": json.dumps(
        {"version": 1, "plan": {"components": 3}, "processes": {"db": {"pid": "x"}}, "sync": []}
    ).encode(),
    "history.jsonl": b'[1, 2]\n"a string"\n',
    "trust-clock.json": json.dumps({"high_water": "soon"}).encode(),
    "api.token": b"two\ntokens\n",
}
NOT_TOLD = {
    # A cut random token is still a token; an older copy of one is another valid token: both are
    # served as they are (clients read the file).
    ("api.token", "truncated"),
    ("api.token", "older"),
    # The mark lags by design; an older one is raised to the snapshot's time without a word,
    # and a missing one is the normal state of an agent that never judged a certificate.
    ("trust-clock.json", "older"),
    ("trust-clock.json", "deleted"),
}


def damage(path: Path, kind: str, older: bytes, rng: random.Random) -> None:
    data = path.read_bytes() if path.exists() else b""
    if kind == "truncated":
        path.write_bytes(data[: max(1, len(data) // 2)])
    elif kind == "emptied":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(max(64, len(data)))) + b"\xff")
    elif kind == "wrong-types":
        path.write_bytes(WRONG_TYPES[path.name])
    elif kind == "older":
        path.write_bytes(older)
    elif kind == "deleted":
        path.unlink(missing_ok=True)


def metrics(agent: Any) -> str:
    req = urllib.request.Request(
        agent.addr + "/metrics", headers={"Authorization": f"Bearer {agent.token()}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        text: str = r.read().decode()
        return text


def converged_on(agent: Any, rev: str, version: str) -> None:
    """The newest verified revision runs: one process per component, all at its version."""

    def check() -> bool:
        code, info = agent.api("GET", "/v1/revision")
        if code != 200 or info.get("applied") != rev:
            return False
        comps = agent.components()
        return all(
            comps.get(c, {}).get("phase") == "healthy" and comps[c]["version"] == version
            for c in COMPONENTS
        )

    wait_until(check, timeout=40, what=f"{rev[:12]} ({version}) applied and healthy")
    procs = component_processes(agent.runtime)
    assert {c: [v for _, v in procs.get(c, [])] for c in COMPONENTS} == {
        c: [version] for c in COMPONENTS
    }, procs


GROUPS = {
    # The snapshot alone: the others' checks lean on it (the history's "older" on its last sync).
    "snapshot": ("agent.json",),
    "others": ("history.jsonl", "trust-clock.json", "api.token"),
}


@pytest.mark.parametrize("group", list(GROUPS))
def test_damaged_state_file_is_reported_and_nothing_older_runs(
    group: str, signed_fleet: Any, make_agent: Any, tmp_path: Path
) -> None:
    """Each damage in turn: the agent starts, reports it, runs the newest verified revision."""
    names = GROUPS[group]
    rng = random.Random(group)
    fleet = signed_fleet
    agent = make_agent("--config", str(fleet.agent_config(tmp_path / "agent.toml")))
    paths = {n: agent.runtime / FILES[n] for n in names}
    clock = agent.runtime / "state" / "trust-clock.json"
    old = fleet_revision(fleet, "1.0.0")
    agent.start()
    assert sync_once(agent)["result"] == "applied"
    if not clock.exists():  # only judging a certificate writes it; give it one to damage
        clock.write_text(json.dumps({"high_water": 1.7e9, "utc": "2023-11-14T22:13:20Z"}))
    wait_until(
        lambda: old in (agent.runtime / "state" / "agent.json").read_text(), what="snapshot saved"
    )
    older = {n: p.read_bytes() for n, p in paths.items()}
    new = fleet_revision(fleet, "1.1.0")
    assert sync_once(agent)["result"] == "applied"
    converged_on(agent, new, "1.1.0")
    passed = 0
    for kind in KINDS:
        seen = len(fleet.started())
        agent.stop(signal.SIGKILL)
        for n, path in paths.items():
            damage(path, kind, older[n], rng)
        agent.start()
        converged_on(agent, new, "1.1.0")
        # Nothing older ever started, not even for a moment at boot.
        assert [s["version"] for s in fleet.started()[seen:] if s["version"] != "1.1.0"] == []
        status, plan = agent.api("GET", "/v1/plan/status")
        assert status == 200, plan
        text = metrics(agent)
        for n, path in paths.items():
            damaged = [d for d in plan["damagedState"] if d["path"] == str(path)]
            if (n, kind) in NOT_TOLD:
                assert not damaged, (n, kind, damaged)
            else:
                assert damaged, (n, kind, plan["damagedState"], agent.output())
                assert f"state file {path}" in agent.output(), (n, kind)
                assert f'keystone_state_recovered_total{{file="{n}"}}' in text, (n, kind)
                moved = damaged[0]["moved_to"]
                assert moved is None or Path(moved).exists(), damaged
            passed += 1
    assert passed == len(KINDS) * len(names)
    shown = agent.cli("status")
    assert shown.returncode == 0, shown.stderr
    assert "damaged state: " in shown.stdout, shown.stdout

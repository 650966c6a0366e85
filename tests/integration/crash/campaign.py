"""The crash campaign: SIGKILL a real agent at seeded random instants of a deployment.

Each run commits a new revision of a two-component fleet (``db`` and ``api``, ``api`` with a
hard dependency on ``db``, both at a new version), starts a sync, SIGKILLs the agent after a
random delay (so the kill lands in fetch, artifact preparation, stop, start or soak), restarts
it, syncs once more and then counts what runs, from ``/proc``: every process the agent spawned
carries ``KEYSTONE_INSTANCE`` and a ``KEYSTONE_WORKDIR`` under the agent's runtime dir.

A run is *converged* when each component has exactly one process, all of them run one version
(one revision) and ``keystone status --revision`` names the revision of that version; *mixed*
when the processes run versions of different revisions; *duplicates* when a component has more
than one process. ``tests/integration/crash/test_crash_campaign.py`` runs it in the suite and
``scripts/crash-campaign --runs N`` runs it longer.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import wait_until

COMPONENTS = ("db", "api")


@dataclass
class Outcome:
    """One run: when the agent was killed and what was found after the restart."""

    run: int
    delay: float
    revision: str
    versions: dict[str, list[str]]
    applied: str | None
    expected_version: str | None
    phase: str = "?"

    @property
    def duplicates(self) -> bool:
        return any(len(v) > 1 for v in self.versions.values())

    @property
    def mixed(self) -> bool:
        return len({v for vs in self.versions.values() for v in vs}) > 1

    @property
    def converged(self) -> bool:
        running = {v for vs in self.versions.values() for v in vs}
        return (
            all(len(self.versions.get(c, [])) == 1 for c in COMPONENTS)
            and len(running) == 1
            and running == {self.expected_version}
        )


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "runs": len(self.outcomes),
            "converged": sum(o.converged for o in self.outcomes),
            "mixed": sum(o.mixed for o in self.outcomes),
            "duplicates": sum(o.duplicates for o in self.outcomes),
            "phases": dict(Counter(o.phase for o in self.outcomes)),
        }


def component_processes(runtime: Path) -> dict[str, list[tuple[int, str]]]:
    """``{component: [(pid, version)]}`` of the live processes the agent at ``runtime`` spawned."""
    root = str((runtime / "components").resolve()) + os.sep
    found: dict[str, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state in ("Z", "X"):
            continue
        env = dict(
            item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item
        )
        if "KEYSTONE_INSTANCE" in env and env.get("KEYSTONE_WORKDIR", "").startswith(root):
            found.setdefault(env.get("KEYSTONE_COMPONENT", "?"), []).append(
                (int(entry), env.get("KEYSTONE_VERSION", ""))
            )
    return found


PHASES = ("fetch", "prepare", "stop", "start", "soak")


def fleet_revision(fleet: Any, version: str) -> str:
    """Commit (signed) and push a revision where db and api both run ``version``.

    Each carries a repo-relative artifact (so every deployment prepares artifacts), and api
    takes half a second to stop gracefully (so a kill can land while it stops).
    """
    files: dict[str, str | None] = {"plans/default.toml": fleet.plan("db", "api")}
    for name in COMPONENTS:
        data = f"{name} {version}\n" * 4096
        artifact = f"artifacts/{name}/data-{version}.txt"
        files[artifact] = data
        recipe = fleet.recipe(
            name,
            version=version,
            deps=[("db", "hard")] if name == "api" else None,
            args=["--term-delay", "0.5"] if name == "api" else None,
        )
        digest = hashlib.sha256(data.encode()).hexdigest()
        files[f"recipes/{name}.recipe.toml"] = (
            recipe + f'\n[[artifacts]]\nuri = "{artifact}"\nsha256 = "{digest}"\n'
        )
    return str(fleet.commit(files, f"db and api {version}"))


def sync_once(agent: Any) -> dict[str, Any]:
    """``sync --once --json``; while the restarted agent is still restoring, asked again."""

    def attempt() -> dict[str, Any] | None:
        r = agent.cli("sync", "--once", "--json")
        if "still starting" in r.stderr + r.stdout:
            return None
        try:
            out: dict[str, Any] = json.loads(r.stdout)
        except json.JSONDecodeError:
            raise AssertionError(
                f"sync printed no JSON ({r.returncode}): {r.stdout}{r.stderr}"
            ) from None
        return out

    return wait_until(attempt, timeout=60, what="a sync the agent accepts")


def status_revision(agent: Any) -> dict[str, Any]:
    """``status --revision --json`` (asked again while the agent is still restoring)."""

    def attempt() -> dict[str, Any] | None:
        r = agent.cli("status", "--revision", "--json")
        if "still starting" in r.stderr:
            return None
        assert r.returncode == 0, r.stderr
        out: dict[str, Any] = json.loads(r.stdout)
        return out

    return wait_until(attempt, timeout=60, what="status --revision")


def phase_of(log: str, old: str, new: str, journaled: bool) -> str:
    """Where the deployment from ``old`` to ``new`` was when the agent died (from its log)."""
    started = {c: f"{c} {new}: pending -> starting" in log for c in COMPONENTS}
    healthy = {c: f"{c} {new}: starting -> healthy" in log for c in COMPONENTS}
    if all(healthy.values()):
        return "soak"
    if any(started.values()):
        return "start"
    if any(f"{c} {old}: healthy -> stopping" in log for c in COMPONENTS):
        return "stop"
    return "prepare" if journaled else "fetch"


def journaled(runtime: Path, rev: str) -> bool:
    """The snapshot journals a deployment of ``rev`` (fetched and verified; preparing)."""
    try:
        doc = json.loads((runtime / "state" / "agent.json").read_text())
    except (OSError, ValueError):
        return False
    journal = (doc.get("sync") or {}).get("journal") or {}
    return isinstance(journal, dict) and journal.get("revision") == rev


def wait_for_phase(agent: Any, phase: str, old: str, new: str, rev: str) -> bool:
    """Wait until the deployment of ``rev`` reaches ``phase`` (False: it ended first)."""
    marks = {
        "stop": f"api {old}: healthy -> stopping",
        "start": f"db {new}: pending -> starting",
        "soak": f"api {new}: starting -> healthy",
    }

    def reached() -> bool:
        if phase == "prepare":
            return journaled(agent.runtime, rev)
        return marks[phase] in agent.output()

    try:
        wait_until(reached, timeout=30, what=f"the deployment to reach {phase}")
    except AssertionError:
        return False
    return True


def one_run(
    fleet: Any, agent: Any, run: int, rng: random.Random, revs: dict[str, str], old: str
) -> Outcome:
    """Commit a new revision, kill the agent somewhere in its deployment, restart, converge."""
    version = f"2.{run}.0"
    rev = fleet_revision(fleet, version)
    revs[rev] = version
    aim = rng.choice(PHASES)
    delay = rng.uniform(0.0, 0.4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "keystone", "sync", "--once", "--json"],
        cwd=agent.cwd,
        env={**os.environ, "KEYSTONE_ADDR": agent.addr, "KEYSTONE_RUNTIME": str(agent.runtime)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if aim == "fetch":
        delay += 0.4  # the CLI's own start, then into the sync worker's fetch
    else:
        wait_for_phase(agent, aim, old, version, rev)
    time.sleep(delay)  # the kill instant within the phase is what is drawn at random
    agent.stop(signal.SIGKILL)
    proc.wait(60)
    phase = phase_of(agent.output(), old, version, journaled(agent.runtime, rev))
    agent.start()
    out = sync_once(agent)
    assert out.get("result") in ("applied", "up-to-date", "known-bad"), out
    applied = status_revision(agent).get("applied")
    expected = revs.get(applied or "")
    if expected is not None:
        agent.wait_states({c: "healthy" for c in COMPONENTS}, timeout=40)
    versions = {c: [v for _, v in ps] for c, ps in component_processes(agent.runtime).items()}
    return Outcome(run, delay, rev, versions, applied, expected, phase)


def campaign(fleet: Any, agent: Any, runs: int, seed: int) -> Tally:
    """``runs`` crash runs against one agent (started and synced to a first revision here)."""
    rng = random.Random(seed)
    revs: dict[str, str] = {fleet_revision(fleet, "1.0.0"): "1.0.0"}
    agent.start()
    out = sync_once(agent)
    assert out["result"] == "applied", out
    agent.wait_states({c: "healthy" for c in COMPONENTS})
    tally = Tally()
    old = "1.0.0"
    for run in range(runs):
        outcome = one_run(fleet, agent, run, rng, revs, old)
        old = outcome.expected_version or old
        tally.outcomes.append(outcome)
        print(
            f"run {run}: killed after {outcome.delay:.2f}s in {outcome.phase}; applied "
            f"{(outcome.applied or '-')[:12]}; running {outcome.versions}; "
            + ("converged" if outcome.converged else "NOT converged"),
            flush=True,
        )
    print("crash campaign:", json.dumps(tally.summary()), flush=True)
    return tally


def wait_gone(runtime: Path, timeout: float = 30.0) -> None:
    """Wait until nothing the agent spawned runs any more."""
    wait_until(lambda: not component_processes(runtime), timeout=timeout, what="components gone")

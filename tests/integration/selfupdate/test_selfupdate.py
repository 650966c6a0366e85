"""The agent updating itself from a real wheel: handover, rollback, SIGKILL at its instants.

Each test runs a real agent (``python -m keystone agent``) supervising a real process, then
applies a plan that pins the agent to a wheel of this repository at another version. The new
agent runs from ``<runtime>/agent/<version>/`` (a venv made by the old one, offline).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import keystone
from keystone.runtime.process import pgid_members
from tests.conftest import free_port, wait_until
from tests.integration.agent.conftest import AgentProc
from tests.integration.artifacts.conftest import Pki
from tests.integration.selfupdate.conftest import Wheel, agent_recipe

pytestmark = pytest.mark.integration

OLD = keystone.__version__


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def agents_of(runtime: Path) -> list[int]:
    """Every live agent process of ``runtime`` (workers and components are not agents)."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        argv = cmdline(int(p))
        if "agent" in argv and str(runtime) in argv and _alive(int(p)):
            out.append(int(p))
    return sorted(out)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def sleepers(marker: str) -> list[int]:
    return sorted(
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit() and cmdline(int(p))[-1:] == [marker] and _alive(int(p))
    )


class NotifySocket:
    """A ``$NOTIFY_SOCKET`` as systemd's: a datagram socket, drained by a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while not self.closed.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        self.thread.join(5)
        self.sock.close()


class Device:
    """One runtime dir, its agent (whatever process serves it now) and its files."""

    def __init__(self, tmp_path: Path, wheel: Wheel, env: dict[str, str]) -> None:
        self.dir = tmp_path
        self.wheel = wheel
        self.marker = f"{random.randrange(10**9)}"
        self.agent = AgentProc(tmp_path, tmp_path / "runtime", free_port(), [], env)
        self.extra: list[subprocess.Popen[bytes]] = []
        (tmp_path / "sleeper.recipe.toml").write_text(
            '[metadata]\nname = "sleeper"\nversion = "1"\n[lifecycle.run.exec]\n'
            f'command = "sleep"\nargs = ["3600", "{self.marker}"]\n'
        )
        (tmp_path / "agent.recipe.toml").write_text(agent_recipe(wheel))
        (tmp_path / "plan1.toml").write_text(
            '[[components]]\nname = "sleeper"\nrecipe = "sleeper.recipe.toml"\n'
        )
        (tmp_path / "plan2.toml").write_text(
            '[[components]]\nname = "sleeper"\nrecipe = "sleeper.recipe.toml"\n'
            '[[components]]\nname = "keystone"\nrecipe = "agent.recipe.toml"\n'
        )

    @property
    def runtime(self) -> Path:
        return self.agent.runtime

    def start(self) -> dict[str, Any]:
        """The old agent running the sleeper; returns its components."""
        self.agent.start()
        done = self.agent.cli("apply", str(self.dir / "plan1.toml"))
        assert done.returncode == 0, done.stdout + done.stderr
        return self.agent.wait_states({"sleeper": "healthy"})

    def pin_agent(self) -> None:
        done = self.agent.cli("apply", str(self.dir / "plan2.toml"), "--no-wait")
        assert done.returncode == 0, done.stdout + done.stderr

    def handover(self) -> dict[str, Any] | None:
        try:
            doc = json.loads((self.runtime / "agent" / "handover.json").read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def state(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(
                (self.runtime / "agent" / "selfupdate.json").read_text()
            )
        except (OSError, ValueError):
            return {}
        return doc

    def sleeper_pid(self) -> int:
        """The sleeper's pid once the agent lists it: an agent answers /healthz before it has
        restored (adopted) its components."""
        pid: int = wait_until(
            lambda: self.agent.components().get("sleeper", {}).get("pid"),
            timeout=30,
            what="the sleeper listed with its pid",
        )
        return pid

    def serving(self, version: str) -> dict[str, Any] | None:
        h = self.agent.healthz()
        return h if h is not None and h.get("version") == version else None

    def settled(self, version: str, timeout: float = 60) -> int:
        """Wait until exactly one agent serves, as ``version``, with no handover going on."""

        def check() -> int | None:
            if self.serving(version) is None or self.handover() is not None:
                return None
            pids = agents_of(self.runtime)
            return pids[0] if len(pids) == 1 else None

        pid = wait_until(check, timeout=timeout, what=f"one agent serving {version}")
        assert agents_of(self.runtime) == [pid]
        return pid

    def start_from(self, install: Path | None) -> int:
        """Start an agent as a supervisor would: ``install``'s ``keystone`` (``current``), or
        the original one; return its pid."""
        argv = (
            [str(install / "bin" / "python"), str(install / "bin" / "keystone")]
            if install is not None
            else [sys.executable, "-m", "keystone"]
        )
        env = {**os.environ, **self.agent.env}
        log = self.dir / f"agent-restart-{len(list(self.dir.glob('agent-*.log')))}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*argv, "agent", "--http", f"127.0.0.1:{self.agent.port}", "--runtime",
                 str(self.runtime)],
                cwd=self.dir, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.extra.append(proc)
        return proc.pid

    def history(self) -> list[dict[str, Any]]:
        lines = (self.runtime / "state" / "history.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if x.strip()]

    def output(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("agent-*.log")))

    def teardown(self) -> None:
        for pid in agents_of(self.runtime):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not agents_of(self.runtime), timeout=30, what="agents gone")
        for pid in agents_of(self.runtime):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.agent.proc is not None and self.agent.proc.poll() is None:
            self.agent.proc.kill()
        for proc in [self.agent.proc, *self.extra]:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        for pid in sleepers(self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)


@pytest.fixture
def device(
    tmp_path: Path,
    agent_wheels: Callable[[str], Wheel],
    agent_installs: Callable[[str], Path],
) -> Iterator[Callable[..., Device]]:
    """``device(kind, soak, preinstalled=False, **env)``; ``preinstalled``: the new version is
    already installed (the handover is under test, not the install)."""
    made: list[Device] = []

    def make(
        kind: str = "good", soak: str = "1s", preinstalled: bool = False, **env: str
    ) -> Device:
        d = Device(
            tmp_path,
            agent_wheels(kind),
            {"KEYSTONE_SELFUPDATE_SOAK": soak, "KEYSTONE_SELFUPDATE_START_TIMEOUT": "20s", **env},
        )
        if preinstalled:
            src = agent_installs(kind)
            shutil.copytree(src, d.runtime / "agent" / src.name, symlinks=True)
        made.append(d)
        return d

    yield make
    for d in made:
        d.teardown()


def test_update_to_a_good_version_keeps_every_process(
    device: Callable[..., Device], signers: Pki, tmp_path: Path
) -> None:
    """A signed wheel, and an agent that accepts signed artifacts only: the new agent adopts
    the sleeper (same pid), serves as the new version, is `current`."""
    notify = NotifySocket(tmp_path / "notify.sock")
    d = device(
        "good",
        KEYSTONE_TRUST_BUNDLE=str(signers.cert("ca")),
        NOTIFY_SOCKET=str(notify.path),
        WATCHDOG_USEC="2000000",
    )
    (d.dir / "agent.toml").write_text("[trust]\nallow_unsigned_artifacts = false\n")
    d.agent.args = ["--config", str(d.dir / "agent.toml")]
    sig = signers.sign("leaf", d.wheel.path)
    (d.dir / "agent.recipe.toml").write_text(agent_recipe(d.wheel, sig, signers.cert("leaf")))
    before = d.start()["sleeper"]["pid"]
    old_pid = d.agent.proc.pid if d.agent.proc else 0
    d.pin_agent()
    pid = d.settled(d.wheel.version)
    assert pid != old_pid
    assert d.agent.proc is not None and d.agent.proc.wait(30) == 0  # the guardian left
    after = d.agent.components()["sleeper"]
    assert after["pid"] == before and after["phase"] == "healthy"
    assert sleepers(d.marker) == [before]
    assert cmdline(pid)[1] == str(d.runtime / "agent" / d.wheel.version / "bin" / "keystone")
    assert os.readlink(d.runtime / "agent" / "current") == d.wheel.version
    status = d.agent.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["health"]["version"] == d.wheel.version
    health = d.agent.healthz()
    assert health is not None and health["self_update"]["last"]["result"] == "ok"
    events = [e for e in d.history() if e.get("kind") == "self-update"]
    assert events[-1]["result"] == "ok" and events[-1]["to"] == d.wheel.version
    out = d.output()
    assert "ready" in out and "after the old one stopped serving" in out
    # What systemd is told (NotifyAccess=main): the guardian hands the unit's main process
    # to the new agent, which then says READY itself and keeps pinging the watchdog.
    wait_until(
        lambda: any(f"MAINPID={pid}" in m and "READY=1" in m for m in notify.messages),
        timeout=20,
        what="READY=1 from the new agent",
    )
    handed = [i for i, m in enumerate(notify.messages) if m.startswith(f"MAINPID={pid}\n")]
    assert handed, notify.messages
    # the first ping comes within half the watchdog timeout of READY, not with it
    wait_until(
        lambda: any(m == "WATCHDOG=1" for m in notify.messages[handed[0] :]),
        timeout=20,
        what="a watchdog ping from the new agent",
    )
    notify.close()

    # SIGKILL the new agent: the next one started from `current` is the new version again.
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not agents_of(d.runtime), timeout=20, what="agent gone")
    assert sleepers(d.marker) == [before]
    pid = d.start_from(d.runtime / "agent" / "current")
    assert d.settled(d.wheel.version) == pid
    assert d.sleeper_pid() == before


def test_a_wheel_that_fails_its_signature_changes_nothing(
    device: Callable[..., Device], signers: Pki
) -> None:
    """Signed by a CA the device does not trust: the plan is refused before anything is
    installed or stopped, and the old agent goes on serving."""
    d = device("good", KEYSTONE_TRUST_BUNDLE=str(signers.cert("ca")))
    sig = signers.sign("rogue", d.wheel.path)
    (d.dir / "agent.recipe.toml").write_text(agent_recipe(d.wheel, sig, signers.cert("rogue")))
    before = d.start()["sleeper"]["pid"]
    assert d.agent.proc is not None
    done = d.agent.cli("apply", str(d.dir / "plan2.toml"))
    assert done.returncode != 0
    assert "sign with a certificate from a trusted CA" in done.stdout + done.stderr
    assert "keystone_agent" in done.stdout + done.stderr
    assert d.settled(OLD) == d.agent.proc.pid
    assert d.sleeper_pid() == before
    assert not (d.runtime / "agent" / d.wheel.version).exists()
    assert "new agent started" not in d.output()


@pytest.mark.parametrize("kind", ["exits", "no-healthz"])
def test_update_to_a_broken_version_rolls_back(device: Callable[..., Device], kind: str) -> None:
    """A new agent that exits at start, or never answers /healthz: the old one takes its
    processes back (same pid, restarted in place), and the version is marked failed."""
    d = device(kind, preinstalled=kind == "no-healthz", KEYSTONE_SELFUPDATE_START_TIMEOUT="8s")
    before = d.start()["sleeper"]["pid"]
    assert d.agent.proc is not None
    old_pid = d.agent.proc.pid
    d.pin_agent()
    wait_until(
        lambda: d.state().get("last", {}).get("result") == "failed",
        timeout=60,
        what="the self-update recorded failed",
    )
    assert d.settled(OLD) == old_pid  # the old agent, restarted in place
    assert d.sleeper_pid() == before
    assert sleepers(d.marker) == [before]
    last = d.state()["last"]
    assert last["to"] == d.wheel.version
    why = "exited before it was ready" if kind == "exits" else "/healthz did not answer"
    assert why in last["reason"]
    assert d.wheel.version in json.dumps(d.state()["failed"])
    events = [e for e in d.history() if e.get("kind") == "self-update"]
    assert events[-1]["result"] == "failed" and why in events[-1]["reason"]
    assert not (d.runtime / "agent" / "current").exists()
    # It is not tried again on its own: one start of the new agent, ever.
    assert d.output().count("new agent started") == 1


def _trial_serving(d: Device) -> dict[str, Any] | None:
    h = d.handover()
    if h is None or h.get("phase") != "trial" or d.serving(d.wheel.version) is None:
        return None
    return h


def test_sigkill_old_agent_during_the_trial(device: Callable[..., Device]) -> None:
    """The guardian dies mid-soak: the new agent gives the processes back to the old version
    (it runs it in its own process); one agent, nothing restarted, the update marked failed."""
    d = device("good", soak="60s", preinstalled=True)
    before = d.start()["sleeper"]["pid"]
    d.pin_agent()
    h = wait_until(lambda: _trial_serving(d), timeout=60, what="the new agent on trial")
    assert d.agent.proc is not None
    d.agent.proc.kill()
    d.agent.proc.wait(10)
    pid = d.settled(OLD)
    assert pid == h["trial"]  # the trial process now runs the previous agent
    assert d.sleeper_pid() == before
    assert sleepers(d.marker) == [before]
    assert "interrupted" in d.state()["last"]["reason"]


def test_under_systemd_a_trial_without_guardian_exits_for_the_unit_restart(
    device: Callable[..., Device], tmp_path: Path
) -> None:
    """With $NOTIFY_SOCKET (systemd), the new agent whose guardian died before the commit
    exits, leaving the processes; the unit's restart (here: the test) runs the previous
    version, which adopts them."""
    notify = NotifySocket(tmp_path / "notify.sock")
    d = device("good", soak="60s", preinstalled=True, NOTIFY_SOCKET=str(notify.path))
    before = d.start()["sleeper"]["pid"]
    d.pin_agent()
    h = wait_until(lambda: _trial_serving(d), timeout=60, what="the new agent on trial")
    assert d.agent.proc is not None
    d.agent.proc.kill()
    d.agent.proc.wait(10)
    wait_until(lambda: not agents_of(d.runtime), timeout=30, what="the trial agent to exit")
    # its command line goes with its memory, a moment before the process itself is gone
    wait_until(lambda: not _alive(int(h["trial"])), timeout=30, what="the trial agent gone")
    assert sleepers(d.marker) == [before]
    d.start_from(None)  # Restart=on-failure; `current` was never switched
    d.settled(OLD)
    assert d.sleeper_pid() == before
    assert "interrupted" in d.state()["last"]["reason"]
    notify.close()


def test_sigkill_new_agent_during_the_trial(device: Callable[..., Device]) -> None:
    """The new agent dies mid-soak: the old one restarts in place and re-adopts."""
    d = device("good", soak="60s", preinstalled=True)
    before = d.start()["sleeper"]["pid"]
    assert d.agent.proc is not None
    old_pid = d.agent.proc.pid
    d.pin_agent()
    h = wait_until(lambda: _trial_serving(d), timeout=60, what="the new agent on trial")
    os.kill(h["trial"], signal.SIGKILL)
    assert d.settled(OLD) == old_pid
    assert d.sleeper_pid() == before
    assert sleepers(d.marker) == [before]
    # Killed once it answered /healthz: before it told its guardian it was ready, before the
    # guardian's own /healthz check, or during the soak.
    reason = d.state()["last"]["reason"]
    assert any(
        why in reason
        for why in ("exited during its soak", "exited before it was ready", "did not answer")
    ), reason


def test_sigkill_old_agent_before_the_new_one_serves(device: Callable[..., Device]) -> None:
    """Killed the moment the new agent is started (it has not taken the lock yet): the new
    one finds no guardian and runs the previous agent instead of serving."""
    d = device("good", preinstalled=True)
    before = d.start()["sleeper"]["pid"]
    d.pin_agent()
    h = wait_until(
        lambda: x if (x := d.handover()) and x.get("trial") else None,
        timeout=60,
        what="the new agent started",
    )
    assert d.agent.proc is not None
    d.agent.proc.kill()
    d.agent.proc.wait(10)
    assert d.settled(OLD) == h["trial"]
    assert d.sleeper_pid() == before
    assert sleepers(d.marker) == [before]


@pytest.mark.skipif(
    not os.environ.get("KEYSTONE_SELFUPDATE_CAMPAIGN"),
    reason="a campaign: KEYSTONE_SELFUPDATE_CAMPAIGN=1 runs it (about 15 s a seed)",
)
@pytest.mark.parametrize("seed", range(int(os.environ.get("KEYSTONE_SELFUPDATE_CAMPAIGN") or 6)))
def test_sigkill_at_a_random_instant(device: Callable[..., Device], seed: int) -> None:
    """SIGKILL to the old agent, the new one, or both, anywhere in the handover; then what a
    supervisor does (start `current`, or the original agent, if none runs): one agent,
    serving, the sleeper never restarted or duplicated."""
    rng = random.Random(seed)
    d = device("good", soak="2s", preinstalled=True)
    before = d.start()["sleeper"]["pid"]
    d.pin_agent()
    t0 = time.monotonic()
    wait_until(lambda: d.handover() is not None, timeout=60, what="the handover")
    time.sleep(rng.uniform(0, 3))  # an instant chosen at random, not a wait for a condition
    target = rng.choice(["old", "new", "both"])
    h = d.handover() or {}
    victims = []
    if target in ("old", "both") and d.agent.proc is not None:
        victims.append(d.agent.proc.pid)
    if target in ("new", "both") and h.get("trial"):
        victims.append(int(h["trial"]))
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def stable() -> bool | None:
        pids = agents_of(d.runtime)
        if not pids:
            return True
        return True if len(pids) == 1 and d.agent.healthz() is not None else None

    wait_until(stable, timeout=60, what="agents settled")
    if not agents_of(d.runtime):
        current = d.runtime / "agent" / "current"
        d.start_from(current if current.exists() else None)
        wait_until(d.agent.healthz, timeout=60, what="the restarted agent")
    version = (d.agent.healthz() or {}).get("version")
    assert version in (OLD, d.wheel.version)
    d.settled(str(version))
    assert d.sleeper_pid() == before
    assert sleepers(d.marker) == [before]
    assert pgid_members(os.getpgid(before)) == [before]
    print(f"seed {seed}: killed {target} {time.monotonic() - t0:.2f}s in; serving {version}")

"""Self-update: the agent as a component of the plan, handed over without restarting anything.

A plan pins the agent's version with a ``type = "agent"`` recipe whose artifacts are the
agent's wheel(s), fetched and verified like every artifact (sha256 always, signatures as the
trust policy says). When its version is not the running one (docs/self-update.md):

1. **prepare** (before the rest of the revision deploys, nothing running is touched): the wheel
   is fetched and verified, installed into ``<runtime>/agent/<version>/`` (``python -m venv``,
   then ``pip install --no-index --no-deps``; the new venv reuses the running environment's
   dependencies through a ``.pth`` file, so no network is needed), and the new agent is asked
   to import itself and say its version. Any failure refuses the revision.
2. **handover** (queued in the slot behind the sync that deployed it): the new agent is started
   beside the old one and waits on the runtime dir's lock (:mod:`keystone.agentlock`); the old
   one stops serving *without stopping components*, saves its snapshot and releases the lock;
   the new one takes it, adopts every process from the snapshot, serves, and says it is ready.
3. **trial**: the old agent, now only a guardian, checks the new one's ``/healthz`` (its
   version), then watches it for the soak period. Passed: the handover is *committed*
   (``handover.json``), ``<runtime>/agent/current`` points at the new install, under systemd the
   new agent becomes the unit's main process (``MAINPID=``), and the guardian exits. Failed:
   the new agent is asked to give the processes back (``SIGUSR2``: it detaches and exits;
   SIGKILL if it does not), the old agent restarts itself in place (same pid), re-adopts,
   and marks the revision failed.

Exactly one agent serves at any instant, whatever is killed when: only the lock holder serves;
a trial agent whose guardian dies before the commit gives the processes back to the previous
version (under systemd it exits and the unit restarts ``current``; otherwise it execs the
previous agent itself); after the commit the new agent is the agent.

This module loads only on an agent whose plan pins the agent, or that is in a handover.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from loguru import logger

from keystone import __version__
from keystone.dag import build_graph
from keystone.errors import KeystoneError, ValidationError
from keystone.plan import Component, DesiredPlan
from keystone.recipe import AGENT_TYPE
from keystone.runtime.procfs import read_start_ticks
from keystone.state import read_json, write_json
from keystone.units import parse_duration

if TYPE_CHECKING:
    import asyncio

    from keystone.ledger import Ledger
    from keystone.runtime.artifact_client import WorkerPreparer
    from keystone.runtime.deployer import ArtifactContext
    from keystone.runtime.process import ProcessRunner
    from keystone.slot import Job, Operation

ENV_TRIAL = "KEYSTONE_SELFUPDATE_TRIAL"
"""Set in a new agent on trial: the path of ``handover.json``."""
ENV_READY_FD = "KEYSTONE_SELFUPDATE_READY_FD"
"""The pipe a trial agent writes ``ready`` to once it serves."""
MARKER = ".keystone-install"
"""Written last into an install dir: the hash of the agent recipe it was made from."""
GIVE_BACK = signal.SIGUSR2
"""Asks a trial agent to detach (leave every component running) and exit."""

JSON = dict[str, Any]


class SelfUpdateError(KeystoneError):
    """The agent's new version could not be installed or refused to start."""


def settings(environ: Mapping[str, str] | None = None) -> tuple[float, float]:
    """(start timeout, soak) in seconds: ``KEYSTONE_SELFUPDATE_START_TIMEOUT`` (60s) and
    ``KEYSTONE_SELFUPDATE_SOAK`` (30s)."""
    env = os.environ if environ is None else environ
    start = parse_duration(env.get("KEYSTONE_SELFUPDATE_START_TIMEOUT") or "60s")
    soak = parse_duration(env.get("KEYSTONE_SELFUPDATE_SOAK") or "30s")
    return start, soak


# --- the plan -------------------------------------------------------------------------------


def is_agent(component: Component) -> bool:
    return component.recipe.metadata.type == AGENT_TYPE


def split_plan(plan: DesiredPlan) -> tuple[DesiredPlan, Component | None]:
    """The plan without its agent component (what the deployer runs), and that component.

    Raises:
        ValidationError: two agent components, or a component that depends on the agent.
    """
    agents = [c for c in plan.components.values() if is_agent(c)]
    if not agents:
        return plan, None
    if len(agents) > 1:
        names = ", ".join(sorted(c.name for c in agents))
        raise ValidationError(
            f'the plan pins the agent more than once (type = "agent"): {names}',
            file=agents[1].origin or None,
            field="components",
        )
    agent = agents[0]
    for comp in plan.components.values():
        for dep in comp.recipe.dependencies:
            if dep.name == agent.name:
                raise ValidationError(
                    f"component {comp.name!r} depends on {agent.name!r}, the agent itself: "
                    "nothing may depend on the agent (it is always there)",
                    file=comp.recipe.source or None,
                    line=dep.line,
                    field="dependencies",
                )
    comps = {n: c for n, c in plan.components.items() if n != agent.name}
    graph = build_graph(
        {n: c.recipe for n, c in comps.items()}, origin={n: c.origin for n, c in comps.items()}
    )
    rest = DesiredPlan(comps, graph, plan.sources, plan.unknown_fields, plan.warnings)
    return rest, agent


# --- files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where self-update keeps its things: ``<runtime>/agent/``."""

    runtime: Path

    @property
    def root(self) -> Path:
        return self.runtime / "agent"

    def install(self, version: str) -> Path:
        return self.root / version

    def wheels(self, recipe_hash: str) -> Path:
        return self.root / ".wheels" / recipe_hash[:16]

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def state(self) -> Path:
        return self.root / "selfupdate.json"

    @property
    def handover(self) -> Path:
        return self.root / "handover.json"

    def read_state(self) -> JSON:
        doc = read_json(self.state, {})
        return doc if isinstance(doc, dict) else {}

    def write_state(self, doc: JSON) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.state, doc)

    def read_handover(self) -> JSON | None:
        doc = read_json(self.handover, None)
        return doc if isinstance(doc, dict) else None

    def write_handover(self, doc: JSON) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.handover, doc)

    def clear_handover(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.handover.unlink()

    def point_current(self, version: str) -> None:
        """``current`` -> ``<version>`` (atomically; a relative link, so the dir may move)."""
        tmp = self.root / f".current.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(version, tmp)
        os.replace(tmp, self.current)

    def is_installed(self, version: str, recipe_hash: str) -> bool:
        try:
            return (self.install(version) / MARKER).read_text().strip() == recipe_hash
        except OSError:
            return False

    def keystone(self, version: str) -> list[str]:
        """The command line that runs this install's ``keystone`` (its interpreter first)."""
        d = self.install(version)
        return [str(d / "bin" / "python"), str(d / "bin" / "keystone")]


def previous_command() -> list[str]:
    """This agent's own command line, to run it again (same interpreter, same arguments)."""
    return [sys.executable, *sys.orig_argv[1:]]


def base_sites(exclude: Path) -> list[str]:
    """The site-packages of the running environment (not those of earlier self-updates)."""
    ex = str(exclude.resolve())
    out: list[str] = []
    for p in sys.path:
        if Path(p).name in ("site-packages", "dist-packages") and os.path.isdir(p):
            real = str(Path(p).resolve())
            if not real.startswith(ex + os.sep) and real not in out:
                out.append(real)
    return out


def _tail(data: bytes, keep: int = 600) -> str:
    text = data.decode(errors="replace").strip()
    return text if len(text) <= keep else "..." + text[-keep:]


# --- the old agent's side -------------------------------------------------------------------


@dataclass
class SelfUpdater:
    """Installs a pinned agent version and starts its handover (lives in the serving agent).

    The agent sets ``submit`` (its slot) and ``request_handover`` (stop serving, then run the
    guardian); ``listen`` is the API address the new agent will serve.
    """

    runtime: Path
    runner: ProcessRunner
    preparer: WorkerPreparer
    ledger: Callable[[], Ledger]
    emit: Callable[[JSON], None]
    save: Callable[[], None]
    submit: Callable[[Job], Operation] | None = None
    request_handover: Callable[[Callable[[], NoReturn]], None] | None = None
    listen: str = "127.0.0.1:8080"
    tls: bool = False
    install_timeout: float = 300.0
    layout: Layout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = Layout(self.runtime)

    # status -----------------------------------------------------------------------------

    def status_json(self) -> JSON:
        """What ``/healthz`` shows under ``self_update``: wanted version, last outcome."""
        state = self.layout.read_state()
        wanted = state.get("wanted") or {}
        out: JSON = {"running": __version__, "wanted": wanted.get("version")}
        if state.get("last"):
            out["last"] = state["last"]
        handover = self.layout.read_handover()
        if handover is not None:
            out["handover"] = handover.get("phase")
        return out

    # start ------------------------------------------------------------------------------

    def on_start(self, *, trial: bool) -> None:
        """After a (re)start: record a handover that failed or was interrupted; resume one
        that was wanted and not done."""
        state = self.layout.read_state()
        pending = state.pop("pending", None)
        if pending is not None:
            self.layout.write_state(state)
        if isinstance(pending, dict):
            self._record_failure(pending)
        if trial:
            return
        handover = self.layout.read_handover()
        if handover is not None:
            self.layout.clear_handover()
            if handover.get("phase") == "committed" and handover.get("to") == __version__:
                self.finished(handover)
            elif handover.get("phase") != "committed":
                # Nobody serves the trial (we hold the lock): it was cut short.
                self._record_failure(
                    {
                        **handover,
                        "reason": "the handover was interrupted (an agent died during it)",
                    }
                )
        self.resume()

    def resume(self) -> None:
        """Queue the handover to the wanted version if it is installed, not failed, not us."""
        state = self.layout.read_state()
        wanted = state.get("wanted")
        if not isinstance(wanted, dict) or wanted.get("version") == __version__:
            return
        digest = str(wanted.get("hash") or "")
        if digest in (state.get("failed") or {}):
            return
        if not self.layout.is_installed(str(wanted["version"]), digest):
            logger.warning(
                "self-update to {}: its install is incomplete; waiting for the next revision",
                wanted.get("version"),
            )
            return
        self._queue(wanted)

    # prepare ----------------------------------------------------------------------------

    def needs_update(self, agent: Component) -> bool:
        """Whether ``agent`` asks for another version than this one, not known to fail."""
        if agent.version == __version__:
            return False
        failed = self.layout.read_state().get("failed") or {}
        return agent.content_hash() not in failed

    async def prepare(self, agent: Component, context: ArtifactContext) -> None:
        """Fetch, verify and install ``agent``'s wheel into ``<runtime>/agent/<version>/``, and
        check that it imports and is the version the recipe says (raises SelfUpdateError)."""
        version, digest = agent.version, agent.content_hash()
        layout = self.layout
        if not self.needs_update(agent) or layout.is_installed(version, digest):
            return
        await self.preparer.prepare([agent], context=context)
        wheels_dir = layout.wheels(digest)
        shutil.rmtree(wheels_dir, ignore_errors=True)
        wheels_dir.mkdir(parents=True)
        await self.preparer.install(agent, wheels_dir, context=context)
        wheels = sorted(str(p) for p in wheels_dir.rglob("*.whl"))
        if not wheels:
            raise SelfUpdateError(
                f"agent {agent.name} {version}: its artifacts hold no wheel (*.whl)"
            )
        dest = layout.install(version)
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        await self._run(
            [sys.executable, "-m", "venv", "--without-pip", str(dest)], what="python -m venv"
        )
        site = (
            dest / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
        ) / "site-packages"
        # The new agent's own packages come first on sys.path; its dependencies are those of
        # the running environment (a .pth line appends a directory), so nothing is downloaded.
        (site / "keystone-base.pth").write_text("".join(f"{p}\n" for p in base_sites(layout.root)))
        await self._run(
            [
                sys.executable,
                "-m",
                "pip",
                "--isolated",
                "--disable-pip-version-check",
                "--python",
                str(dest / "bin" / "python"),
                "install",
                "--no-index",
                "--no-deps",
                "--ignore-installed",
                "--no-warn-script-location",
                "--quiet",
                *wheels,
            ],
            what="pip install",
        )
        probe = await self._run(
            [
                str(dest / "bin" / "python"),
                "-I",
                "-c",
                "import keystone, keystone.agent, keystone.cli; print(keystone.__version__)",
            ],
            what="the new agent's import check",
        )
        got = probe.stdout.decode(errors="replace").strip()
        if got != version:
            raise SelfUpdateError(
                f"agent {agent.name}: the wheel installs keystone {got!r}, the recipe pins "
                f"{version!r}"
            )
        if not (dest / "bin" / "keystone").exists():
            raise SelfUpdateError(f"agent {agent.name} {version}: the wheel has no keystone script")
        (dest / MARKER).write_text(digest + "\n")
        logger.info(
            "self-update: agent {} installed in {} ({:.1f}s)", version, dest, time.monotonic() - t0
        )

    async def _run(self, argv: list[str], *, what: str) -> Any:
        result = await self.runner.run(
            argv, cwd=self.runtime, env=os.environ, timeout=self.install_timeout
        )
        if result.returncode != 0:
            why = "timed out" if result.timed_out else f"exited {result.returncode}"
            raise SelfUpdateError(
                f"self-update: {what} {why}: {_tail(result.stderr or result.stdout)}"
            )
        return result

    # want -------------------------------------------------------------------------------

    def want(self, agent: Component | None, *, from_sync: bool) -> None:
        """The applied plan pins ``agent`` (None: it pins nothing): remember it, and queue the
        handover when it is another version."""
        state = self.layout.read_state()
        if agent is None:
            if state.pop("wanted", None) is not None:
                self.layout.write_state(state)
            return
        wanted = {
            "name": agent.name,
            "version": agent.version,
            "hash": agent.content_hash(),
            "from_sync": from_sync,
        }
        if state.get("wanted") != wanted:
            state["wanted"] = wanted
            self.layout.write_state(state)
        if self.needs_update(agent):
            self._queue(wanted)

    def _queue(self, wanted: JSON) -> None:
        if self.submit is None:
            return
        # lazy: the slot module is the agent's; only its Job record is needed here
        from keystone.slot import Job

        async def run(op_id: str) -> JSON:
            return await self._handover(wanted)

        self.submit(Job(kind="self-update", run=run, key=("self-update", wanted["hash"])))

    async def _handover(self, wanted: JSON) -> JSON:
        """Start the new agent (it waits on the lock), then stop serving: the guardian runs."""
        version, digest = str(wanted["version"]), str(wanted["hash"])
        state = self.layout.read_state()
        if (
            version == __version__
            or digest in (state.get("failed") or {})
            or state.get("wanted", {}).get("hash") != digest
            or self.request_handover is None
        ):
            return {"result": "skipped", "to": version}
        if not self.layout.is_installed(version, digest):
            return {"result": "skipped", "to": version, "reason": "not installed"}
        ledger = self.ledger()
        handover: JSON = {
            "phase": "starting",
            "from": __version__,
            "to": version,
            "hash": digest,
            "name": wanted.get("name"),
            "revision": ledger.applied if wanted.get("from_sync") else None,
            "guardian": os.getpid(),
            "guardian_ticks": read_start_ticks(os.getpid()),
            "previous": previous_command(),
            "started": time.time(),
        }
        self.layout.write_handover(handover)
        ready_r, ready_w = os.pipe()
        env = {k: v for k, v in os.environ.items() if k != "WATCHDOG_PID"}
        env[ENV_TRIAL] = str(self.layout.handover)
        env[ENV_READY_FD] = str(ready_w)
        argv = [*self.layout.keystone(version), *sys.argv[1:]]
        try:
            proc = subprocess.Popen(
                argv, env=env, pass_fds=(ready_w,), start_new_session=True, cwd=os.getcwd()
            )
        except OSError as exc:
            os.close(ready_r)
            os.close(ready_w)
            self.layout.clear_handover()
            self._record_failure({**handover, "reason": f"cannot start the new agent: {exc}"})
            return {"result": "failed", "to": version, "reason": str(exc)}
        os.close(ready_w)
        handover = {**handover, "phase": "trial", "trial": proc.pid}
        self.layout.write_handover(handover)
        logger.info(
            "self-update {} -> {}: new agent started (pid {}); handing over",
            __version__,
            version,
            proc.pid,
        )
        # Nothing is handed over until the new agent got as far as waiting for the lock: one
        # that cannot even start costs the running agent nothing.
        try:
            why = await _until_waiting(ready_r, proc, settings()[0])
        except BaseException:
            # The agent shuts down meanwhile: the new one has adopted nothing yet; it goes.
            self._abandon(proc, ready_r)
            raise
        if why is not None:
            self._abandon(proc, ready_r)
            self._record_failure({**handover, "reason": why})
            return {"result": "failed", "to": version, "reason": why}
        guardian = Guardian(self.layout, handover, proc, ready_r, self.listen, tls=self.tls)
        self.request_handover(guardian.guard)
        return {"result": "handover", "from": __version__, "to": version, "pid": proc.pid}

    def _abandon(self, proc: subprocess.Popen[bytes], ready_fd: int) -> None:
        """Kill a new agent that never got the lock (it holds nothing) and forget it."""
        with contextlib.suppress(OSError):
            os.close(ready_fd)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.layout.clear_handover()

    # outcomes ---------------------------------------------------------------------------

    def _record_failure(self, doc: Mapping[str, Any]) -> None:
        reason = str(doc.get("reason") or "self-update failed")
        version = str(doc.get("to") or "")
        digest = str(doc.get("hash") or "")
        state = self.layout.read_state()
        failed = state.setdefault("failed", {})
        now = time.time()
        if digest:
            failed[digest] = {"version": version, "reason": reason, "time": now}
        state["last"] = {
            "result": "failed",
            "from": doc.get("from"),
            "to": version,
            "reason": reason,
            "time": now,
        }
        self.layout.write_state(state)
        revision = doc.get("revision")
        if revision:
            self.ledger().mark_failed(str(revision), f"self-update: {reason}", "self-update", now)
        logger.error("self-update to {} failed: {}; agent {} serves", version, reason, __version__)
        self.emit(
            {
                "kind": "self-update",
                "result": "failed",
                "from": doc.get("from"),
                "to": version,
                "revision": revision,
                "reason": reason,
            }
        )
        self.save()

    def finished(self, handover: Mapping[str, Any]) -> None:
        """A handover to this agent was committed: record it, point ``current`` here, trim."""
        state = self.layout.read_state()
        state["last"] = {
            "result": "ok",
            "from": handover.get("from"),
            "to": handover.get("to"),
            "time": time.time(),
        }
        self.layout.write_state(state)
        with contextlib.suppress(OSError):
            self.layout.point_current(str(handover.get("to")))
        self.emit(
            {
                "kind": "self-update",
                "result": "ok",
                "from": handover.get("from"),
                "to": handover.get("to"),
                "revision": handover.get("revision"),
            }
        )
        self.save()
        self._gc(keep={str(handover.get("to")), str(handover.get("from"))})

    def _gc(self, keep: set[str]) -> None:
        """Remove installs other than the running one and the one before it."""
        if not self.layout.root.is_dir():
            return
        for d in self.layout.root.iterdir():
            if d.name not in keep and not d.is_symlink() and (d / MARKER).exists():
                shutil.rmtree(d, ignore_errors=True)
        wanted = (self.layout.read_state().get("wanted") or {}).get("hash", "")
        wheels = self.layout.root / ".wheels"
        if wheels.is_dir():
            for d in wheels.iterdir():
                if not wanted.startswith(d.name):
                    shutil.rmtree(d, ignore_errors=True)


async def _until_waiting(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    """Wait (on the loop) for the new agent's ``waiting`` line; why not, or None."""
    import asyncio  # lazy: the module is imported by the agent, whose loop this runs on

    loop = asyncio.get_running_loop()
    done: asyncio.Future[str | None] = loop.create_future()
    buf = bytearray()

    def readable() -> None:
        try:
            chunk = os.read(fd, 64)
        except OSError as exc:
            chunk, buf[:] = b"", f"{exc}".encode()
        buf.extend(chunk)
        if b"waiting" in buf or not chunk:
            loop.remove_reader(fd)
            if not done.done():
                done.set_result(None if b"waiting" in buf else "eof")

    loop.add_reader(fd, readable)
    try:
        got = await asyncio.wait_for(done, timeout)
    except TimeoutError:
        loop.remove_reader(fd)
        return f"the new agent did not start within {timeout:g}s"
    if got is None:
        return None
    try:
        code = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        code = None
    return f"the new agent exited before it was ready (status {code})"


def announce_waiting() -> None:
    """In a new agent on trial, before it waits for the lock: tell the guardian it got here."""
    fd = os.environ.get(ENV_READY_FD, "")
    if fd.isdigit():
        with contextlib.suppress(OSError):
            os.write(int(fd), b"waiting\n")


# --- the guardian: the old agent once it stopped serving ------------------------------------


class Guardian:
    """Watches the new agent through health and soak; commits, or restores the old agent."""

    def __init__(
        self,
        layout: Layout,
        handover: JSON,
        proc: subprocess.Popen[bytes],
        ready_fd: int,
        listen: str,
        *,
        tls: bool = False,
    ) -> None:
        self.layout = layout
        self.handover = handover
        self.proc = proc
        self.ready_fd = ready_fd
        self.url = health_url(listen, tls=tls)
        self.tls = tls
        # lazy: sd_notify, only once a handover runs (the unit's main process changes)
        from keystone.systemd import Notifier

        self.notifier = Notifier()
        self.ping_every = self.notifier.watchdog_interval() or 5.0

    def guard(self) -> NoReturn:
        """Run the trial to its end; exit (committed) or exec the old agent (failed).

        Called once the old agent stopped serving and released the lock.
        """
        start_timeout, soak = settings()
        stopped = time.monotonic()
        self.notifier.status(f"self-update: handing over to {self.handover['to']}")
        why = self._wait_ready(start_timeout)
        if why is None:
            ready = time.monotonic()
            logger.info(
                "self-update: new agent {} ready {:.3f}s after the old one stopped serving",
                self.handover["to"],
                ready - stopped,
            )
            why = self._check_health() or self._soak(soak) or self._check_health()
        if why is None:
            self._commit()
        self._restore(why)

    def _ping(self) -> None:
        self.notifier.ping()

    def _wait_ready(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        buf = b""
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return f"the new agent did not become ready within {timeout:g}s"
                readable, _, _ = select.select(
                    [self.ready_fd], [], [], min(remaining, self.ping_every)
                )
                self._ping()
                if not readable:
                    continue
                chunk = os.read(self.ready_fd, 64)
                if not chunk:
                    code = self.proc.poll()
                    return f"the new agent exited before it was ready (status {code})"
                buf += chunk
                if b"ready" in buf:
                    return None
        finally:
            os.close(self.ready_fd)

    def _check_health(self) -> str | None:
        # lazy: urllib only in a guardian
        import ssl
        import urllib.request

        ctx = None
        if self.tls:
            # Our own child on loopback: what matters is that it answers, as what version.
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(self.url, timeout=10, context=ctx) as r:
                doc = json.loads(r.read())
        except (OSError, ValueError) as exc:
            return f"the new agent's /healthz did not answer: {exc}"
        if not isinstance(doc, dict) or doc.get("version") != self.handover["to"]:
            got = doc.get("version") if isinstance(doc, dict) else doc
            return f"/healthz answers version {got!r}, not {self.handover['to']!r}"
        return None

    def _soak(self, soak: float) -> str | None:
        deadline = time.monotonic() + soak
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                code = self.proc.wait(timeout=min(remaining, self.ping_every))
            except subprocess.TimeoutExpired:
                self._ping()
                continue
            return f"the new agent exited during its soak (status {code})"
        return None

    def _commit(self) -> NoReturn:
        to = str(self.handover["to"])
        # Under systemd the new agent becomes the unit's main process before we leave.
        self.notifier.send(f"MAINPID={self.proc.pid}", f"STATUS=self-update to {to} done")
        self.layout.write_handover({**self.handover, "phase": "committed"})
        with contextlib.suppress(OSError):
            self.layout.point_current(to)
        logger.info("self-update to {} committed; the old agent exits", to)
        exit_now(0)

    def _restore(self, why: str | None) -> NoReturn:
        reason = why or "self-update failed"
        logger.error("self-update to {} failed: {}", self.handover["to"], reason)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(GIVE_BACK)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        state = self.layout.read_state()
        state["pending"] = {**self.handover, "reason": reason}
        self.layout.write_state(state)
        self.layout.clear_handover()
        logger.info("restarting agent {} in place to take its components back", __version__)
        restart_previous(previous_command())


def health_url(listen: str, *, tls: bool) -> str:
    """``/healthz`` of an agent that listens on ``listen`` (a wildcard host: loopback)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}/healthz"


def exit_now(code: int) -> NoReturn:
    """Leave now, logs flushed, without running the loop's shutdown (nothing may stop)."""
    with contextlib.suppress(Exception):
        logger.complete()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def restart_previous(argv: list[str], env: Mapping[str, str] | None = None) -> NoReturn:
    """Replace this process by ``argv`` (same pid: a unit's main process stays the same)."""
    environ = dict(os.environ if env is None else env)
    environ.pop(ENV_TRIAL, None)
    environ.pop(ENV_READY_FD, None)
    with contextlib.suppress(Exception):
        logger.complete()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, environ)


# --- the new agent's side -------------------------------------------------------------------


class Trial:
    """A new agent on trial: tells its guardian when it serves, gives back on request, and
    never outlives its guardian as a trial."""

    def __init__(self, layout: Layout, handover: JSON, ready_fd: int | None) -> None:
        self.layout = layout
        self.handover = handover
        self.ready_fd = ready_fd
        self.guardian = int(handover.get("guardian") or 0)
        self._pidfd: int | None = None

    @classmethod
    def from_env(cls, runtime: Path) -> Trial | None:
        """The trial this agent is on (``KEYSTONE_SELFUPDATE_TRIAL``), or None."""
        path = os.environ.get(ENV_TRIAL)
        if not path:
            return None
        fd_text = os.environ.get(ENV_READY_FD, "")
        fd = int(fd_text) if fd_text.isdigit() else None
        layout = Layout(runtime)
        handover = layout.read_handover()
        if handover is None or Path(path).resolve() != layout.handover.resolve():
            logger.warning("{} is set but names no handover of this runtime dir", ENV_TRIAL)
            handover = {}
        return cls(layout, handover, fd)

    def guardian_alive(self) -> bool:
        if not self.guardian or self.handover.get("phase") not in ("trial", "starting"):
            return False
        ticks = read_start_ticks(self.guardian)
        return ticks is not None and ticks == self.handover.get("guardian_ticks")

    def ready(self) -> None:
        """Tell the guardian this agent serves (once)."""
        if self.ready_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b"ready\n")
        with contextlib.suppress(OSError):
            os.close(self.ready_fd)
        self.ready_fd = None

    def watch(self, loop: asyncio.AbstractEventLoop, on_gone: Callable[[], None]) -> None:
        """Call ``on_gone`` when the guardian exits (a pidfd on the loop, no polling)."""
        try:
            self._pidfd = os.pidfd_open(self.guardian)
        except OSError:
            loop.call_soon(on_gone)
            return

        def gone() -> None:
            assert self._pidfd is not None
            loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
            on_gone()

        loop.add_reader(self._pidfd, gone)

    def committed(self) -> bool:
        doc = self.layout.read_handover()
        return doc is not None and doc.get("phase") == "committed"

    def promote(self) -> None:
        """The guardian committed and left: this agent is the agent."""
        for key in (ENV_TRIAL, ENV_READY_FD):
            os.environ.pop(key, None)
        self.layout.clear_handover()

    def yield_back(self) -> NoReturn:
        """The guardian died before the commit: hand the processes back to the previous agent.

        Called after this agent detached. Under systemd the unit restarts ``current`` (still
        the previous version) once its main process is gone, so this one only exits; otherwise
        it runs the previous agent in its place.
        """
        state = self.layout.read_state()
        state["pending"] = {
            **self.handover,
            "reason": "the handover was interrupted: the previous agent died during the trial",
        }
        self.layout.write_state(state)
        self.layout.clear_handover()
        if os.environ.get("NOTIFY_SOCKET"):
            logger.warning("self-update interrupted; exiting for systemd to restart the agent")
            exit_now(0)
        previous = self.handover.get("previous")
        if not isinstance(previous, list) or not previous:
            logger.error("self-update interrupted and no previous agent recorded; exiting")
            exit_now(1)
        logger.warning("self-update interrupted; running the previous agent in this process")
        restart_previous([str(a) for a in previous])

"""The NATS adapter (nats-py, on the agent's event loop): Go's subjects, and our fleet nudges.

Subjects (``{d}`` is the device id)::

    keystone.{d}.cmd.<command>      request/reply: {success, error?, data?}
    keystone.{d}.events.state       state: every state_interval and on a component change
    keystone.{d}.events.health      health: every health_interval
    keystone.{d}.jobs               JetStream job queue (``keystone.adapters.jetstream``)
    keystone.{d}.jobs.results       job results
    keystone.fleet.sync             every device: sync now (a reply if the message has one)
    keystone.label.<label>.sync     devices carrying <label>: sync now

All network I/O is on the agent's loop. The first connection is retried with a backoff (1 s
doubling up to ``reconnect_wait``, so a broker that comes up late is found as quickly as a lost
one) and nats-py reconnects after that by itself; components are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import nats
from loguru import logger
from nats.aio.client import Client
from nats.aio.msg import Msg

from keystone.adapters.common import (
    AdapterMetrics,
    BrokerMetrics,
    Commands,
    EventBuffer,
    EventLoop,
    encode,
    tls_context,
)
from keystone.brokerconfig import NatsConfig
from keystone.control import JSON
from keystone.sync.scheduler import device_offset


class Subjects:
    """The resolved subjects of one device (Go's ``Subjects``, plus the fleet ones)."""

    def __init__(self, device_id: str, labels: tuple[str, ...] = ()) -> None:
        self.device_id = device_id
        self.prefix = f"keystone.{device_id}"
        self.cmd_wildcard = f"{self.prefix}.cmd.*"
        self.event_state = f"{self.prefix}.events.state"
        self.event_health = f"{self.prefix}.events.health"
        self.jobs = f"{self.prefix}.jobs"
        self.job_results = f"{self.prefix}.jobs.results"
        self.fleet_sync = "keystone.fleet.sync"
        self.label_sync = tuple(f"keystone.label.{label}.sync" for label in labels)

    def cmd(self, name: str) -> str:
        return f"{self.prefix}.cmd.{name}"

    def command_of(self, subject: str) -> str | None:
        if subject.startswith(self.prefix + ".cmd."):
            return subject[len(self.prefix) + 5 :] or None
        if subject == self.fleet_sync or subject in self.label_sync:
            return "sync"
        return None

    def is_fleet(self, subject: str) -> bool:
        return subject == self.fleet_sync or subject in self.label_sync


_JWT_BEGIN = "-----BEGIN NATS USER JWT-----"
_SEED_BEGIN = "-----BEGIN USER NKEY SEED-----"


def creds_seed(path: Path) -> str | None:
    """The NKey seed of a credentials file that holds no JWT, else None.

    A ``.creds`` file is a user JWT and its NKey seed. nats-py always sends the JWT it finds
    (empty or not), which only a server in operator (JWT) mode accepts; a file with no JWT is
    meant for a server that lists the user's NKey in its config, so it authenticates with the
    seed alone, like ``nkey``. An unreadable file is left to nats-py, which says why.
    """
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError):
        return None

    def block(begin: str) -> str:
        for i, line in enumerate(lines):
            if begin in line:
                # The value is the first non-empty line before the block's END marker.
                for value in lines[i + 1 :]:
                    if value.startswith("-"):
                        return ""
                    if value:
                        return value
        return ""

    if block(_JWT_BEGIN):
        return None
    seed = block(_SEED_BEGIN)
    return seed or None


def connect_options(cfg: NatsConfig, device_id: str) -> dict[str, Any]:
    """nats-py connect() options: TLS and authentication in Go's priority order.

    NKey > credentials file > token > user/password (Go's ``buildAuthOptions``); a
    credentials file without a JWT authenticates with its NKey seed (``creds_seed``).
    """
    opts: dict[str, Any] = {
        "servers": [u.strip() for u in cfg.url.split(",") if u.strip()],
        "name": f"keystone-agent-{device_id}",
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": cfg.reconnect_wait,
        "connect_timeout": 5,
    }
    if cfg.url.startswith("tls://") or cfg.tls_ca or cfg.tls_cert:
        opts["tls"] = tls_context(cfg.tls_ca, cfg.tls_cert, cfg.tls_key, cfg.tls_verify)
    if cfg.nkey:
        opts["nkeys_seed"] = str(cfg.nkey)
    elif cfg.creds:
        seed = creds_seed(cfg.creds)
        if seed is not None:
            opts["nkeys_seed_str"] = seed
        else:
            opts["user_credentials"] = str(cfg.creds)
    elif cfg.token:
        opts["token"] = cfg.token
    elif cfg.user:
        opts["user"] = cfg.user
        opts["password"] = cfg.password
    return opts


class NatsAdapter:
    """A trigger: answers requests on NATS, publishes events, runs JetStream jobs."""

    name = "nats"

    def __init__(
        self,
        cfg: NatsConfig,
        commands: Commands,
        *,
        device_id: str,
        labels: tuple[str, ...] = (),
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.commands = commands
        self.device_id = cfg.device_id or device_id
        self.subjects = Subjects(self.device_id, labels)
        self.metrics = AdapterMetrics(metrics, self.name)
        self.buffer = EventBuffer(cfg.buffer, self.metrics.dropped)
        self.events = EventLoop(
            commands.control,
            self.device_id,
            self._send_event,
            state_interval=cfg.state_interval,
            health_interval=cfg.health_interval,
        )
        self.nc: Client | None = None
        self.jobs: Any = None
        self.connects = 0
        self._main: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._errors: set[str] = set()  # reported since the last connection: not logged again

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    # --- Trigger ----------------------------------------------------------------------------

    def start(self) -> None:
        self._main = asyncio.get_running_loop().create_task(self._connect())
        self.events.start()

    async def stop(self) -> None:
        self._stopping = True
        await self.events.stop()
        if self._main is not None and not self._main.done():
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        if self.jobs is not None:
            await self.jobs.stop()
        for task in list(self._tasks):
            task.cancel()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 5)
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = None

    def changed(self) -> None:
        self.events.changed()

    # --- connection -------------------------------------------------------------------------

    async def _connect(self) -> None:
        cap = max(self.cfg.reconnect_wait, 0.1)
        delay = min(1.0, cap)
        opts = connect_options(self.cfg, self.device_id)
        while True:
            try:
                self.nc = await nats.connect(
                    **opts,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no server yet, refused credentials, bad TLS: retry
                logger.warning(
                    "[nats] cannot connect to {}: {}; retry in {:g}s", self.cfg.url, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, cap)
        nc = self.nc
        await nc.subscribe(self.subjects.cmd_wildcard, cb=self._on_msg)
        await nc.subscribe(self.subjects.fleet_sync, cb=self._on_msg)
        for subject in self.subjects.label_sync:
            await nc.subscribe(subject, cb=self._on_msg)
        logger.info("[nats] connected to {} as device {}", self.cfg.url, self.device_id)
        self.connects += 1
        self.metrics.connected(True)
        self._errors.clear()
        if self.cfg.jetstream:
            # The job queue's module is loaded only by an agent that consumes it.
            from keystone.adapters.jetstream import JobQueue

            self.jobs = JobQueue(nc, self.cfg, self.subjects, self.commands)
            await self.jobs.start()
        self._flush()
        self.events.publish("state")

    async def _on_error(self, exc: Exception) -> None:
        # nats-py retries every reconnect_wait and reports each failure: an error already
        # reported (a refused certificate, a wrong password) goes to debug, not to the log.
        text = str(exc)
        if text in self._errors or len(self._errors) >= 32:
            logger.debug("[nats] {}", text)
            return
        self._errors.add(text)
        logger.warning("[nats] {}", text)

    async def _on_disconnected(self) -> None:
        self.metrics.connected(False)
        if self._stopping:
            return
        logger.warning("[nats] disconnected from {}; reconnecting", self.cfg.url)

    async def _on_reconnected(self) -> None:
        self.connects += 1
        self.metrics.connected(True)
        self._errors.clear()
        url = self.nc.connected_url if self.nc else None
        logger.info("[nats] reconnected to {}", url.geturl() if url else self.cfg.url)
        if self.jobs is not None:
            self.jobs.reconnected()
        self._flush()

    def _flush(self) -> None:
        if self.buffer.dropped:
            logger.warning(
                "[nats] {} event(s) dropped while the server was away", self.buffer.dropped
            )
        for subject, payload in self.buffer.drain():
            self._publish(subject, payload)

    # --- messages ---------------------------------------------------------------------------

    async def _on_msg(self, msg: Msg) -> None:
        name = self.subjects.command_of(msg.subject)
        if name is None:
            return
        # One task per message, so that a long apply never holds up a status request.
        task = asyncio.get_running_loop().create_task(
            self._handle(name, msg, fleet=self.subjects.is_fleet(msg.subject))
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, name: str, msg: Msg, *, fleet: bool) -> None:
        if fleet and self.cfg.fleet_jitter > 0:
            await asyncio.sleep(device_offset(self.device_id, self.cfg.fleet_jitter))
        logger.info("[nats] cmd.{}", name)
        reply, _ = await self.commands.execute_payload(name, msg.data)
        if msg.reply:
            try:
                await msg.respond(encode(reply.to_json()))
            except Exception as exc:  # the requester went away, or the server did
                logger.warning("[nats] cannot answer {}: {}", msg.subject, exc)

    def _publish(self, subject: str, payload: bytes) -> None:
        nc = self.nc
        if nc is None or not nc.is_connected:
            self.buffer.push(subject, payload)
            return
        task = asyncio.get_running_loop().create_task(nc.publish(subject, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_event(self, kind: str, event: JSON) -> None:
        subject = self.subjects.event_state if kind == "state" else self.subjects.event_health
        self._publish(subject, encode(event))

"""The MQTT adapter (paho-mqtt 2): the Go Keystone's topic tree, and our fleet "sync now".

Topics (``{d}`` is the device id)::

    keystone/{d}/cmd/<command>      the agent subscribes (QoS ``qos``)
    keystone/{d}/resp/<command>     the agent answers: {correlationId?, success, error?, data?}
    keystone/{d}/events/state       state: every state_interval and on a component change
    keystone/{d}/events/health      health: every health_interval
    keystone/{d}/status             retained "online"; the broker's last will: "offline"
    keystone/fleet/sync             every device: sync now (answer on resp/sync)
    keystone/label/<label>/sync     devices carrying <label>: sync now

paho's network loop is ONE thread (``loop_start``); it only hands each message to the agent's
event loop, where the command runs in the shared command pool. paho reconnects by itself with
a backoff from 1 s to ``max_reconnect_wait``; components are never touched by a broker loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from loguru import logger
from paho.mqtt.enums import CallbackAPIVersion

from keystone.adapters.common import (
    AdapterMetrics,
    BrokerMetrics,
    Commands,
    EventBuffer,
    EventLoop,
    Reply,
    encode,
    tls_context,
)
from keystone.brokerconfig import MqttConfig
from keystone.control import JSON
from keystone.sync.scheduler import device_offset

TLS_SCHEMES = ("ssl", "tls", "mqtts", "wss")


class Topics:
    """The resolved topic names of one device (Go's ``Topics``, plus the fleet ones)."""

    def __init__(self, device_id: str, labels: tuple[str, ...] = ()) -> None:
        self.device_id = device_id
        self.prefix = f"keystone/{device_id}"
        self.cmd_wildcard = f"{self.prefix}/cmd/+"
        self.event_state = f"{self.prefix}/events/state"
        self.event_health = f"{self.prefix}/events/health"
        self.status = f"{self.prefix}/status"
        self.fleet_sync = "keystone/fleet/sync"
        self.label_sync = tuple(f"keystone/label/{label}/sync" for label in labels)

    def cmd(self, name: str) -> str:
        return f"{self.prefix}/cmd/{name}"

    def resp(self, name: str) -> str:
        return f"{self.prefix}/resp/{name}"

    def command_of(self, topic: str) -> str | None:
        """The command a topic carries (``sync`` for the fleet topics), or None."""
        if topic.startswith(self.prefix + "/cmd/"):
            name = topic[len(self.prefix) + 5 :]
            return name if name and "/" not in name else None
        if topic == self.fleet_sync or topic in self.label_sync:
            return "sync"
        return None

    def is_fleet(self, topic: str) -> bool:
        return topic == self.fleet_sync or topic in self.label_sync


def broker_address(url: str) -> tuple[str, int, bool, str]:
    """(host, port, tls, transport) of ``tcp://h:1883``, ``ssl://h:8883``, ``ws://h/...``."""
    parts = urlsplit(url if "://" in url else "tcp://" + url)
    scheme = parts.scheme or "tcp"
    tls = scheme in TLS_SCHEMES
    transport = "websockets" if scheme in ("ws", "wss") else "tcp"
    default = {"ws": 80, "wss": 443}.get(scheme, 8883 if tls else 1883)
    return parts.hostname or "localhost", parts.port or default, tls, transport


class MqttAdapter:
    """A trigger: answers commands from MQTT and publishes events (see the module docstring)."""

    name = "mqtt"

    def __init__(
        self,
        cfg: MqttConfig,
        commands: Commands,
        *,
        device_id: str,
        labels: tuple[str, ...] = (),
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.commands = commands
        self.device_id = cfg.device_id or device_id
        self.client_id = cfg.client_id or f"keystone-{self.device_id}"
        self.topics = Topics(self.device_id, labels)
        self.metrics = AdapterMetrics(metrics, self.name)
        self.buffer = EventBuffer(cfg.buffer, self.metrics.dropped)
        self.events = EventLoop(
            commands.control,
            self.device_id,
            self._send_event,
            state_interval=cfg.state_interval,
            health_interval=cfg.health_interval,
        )
        self.connected = False
        self.connects = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    # --- Trigger ----------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (paho retries until the broker answers)."""
        self._loop = asyncio.get_running_loop()
        host, port, tls, transport = broker_address(self.cfg.broker)
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            transport=transport,  # type: ignore[arg-type]
        )
        if self.cfg.user:
            client.username_pw_set(self.cfg.user, self.cfg.password or None)
        if tls:
            client.tls_set_context(
                tls_context(
                    self.cfg.tls_ca, self.cfg.tls_cert, self.cfg.tls_key, self.cfg.tls_verify
                )
            )
            if not self.cfg.tls_verify:
                client.tls_insecure_set(True)
        elif self.cfg.tls_cert or self.cfg.tls_ca:
            logger.warning(
                "[mqtt] TLS files are set but {} is not a TLS URL (ssl://...)", self.cfg.broker
            )
        client.will_set(self.topics.status, b"offline", qos=self.cfg.qos, retain=True)
        client.reconnect_delay_set(1, max(1, int(self.cfg.max_reconnect_wait)))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        self._client = client
        client.connect_async(host, port, keepalive=max(5, int(self.cfg.keepalive)))
        client.loop_start()
        self.events.start()
        logger.info("[mqtt] connecting to {} as {}", self.cfg.broker, self.client_id)

    async def stop(self) -> None:
        """Say "offline" (retained), disconnect, end paho's thread."""
        await self.events.stop()
        for task in list(self._tasks):
            task.cancel()
        client = self._client
        if client is None:
            return
        self._client = None
        self._stopping = True

        def close() -> None:
            if self.connected:
                info = client.publish(self.topics.status, b"offline", qos=self.cfg.qos, retain=True)
                with contextlib.suppress(Exception):
                    info.wait_for_publish(timeout=2.0)
            client.disconnect()
            client.loop_stop()

        await asyncio.to_thread(close)

    def changed(self) -> None:
        """A component changed: a state event soon (on the loop)."""
        self.events.changed()

    # --- paho's thread ----------------------------------------------------------------------

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            logger.warning("[mqtt] {} refused the connection: {}", self.cfg.broker, reason)
            return
        sock = client.socket()
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small request/response packets: Nagle plus delayed ACKs would add ~40 ms to each.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        subs = [(self.topics.cmd_wildcard, self.cfg.qos), (self.topics.fleet_sync, self.cfg.qos)]
        subs += [(t, self.cfg.qos) for t in self.topics.label_sync]
        client.subscribe(subs)
        client.publish(self.topics.status, b"online", qos=self.cfg.qos, retain=True)
        logger.info("[mqtt] connected to {} as {}", self.cfg.broker, self.client_id)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._connected)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this inside its ``except OSError``: the exception says why (a refused
        # port, a certificate the broker or we do not trust); paho itself logs nothing.
        exc = sys.exc_info()[1]
        logger.warning("[mqtt] cannot connect to {}: {}; retrying", self.cfg.broker, exc)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if not self.connected and not self._stopping:
            # Closed before CONNACK: with TLS 1.3 a refused client certificate shows only here.
            logger.warning(
                "[mqtt] {} closed the connection before accepting it ({}); retrying",
                self.cfg.broker,
                reason,
            )
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._disconnected, str(reason))

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(
                self._dispatch, msg.topic, bytes(msg.payload), bool(msg.retain)
            )

    # --- the agent's loop -------------------------------------------------------------------

    def _connected(self) -> None:
        self.connected = True
        self.metrics.connected(True)
        self.connects += 1
        pending = self.buffer.drain()
        if self.buffer.dropped:
            logger.warning(
                "[mqtt] {} event(s) dropped while the broker was away", self.buffer.dropped
            )
        for topic, payload in pending:
            self._publish(topic, payload, qos=0)
        self.events.publish("state")

    def _disconnected(self, reason: str) -> None:
        if self.connected and not self._stopping:
            logger.warning("[mqtt] connection lost ({}); reconnecting", reason)
        self.connected = False
        self.metrics.connected(False)

    def _dispatch(self, topic: str, payload: bytes, retained: bool) -> None:
        name = self.topics.command_of(topic)
        if name is None:
            return
        if retained:
            # A retained command would run again at every reconnect: never act on one.
            logger.warning("[mqtt] ignoring a retained message on {}", topic)
            return
        task = asyncio.get_running_loop().create_task(
            self._handle(name, payload, fleet=self.topics.is_fleet(topic))
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, name: str, payload: bytes, *, fleet: bool) -> None:
        if fleet and self.cfg.fleet_jitter > 0:
            await asyncio.sleep(device_offset(self.device_id, self.cfg.fleet_jitter))
        logger.info("[mqtt] cmd/{}", name)
        reply, cid = await self.commands.execute_payload(name, payload)
        self._respond(name, reply, cid)

    def _respond(self, name: str, reply: Reply, cid: str) -> None:
        self._publish(self.topics.resp(name), encode(reply.to_json(cid)), qos=self.cfg.qos)

    def _publish(self, topic: str, payload: bytes, *, qos: int) -> None:
        client = self._client
        if client is None:
            return
        info = client.publish(topic, payload, qos=qos)
        if info.rc != paho.MQTT_ERR_SUCCESS and qos == 0:
            self.buffer.push(topic, payload)

    def _send_event(self, kind: str, event: JSON) -> None:
        topic = self.topics.event_state if kind == "state" else self.topics.event_health
        payload = encode(event)
        if not self.connected:
            self.buffer.push(topic, payload)
            return
        self._publish(topic, payload, qos=0)

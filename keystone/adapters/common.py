"""What the MQTT and NATS adapters share: the command table, the message codec, the events.

A broker command is the Go Keystone's (``apply``, ``stop``, ``status``, ``components``,
``graph``, ``restart``, ``stop-comp``, ``health``, ``recipes``, ``add-recipe``; JetStream's
``delete-recipe``) plus our ``sync``. Each one is a call of ``keystone.control.AgentControl``,
the face the HTTP API uses, so a broker message meets the same desired-state slot, the same
verification and the same rules as an HTTP request (the API never reads a plan file a client
names; a plan's recipes are stored ones or recipe files under the agent's working directory). The control methods block their caller until the agent's
loop has done the work, so commands run in one small bounded thread pool, never on the loop and
never in a thread per message.

Replies have Go's shape: ``{"correlationId"?, "success", "error"?, "data"?}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from loguru import logger

from keystone.control import JSON, AgentControl, Conflict, NotFound
from keystone.errors import KeystoneError, Refused
from keystone.units import go_duration, parse_duration

COMMANDS = (
    "apply",
    "stop",
    "status",
    "components",
    "graph",
    "restart",
    "stop-comp",
    "health",
    "recipes",
    "add-recipe",
    "delete-recipe",
    "sync",
)
"""Every command an adapter answers: Go's ten, JetStream's delete-recipe, and our sync."""

JOB_TYPES = ("apply", "stop", "restart", "stop-comp", "add-recipe", "delete-recipe", "sync")
"""The JetStream job types (Go's, plus sync)."""

APPLY_TIMEOUT = 600.0
"""How long an apply over a broker waits for its deployment before it answers."""


class BadRequest(ValueError):
    """A malformed or incomplete message: refused, never retried (it will not fix itself)."""


@dataclass(frozen=True)
class Policy:
    """What the adapters may do on this device.

    Attributes:
        device_id: the ``{deviceId}`` of the topics and subjects.
        git_synced: the agent follows a signed source (``[source] url``).
        accept_local_plans: an apply over the broker is accepted even so.
    """

    device_id: str
    git_synced: bool = False
    accept_local_plans: bool = False


@dataclass(frozen=True)
class Reply:
    """The outcome of one command, encoded in Go's response shape."""

    success: bool
    data: Any = None
    error: str = ""
    retryable: bool = False  # a failure that may pass by itself (JetStream redelivers it)

    def to_json(self, correlation_id: str | None = None) -> JSON:
        """Go's ``Response``: empty fields are left out (``omitempty``)."""
        out: JSON = {}
        if correlation_id:
            out["correlationId"] = correlation_id
        out["success"] = self.success
        if self.error:
            out["error"] = self.error
        if self.data is not None:
            out["data"] = self.data
        return out


def decode(payload: bytes) -> JSON:
    """A request body: a JSON object (an empty payload is ``{}``); else ``BadRequest``."""
    if not payload.strip():
        return {}
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid request: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"invalid request: expected a JSON object, got {type(doc).__name__}")
    return doc


def encode(doc: Any) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(doc, separators=(",", ":"), default=str).encode()


def correlation(req: Mapping[str, Any]) -> str:
    """The request's ``correlationId`` (MQTT), or ''."""
    value = req.get("correlationId")
    return value if isinstance(value, str) else ""


# --- fields ---------------------------------------------------------------------------------


def _str(req: Mapping[str, Any], key: str, *, required: str = "") -> str:
    value = req.get(key)
    if value is None or value == "":
        if required:
            raise BadRequest(required)
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"invalid request: {key} must be a string")
    return value


def _bool(req: Mapping[str, Any], *keys: str) -> bool:
    for key in keys:
        value = req.get(key)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise BadRequest(f"invalid request: {key} must be true or false")
        if value:
            return True
    return False


def _seconds(req: Mapping[str, Any], key: str, default: float) -> float:
    """A Go duration string (``"60s"``); like Go, a bad or non-positive one is the default."""
    raw = req.get(key)
    if not isinstance(raw, str) or not raw:
        return default
    try:
        value = parse_duration(raw)
    except ValueError:
        return default
    return value if value > 0 else default


# --- the command table ----------------------------------------------------------------------


def run_command(control: AgentControl, name: str, req: Mapping[str, Any], policy: Policy) -> Reply:
    """Carry out one command through ``control`` (blocking; call it from a worker thread).

    Malformed requests, refusals and the agent's errors become an unsuccessful reply; only a
    bug escapes as an exception.
    """
    handler = HANDLERS.get(name)
    if handler is None:
        return Reply(False, error=f"unknown command: {name}")
    try:
        return handler(control, req, policy)
    except (BadRequest, Refused, NotFound, Conflict) as exc:
        return Reply(False, error=str(exc))
    except (KeystoneError, TimeoutError) as exc:
        return Reply(False, error=str(exc), retryable=True)


def _apply(control: AgentControl, req: Mapping[str, Any], policy: Policy) -> Reply:
    if req.get("planPath"):
        raise BadRequest(
            "planPath is not accepted: the agent never reads a file a client names; "
            "send the plan itself as content"
        )
    content = _str(req, "content", required="planPath or content required")
    dry = _bool(req, "dry", "dryRun")
    recipes = req.get("recipes") or []
    if not isinstance(recipes, list) or not all(isinstance(r, str) for r in recipes):
        raise BadRequest("invalid request: recipes must be an array of TOML strings")
    if not dry and policy.git_synced and not policy.accept_local_plans:
        raise Refused(
            "refused: this device follows a signed git source, and a plan sent over the broker "
            "would bypass its signature verification; commit the plan to the fleet repository "
            "(or set accept_local_plans = true for this adapter)"
        )
    for i, text in enumerate(recipes):
        try:
            control.upload_recipe(text, force=True)  # the controller owns the version (Go)
        except (KeystoneError, Conflict) as exc:
            raise BadRequest(f"inline recipe {i}: {exc}") from None
    body = control.apply_plan(content, dry=dry)
    if dry:
        return Reply(True, {**control.plan_status(), "apply": body})
    op_id = body.get("operation")
    timeout = _seconds(req, "timeout", APPLY_TIMEOUT)
    record: JSON = {}
    if isinstance(op_id, str):
        op = control.operation(op_id, wait=timeout)
        if op.get("state") != "done":
            raise TimeoutError(
                f"the deployment did not finish within {timeout:g}s; operation {op_id} goes on "
                "in the agent"
            )
        record = op.get("result") or {"result": "error", "error": op.get("error")}
    status = control.plan_status()
    data = {**status, "operation": op_id, "apply": record}
    if record.get("result") != "ok":
        why = record.get("error") or status.get("error") or record.get("result")
        return Reply(False, data, f"apply failed: {why}")
    return Reply(True, data)


def _stop(control: AgentControl, req: Mapping[str, Any], policy: Policy) -> Reply:
    control.stop_plan()
    return Reply(True, control.plan_status())


def _status(control: AgentControl, req: Mapping[str, Any], policy: Policy) -> Reply:
    return Reply(True, control.plan_status())


def _components(control: AgentControl, req: Mapping[str, Any], policy: Policy) -> Reply:
    return Reply(True, {"components": control.components()})


def _graph(control: AgentControl, req: Mapping[str, Any], policy: Policy) -> Reply:
    return Reply(True, control.plan_graph())


def _restart(control: AgentControl, req: Mapping[str, Any], policy: Policy) -> Reply:
    name = _str(req, "component", required="component name required")
    if _bool(req, "dry"):
        return Reply(True, control.restart_component(name, wait=None, timeout=0, dry=True))
    wait = _str(req, "wait") or "pid"
    if wait not in ("pid", "health"):
        raise BadRequest(f"invalid request: wait must be pid or health, got {wait!r}")
    timeout = _seconds(req, "timeout", 60.0)
    result = control.restart_component(name, wait=wait, timeout=timeout, dry=False)
    return Reply(True, {**result, "wait": wait, "timeout": go_duration(timeout)})


def _stop_comp(control: AgentControl, req: Mapping[str, Any], policy: Policy) -> Reply:
    name = _str(req, "component", required="component name required")
    op = control.stop_component(name)
    return Reply(True, {"status": "stopped", "component": name, "operation": op})


def _health(control: AgentControl, req: Mapping[str, Any], policy: Policy) -> Reply:
    # Go's HealthStatus body (uptime a Go duration, "1h2m3.5s"); our other keys ride along.
    return Reply(True, control.health())


def _recipes(control: AgentControl, req: Mapping[str, Any], policy: Policy) -> Reply:
    # Go lists its store's file names (name-version.toml); the HTTP API's entries ride along.
    return Reply(True, {"recipes": control.recipe_files(), "items": control.recipes()})


def _add_recipe(control: AgentControl, req: Mapping[str, Any], policy: Policy) -> Reply:
    content = _str(req, "content", required="recipe content required")
    result = control.upload_recipe(content, force=_bool(req, "force"))
    return Reply(True, {"name": result["name"], "version": result["version"]})


def _delete_recipe(control: AgentControl, req: Mapping[str, Any], policy: Policy) -> Reply:
    name = _str(req, "name", required="recipe name required")
    version = _str(req, "version", required="recipe version required")
    control.delete_recipe(name, version)
    return Reply(True, {"name": name, "version": version, "status": "deleted"})


def _sync(control: AgentControl, req: Mapping[str, Any], policy: Policy) -> Reply:
    record = control.sync(
        dry_run=_bool(req, "dry", "dryRun"),
        allow_rollback=_bool(req, "allowRollback"),
        retry=_bool(req, "retry"),
    )
    if record.get("exit_code", 1) != 0:
        return Reply(False, record, f"sync {record.get('result')}: {record.get('error') or ''}")
    return Reply(True, record)


Handler = Callable[[AgentControl, Mapping[str, Any], Policy], Reply]

HANDLERS: dict[str, Handler] = {
    "apply": _apply,
    "stop": _stop,
    "status": _status,
    "components": _components,
    "graph": _graph,
    "restart": _restart,
    "stop-comp": _stop_comp,
    "health": _health,
    "recipes": _recipes,
    "add-recipe": _add_recipe,
    "delete-recipe": _delete_recipe,
    "sync": _sync,
}


class Commands:
    """Runs commands for the adapters in one bounded thread pool.

    Args:
        control: the agent's control service.
        policy: what broker commands may do here.
        pool: the pool to run in (the adapters of one agent share one); None: own one.
        workers: the size of an own pool: commands beyond it wait their turn.
    """

    def __init__(
        self,
        control: AgentControl,
        policy: Policy,
        *,
        pool: ThreadPoolExecutor | None = None,
        workers: int = 4,
    ) -> None:
        self.control = control
        self.policy = policy
        self._workers = workers
        self._pool = pool
        self._owned = pool is None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="keystone-broker")
        return self._pool

    async def execute(self, name: str, req: Mapping[str, Any]) -> Reply:
        """Run one command off the loop; a bug becomes an unsuccessful reply, logged."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor(), run_command, self.control, name, req, self.policy
            )
        except Exception as exc:  # a bug in one command must not end the adapter
            logger.opt(exception=exc).error("broker command {} failed", name)
            return Reply(False, error=f"internal error: {type(exc).__name__}: {exc}")

    async def execute_payload(self, name: str, payload: bytes) -> tuple[Reply, str]:
        """Decode ``payload`` and run it: (reply, correlationId)."""
        try:
            req = decode(payload)
        except BadRequest as exc:
            return Reply(False, error=str(exc)), ""
        return await self.execute(name, req), correlation(req)

    def close(self) -> None:
        if self._pool is not None and self._owned:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def tls_context(ca: Any, cert: Any, key: Any, verify: bool) -> ssl.SSLContext:
    """TLS 1.2+; a client certificate for mTLS; verification off only when asked."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert and key:
        ctx.load_cert_chain(str(cert), str(key))
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- events ---------------------------------------------------------------------------------


def utc_stamp(now: float) -> str:
    """RFC 3339 UTC with microseconds, as Go's ``time.Time`` marshals."""
    frac = f"{now % 1:.6f}"[1:]
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + frac + "Z"


def state_event(control: AgentControl, device_id: str, now: float) -> JSON:
    """Go's ``StateEvent`` (plus the applied ``revision``)."""
    status = control.plan_status()
    event: JSON = {
        "timestamp": utc_stamp(now),
        "deviceId": device_id,
        "components": status.get("components") or [],
        "planStatus": status.get("status"),
    }
    if status.get("planPath"):
        event["planPath"] = status["planPath"]
    health = control.health()
    revision = health.get("revision")
    if revision:
        event["revision"] = revision
    if health.get("rollout"):  # the device's wave and outcome, for a fleet-side rollout gate
        event["rollout"] = health["rollout"]
    return event


def health_event(control: AgentControl, device_id: str, now: float) -> JSON:
    """Go's ``HealthEvent``: ``uptime`` as a Go duration string."""
    health = control.health()
    return {
        "timestamp": utc_stamp(now),
        "deviceId": device_id,
        "status": health.get("status"),
        "uptime": health.get("uptime"),
    }


class BrokerMetrics(Protocol):
    """The agent's metrics an adapter reports to (``keystone.metrics.Metrics``)."""

    def set_broker_connected(self, adapter: str, connected: bool) -> None: ...

    def broker_events_dropped(self, adapter: str, n: int = 1) -> None: ...


class AdapterMetrics:
    """One adapter's connection state and dropped events, for ``BrokerMetrics`` (or nothing).

    Both series exist from the start (disconnected, none dropped), so a dashboard sees an
    adapter that never connected.
    """

    def __init__(self, metrics: BrokerMetrics | None, adapter: str) -> None:
        self.metrics = metrics
        self.adapter = adapter
        if metrics is not None:
            metrics.set_broker_connected(adapter, False)
            metrics.broker_events_dropped(adapter, 0)

    def connected(self, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.set_broker_connected(self.adapter, up)

    def dropped(self) -> None:
        if self.metrics is not None:
            self.metrics.broker_events_dropped(self.adapter)


class EventBuffer:
    """Events kept while the broker is away: bounded, the oldest dropped and counted.

    ``on_drop`` is called once per dropped event (the adapters count them in the metrics).
    """

    def __init__(self, size: int, on_drop: Callable[[], None] | None = None) -> None:
        self._items: deque[tuple[str, bytes]] = deque(maxlen=max(size, 0) or None)
        self.size = size
        self.dropped = 0
        self._on_drop = on_drop

    def push(self, subject: str, payload: bytes) -> None:
        if self.size <= 0 or len(self._items) == self.size:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
        if self.size > 0:
            self._items.append((subject, payload))

    def drain(self) -> list[tuple[str, bytes]]:
        items = list(self._items)
        self._items.clear()
        return items

    def __len__(self) -> int:
        return len(self._items)


class EventLoop:
    """State and health events: every interval, and state also on a component change.

    ``send(kind, event)`` publishes (or buffers) one event; it is called on the loop.
    A burst of component changes is coalesced into one state event (``settle`` seconds).
    """

    def __init__(
        self,
        control: AgentControl,
        device_id: str,
        send: Callable[[str, JSON], None],
        *,
        state_interval: float,
        health_interval: float,
        settle: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.control = control
        self.device_id = device_id
        self.send = send
        self.state_interval = state_interval
        self.health_interval = health_interval
        self.settle = settle
        self.clock = clock
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.state_interval > 0:
            self._tasks.append(self._loop.create_task(self._every(self.state_interval, "state")))
        if self.health_interval > 0:
            self._tasks.append(self._loop.create_task(self._every(self.health_interval, "health")))

    def changed(self) -> None:
        """A component changed state: one state event soon (called on the loop)."""
        if self._loop is None or self._pending is not None:
            return
        self._pending = self._loop.call_later(self.settle, self._publish_change)

    def _publish_change(self) -> None:
        self._pending = None
        self.publish("state")

    def publish(self, kind: str) -> None:
        """Build and send one event now."""
        try:
            if kind == "state":
                event = state_event(self.control, self.device_id, self.clock())
            else:
                event = health_event(self.control, self.device_id, self.clock())
        except Exception as exc:  # a status read must not end the event loop
            logger.opt(exception=exc).warning("broker {} event not built", kind)
            return
        self.send(kind, event)

    async def _every(self, interval: float, kind: str) -> None:
        while True:
            await asyncio.sleep(interval)
            self.publish(kind)

    async def stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

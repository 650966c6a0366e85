"""The ``[mqtt]`` and ``[nats]`` tables of ``agent.toml`` and the Go agent's environment variables.

Field names follow the Go Keystone's flags (``--mqtt-broker`` is ``[mqtt] broker``,
``--nats-js-workers`` is ``[nats] js_workers``); defaults are Go's. Precedence as everywhere:
flag, then environment, then file (the CLI applies flags with ``dataclasses.replace``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from keystone.errors import ValidationError
from keystone.tomlsrc import Path_, Reader
from keystone.units import parse_duration


@dataclass(frozen=True)
class MqttConfig:
    """The MQTT adapter (Go: ``internal/adapter/mqtt`` Config and ``--mqtt-*`` flags).

    Attributes:
        broker: ``tcp://host:1883``, ``ssl://host:8883`` (also ``mqtt://``, ``mqtts://``,
            ``tls://``); empty disables the adapter.
        device_id: the ``{deviceId}`` of the topics; empty: the agent's device id.
        client_id: empty: ``keystone-{deviceId}``.
        qos: QoS of command subscriptions and responses (0, 1, 2); events use 0 as in Go.
        state_interval / health_interval: seconds between periodic events (0: off). State
            events are also published on every component change.
        accept_local_plans: accept ``cmd/apply`` on a device that follows a signed git
            source (by default refused: it would bypass signature verification).
        fleet_jitter: a fleet or label "sync now" waits a fixed per-device offset within
            this window, so that a whole fleet does not hit the git server in one instant.
        buffer: events kept while the broker is away (oldest dropped and counted).
    """

    broker: str = ""
    device_id: str = ""
    client_id: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_verify: bool = True
    user: str = ""
    password: str = ""
    qos: int = 1
    state_interval: float = 10.0
    health_interval: float = 30.0
    keepalive: float = 30.0
    max_reconnect_wait: float = 300.0
    accept_local_plans: bool = False
    fleet_jitter: float = 0.0
    buffer: int = 100


@dataclass(frozen=True)
class NatsConfig:
    """The NATS adapter (Go: ``internal/adapter/nats`` Config and ``--nats-*`` flags).

    Attributes:
        url: ``nats://host:4222`` or ``tls://host:4222``; empty disables the adapter.
        creds / nkey / token / user+password: authentication, in Go's priority order
            (NKey > credentials > token > user/password).
        jetstream: consume the durable job queue ``keystone.{deviceId}.jobs``.
        js_stream / js_workers / js_max_deliver / js_ack_wait / js_max_ack_pending: as Go.
        Other fields as in ``MqttConfig``.
    """

    url: str = ""
    device_id: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_verify: bool = True
    creds: Path | None = None
    nkey: Path | None = None
    token: str = ""
    user: str = ""
    password: str = ""
    state_interval: float = 10.0
    health_interval: float = 30.0
    reconnect_wait: float = 2.0
    jetstream: bool = False
    js_stream: str = "KEYSTONE_JOBS"
    js_workers: int = 1
    js_max_deliver: int = 5
    js_ack_wait: float = 30.0
    js_max_ack_pending: int = 100
    accept_local_plans: bool = False
    fleet_jitter: float = 0.0
    buffer: int = 100


_DURATIONS = {
    "state_interval",
    "health_interval",
    "keepalive",
    "max_reconnect_wait",
    "reconnect_wait",
    "js_ack_wait",
    "fleet_jitter",
}
_PATHS = {"tls_cert", "tls_key", "tls_ca", "creds", "nkey"}
_BOOLS = {"tls_verify", "jetstream", "accept_local_plans"}
_INTS = {"qos": (0, 2), "js_workers": (1, 64), "js_max_deliver": (1, 1000)}
_INTS_MIN = {"js_max_ack_pending": 1, "buffer": 0}

C = TypeVar("C", MqttConfig, NatsConfig)


def _read_table(r: Reader, name: str, cls: type[C], base: Path) -> C | None:
    keys = {f.name for f in fields(cls)}
    if r.table((name,), keys) is None:
        return None
    values: dict[str, Any] = {}
    for key in keys:
        path: Path_ = (name, key)
        if r.get(path) is None:
            continue
        if key in _DURATIONS:
            values[key] = r.converted(path, parse_duration, 'a duration such as "10s"')
        elif key in _PATHS:
            raw = r.text(path) or ""
            p = Path(raw).expanduser()
            values[key] = (p if p.is_absolute() else base / p) if raw else None
        elif key in _BOOLS:
            values[key] = r.flag(path)
        elif key in _INTS:
            lo, hi = _INTS[key]
            value = r.integer(path, minimum=lo)
            if value is not None and value > hi:
                raise r.error(path, f"expected an integer from {lo} to {hi}, got {value}")
            values[key] = value
        elif key in _INTS_MIN:
            values[key] = r.integer(path, minimum=_INTS_MIN[key])
        else:
            values[key] = r.text(path)
    cfg = cls(**values)
    _check_urls(cfg, lambda f, msg: r.error((name, f), msg))
    return cfg


def parse_broker_tables(r: Reader, base: Path) -> tuple[MqttConfig | None, NatsConfig | None]:
    """Read ``[mqtt]`` and ``[nats]`` (errors name the file, line and field)."""
    return _read_table(r, "mqtt", MqttConfig, base), _read_table(r, "nats", NatsConfig, base)


MQTT_SCHEMES = ("tcp", "mqtt", "ssl", "tls", "mqtts", "ws", "wss")
NATS_SCHEMES = ("nats", "tls")


def _check_urls(cfg: MqttConfig | NatsConfig, error: Any) -> None:
    if isinstance(cfg, MqttConfig):
        if cfg.broker and cfg.broker.split("://", 1)[0] not in MQTT_SCHEMES:
            raise error(
                "broker",
                f"expected a URL such as tcp://host:1883 or ssl://host:8883, got {cfg.broker!r}",
            )
    else:
        for url in filter(None, cfg.url.split(",")):
            if url.strip().split("://", 1)[0] not in NATS_SCHEMES:
                raise error("url", f"expected a URL such as nats://host:4222, got {url!r}")
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise error(
            "tls_key" if cfg.tls_key is None else "tls_cert", "tls_cert and tls_key go together"
        )


# Go's environment variables (docs/adapters.md); NATS has none in Go, ours mirror MQTT's.
_ENV = {
    "MQTT": (
        MqttConfig,
        {
            "BROKER": "broker",
            "DEVICE_ID": "device_id",
            "CLIENT_ID": "client_id",
            "TLS_CERT": "tls_cert",
            "TLS_KEY": "tls_key",
            "TLS_CA": "tls_ca",
            "TLS_VERIFY": "tls_verify",
            "USER": "user",
            "PASS": "password",
            "QOS": "qos",
            "STATE_INTERVAL": "state_interval",
            "HEALTH_INTERVAL": "health_interval",
        },
    ),
    "NATS": (
        NatsConfig,
        {
            "URL": "url",
            "DEVICE_ID": "device_id",
            "TLS_CERT": "tls_cert",
            "TLS_KEY": "tls_key",
            "TLS_CA": "tls_ca",
            "TLS_VERIFY": "tls_verify",
            "CREDS": "creds",
            "NKEY": "nkey",
            "TOKEN": "token",
            "USER": "user",
            "PASS": "password",
            "STATE_INTERVAL": "state_interval",
            "HEALTH_INTERVAL": "health_interval",
            "JETSTREAM": "jetstream",
            "JS_STREAM": "js_stream",
            "JS_WORKERS": "js_workers",
        },
    ),
}


def convert_value(key: str, raw: str, where: str) -> Any:
    """A flag or environment string as the field's type (ValidationError naming ``where``)."""
    try:
        if key in _DURATIONS:
            return parse_duration(raw)
        if key in _PATHS:
            return Path(raw).expanduser() if raw else None
        if key in _BOOLS:
            low = raw.strip().lower()
            if low in ("1", "t", "true", "yes", "on"):
                return True
            if low in ("0", "f", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {raw!r}")
        if key in _INTS or key in _INTS_MIN:
            value = int(raw)
            lo, hi = _INTS.get(key, (_INTS_MIN.get(key, 0), 1 << 30))
            if not lo <= value <= hi:
                raise ValueError(f"expected an integer from {lo} to {hi}, got {value}")
            return value
    except ValueError as exc:
        raise ValidationError(str(exc), field=where) from None
    return raw


def apply_broker_env(
    mqtt: MqttConfig | None, nats: NatsConfig | None, environ: Mapping[str, str]
) -> tuple[MqttConfig | None, NatsConfig | None]:
    """Overlay ``KEYSTONE_MQTT_*`` / ``KEYSTONE_NATS_*`` on the file's tables."""
    out: list[Any] = []
    for prefix, current in (("MQTT", mqtt), ("NATS", nats)):
        cls, names = _ENV[prefix]
        changes: dict[str, Any] = {}
        for suffix, key in names.items():
            var = f"KEYSTONE_{prefix}_{suffix}"
            raw = environ.get(var)
            if raw:
                changes[key] = convert_value(key, raw, var)
        if changes:
            current = replace(current or cls(), **changes)
            _check_urls(
                current,
                lambda f, msg, p=prefix: ValidationError(msg, field=f"KEYSTONE_{p}_{f.upper()}"),
            )
        out.append(current)
    return out[0], out[1]


def apply_broker_flags(
    mqtt: MqttConfig | None, nats: NatsConfig | None, flags: Mapping[str, str | None]
) -> tuple[MqttConfig | None, NatsConfig | None]:
    """Overlay Go's ``--mqtt-*`` / ``--nats-*`` flags (given as strings; None: not given).

    ``flags`` maps the flag name without dashes (``mqtt-broker``, ``nats-js-workers``) to its
    value; the CLI passes what the user typed.
    """
    result: list[Any] = []
    for prefix, current, cls in (("mqtt", mqtt, MqttConfig), ("nats", nats, NatsConfig)):
        changes: dict[str, Any] = {}
        for flag, raw in flags.items():
            if raw is None or not flag.startswith(prefix + "-"):
                continue
            key = FLAG_FIELDS[prefix].get(flag[len(prefix) + 1 :])
            if key is None:
                raise ValidationError(f"unknown flag --{flag}")
            changes[key] = convert_value(key, raw, f"--{flag}")
        if changes:
            current = replace(current or cls(), **changes)
        result.append(current)
    return result[0], result[1]


# The Go agent's flag names (cmd/keystone/main.go) -> our fields; the last ones are ours.
FLAG_FIELDS: dict[str, dict[str, str]] = {
    "mqtt": {
        "broker": "broker",
        "device-id": "device_id",
        "client-id": "client_id",
        "tls-cert": "tls_cert",
        "tls-key": "tls_key",
        "tls-ca": "tls_ca",
        "tls-verify": "tls_verify",
        "user": "user",
        "pass": "password",
        "qos": "qos",
        "state-interval": "state_interval",
        "health-interval": "health_interval",
        "accept-local-plans": "accept_local_plans",
        "fleet-jitter": "fleet_jitter",
    },
    "nats": {
        "url": "url",
        "device-id": "device_id",
        "tls-cert": "tls_cert",
        "tls-key": "tls_key",
        "tls-ca": "tls_ca",
        "tls-verify": "tls_verify",
        "creds": "creds",
        "nkey": "nkey",
        "token": "token",
        "user": "user",
        "pass": "password",
        "state-interval": "state_interval",
        "health-interval": "health_interval",
        "jetstream": "jetstream",
        "js-stream": "js_stream",
        "js-workers": "js_workers",
        "accept-local-plans": "accept_local_plans",
        "fleet-jitter": "fleet_jitter",
    },
}

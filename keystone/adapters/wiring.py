"""Build the configured broker adapters for the agent's composition root.

Only what is configured is imported: an agent with ``[mqtt]`` loads paho-mqtt, one with
``[nats]`` loads nats-py, one with neither never imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from keystone.adapters.common import BrokerMetrics, Commands, Policy
from keystone.config import AgentConfig
from keystone.control import AgentControl


def broker_configured(config: AgentConfig) -> bool:
    """Whether ``[mqtt] broker`` or ``[nats] url`` is set."""
    return bool((config.mqtt and config.mqtt.broker) or (config.nats and config.nats.url))


def build_adapters(
    config: AgentConfig, control: AgentControl, metrics: BrokerMetrics | None = None
) -> list[Any]:
    """The adapters ``config`` asks for (each is a ``keystone.sync.triggers.Trigger``).

    ``metrics`` (the agent's ``keystone.metrics.Metrics``) gets each adapter's connection state
    and dropped events.
    """
    git_synced = bool(config.source is not None and config.source.url)
    # One bounded pool for every adapter's commands (threads start only when a command comes).
    pool = ThreadPoolExecutor(4, thread_name_prefix="keystone-broker")
    adapters: list[Any] = []

    def commands(device_id: str, accept_local_plans: bool) -> Commands:
        policy = Policy(
            device_id or config.device_id,
            git_synced=git_synced,
            accept_local_plans=accept_local_plans,
        )
        return Commands(control, policy, pool=pool)

    common: dict[str, Any] = {
        "device_id": config.device_id,
        "labels": config.labels,
        "metrics": metrics,
    }
    if config.mqtt is not None and config.mqtt.broker:
        # paho-mqtt is loaded only by an agent with an MQTT broker.
        from keystone.adapters.mqtt import MqttAdapter

        mqtt = config.mqtt
        cmds = commands(mqtt.device_id, mqtt.accept_local_plans)
        adapters.append(MqttAdapter(mqtt, cmds, **common))
    if config.nats is not None and config.nats.url:
        # nats-py is loaded only by an agent with a NATS server.
        from keystone.adapters.nats import NatsAdapter

        nats = config.nats
        adapters.append(
            NatsAdapter(nats, commands(nats.device_id, nats.accept_local_plans), **common)
        )
    return adapters


def chain_change(first: Callable[[Any], None] | None, adapters: list[Any]) -> Callable[[Any], None]:
    """A component-change callback that calls ``first`` and tells every adapter."""

    def changed(sup: Any) -> None:
        if first is not None:
            first(sup)
        for adapter in adapters:
            adapter.changed()

    return changed

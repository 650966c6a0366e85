"""Control-plane adapters on message brokers: MQTT (paho-mqtt) and NATS (nats-py, JetStream).

The package stays light on import: ``settings`` (the ``[mqtt]`` and ``[nats]`` tables) is what
the configuration reads. The adapters themselves (``common``, ``mqtt``, ``nats``, ``jetstream``)
and their client libraries are imported by the agent only when a broker is configured.
"""

from __future__ import annotations

from keystone.brokerconfig import MqttConfig, NatsConfig

__all__ = ["MqttConfig", "NatsConfig"]

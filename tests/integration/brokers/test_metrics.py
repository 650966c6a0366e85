"""The broker adapters' metrics through the agent's /metrics: connection state and the events
dropped from a full buffer while the broker is away."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.integration.brokers.conftest import Broker

pytestmark = pytest.mark.integration


def scrape(agent: Any) -> str:
    req = urllib.request.Request(
        agent.addr + "/metrics", headers={"Authorization": f"Bearer {agent.token()}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        text: str = r.read().decode()
        return text


def sample(text: str, name: str, adapter: str) -> float | None:
    m = re.search(rf'^{name}{{adapter="{adapter}"}} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else None


def wait_metric(agent: Any, name: str, adapter: str, ok: Any, what: str) -> float:
    def check() -> list[float]:  # a list: a value of 0.0 must count as found
        value = sample(scrape(agent), name, adapter)
        return [value] if value is not None and ok(value) else []

    return wait_until(check, timeout=30, what=what)[0]


@pytest.mark.parametrize("adapter", ["mqtt", "nats"])
def test_connected_and_dropped_events_follow_the_broker(
    adapter: str, mqtt_broker: Broker, nats_broker: Broker, make_agent: Any, tmp_path: Path
) -> None:
    """Connected 1 -> broker stopped: 0, and state events beyond the buffer are counted as
    dropped -> broker back: 1 again (the other adapter is not configured: no series)."""
    broker = mqtt_broker if adapter == "mqtt" else nats_broker
    table = (
        f'[mqtt]\nbroker = "tcp://127.0.0.1:{broker.port}"\nkeepalive = "5s"\n'
        if adapter == "mqtt"
        else f'[nats]\nurl = "nats://127.0.0.1:{broker.port}"\nreconnect_wait = "500ms"\n'
    )
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[device]\nid = "metered"\n\n'
        + table
        + 'state_interval = "200ms"\nhealth_interval = "0s"\nbuffer = 2\n'
    )
    agent = make_agent("--config", str(cfg)).start()
    connected, dropped = "keystone_broker_connected", "keystone_broker_events_dropped_total"
    wait_metric(agent, connected, adapter, lambda v: v == 1, f"{adapter} connected")
    text = scrape(agent)
    assert sample(text, dropped, adapter) == 0
    other = "nats" if adapter == "mqtt" else "mqtt"
    assert sample(text, connected, other) is None

    broker.stop()
    wait_metric(agent, connected, adapter, lambda v: v == 0, f"{adapter} disconnected")
    lost = wait_metric(agent, dropped, adapter, lambda v: v >= 3, "events dropped")
    broker.start()
    wait_metric(agent, connected, adapter, lambda v: v == 1, f"{adapter} reconnected")
    # The counter is a total: it never goes back.
    after = sample(scrape(agent), dropped, adapter)
    assert after is not None and after >= lost

"""A fleet-wide "sync now" over real brokers reaching several real git-synced agents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.integration.brokers.conftest import MqttProbe, NatsProbe, recipe_text
from tests.integration.sync.conftest import SignedFleet, signed_fleet  # noqa: F401

pytestmark = pytest.mark.integration


def fleet_agent(
    make_agent: Any,
    fleet: SignedFleet,
    tmp: Path,
    device: str,
    labels: list[str],
    mqtt: int,
    nats: int,
) -> Any:
    cfg = fleet.agent_config(
        tmp / f"{device}.toml",
        labels=labels,
        extra=(
            f'\n[mqtt]\nbroker = "tcp://127.0.0.1:{mqtt}"\nstate_interval = "0s"\n'
            f'health_interval = "0s"\n\n[nats]\nurl = "nats://127.0.0.1:{nats}"\n'
            'state_interval = "0s"\nhealth_interval = "0s"\n'
        ),
    )
    cfg.write_text(cfg.read_text().replace('id = "dev-1"', f'id = "{device}"'))
    return make_agent("--config", str(cfg), runtime=tmp / f"rt-{device}").start()


def applied(agent: Any) -> str | None:
    status, body = agent.api("GET", "/v1/revision")
    assert status == 200, body
    rev: str | None = body.get("applied")
    return rev


class TestFleetNudge:
    def test_label_and_fleet_sync_reach_every_agent_that_should_sync(
        self,
        signed_fleet: SignedFleet,  # noqa: F811
        mqtt_broker: Any,
        nats_broker: Any,
        make_agent: Any,
        tmp_path: Path,
        probes: list[Any],
    ) -> None:
        """keystone/label/gw/sync syncs the gw devices now; keystone.fleet.sync syncs them all."""
        fleet = signed_fleet
        files = {
            "recipes/nap.recipe.toml": recipe_text("nap"),
            "plans/default.toml": '[[components]]\nname = "nap"\nrecipe = "recipes/nap.recipe.toml"\n',
        }
        rev1 = fleet.commit(files, "v1")
        probe = MqttProbe(mqtt_broker.port).connect("keystone/+/resp/sync", "keystone/+/status")
        probes.append(probe)
        devices = {"gw-1": ["gw"], "gw-2": ["gw", "site"], "other-1": ["other"]}
        agents = {
            d: fleet_agent(
                make_agent, fleet, tmp_path, d, labels, mqtt_broker.port, nats_broker.port
            )
            for d, labels in devices.items()
        }
        for d, agent in agents.items():
            wait_until(lambda a=agent: applied(a) == rev1, timeout=60, what=f"{d} at v1")
            probe.wait(lambda t, p, r, d=d: t == f"keystone/{d}/status" and p == b"online")

        rev2 = fleet.commit({"recipes/nap.recipe.toml": recipe_text("nap", "1.0.1")}, "v2")
        probe.publish("keystone/label/gw/sync", {"correlationId": "nudge-1"})
        for d in ("gw-1", "gw-2"):
            _, raw, _ = probe.wait(lambda t, p, r, d=d: t == f"keystone/{d}/resp/sync", timeout=60)
            reply = json.loads(raw)
            assert reply["correlationId"] == "nudge-1" and reply["success"] is True, reply
            assert reply["data"]["result"] == "applied" and reply["data"]["revision"] == rev2
        assert applied(agents["other-1"]) == rev1, "a label nudge reached a device without it"

        nats = NatsProbe(nats_broker.port).connect()
        probes.append(nats)
        nats.publish("keystone.fleet.sync", {})
        wait_until(lambda: applied(agents["other-1"]) == rev2, timeout=60, what="other-1 at v2")
        assert {d: applied(a) for d, a in agents.items()} == dict.fromkeys(devices, rev2)

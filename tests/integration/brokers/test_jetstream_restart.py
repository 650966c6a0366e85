"""JetStream after nats-server restarts WITHOUT its store: the agent re-creates the stream and
its durable consumer (once, however many workers) and jobs flow again at once; a restart with
the store re-creates nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.integration.brokers.conftest import NatsProbe, recipe_text

pytestmark = pytest.mark.integration

DEV = "edge-js"


def job(job_id: str) -> dict[str, Any]:
    return {
        "id": job_id,
        "type": "add-recipe",
        "deviceId": DEV,
        "payload": {"content": recipe_text(job_id)},
        "createdAt": "2026-01-01T00:00:00Z",
    }


def test_the_stream_and_consumer_come_back_after_the_store_is_lost(
    nats_broker: Any, make_agent: Any, tmp_path: Path, probes: list[Any]
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[device]\nid = "{DEV}"\n\n'
        f'[nats]\nurl = "nats://127.0.0.1:{nats_broker.port}"\nreconnect_wait = "500ms"\n'
        'state_interval = "0s"\nhealth_interval = "0s"\njetstream = true\njs_workers = 3\n'
    )
    agent = make_agent("--config", str(cfg)).start()
    store = Path(nats_broker.argv[nats_broker.argv.index("-sd") + 1])

    def connect() -> NatsProbe:
        probe = NatsProbe(nats_broker.port).connect(f"keystone.{DEV}.jobs.results")
        probes.append(probe)
        return probe

    def consumer_ready(probe: NatsProbe) -> None:
        async def exists() -> bool:
            try:
                await probe.nc.jetstream().consumer_info("KEYSTONE_JOBS", f"keystone-{DEV}")
                return True
            except Exception:
                return False

        wait_until(lambda: probe.run(exists()), timeout=60, what="the durable consumer")

    def run_job(probe: NatsProbe, job_id: str) -> dict[str, Any]:
        async def publish() -> None:
            await probe.nc.jetstream().publish(
                f"keystone.{DEV}.jobs", json.dumps(job(job_id)).encode()
            )

        probe.run(publish())
        _, raw = probe.wait(lambda s, d: json.loads(d)["jobId"] == job_id, timeout=60)
        result: dict[str, Any] = json.loads(raw)
        return result

    probe = connect()
    consumer_ready(probe)
    assert run_job(probe, "before")["success"] is True
    probe.close()
    probes.remove(probe)

    # A restart WITH the store keeps the consumer: nothing is re-created.
    nats_broker.stop()
    nats_broker.start()
    probe = connect()
    consumer_ready(probe)
    assert run_job(probe, "kept")["success"] is True
    assert "re-created" not in agent.output()
    probe.close()
    probes.remove(probe)

    nats_broker.stop()
    shutil.rmtree(store)
    store.mkdir()
    nats_broker.start()

    probe = connect()
    consumer_ready(probe)
    result = run_job(probe, "after")
    assert result["success"] is True and result["data"] == {"name": "after", "version": "1.0.0"}

    async def state() -> tuple[int, int, list[str]]:
        js = probe.nc.jetstream()
        info = await js.consumer_info("KEYSTONE_JOBS", f"keystone-{DEV}")
        names = [s.config.name for s in await js.streams_info()]
        return info.num_ack_pending, info.num_redelivered, names

    wait_until(lambda: probe.run(state())[0] == 0, timeout=30, what="the job acked")
    _, redelivered, streams = probe.run(state())
    assert redelivered == 0 and streams == ["KEYSTONE_JOBS"]
    assert probe.messages.empty(), "a job result arrived twice"
    log = agent.output()
    assert log.count("were gone on the server: re-created") == 1, log

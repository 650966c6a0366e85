"""The JetStream job queue, as the Go Keystone has it.

Stream ``js_stream`` (default ``KEYSTONE_JOBS``) over ``keystone.*.jobs``, work-queue
retention, file storage, 7 days / 10,000 jobs / 100 MB, discard old; one durable consumer per
device, ``keystone-{deviceId}``, filtered on ``keystone.{deviceId}.jobs``, explicit ack, deliver
all. A job queued while the device is offline waits in the stream and is delivered when it
connects. A job is acked only after it completes (``in_progress`` keeps a long one from being
redelivered); a failure that may pass by itself is nak'ed with a 5 s delay and redelivered up to
``js_max_deliver`` times; a malformed or refused job is terminated (retrying cannot fix it).
Every result goes to ``keystone.{deviceId}.jobs.results``::

    job:    {"id", "type", "deviceId", "payload": {...}, "createdAt", "priority"?, "metadata"?}
    result: {"jobId", "success", "error"?, "data"?, "processedAt"}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from loguru import logger
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import NotFoundError

from keystone.adapters.common import JOB_TYPES, Commands, Reply, encode, utc_stamp
from keystone.brokerconfig import NatsConfig

FETCH_WAIT = 30.0
"""How long one pull waits for a job (an idle worker wakes this often)."""


def stream_config(name: str) -> api.StreamConfig:
    """Go's stream: work queue over every device's jobs subject."""
    return api.StreamConfig(
        name=name,
        description="Keystone agent job queue",
        subjects=["keystone.*.jobs"],
        retention=api.RetentionPolicy.WORK_QUEUE,
        max_msgs=10000,
        max_bytes=100 * 1024 * 1024,
        max_age=7 * 24 * 3600,
        storage=api.StorageType.FILE,
        num_replicas=1,
        discard=api.DiscardPolicy.OLD,
    )


class BadJob(ValueError):
    """A job that cannot run: its id (``unknown`` when unreadable, as in Go) and why."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


def parse_job(data: bytes) -> tuple[str, str, dict[str, Any]]:
    """(id, type, payload) of a job message; ``BadJob`` says what is wrong."""
    try:
        job = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadJob("unknown", f"invalid job format: {exc}") from None
    if not isinstance(job, dict):
        raise BadJob("unknown", "invalid job format: expected a JSON object")
    job_id = str(job["id"]) if isinstance(job.get("id"), str | int) else "unknown"
    kind = job.get("type")
    if kind not in JOB_TYPES:
        raise BadJob(job_id, f"unknown job type: {kind}")
    payload = job.get("payload") or {}
    if not isinstance(payload, dict):
        raise BadJob(job_id, "invalid job format: payload must be a JSON object")
    return job_id, str(kind), payload


class JobQueue:
    """``js_workers`` pull workers on the device's durable consumer."""

    def __init__(self, nc: Client, cfg: NatsConfig, subjects: Any, commands: Commands) -> None:
        self.nc = nc
        self.cfg = cfg
        self.subjects = subjects
        self.commands = commands
        self.durable = f"keystone-{subjects.device_id}"
        self.processed = 0
        self._workers: list[asyncio.Task[None]] = []
        self._sub: Any = None

    async def start(self) -> None:
        js = self.nc.jetstream()
        try:
            await js.stream_info(self.cfg.js_stream)
        except NotFoundError:
            await js.add_stream(stream_config(self.cfg.js_stream))
        consumer = api.ConsumerConfig(
            durable_name=self.durable,
            description=f"Keystone agent consumer for device {self.subjects.device_id}",
            filter_subject=self.subjects.jobs,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.cfg.js_ack_wait,
            max_deliver=self.cfg.js_max_deliver,
            max_ack_pending=self.cfg.js_max_ack_pending,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        self._sub = await js.pull_subscribe(
            self.subjects.jobs, durable=self.durable, stream=self.cfg.js_stream, config=consumer
        )
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work(i)) for i in range(self.cfg.js_workers)]
        logger.info(
            "[nats] JetStream consumer {} on {} ({} worker(s))",
            self.durable,
            self.subjects.jobs,
            self.cfg.js_workers,
        )

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers.clear()

    async def _work(self, index: int) -> None:
        backoff = 1.0
        while True:
            try:
                msgs = await self._sub.fetch(1, timeout=FETCH_WAIT)
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                continue
            except Exception as exc:  # disconnected: nats-py reconnects; try again later
                logger.debug("[nats] job worker {}: {}", index, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            for msg in msgs:
                await self.process(msg)

    async def process(self, msg: Msg) -> Reply:
        """Run one job, then ack, nak or terminate it, and publish its result."""
        try:
            job_id, kind, payload = parse_job(msg.data)
        except BadJob as exc:
            job_id, reply = exc.job_id, Reply(False, error=str(exc))
            logger.warning("[nats] job {} refused: {}", job_id, exc)
            with contextlib.suppress(Exception):
                await msg.term()
            await self._result(job_id, reply)
            return reply
        logger.info("[nats] processing job id={} type={}", job_id, kind)
        heartbeat = asyncio.get_running_loop().create_task(self._in_progress(msg))
        try:
            reply = await self.commands.execute(kind, payload)
        finally:
            heartbeat.cancel()
        try:
            if reply.success:
                await msg.ack_sync()
            elif reply.retryable:
                await msg.nak(delay=5)
            else:
                await msg.term()
        except Exception as exc:
            logger.warning("[nats] job {}: acknowledgement failed: {}", job_id, exc)
        self.processed += 1
        await self._result(job_id, reply)
        return reply

    async def _in_progress(self, msg: Msg) -> None:
        every = max(self.cfg.js_ack_wait / 3, 0.5)
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _result(self, job_id: str, reply: Reply) -> None:
        doc: dict[str, Any] = {"jobId": job_id, "success": reply.success}
        if reply.error:
            doc["error"] = reply.error
        if reply.data is not None:
            doc["data"] = reply.data
        doc["processedAt"] = utc_stamp(time.time())
        try:
            await self.nc.publish(self.subjects.job_results, encode(doc))
        except Exception as exc:
            logger.warning("[nats] job {}: result not published: {}", job_id, exc)

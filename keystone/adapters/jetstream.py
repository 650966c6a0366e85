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
from nats.js.errors import BadRequestError, NotFoundError

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
        self.generation = 0  # how many times the consumer was (re-)created
        self._workers: list[asyncio.Task[None]] = []
        self._sub: Any = None
        self._lock = asyncio.Lock()
        self._recovery: asyncio.Task[None] | None = None
        self._fetching: set[asyncio.Task[Any]] = set()  # workers waiting in a pull

    def _consumer_config(self) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name=self.durable,
            description=f"Keystone agent consumer for device {self.subjects.device_id}",
            filter_subject=self.subjects.jobs,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.cfg.js_ack_wait,
            max_deliver=self.cfg.js_max_deliver,
            max_ack_pending=self.cfg.js_max_ack_pending,
            deliver_policy=api.DeliverPolicy.ALL,
        )

    async def ensure(self) -> None:
        """Create the stream (if missing) and the durable consumer, and pull from it.

        Idempotent: what exists is kept (JetStream also answers an identical definition with the
        existing one), and one lock keeps this queue's workers from doing it at once.
        """
        async with self._lock:
            js = self.nc.jetstream()
            try:
                await js.stream_info(self.cfg.js_stream)
            except NotFoundError:
                try:
                    await js.add_stream(stream_config(self.cfg.js_stream))
                except BadRequestError as exc:
                    # Another device created it in the meantime (10058: name already in use).
                    if exc.err_code != 10058:
                        raise
            try:
                # An existing consumer is bound as it is (as nats-py's pull_subscribe does).
                await js.consumer_info(self.cfg.js_stream, self.durable)
            except NotFoundError:
                await js.add_consumer(self.cfg.js_stream, self._consumer_config())
            old, self._sub = (
                self._sub,
                await js.pull_subscribe_bind(self.durable, self.cfg.js_stream),
            )
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.unsubscribe()
            self.generation += 1

    async def start(self) -> None:
        await self.ensure()
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work(i)) for i in range(self.cfg.js_workers)]
        logger.info(
            "[nats] JetStream consumer {} on {} ({} worker(s))",
            self.durable,
            self.subjects.jobs,
            self.cfg.js_workers,
        )

    async def check(self) -> bool:
        """Re-create the stream and consumer if the server lost them (a restart without its
        store); True if they were re-created. Errors (JetStream not ready yet) propagate."""
        try:
            await self.nc.jetstream().consumer_info(self.cfg.js_stream, self.durable)
            return False
        except NotFoundError:
            pass
        generation = self.generation
        async with self._lock:
            if self.generation != generation:
                return False  # another worker (or the reconnect) has just done it
        await self.ensure()
        logger.warning(
            "[nats] JetStream stream {} / consumer {} were gone on the server: re-created",
            self.cfg.js_stream,
            self.durable,
        )
        self._restart_pulls()
        return True

    def _restart_pulls(self) -> None:
        """Start the workers waiting in a pull again: a pull asked of a server that has since
        gone (restarted, or lost its consumer) is never answered, and the worker would sit out
        its whole ``FETCH_WAIT``. A worker running a job finishes it and moves over by itself."""
        current = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for i, task in enumerate(self._workers):
            if task in self._fetching and task is not current:
                task.cancel()
                self._workers[i] = loop.create_task(self._work(i))

    def reconnected(self) -> None:
        """The connection is back: the server may be a new one without its store."""
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        delay = 0.5
        while True:
            try:
                if not await self.check():
                    self._restart_pulls()  # the pulls asked before the reconnect are lost
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # JetStream not ready on a server that just started
                logger.debug("[nats] JetStream check: {}; again in {:g}s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def stop(self) -> None:
        tasks = [*self._workers, *([self._recovery] if self._recovery else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers.clear()
        self._recovery = None

    async def _work(self, index: int) -> None:
        backoff = 1.0
        while True:
            try:
                msgs = await self._fetch()
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                if index == 0:
                    # An idle queue: one worker makes sure the consumer still exists.
                    with contextlib.suppress(Exception):
                        await self.check()
                continue
            except Exception as exc:  # disconnected: nats-py reconnects; try again later
                logger.debug("[nats] job worker {}: {}", index, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                with contextlib.suppress(Exception):
                    await self.check()
                continue
            backoff = 1.0
            for msg in msgs:
                await self.process(msg)

    async def _fetch(self) -> list[Msg]:
        me = asyncio.current_task()
        assert me is not None
        self._fetching.add(me)
        try:
            msgs: list[Msg] = await self._sub.fetch(1, timeout=FETCH_WAIT)
            return msgs
        finally:
            self._fetching.discard(me)

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

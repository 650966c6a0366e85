"""The composition root: builds the node, slot, sync engine, triggers and API, and runs them.

The agent is one asyncio event loop. ``Node`` owns the deployer, snapshot and history;
``DesiredSlot`` is the one serial lane every change goes through; ``SyncEngine`` runs the sync
pipeline; the triggers (poll schedule, staged bundles, USB watcher) submit to it; the HTTP API
runs in its own small thread pool and calls ``ControlService``, which marshals work onto the
loop. Nothing here is logic of its own: it is wiring and the run loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from loguru import logger

from keystone.agentlock import AgentLock
from keystone.config import AgentConfig
from keystone.drift import DriftMonitor
from keystone.env import substitution_env
from keystone.errors import ValidationError
from keystone.node import Node
from keystone.plan import DesiredPlan, FileRecipes, merge_entries, parse_plan, resolve_entries
from keystone.recipesig import RecipeFileVerifier
from keystone.runtime.logs import rotate_logs
from keystone.runtime.supervisor import RestartTuning
from keystone.service import ControlService
from keystone.slot import DesiredSlot
from keystone.stick import StickReporter
from keystone.sync.engine import SyncEngine
from keystone.sync.model import RequestKind, SyncRequest
from keystone.sync.pipeline import SyncSettings
from keystone.sync.scheduler import device_offset
from keystone.sync.triggers import BundleWatch, PollTrigger, StagedBundles, Trigger
from keystone.units import parse_size

if TYPE_CHECKING:
    from keystone.selfupdate import SelfUpdater, Trial


class Agent:
    """One device's agent: wiring and the run loop."""

    def __init__(
        self, config: AgentConfig, *, http: str | None = None, tuning: RestartTuning | None = None
    ) -> None:
        self.config = config
        self.node = Node(config, tuning=tuning)
        self.runtime = self.node.runtime
        # ``--http ""`` (the Go agent's way) runs without the HTTP API.
        self.listen = config.api.listen if http is None else http
        self.slot = DesiredSlot()
        self.service = ControlService(config, self.node, self.slot)
        self.drift = self.service.drift_monitor = DriftMonitor(
            self.node.deployer,
            emit=self.node.emit,
            metrics=self.node.metrics,
            submit=self.slot.submit,
        )
        self.reporter = StickReporter(self.node, device=config.device_id, drift=self.drift)
        self.engine: SyncEngine | None = None
        self.triggers: list[Trigger] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.api: Any = None
        self.notifier: Any = None
        self._shutdown: asyncio.Event | None = None
        # One serving agent per runtime dir; a self-update hands the lock over.
        self.lock = AgentLock(self.runtime)
        # Set by a self-update: stop serving without stopping components, then run this.
        self.after_detach: Callable[[], NoReturn] | None = None
        self.trial: Trial | None = None
        self.node.configure_updater = self._configure_updater

    def load_plan_file(
        self,
        path: Path,
        *,
        root: Path | None = None,
        verify_signatures: bool = True,
        insecure_skip_verify: bool = False,
    ) -> DesiredPlan:
        """Validate a local plan file and its recipes (raises before anything runs).

        With a trust bundle configured, every recipe file it names must carry a valid
        ``<recipe>.sig`` (:mod:`keystone.recipesig`); ``verify_signatures=False`` is for the
        built-in demo, whose recipes ship inside the package.
        """
        text = _read_plan(path)
        pf = parse_plan(text, file=str(path))
        entries, unknown = merge_entries([pf])
        verify = (
            RecipeFileVerifier.from_env(insecure_skip_verify=insecure_skip_verify)
            if verify_signatures
            else None
        )
        return resolve_entries(
            entries,
            FileRecipes(root or Path.cwd(), self.node.store, verify=verify, allow_absolute=True),
            environ=substitution_env(),
            sources=(str(path),),
            unknown=unknown,
        )

    async def run(self, *, initial: DesiredPlan | None = None, initial_source: str = "") -> int:
        """Run until SIGTERM/SIGINT; stop every component in reverse order; return 0."""
        node = self.node
        self.loop = node.loop = self.service.loop = asyncio.get_running_loop()
        self._shutdown = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._shutdown.set)
        if os.environ.get("KEYSTONE_SELFUPDATE_TRIAL"):
            # lazy: only an agent started by a self-update
            from keystone.selfupdate import announce_waiting

            announce_waiting()
        self.lock.acquire()
        if os.environ.get("KEYSTONE_SELFUPDATE_TRIAL"):
            self._begin_trial()
        if self.listen:
            self._start_api()
        else:
            logger.info('HTTP API disabled (--http "")')
        await node.restore()
        if self.trial is not None or node.has_updater_state():
            node.updater.on_start(trial=self.trial is not None)
        if initial is not None:
            result = await node.apply(initial, source=initial_source, record=True)
            if not result.ok:
                logger.error("initial plan failed: {}: {}", result.failed, result.reason)
        node.plan_state = (
            "stopped"
            if node.stopped
            else ("running" if node.deployer.applied.components else "idle")
        )
        node.start_datasets()
        self._start_notifier()
        self._start_sync()
        self._start_brokers()  # brokers
        self._start_reconcile_timer()
        node.background(self.reporter.ensure_key())
        if self.config.drift_interval > 0:
            node.background(self.drift.run(self.config.drift_interval))
        node.background(self._rotate_logs())
        logger.info(
            "agent ready: {} component(s); API on {}",
            len(node.deployer.supervisors),
            self.listen or "none",
        )
        if self.trial is not None:
            self.trial.ready()
        await self._shutdown.wait()
        self.service.closed = True  # /healthz says so while the components stop
        if self.after_detach is not None:
            await self._detach(self.after_detach)
        logger.info("shutting down: stopping components in reverse order")
        if self.notifier is not None:
            self.notifier.stopping()
        for trigger in self.triggers:
            await trigger.stop()
        if self.engine is not None:
            await self.engine.close()
        await self.slot.close()
        await node.close()
        if self.api is not None:
            self.api.stop()
        return 0

    # --- self-update (keystone.selfupdate) ---------------------------------------------------

    def _configure_updater(self, updater: SelfUpdater) -> None:
        updater.submit = self.slot.submit
        updater.request_handover = self._request_detach
        updater.listen = self.listen
        updater.tls = bool(self.config.api.tls_cert and self.config.api.tls_key)

    def _request_detach(self, after: Callable[[], NoReturn]) -> None:
        """Stop serving (components keep running), then run ``after`` (it never returns)."""
        if self.after_detach is None:
            self.after_detach = after
        if self._shutdown is not None:
            self._shutdown.set()

    async def _detach(self, after: Callable[[], NoReturn]) -> NoReturn:
        logger.info("self-update: the agent stops serving; components keep running")
        for trigger in self.triggers:
            await trigger.stop()
        if self.engine is not None:
            await self.engine.close()
        await self.slot.close()
        if self.api is not None:
            self.api.stop()
        await self.node.detach()
        self.lock.release()
        after()

    def _begin_trial(self) -> None:
        """This agent was started by a self-update: serve only while the old one guards it."""
        # lazy: only an agent on trial loads the handover code here
        from keystone.selfupdate import GIVE_BACK, Trial

        trial = Trial.from_env(self.runtime)
        if trial is None:
            return
        if not trial.guardian_alive():
            self.lock.release()
            trial.yield_back()
        self.trial = trial
        assert self.loop is not None

        def give_back() -> None:
            logger.info("self-update: the old agent takes its components back")
            self._request_detach(_exit_now)

        def guardian_gone() -> None:
            if trial.committed():
                trial.promote()
                self.trial = None
                self.node.updater.finished(trial.handover)
                self._notify_main()
                logger.info("self-update to {} complete: this agent serves", trial.handover["to"])
            else:
                self._request_detach(trial.yield_back)

        self.loop.add_signal_handler(GIVE_BACK, give_back)
        trial.watch(self.loop, guardian_gone)

    def _notify_main(self) -> None:
        """Under systemd: tell the unit this process is its main one now (``MAINPID=``)."""
        if self.notifier is not None:
            self.notifier.pid = os.getpid()
            self.notifier.ready("self-update complete")

    def request_shutdown(self) -> None:
        if self.loop is not None and self._shutdown is not None:
            self.loop.call_soon_threadsafe(self._shutdown.set)

    # --- wiring -----------------------------------------------------------------------------

    def _start_api(self) -> None:
        # The API server module is loaded only by an agent that serves it.
        from keystone.api import ApiServer, TlsConfig, resolve_token

        tls = None
        api = self.config.api
        if api.tls_cert and api.tls_key:
            tls = TlsConfig(cert=api.tls_cert, key=api.tls_key, client_ca=api.client_ca)
        token = resolve_token(self.runtime, os.environ)
        self.api = ApiServer(
            self.service,
            listen=self.listen,
            token=token,
            token_file=self.runtime / "api.token",
            tls=tls,
            limits=self.config.limits,
        )
        self.api.start()

    def _start_notifier(self) -> None:
        # systemd notification is only wanted under systemd; its module stays out otherwise.
        from keystone.systemd import Notifier

        self.notifier = Notifier()
        self.notifier.ready()
        interval = self.notifier.watchdog_interval()
        if interval:
            self.node.background(self._watchdog(interval))

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.ping()
            await asyncio.sleep(interval)

    def _start_sync(self) -> None:
        """The sync engine and its triggers: polling with a source; staged and watched bundles."""
        cfg = self.config
        engine = SyncEngine(self.node, SyncSettings.from_config(cfg, self.runtime), self.slot)
        self.engine = self.service.engine = engine
        self.node.on_component_change = engine.on_component_change
        engine.start()
        if self.node.recover_to is not None and not self.node.stopped:
            # The snapshot was older than the mirror's verified anchor: deploy the anchor now.
            engine.submit(
                SyncRequest(kind=RequestKind.ROLLBACK, to=self.node.recover_to, trigger="recovery")
            )
        if cfg.source is not None and cfg.source.url:
            self.triggers.append(
                PollTrigger(
                    engine,
                    interval=cfg.source.interval,
                    jitter=cfg.source.jitter,
                    device_id=cfg.device_id,
                )
            )
        self.triggers.append(StagedBundles(engine, self.runtime))
        if cfg.bundle_watch:
            self.triggers.append(BundleWatch(engine, cfg.bundle_watch, on_imported=self.reporter))
        for trigger in self.triggers:
            trigger.start()

    def _start_brokers(self) -> None:  # brokers: the MQTT / NATS adapters are triggers too
        cfg = self.config
        if not ((cfg.mqtt and cfg.mqtt.broker) or (cfg.nats and cfg.nats.url)):
            return
        # The adapters and their client libraries load only on an agent that uses a broker.
        from keystone.adapters.wiring import build_adapters, chain_change

        adapters = build_adapters(cfg, self.service, self.node.metrics)
        self.node.on_component_change = chain_change(self.node.on_component_change, adapters)
        for adapter in adapters:
            adapter.start()
        self.triggers.extend(adapters)

    def _start_reconcile_timer(self) -> None:
        interval = self.config.reconcile_interval
        if interval <= 0 or (self.config.source is not None and self.config.source.url):
            return  # with a source, every sync tick repairs too

        async def loop() -> None:
            jitter = (
                self.config.reconcile_jitter
                if self.config.reconcile_jitter is not None
                else interval * 0.1
            )
            await asyncio.sleep(device_offset(self.config.device_id, jitter))
            while True:
                await self.node.repair()
                await asyncio.sleep(interval)

        self.node.background(loop())

    async def _rotate_logs(self, every: float = 60.0) -> None:
        """Rotate component logs past ``KEYSTONE_LOG_MAX_BYTES`` (10 MiB), keeping 3 old files."""
        max_bytes = parse_size(os.environ.get("KEYSTONE_LOG_MAX_BYTES") or "10M")
        while True:
            await asyncio.sleep(every)
            dirs = {sup.paths.logdir for sup in self.node.deployer.supervisors.values()}
            for d in dirs:
                try:
                    await asyncio.to_thread(rotate_logs, d, max_bytes, 3)
                except OSError as exc:
                    logger.warning("log rotation in {} failed: {}", d, exc)


def _exit_now() -> NoReturn:
    # lazy: as in _begin_trial
    from keystone.selfupdate import exit_now

    exit_now(0)


def _read_plan(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValidationError("plan file not found", file=str(path)) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ValidationError(f"cannot read plan: {exc}", file=str(path)) from None

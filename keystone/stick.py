"""The agent's side of reports on the stick: after a watched bundle is imported, write a signed
report next to it (``keystone.report`` has the format, the key and the signing worker).

The report carries the device, the bundle it answers (name, sha256), the outcome of the import,
the applied and last known-good revisions with their signer, every component's state (with its
drift), the last drift check, and recent history. Signing runs in the ``keystone.report``
worker process (cryptography stays out of the agent); writing runs in a thread. A read-only or
full stick, or a failing worker, is logged and never stops the agent.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from loguru import logger

from keystone import __version__, report
from keystone.drift import DriftMonitor
from keystone.node import Node
from keystone.workerproc import call

REPORT_WORKER = "keystone.report"
HISTORY = 20


class StickReporter:
    """Writes ``keystone-report-<device>-<time>.json`` beside each imported watched bundle."""

    def __init__(
        self,
        node: Node,
        *,
        device: str,
        drift: DriftMonitor | None = None,
        history: int = HISTORY,
        timeout: float = 60.0,
    ) -> None:
        self.node = node
        self.device = device
        self.drift = drift
        self.history = history
        self.timeout = timeout
        self.state_dir = node.runtime / "state"

    async def _worker(self, request: dict[str, Any]) -> dict[str, Any] | None:
        reply = await call(
            self.node.runner,
            REPORT_WORKER,
            {**request, "state": str(self.state_dir)},
            cwd=self.node.runtime,
            env=os.environ,
            timeout=self.timeout,
        )
        answer = reply.answer
        if answer is None or answer.get("error"):
            why = (answer or {}).get("error") or f"exited {reply.returncode} without an answer"
            logger.error("report worker ({}): {}", request.get("op"), why)
            return None
        return answer

    async def ensure_key(self) -> dict[str, str] | None:
        """Make the device key at first start (nothing when it exists); its public info."""
        info = report.public_info(self.state_dir)
        if info is not None:
            return info
        answer = await self._worker({"op": "keygen"})
        info = report.public_info(self.state_dir)
        if answer is not None and info is not None:
            logger.info("device key created: {} {}", info["algorithm"], info["fingerprint"])
        return info

    def collect(
        self, bundle: Path, digest: str, result: dict[str, Any], now: float
    ) -> dict[str, Any]:
        """The report of one import (unsigned)."""
        node = self.node
        led = node.ledger
        comps = []
        for name, sup in sorted(node.deployer.supervisors.items()):
            row = sup.to_json()
            comps.append(
                {
                    "name": name,
                    "version": row.get("version"),
                    "state": row.get("state"),
                    "phase": row.get("phase"),
                    "pid": row.get("pid"),
                    "restarts": row.get("restarts"),
                    "error": row.get("error"),
                    "drift": self.drift.of(sup) if self.drift is not None else None,
                }
            )
        drift = None
        if self.drift is not None:
            summary = self.drift.to_json()
            drift = {"last_check": summary["last_check"], "drifted": summary["drifted"]}
        return {
            "format": report.FORMAT,
            "device": self.device,
            "agent_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "bundle": {"file": bundle.name, "sha256": digest},
            "outcome": result.get("result"),
            "error": result.get("error"),
            "revision": {
                "applied": led.applied,
                "last_known_good": led.last_known_good,
                "signer": led.signer,
                "fingerprint": led.fingerprint,
            },
            "components": comps,
            "drift": drift,
            "history": node.events.newest(self.history),
            "sync": result,
        }

    async def __call__(self, bundle: Path, digest: str, result: dict[str, Any]) -> Path | None:
        """Write the report of the import of ``bundle``; its path, or None when it could not
        be written (logged)."""
        now = time.time()
        doc = self.collect(bundle, digest, result, now)
        answer = await self._worker({"op": "sign", "report": doc})
        if answer is None:
            return None
        try:
            path = await asyncio.to_thread(
                report.write_document, bundle.parent, self.device, now, answer["document"]
            )
        except OSError as exc:  # a read-only or full stick: the import itself stands
            logger.warning("cannot write the report next to {}: {}", bundle, exc)
            return None
        logger.info("report written: {}", path)
        return path

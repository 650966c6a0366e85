"""What the sync engine needs from the agent that hosts it: a narrow Protocol.

The engine never imports the composition root. It applies a plan with its change set, reads
the applied plan and the ledger, writes history events, saves the snapshot, runs the sync
worker, counts metrics and owns background tasks through this seam; unit tests pass a fake.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, Protocol

from keystone.ledger import Ledger
from keystone.plan import DesiredPlan
from keystone.runtime.deployer import ArtifactContext, DeployResult, PlannedChanges
from keystone.sync.model import WorkerAnswer, WorkerRequest


class SyncMetrics(Protocol):
    """The metrics the engine records (``keystone.metrics.Metrics``)."""

    def sync(self, result: str, source: str, duration: float) -> None: ...

    def signature_failure(self, kind: str) -> None: ...

    def set_revision(self, revision: str, source: str) -> None: ...

    def rollback(self, result: str) -> None: ...

    def rollout(
        self,
        *,
        revision: str,
        wave: int,
        canary: bool,
        outcome: str,
        until: float | None,
        halted: bool,
    ) -> None: ...


class SyncHost(Protocol):
    """The agent as the sync engine sees it."""

    @property
    def ledger(self) -> Ledger:
        """The ledger of revisions (saved with the snapshot)."""
        ...

    @property
    def applied_plan(self) -> DesiredPlan:
        """The plan that runs now."""
        ...

    @property
    def metrics(self) -> SyncMetrics | None:
        """Where sync metrics go (None: nowhere)."""
        ...

    def environ(self) -> Mapping[str, str]:
        """The ``${VAR}`` substitution environment for plans and recipes."""
        ...

    async def apply(
        self,
        plan: DesiredPlan,
        *,
        source: str,
        planned: PlannedChanges | None,
        artifacts: ArtifactContext,
    ) -> DeployResult:
        """Deploy ``plan`` with its change set (the engine writes the history record)."""
        ...

    def emit(self, event: dict[str, Any]) -> None:
        """Append one entry to the history."""
        ...

    def save_now(self) -> None:
        """Write the snapshot now (before and after a deployment)."""
        ...

    def save_soon(self) -> None:
        """Write the snapshot at the next turn of the loop."""
        ...

    async def run_worker(self, request: WorkerRequest, *, timeout: float) -> WorkerAnswer:
        """Run the sync worker once (refusals and crashes are answers)."""
        ...

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` as a task the agent owns (cancelled at shutdown)."""
        ...

    async def import_bundle_datasets(
        self, root: Path, error: str | None, *, plan: DesiredPlan | None = None
    ) -> list[dict[str, Any]]:
        """Hand a verified bundle's datasets (``root/datasets``) to the dataset manager.

        ``plan`` is the revision about to be deployed: its components' datasets are the ones
        imported (so a required dataset that only the bundle carries is there at first start).
        ``error`` says why they could not be copied out of the bundle. Returns one record per
        dataset (``name``, ``result``, ``version``, ``reason``); never raises.
        """
        ...

    async def repair(self) -> list[str]:
        """Start what the applied plan says should run and does not."""
        ...

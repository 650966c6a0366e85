"""The pipeline's ``datasets`` step: a verified bundle's datasets go to the host before the deploy."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from keystone.sync import pipeline as p
from keystone.sync.model import SyncRequest
from tests.unit.test_sync_pipeline import FakeHost, context, verified_answer


@dataclass
class DatasetHost(FakeHost):
    imported: list[tuple[Path, str | None]] = field(default_factory=list)

    plans: list[Any] = field(default_factory=list)

    async def import_bundle_datasets(
        self, root: Path, error: str | None, *, plan: Any = None
    ) -> list[dict[str, Any]]:
        self.imported.append((root, error))
        self.plans.append(plan)
        if error:
            return [{"name": "", "result": "failed", "reason": error}]
        return [{"name": "cve", "result": "updated", "version": "2026-08-16"}]


@pytest.mark.parametrize(
    ("wire", "called", "records"),
    [
        ({}, [], None),
        (
            {"bundle_datasets": "/rt/bundles/datasets"},
            [(Path("/rt/bundles/datasets"), None)],
            [{"name": "cve", "result": "updated", "version": "2026-08-16"}],
        ),
        (
            {"bundle_datasets_error": "damaged"},
            [(Path("."), "damaged")],
            [{"name": "", "result": "failed", "reason": "damaged"}],
        ),
    ],
)
def test_the_bundle_datasets_before_the_deployment(
    wire: dict[str, str], called: list[tuple[Path, str | None]], records: Any
) -> None:
    """Handed over with the plan about to deploy, after prepare and before deploy; the applied
    result names them."""
    answer = verified_answer("db")
    answer = replace(answer, tip=replace(answer.tip, wire=wire))
    host = DatasetHost(answer=answer)
    result = asyncio.run(p.run_pipeline(context(SyncRequest(trigger="bundle"), host)))
    doc = result.to_json()
    assert doc["result"] == "applied" and host.imported == called
    assert all(plan is not None and "db" in plan.components for plan in host.plans)
    assert p.STEPS.index(p.datasets) == p.STEPS.index(p.deploy) - 1
    assert doc.get("datasets") == records
    assert host.events[-1].get("datasets") == records
    for c in host.tasks:
        c.close()

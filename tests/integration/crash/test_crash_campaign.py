"""The crash campaign in the suite: a real agent SIGKILLed at seeded random instants.

``KEYSTONE_CRASH_RUNS`` (default 6) and ``KEYSTONE_CRASH_SEED`` (default 10) choose the runs;
``scripts/crash-campaign --runs N`` sets them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from .campaign import campaign

pytestmark = [pytest.mark.integration, pytest.mark.crash]


def test_agent_killed_anywhere_in_a_deployment_converges(
    signed_fleet: Any, make_agent: Any, tmp_path: Path
) -> None:
    """After every kill and restart: one process per component, one revision, status agrees."""
    runs = int(os.environ.get("KEYSTONE_CRASH_RUNS") or 6)
    seed = int(os.environ.get("KEYSTONE_CRASH_SEED") or 10)
    agent = make_agent("--config", str(signed_fleet.agent_config(tmp_path / "agent.toml")))
    tally = campaign(signed_fleet, agent, runs, seed)
    bad = [o for o in tally.outcomes if not o.converged]
    assert not bad, (tally.summary(), bad)

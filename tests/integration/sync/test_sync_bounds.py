"""A signed revision over the component bound is refused clearly by a real agent, and what
runs keeps running."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .conftest import SignedFleet
from .test_sync import base_fleet, pids, revision, sync

pytestmark = pytest.mark.integration


class TestComponentBound:
    def test_ten_thousand_components_are_refused(
        self, signed_fleet: SignedFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        """A signed plan of 10,000 components is refused naming the bound and how to raise
        it; the running revision and its processes are untouched."""
        f = signed_fleet
        first = base_fleet(f)
        agent = make_agent("--config", str(f.agent_config(tmp_path / "agent.toml"))).start()
        code, out = sync(agent)
        assert code == 0 and out["revision"] == first, out
        agent.wait_states({"db": "healthy", "api": "healthy", "tool": "healthy"})
        before = pids(agent)
        plan = "".join(
            f'[[components]]\nname = "c{i}"\nrecipe = "recipes/tool.recipe.toml"\n'
            for i in range(10_000)
        )
        f.commit({"plans/default.toml": plan}, "ten thousand components")
        code, out = sync(agent)
        assert out["result"] == "refused", out
        err = out["error"]
        assert "10000 components; the limit is 1000 components" in err, err
        assert "KEYSTONE_MAX_COMPONENTS" in err and "[limits] max_components" in err
        assert pids(agent) == before
        assert revision(agent)["applied"] == first

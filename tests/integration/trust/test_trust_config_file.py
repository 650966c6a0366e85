"""``[trust] trust_bundle`` in agent.toml reaches the recipe signature check of a real agent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent.conftest import make_agent  # noqa: F401 - the fixture
from tests.integration.artifacts.conftest import Pki

from .test_recipe_signatures import openssl_sign, pki, write  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration


def test_trust_bundle_from_agent_toml(make_agent: Any, tmp_path: Path, pki: Pki) -> None:  # noqa: F811
    """No KEYSTONE_TRUST_BUNDLE: the file's trust bundle refuses an unsigned recipe, then the
    same recipe signed with openssl starts."""
    recipe, plan = write(tmp_path)
    config = tmp_path / "agent.toml"
    config.write_text(f'[trust]\ntrust_bundle = "{pki.cert("ca")}"\n')
    env = {"KEYSTONE_TRUST_BUNDLE": "", "KEYSTONE_LEAF_CERT": ""}
    refused = make_agent("--config", str(config), "--apply", str(plan), env=env).start(wait=False)
    assert refused.proc.wait(60) == 3
    assert "missing detached signature app.recipe.toml.sig" in refused.output()

    openssl_sign(pki, "leaf-p256", recipe)
    signed = make_agent("--config", str(config), "--apply", str(plan), env=env).start()
    signed.wait_states({"app": "healthy"}, timeout=60)
    assert "signature verified (signed by" in signed.output()


def test_a_missing_trust_bundle_names_the_line(make_agent: Any, tmp_path: Path) -> None:  # noqa: F811
    config = tmp_path / "agent.toml"
    config.write_text('[device]\nid = "d"\n\n[trust]\ntrust_bundle = "nowhere.pem"\n')
    agent = make_agent("--config", str(config)).start(wait=False)
    assert agent.proc.wait(60) != 0
    assert f"{config}:5" in agent.output() and "nowhere.pem" in agent.output()

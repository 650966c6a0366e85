"""A real agent run the way Go's dev-sign.sh tells its user to: recipe and artifact signed with
its material (current Ed25519 and first RSA versions), ``KEYSTONE_TRUST_BUNDLE=ca.pem``,
``KEYSTONE_LEAF_CERT=leaf.pem``, the artifact served over HTTP with its ``.sig`` beside it."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent.conftest import make_agent  # noqa: F401 - the fixture
from tests.integration.trust.test_go_signing_interop import (
    KINDS,
    dev_sign_material,
    openssl_sign,
)

pytestmark = pytest.mark.integration

APP = b"#!/bin/sh\nexec sleep 3600\n"

RECIPE = """\
[metadata]
name = "com.keystone.server"
version = "1.0.0"

[[artifacts]]
uri = "{url}/server-bin"
sha256 = "{sha}"
sig_uri = "{url}/server-bin.sig"

[lifecycle.install]
script = "cp ../../../artifacts/com.keystone.server/1.0.0/server-bin ./server && chmod +x server"

[lifecycle.run.exec]
command = "./server"
"""


@pytest.fixture
def www(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", KINDS)
def test_dev_sign_material_verifies_in_a_real_agent(
    make_agent: Any,  # noqa: F811
    tmp_path: Path,
    www: tuple[str, Path],
    kind: str,
) -> None:
    """Signed as dev-sign.sh signs (Ed25519 over the digest, or openssl dgst -sha256 -sign with
    RSA), the recipe and its artifact verify against a v1 leaf and a CA without keyUsage; the
    component runs. An artifact signature made by another key is refused and nothing starts."""
    url, root = www
    ca, key, leaf = dev_sign_material(tmp_path / "trust", kind)
    (root / "server-bin").write_bytes(APP)
    openssl_sign(tmp_path, key, root / "server-bin", kind)
    recipe = tmp_path / "com.keystone.server.recipe.toml"
    recipe.write_text(RECIPE.format(url=url, sha=hashlib.sha256(APP).hexdigest()))
    openssl_sign(tmp_path, key, recipe, kind)
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[[components]]\nname = "server"\nrecipe = "{recipe.name}"\n')
    env = {"KEYSTONE_TRUST_BUNDLE": str(ca), "KEYSTONE_LEAF_CERT": str(leaf)}

    agent = make_agent("--apply", str(plan), env=env).start()
    comps = agent.wait_states({"server": "healthy"}, timeout=60)
    assert comps["server"]["state"] == "running" and comps["server"]["pid"] > 0
    assert "signature verified (signed by" in agent.output()
    assert agent.stop() == 0

    # The same artifact signed by a key the trust bundle does not know: refused.
    _, other_key, _ = dev_sign_material(tmp_path / "other", "ed25519")
    openssl_sign(tmp_path, other_key, root / "server-bin", "ed25519")
    fresh = tmp_path / "fresh-runtime"
    refused = make_agent("--apply", str(plan), env=env, runtime=fresh).start(wait=False)
    assert refused.proc.wait(60) != 0
    out = refused.output()
    assert "server-bin" in out and "signature" in out, out
    assert not (fresh / "components" / "server" / "1.0.0" / "server").exists()

"""mTLS: an agent configured with [api] tls_cert, tls_key and client_ca serves only clients
with a certificate from that CA (certificates made by openssl)."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, wait_until
from tests.integration.api.conftest import AgentProc, stop_agent

pytestmark = pytest.mark.integration


def context(pki: Path, client: str | None) -> ssl.SSLContext:
    """A client context that trusts the agent's CA and presents ``client``'s certificate."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client is not None:
        ctx.load_cert_chain(str(pki / f"{client}.pem"), str(pki / f"{client}.key"))
    return ctx


def get(agent: AgentProc, ctx: ssl.SSLContext, path: str, token: str | None) -> tuple[int, Any]:
    conn = http.client.HTTPSConnection("127.0.0.1", agent.port, context=ctx, timeout=15)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[AgentProc]:
    """An agent (no components) whose API is HTTPS with client certificates required."""
    root = tmp_path_factory.mktemp("tls-agent")
    config = root / "agent.toml"
    config.write_text(
        "[api]\n"
        f'tls_cert = "{pki / "server.pem"}"\n'
        f'tls_key = "{pki / "server.key"}"\n'
        f'client_ca = "{pki / "ca.pem"}"\n'
    )
    agent = AgentProc(root, root / "runtime", free_port(), ["--config", str(config)])
    agent.start(wait=False)
    good = context(pki, "client")

    def up() -> bool:
        assert agent.proc is not None and agent.proc.poll() is None, agent.output()
        try:
            return get(agent, good, "/healthz", None)[0] == 200
        except OSError:
            return False

    try:
        wait_until(up, timeout=30, what="the agent's HTTPS API")
        yield agent
    finally:
        stop_agent(agent)


class TestMutualTls:
    def test_client_with_a_certificate_from_the_ca(self, tls_agent: AgentProc, pki: Path) -> None:
        """A client certificate from client_ca plus the token gets answers."""
        ctx = context(pki, "client")
        assert get(tls_agent, ctx, "/v1/components", tls_agent.token()) == (200, [])
        status, body = get(tls_agent, ctx, "/healthz", None)
        assert status == 200 and body["status"] == "ok"

    def test_the_token_is_still_required(self, tls_agent: AgentProc, pki: Path) -> None:
        """mTLS does not replace the bearer token: without it the answer is 401."""
        assert get(tls_agent, context(pki, "client"), "/v1/components", None)[0] == 401

    @pytest.mark.parametrize("client", [None, "rogue"], ids=["no-certificate", "other-ca"])
    def test_refused_without_a_certificate_from_the_ca(
        self, tls_agent: AgentProc, pki: Path, client: str | None
    ) -> None:
        """No client certificate, or one from another CA, fails the TLS handshake: no answer,
        not even /healthz, and the right token does not help."""
        for path, token in (("/healthz", None), ("/v1/components", tls_agent.token())):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                get(tls_agent, context(pki, client), path, token)
        # The agent shrugs off refused handshakes and serves the next good client.
        assert get(tls_agent, context(pki, "client"), "/healthz", None)[0] == 200

    def test_plain_http_gets_no_answer(self, tls_agent: AgentProc) -> None:
        """Plain HTTP to the TLS port is not served: the connection is closed unanswered."""
        conn = http.client.HTTPConnection("127.0.0.1", tls_agent.port, timeout=15)
        try:
            with pytest.raises((http.client.HTTPException, ConnectionError)):
                conn.request("GET", "/healthz")
                conn.getresponse()
        finally:
            conn.close()

    def test_cli_with_client_certificate(self, tls_agent: AgentProc, pki: Path) -> None:
        """keystonectl reaches an mTLS agent with KEYSTONE_CA_CERT and KEYSTONE_CLIENT_CERT/KEY,
        and without the client certificate it fails with exit 1."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTONE_")}
        env = {
            **base,
            "KEYSTONE_ADDR": f"https://127.0.0.1:{tls_agent.port}",
            "KEYSTONE_RUNTIME": str(tls_agent.runtime),
            "KEYSTONE_CA_CERT": str(pki / "ca.pem"),
        }
        cmd = [sys.executable, "-m", "keystone", "components", "--json"]
        with_cert = {
            **env,
            "KEYSTONE_CLIENT_CERT": str(pki / "client.pem"),
            "KEYSTONE_CLIENT_KEY": str(pki / "client.key"),
        }
        r = subprocess.run(cmd, env=with_cert, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == []
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert r.stderr.strip()


class TestListenPolicy:
    def test_beyond_loopback_without_token_or_mtls_refuses_to_start(self, tmp_path: Path) -> None:
        """`keystone agent --http 0.0.0.0:0` with only a generated token exits 2 before it
        binds or starts anything, and says what to do."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTONE_")}
        r = subprocess.run(
            [sys.executable, "-m", "keystone", "agent", "--demo", "--http", "0.0.0.0:0",
             "--runtime", str(tmp_path / "rt")],
            cwd=tmp_path, env=base, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert "loopback" in r.stderr and "KEYSTONE_API_TOKEN" in r.stderr
        assert not (tmp_path / "rt" / "components" / "db").exists()

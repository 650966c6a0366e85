"""Fixtures for the API tests: real agents (the demo stack, a plan of sleeping components),
raw HTTP with any token, and certificates made by openssl for mTLS."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.integration.agent.conftest import AgentProc, make_agent

__all__ = ["AgentProc", "make_agent"]

DEMO = ("db", "cache", "api")


def demo_env() -> dict[str, str]:
    """Free ports for the demo stack's three services."""
    return {
        "DEMO_DB_PORT": str(free_port()),
        "DEMO_CACHE_PORT": str(free_port()),
        "DEMO_API_PORT": str(free_port()),
    }


def request(
    agent: AgentProc,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    token: str | None = "",
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[int, Any, dict[str, str]]:
    """One request with any token: ``""`` uses the agent's own, None sends no Authorization.

    Returns (status, parsed JSON or text, headers with lower-case names).
    """
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=timeout)
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token or agent.token()}"
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    data: Any = raw.decode(errors="replace")
    if raw and "json" in (resp.getheader("Content-Type") or ""):
        data = json.loads(raw)
    elif not raw:
        data = None
    return resp.status, data, {k.lower(): v for k, v in resp.getheaders()}


def pids(agent: AgentProc) -> dict[str, int | None]:
    """Component name -> pid, as the agent reports them."""
    return {n: c["pid"] for n, c in agent.components().items()}


def write_sleep_plan(root: Path, count: int, *, prefix: str = "s") -> Path:
    """``count`` components that each run ``sleep``, no dependencies; returns the plan file."""
    lines = []
    for i in range(count):
        name = f"{prefix}{i:02d}"
        (root / f"{name}.recipe.toml").write_text(
            f'[metadata]\nname = "{name}"\nversion = "1.0.0"\n'
            '[lifecycle.run]\nrestart_policy = "always"\n'
            '[lifecycle.run.exec]\ncommand = "sleep"\nargs = ["3600"]\n'
        )
        lines.append(f'[[components]]\nname = "{name}"\nrecipe = "{name}.recipe.toml"\n')
    plan = root / "plan.toml"
    plan.write_text("\n".join(lines))
    return plan


@pytest.fixture(scope="module")
def demo_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    """One demo agent (db -> cache -> api, all healthy) shared by a module's read-mostly tests."""
    root = tmp_path_factory.mktemp("demo")
    agent = AgentProc(root, root / "runtime", free_port(), ["--demo"], demo_env())
    agent.start()
    try:
        agent.wait_states(dict.fromkeys(DEMO, "healthy"))
        yield agent
    finally:
        stop_agent(agent)


def stop_agent(agent: AgentProc) -> None:
    """SIGTERM the agent (it stops its components) and kill whatever a failure left behind."""
    import contextlib
    import os

    if agent.proc is not None and agent.proc.poll() is None:
        agent.proc.send_signal(signal.SIGTERM)
        try:
            agent.proc.wait(30)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            agent.proc.wait()
    snap = agent.runtime / "state" / "agent.json"
    if snap.exists():
        for rec in (json.loads(snap.read_text()).get("processes") or {}).values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rec["pgid"], signal.SIGKILL)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    """``name.key`` + ``name.pem``: a self-signed EC CA."""
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=d)
    openssl(
        "req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-days", "2",
        "-out", f"{name}.pem", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d,
    )  # fmt: skip


def make_leaf(d: Path, name: str, ca: str, ext: str) -> None:
    """``name.key`` + ``name.pem`` issued by ``ca`` with the given extensions."""
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=d)
    openssl(
        "req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr", cwd=d
    )
    (d / f"{name}.ext").write_text(ext)
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, the agent's server certificate for 127.0.0.1, a client certificate from the CA,
    and a client certificate from another CA (``rogue``)."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_leaf(
        d,
        "server",
        "ca",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
    )
    client_ext = (
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n"
    )
    make_leaf(d, "client", "ca", client_ext)
    make_leaf(d, "rogue", "other-ca", client_ext)
    return d

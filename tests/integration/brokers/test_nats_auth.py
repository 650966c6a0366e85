"""NATS authentication on a real nats-server: NKey, a credentials file without a JWT, token,
user/password; the wrong credentials are refused by the server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, wait_until
from tests.integration.brokers.conftest import Broker, NatsProbe, broker_binary, nats_server

pytestmark = pytest.mark.integration

nkeys = pytest.importorskip("nkeys", reason="the brokers extra installs nkeys")


def new_user_seed() -> tuple[str, str]:
    """(seed, public key) of a fresh NATS user NKey."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key
    return seed.decode(), public.decode()


def creds_without_jwt(seed: str) -> str:
    """nsc's layout, with the JWT block left empty."""
    return (
        "-----BEGIN NATS USER JWT-----\n\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )


@pytest.fixture
def nkey_server(tmp_path: Path) -> Any:
    """A nats-server that knows one NKey user and one user/password (the test's probe)."""
    seed, public = new_user_seed()
    port = free_port()
    conf = tmp_path / f"nats-auth-{port}.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        "authorization {\n  users: [\n"
        f'    {{ nkey: "{public}" }}\n'
        '    { user: "device", password: "s3cret" }\n'
        '    { user: "probe", password: "probe-pw" }\n'
        "  ]\n}\n"
    )
    broker = Broker(
        [broker_binary("nats-server"), "-c", str(conf)], port, tmp_path / f"nats-{port}.log"
    ).start()
    yield broker, seed
    broker.stop()


def agent_config(tmp: Path, port: int, device: str, auth: str) -> Path:
    path = tmp / f"agent-{device}.toml"
    path.write_text(
        f'[device]\nid = "{device}"\n\n'
        f'[nats]\nurl = "nats://127.0.0.1:{port}"\nreconnect_wait = "500ms"\n{auth}'
    )
    return path


def answers(probe: NatsProbe, device: str, timeout: float = 30) -> None:
    def ok() -> bool:
        try:
            return bool(probe.request(f"keystone.{device}.cmd.health", timeout=1)["success"])
        except Exception:
            return False

    wait_until(ok, timeout=timeout, what=f"{device} answers on NATS")


def refused(agent: Any) -> None:
    wait_until(
        lambda: "authorization violation" in agent.output().lower(),
        timeout=30,
        what="the server's authorization violation in the agent log",
    )


def write_secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


class TestNatsAuth:
    @pytest.mark.parametrize("kind", ["nkey", "creds", "user"])
    def test_the_agent_authenticates(
        self, kind: str, nkey_server: Any, make_agent: Any, tmp_path: Path, probes: Any
    ) -> None:
        broker, seed = nkey_server
        if kind == "nkey":
            auth = f'nkey = "{write_secret(tmp_path / "device.nk", seed + chr(10))}"\n'
        elif kind == "creds":
            path = write_secret(tmp_path / "device.creds", creds_without_jwt(seed))
            auth = f'creds = "{path}"\n'
        else:
            auth = 'user = "device"\npassword = "s3cret"\n'
        make_agent("--config", str(agent_config(tmp_path, broker.port, kind, auth))).start()
        probe = NatsProbe(broker.port, user="probe", password="probe-pw").connect()
        probes.append(probe)
        answers(probe, kind)

    @pytest.mark.parametrize("kind", ["nkey", "user", "none"])
    def test_wrong_credentials_are_refused_by_the_server(
        self, kind: str, nkey_server: Any, make_agent: Any, tmp_path: Path
    ) -> None:
        broker, _ = nkey_server
        if kind == "nkey":
            other, _ = new_user_seed()  # a key the server does not list
            auth = f'nkey = "{write_secret(tmp_path / "other.nk", other)}"\n'
        elif kind == "user":
            auth = 'user = "device"\npassword = "wrong"\n'
        else:
            auth = ""
        agent = make_agent("--config", str(agent_config(tmp_path, broker.port, kind, auth)))
        refused(agent.start())

    def test_token(self, tmp_path: Path, make_agent: Any, probes: Any) -> None:
        broker = nats_server(tmp_path, token="t0ken-for-tests").start()
        try:
            good = agent_config(tmp_path, broker.port, "good", 'token = "t0ken-for-tests"\n')
            make_agent("--config", str(good), runtime=tmp_path / "rt-good").start()
            bad = agent_config(tmp_path, broker.port, "bad", 'token = "not-it"\n')
            refused(make_agent("--config", str(bad), runtime=tmp_path / "rt-bad").start())
            probe = NatsProbe(broker.port, token="t0ken-for-tests").connect()
            probes.append(probe)
            answers(probe, "good")
            with pytest.raises(Exception):  # noqa: B017  (no responders / timeout)
                probe.request("keystone.bad.cmd.health", timeout=1)
        finally:
            for p in probes:
                p.close()
            probes.clear()
            broker.stop()

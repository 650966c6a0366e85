"""TLS and mTLS on real brokers: certificates made here with openssl, mosquitto and nats-server
with TLS listeners, the agent connecting with ``tls_ca`` / ``tls_cert`` / ``tls_key``."""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keystone.adapters.common import tls_context
from tests.conftest import free_port, wait_until
from tests.integration.brokers.conftest import (
    Broker,
    MqttProbe,
    NatsProbe,
    broker_binary,
    demo_env,
)

pytestmark = pytest.mark.integration

DEV = "edge-tls"


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1 (SAN IP), a client certificate, and a
    self-signed server certificate no CA vouches for."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    self_cert: Path
    self_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> Pki:
    """Everything with openssl: EC P-256 keys, SHA-256, one day."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=Keystone Test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        _openssl(
            "req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=keystone-{name}", cwd=d,
        )  # fmt: skip
        (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n" + ext)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-sha256",
            "-extfile", f"{name}.ext", cwd=d,
        )  # fmt: skip
    _openssl(
        "req", "-x509", *ec, "-keyout", "self.key", "-out", "self.pem", "-days", "1",
        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", cwd=d,
    )  # fmt: skip
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return Pki(
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "self.pem",
        d / "self.key",
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class TlsMosquitto:
    """One mosquitto: a plain loopback listener (for the test's probe) and TLS listeners."""

    broker: Broker
    plain: int
    tls: int  # server cert from the CA, client certificates optional
    mtls: int  # server cert from the CA, a client certificate required
    selfsigned: int  # a self-signed server cert


@pytest.fixture
def tls_mosquitto(tmp_path: Path, pki: Pki) -> Any:
    binary = broker_binary("mosquitto")
    plain, tls, mtls, selfsigned = (free_port() for _ in range(4))
    lines = [
        "per_listener_settings false",
        "allow_anonymous true",
        "persistence false",
        f"user {getpass.getuser()}",
        f"listener {plain} 127.0.0.1",
    ]
    for port, cert, key, require in (
        (tls, pki.server_cert, pki.server_key, False),
        (mtls, pki.server_cert, pki.server_key, True),
        (selfsigned, pki.self_cert, pki.self_key, False),
    ):
        lines += [
            f"listener {port} 127.0.0.1",
            f"cafile {pki.ca}",
            f"certfile {cert}",
            f"keyfile {key}",
            f"require_certificate {'true' if require else 'false'}",
        ]
    conf = tmp_path / "mosquitto-tls.conf"
    conf.write_text("\n".join(lines) + "\n")
    broker = Broker([binary, "-c", str(conf)], plain, tmp_path / "mosquitto-tls.log").start()
    for port in (tls, mtls, selfsigned):
        wait_until(lambda p=port: _port_open(p), timeout=20, what=f"TLS listener {port}")
    yield TlsMosquitto(broker, plain, tls, mtls, selfsigned)
    broker.stop()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def mqtt_connack(port: int, ctx: ssl.SSLContext) -> bytes:
    """Send an MQTT 3.1.1 CONNECT over TLS; what the broker answers (b'' if it hung up).

    Raises ``ssl.SSLError`` / ``OSError`` when the broker refuses the handshake (with TLS 1.3
    a refused client certificate shows on the first read, not in the handshake).
    """
    client_id = b"tls-probe"
    var = b"\x00\x04MQTT\x04\x02\x00\x1e"
    payload = len(client_id).to_bytes(2, "big") + client_id
    body = var + payload
    packet = bytes([0x10, len(body)]) + body
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(packet)
        return s.recv(4)


def agent_log_has(agent: Any, *needles: str, timeout: float = 30) -> None:
    wait_until(
        lambda: any(n in agent.output() for n in needles),
        timeout=timeout,
        what=f"agent log mentions one of {needles}",
    )


def mqtt_agent_config(tmp: Path, port: int, tls_lines: str, *, device: str = DEV) -> Path:
    path = tmp / f"agent-{device}.toml"
    path.write_text(
        f'[device]\nid = "{device}"\n\n'
        f'[mqtt]\nbroker = "ssl://127.0.0.1:{port}"\nstate_interval = "1s"\n'
        f'health_interval = "1s"\nkeepalive = "5s"\n{tls_lines}'
    )
    return path


def toml_path(p: Path) -> str:
    return json.dumps(str(p))


class TestMosquittoTls:
    def test_the_broker_refuses_a_client_without_a_certificate_on_mtls(
        self, tls_mosquitto: TlsMosquitto, pki: Pki
    ) -> None:
        """Our TLS context with a client certificate gets a CONNACK; without one it is refused."""
        with_cert = tls_context(pki.ca, pki.client_cert, pki.client_key, True)
        assert mqtt_connack(tls_mosquitto.mtls, with_cert)[:1] == b"\x20"
        without = tls_context(pki.ca, None, None, True)
        with pytest.raises((ssl.SSLError, OSError)):
            if mqtt_connack(tls_mosquitto.mtls, without) == b"":
                raise ConnectionResetError("the broker hung up")
        # The plain TLS listener serves a client without a certificate.
        assert mqtt_connack(tls_mosquitto.tls, without)[:1] == b"\x20"

    def test_a_server_no_ca_vouches_for_is_refused_unless_verification_is_off(
        self, tls_mosquitto: TlsMosquitto, pki: Pki
    ) -> None:
        with pytest.raises(ssl.SSLCertVerificationError):
            mqtt_connack(tls_mosquitto.selfsigned, tls_context(pki.ca, None, None, True))
        insecure = tls_context(None, None, None, False)
        assert mqtt_connack(tls_mosquitto.selfsigned, insecure)[:1] == b"\x20"

    def test_the_agent_connects_with_mtls_from_agent_toml(
        self, tls_mosquitto: TlsMosquitto, pki: Pki, make_agent: Any, tmp_path: Path, probes: Any
    ) -> None:
        probe = MqttProbe(tls_mosquitto.plain).connect(f"keystone/{DEV}/#")
        probes.append(probe)
        cfg = mqtt_agent_config(
            tmp_path,
            tls_mosquitto.mtls,
            f"tls_ca = {toml_path(pki.ca)}\ntls_cert = {toml_path(pki.client_cert)}\n"
            f"tls_key = {toml_path(pki.client_key)}\n",
        )
        make_agent("--demo", "--config", str(cfg), env=demo_env()).start()
        probe.wait(lambda t, p, r: t == f"keystone/{DEV}/status" and p == b"online")
        health = probe.request(DEV, "health")
        assert health["success"] is True and health["data"]["status"] == "ok"

    def test_the_agent_connects_with_mtls_from_flags(
        self, tls_mosquitto: TlsMosquitto, pki: Pki, make_agent: Any, tmp_path: Path, probes: Any
    ) -> None:
        probe = MqttProbe(tls_mosquitto.plain).connect(f"keystone/{DEV}/#")
        probes.append(probe)
        cfg = tmp_path / "agent.toml"
        cfg.write_text(f'[device]\nid = "{DEV}"\n')
        make_agent(
            "--demo",
            "--config",
            str(cfg),
            f"--mqtt-broker=ssl://127.0.0.1:{tls_mosquitto.mtls}",
            f"--mqtt-tls-ca={pki.ca}",
            f"--mqtt-tls-cert={pki.client_cert}",
            f"--mqtt-tls-key={pki.client_key}",
            env=demo_env(),
        ).start()
        probe.wait(lambda t, p, r: t == f"keystone/{DEV}/status" and p == b"online")
        assert probe.request(DEV, "status")["success"] is True

    def test_an_agent_without_a_client_certificate_is_refused(
        self, tls_mosquitto: TlsMosquitto, pki: Pki, make_agent: Any, tmp_path: Path, probes: Any
    ) -> None:
        probe = MqttProbe(tls_mosquitto.plain).connect(f"keystone/{DEV}/status")
        probes.append(probe)
        cfg = mqtt_agent_config(tmp_path, tls_mosquitto.mtls, f"tls_ca = {toml_path(pki.ca)}\n")
        agent = make_agent("--demo", "--config", str(cfg), env=demo_env()).start()
        agent.wait_states({"db": "healthy", "cache": "healthy", "api": "healthy"})
        # paho logs each refused attempt; by then the device must not be online.
        agent_log_has(agent, "closed the connection before accepting it", "[mqtt] cannot connect")
        assert not any(p == b"online" for _, p, _ in probe.seen)
        assert probe.messages.empty() or all(
            p != b"online" for _, p, _ in list(probe.messages.queue)
        )

    def test_tls_verify_false_accepts_a_self_signed_server_only_when_set(
        self, tls_mosquitto: TlsMosquitto, pki: Pki, make_agent: Any, tmp_path: Path, probes: Any
    ) -> None:
        probe = MqttProbe(tls_mosquitto.plain).connect("keystone/+/status")
        probes.append(probe)
        strict = mqtt_agent_config(
            tmp_path, tls_mosquitto.selfsigned, f"tls_ca = {toml_path(pki.ca)}\n", device="strict"
        )
        agent = make_agent(
            "--config", str(strict), runtime=tmp_path / "rt-strict", env=demo_env()
        ).start()
        agent_log_has(agent, "CERTIFICATE_VERIFY_FAILED", "certificate verify failed")
        loose = mqtt_agent_config(
            tmp_path, tls_mosquitto.selfsigned, "tls_verify = false\n", device="loose"
        )
        make_agent("--config", str(loose), runtime=tmp_path / "rt-loose", env=demo_env()).start()
        probe.wait(lambda t, p, r: t == "keystone/loose/status" and p == b"online")
        assert not any(t == "keystone/strict/status" and p == b"online" for t, p, _ in probe.seen)


# --- NATS -------------------------------------------------------------------------------------


def nats_tls_server(tmp: Path, pki: Pki, *, verify: bool, selfsigned: bool = False) -> Broker:
    binary = broker_binary("nats-server")
    port = free_port()
    cert, key = (pki.self_cert, pki.self_key) if selfsigned else (pki.server_cert, pki.server_key)
    conf = tmp / f"nats-tls-{port}.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        "tls {\n"
        f"  cert_file: {json.dumps(str(cert))}\n"
        f"  key_file: {json.dumps(str(key))}\n"
        f"  ca_file: {json.dumps(str(pki.ca))}\n"
        f"  verify: {'true' if verify else 'false'}\n"
        "  timeout: 5\n"
        "}\n"
    )
    return Broker([binary, "-c", str(conf)], port, tmp / f"nats-tls-{port}.log")


@pytest.fixture
def nats_mtls(tmp_path: Path, pki: Pki) -> Any:
    broker = nats_tls_server(tmp_path, pki, verify=True).start()
    yield broker
    broker.stop()


@pytest.fixture
def nats_selfsigned(tmp_path: Path, pki: Pki) -> Any:
    broker = nats_tls_server(tmp_path, pki, verify=False, selfsigned=True).start()
    yield broker
    broker.stop()


def nats_agent_config(tmp: Path, port: int, tls_lines: str, *, device: str = DEV) -> Path:
    path = tmp / f"agent-nats-{device}.toml"
    path.write_text(
        f'[device]\nid = "{device}"\n\n'
        f'[nats]\nurl = "tls://127.0.0.1:{port}"\nstate_interval = "1s"\n'
        f'health_interval = "1s"\nreconnect_wait = "500ms"\n{tls_lines}'
    )
    return path


def nats_ready(probe: NatsProbe, device: str = DEV, timeout: float = 30) -> None:
    def ok() -> bool:
        try:
            return bool(probe.request(f"keystone.{device}.cmd.health", timeout=1)["success"])
        except Exception:
            return False

    wait_until(ok, timeout=timeout, what=f"{device} answers on NATS over TLS")


class TestNatsTls:
    def test_the_server_refuses_a_client_without_a_certificate(
        self, nats_mtls: Broker, pki: Pki
    ) -> None:
        probe = NatsProbe(nats_mtls.port, tls=tls_context(pki.ca, None, None, True))
        try:
            with pytest.raises(Exception):  # noqa: B017  (nats-py raises several kinds here)
                probe.connect()
        finally:
            probe.close()
        probe = NatsProbe(
            nats_mtls.port, tls=tls_context(pki.ca, pki.client_cert, pki.client_key, True)
        )
        try:
            probe.connect()
            assert probe.nc.is_connected
        finally:
            probe.close()

    def test_the_agent_connects_with_mtls_from_agent_toml(
        self, nats_mtls: Broker, pki: Pki, make_agent: Any, tmp_path: Path, probes: Any
    ) -> None:
        cfg = nats_agent_config(
            tmp_path,
            nats_mtls.port,
            f"tls_ca = {toml_path(pki.ca)}\ntls_cert = {toml_path(pki.client_cert)}\n"
            f"tls_key = {toml_path(pki.client_key)}\n",
        )
        make_agent("--demo", "--config", str(cfg), env=demo_env()).start()
        probe = NatsProbe(
            nats_mtls.port, tls=tls_context(pki.ca, pki.client_cert, pki.client_key, True)
        ).connect()
        probes.append(probe)
        nats_ready(probe)
        assert probe.request(f"keystone.{DEV}.cmd.status")["data"]["status"] == "running"

    def test_the_agent_connects_with_mtls_from_flags(
        self, nats_mtls: Broker, pki: Pki, make_agent: Any, tmp_path: Path, probes: Any
    ) -> None:
        cfg = tmp_path / "agent.toml"
        cfg.write_text(f'[device]\nid = "{DEV}"\n')
        make_agent(
            "--config",
            str(cfg),
            f"--nats-url=tls://127.0.0.1:{nats_mtls.port}",
            f"--nats-tls-ca={pki.ca}",
            f"--nats-tls-cert={pki.client_cert}",
            f"--nats-tls-key={pki.client_key}",
            env=demo_env(),
        ).start()
        probe = NatsProbe(
            nats_mtls.port, tls=tls_context(pki.ca, pki.client_cert, pki.client_key, True)
        ).connect()
        probes.append(probe)
        nats_ready(probe)

    def test_an_agent_without_a_client_certificate_is_refused(
        self, nats_mtls: Broker, pki: Pki, make_agent: Any, tmp_path: Path, probes: Any
    ) -> None:
        cfg = nats_agent_config(tmp_path, nats_mtls.port, f"tls_ca = {toml_path(pki.ca)}\n")
        agent = make_agent("--config", str(cfg), env=demo_env()).start()
        agent_log_has(agent, "bad certificate", "[nats] cannot connect")
        probe = NatsProbe(
            nats_mtls.port, tls=tls_context(pki.ca, pki.client_cert, pki.client_key, True)
        ).connect()
        probes.append(probe)
        with pytest.raises(Exception):  # noqa: B017  (no responders / timeout)
            probe.request(f"keystone.{DEV}.cmd.health", timeout=1)

    def test_tls_verify_false_accepts_a_self_signed_server_only_when_set(
        self, nats_selfsigned: Broker, pki: Pki, make_agent: Any, tmp_path: Path, probes: Any
    ) -> None:
        strict = nats_agent_config(
            tmp_path, nats_selfsigned.port, f"tls_ca = {toml_path(pki.ca)}\n", device="strict"
        )
        agent = make_agent(
            "--config", str(strict), runtime=tmp_path / "rt-strict", env=demo_env()
        ).start()
        agent_log_has(agent, "CERTIFICATE_VERIFY_FAILED", "certificate verify failed")
        loose = nats_agent_config(
            tmp_path, nats_selfsigned.port, "tls_verify = false\n", device="loose"
        )
        make_agent("--config", str(loose), runtime=tmp_path / "rt-loose", env=demo_env()).start()
        probe = NatsProbe(nats_selfsigned.port, tls=tls_context(None, None, None, False)).connect()
        probes.append(probe)
        nats_ready(probe, "loose")
        with pytest.raises(Exception):  # noqa: B017  (no responders / timeout)
            probe.request("keystone.strict.cmd.health", timeout=1)

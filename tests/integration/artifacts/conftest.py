"""Fixtures for artifact tests: a PKI made by the openssl CLI, and loopback HTTP servers.

* :class:`Pki`: CAs, code-signing leaves (P-256, P-384, RSA, Ed25519, one chained through an
  intermediate), an expired leaf, one from an untrusted CA, one not for code signing; signatures
  made by ``openssl dgst -sha256 -sign`` (Ed25519: ``openssl pkeyutl`` over the 32-byte digest).
* :class:`RecordingServer`: ``http.server`` in a thread with routes, recording every request.
* :class:`RawServer`: a raw socket server running a scenario per connection (drop halfway,
  drip a byte at a time, send more than announced) that ``http.server`` cannot play.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import socketserver
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

LEAF_EXT = (
    "basicConstraints=CA:FALSE\n"
    "keyUsage=critical,digitalSignature\n"
    "extendedKeyUsage=codeSigning\n"
    "subjectKeyIdentifier=hash\n"
    "authorityKeyIdentifier=keyid\n"
)
CA_EXT = (
    "basicConstraints=critical,CA:TRUE\n"
    "keyUsage=critical,keyCertSign,cRLSign\n"
    "subjectKeyIdentifier=hash\n"
    "authorityKeyIdentifier=keyid\n"
)
CA_CNF = """[ca]
default_ca = d
[d]
database = {dir}/index.txt
new_certs_dir = {dir}
default_md = sha256
policy = p
serial = {dir}/serial
unique_subject = no
[p]
commonName = supplied
[leaf]
{leaf}
[ca_ext]
{ca}
"""


def openssl(*args: str, cwd: Path) -> None:
    """Run the openssl CLI; fail the test with its stderr."""
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed: {proc.stderr}")


@dataclass
class Pki:
    """A throwaway PKI in ``dir``: ``<name>.key`` / ``<name>.pem`` for every actor."""

    dir: Path
    kinds: dict[str, str] = field(default_factory=dict)

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def _genkey(self, name: str, kind: str) -> None:
        self.kinds[name] = kind
        out = str(self.key(name))
        if kind == "p256":
            openssl(
                "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", out, cwd=self.dir
            )
        elif kind == "p384":
            openssl("ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out", out, cwd=self.dir)
        elif kind == "rsa":
            openssl(
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                out,
                cwd=self.dir,
            )
        elif kind == "ed25519":
            openssl("genpkey", "-algorithm", "ed25519", "-out", out, cwd=self.dir)
        else:
            raise ValueError(kind)

    def root_ca(self, name: str) -> None:
        """A self-signed root (``openssl req -x509``), valid 30 days from now."""
        self._genkey(name, "p256")
        openssl(
            "req", "-x509", "-new", "-key", str(self.key(name)), "-subj", f"/CN={name}",
            "-days", "30", "-out", str(self.cert(name)),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=self.dir,
        )  # fmt: skip

    def issue(
        self,
        name: str,
        kind: str,
        issuer: str,
        *,
        ext: str = LEAF_EXT,
        dates: tuple[str, str] | None = None,
        ca: bool = False,
    ) -> None:
        """A certificate for a new key, signed by ``issuer`` with ``openssl x509``/``openssl ca``."""
        self._genkey(name, kind)
        csr = self.dir / f"{name}.csr"
        openssl(
            "req",
            "-new",
            "-key",
            str(self.key(name)),
            "-subj",
            f"/CN={name}",
            "-out",
            str(csr),
            cwd=self.dir,
        )
        extfile = self.dir / f"{name}.ext"
        extfile.write_text(CA_EXT if ca else ext)
        if dates is None:
            openssl(
                "x509", "-req", "-in", str(csr), "-CA", str(self.cert(issuer)),
                "-CAkey", str(self.key(issuer)), "-CAcreateserial", "-days", "10",
                "-extfile", str(extfile), "-out", str(self.cert(name)),
                cwd=self.dir,
            )  # fmt: skip
            return
        # openssl 3.0's x509 cannot backdate: `openssl ca` can (-startdate/-enddate).
        db = self.dir / f"ca-{name}"
        db.mkdir()
        (db / "index.txt").write_text("")
        (db / "serial").write_text("1000\n")
        cnf = db / "ca.cnf"
        cnf.write_text(CA_CNF.format(dir=db, leaf=ext, ca=CA_EXT))
        openssl(
            "ca", "-batch", "-config", str(cnf), "-cert", str(self.cert(issuer)),
            "-keyfile", str(self.key(issuer)), "-in", str(csr), "-out", str(self.cert(name)),
            "-startdate", dates[0], "-enddate", dates[1], "-extensions", "leaf", "-notext",
            cwd=self.dir,
        )  # fmt: skip

    def sign(self, name: str, file: Path, *, b64: bool = False) -> Path:
        """Sign ``file`` as the real tools do; return the signature path (``<file>.<name>.sig``)."""
        sig = file.with_name(f"{file.name}.{name}.sig")
        if self.kinds[name] == "ed25519":
            digest = file.with_name(f"{file.name}.sha256")
            digest.write_bytes(hashlib.sha256(file.read_bytes()).digest())
            openssl(
                "pkeyutl",
                "-sign",
                "-rawin",
                "-inkey",
                str(self.key(name)),
                "-in",
                str(digest),
                "-out",
                str(sig),
                cwd=self.dir,
            )
        else:
            openssl(
                "dgst",
                "-sha256",
                "-sign",
                str(self.key(name)),
                "-out",
                str(sig),
                str(file),
                cwd=self.dir,
            )
        if b64:
            sig.write_bytes(base64.encodebytes(sig.read_bytes()))
        return sig


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Every certificate the artifact tests need, made once per session with openssl."""
    p = Pki(tmp_path_factory.mktemp("pki"))
    p.root_ca("ca")
    p.root_ca("rogue-ca")
    for kind in ("p256", "p384", "rsa", "ed25519"):
        p.issue(f"leaf-{kind}", kind, "ca")
    p.issue("inter", "p256", "ca", ca=True)
    p.issue("leaf-chained", "p256", "inter")
    (p.dir / "chain.pem").write_bytes(
        p.cert("leaf-chained").read_bytes() + p.cert("inter").read_bytes()
    )
    p.issue("leaf-expired", "p256", "ca", dates=("20200101000000Z", "20200201000000Z"))
    p.issue("leaf-rogue", "p256", "rogue-ca")
    p.issue(
        "leaf-tls",
        "p256",
        "ca",
        ext="basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    # A CA valid since 2019 and its leaf that expired in 2020: for the dead-RTC case.
    p._genkey("old-ca", "p256")
    csr = p.dir / "old-ca.csr"
    openssl(
        "req",
        "-new",
        "-key",
        str(p.key("old-ca")),
        "-subj",
        "/CN=old-ca",
        "-out",
        str(csr),
        cwd=p.dir,
    )
    db = p.dir / "ca-old-ca"
    db.mkdir()
    (db / "index.txt").write_text("")
    (db / "serial").write_text("2000\n")
    (db / "ca.cnf").write_text(CA_CNF.format(dir=db, leaf=LEAF_EXT, ca=CA_EXT))
    openssl(
        "ca", "-batch", "-selfsign", "-config", str(db / "ca.cnf"), "-keyfile", str(p.key("old-ca")),
        "-in", str(csr), "-out", str(p.cert("old-ca")), "-startdate", "20190101000000Z",
        "-enddate", "20400101000000Z", "-extensions", "ca_ext", "-notext",
        cwd=p.dir,
    )  # fmt: skip
    p.issue("leaf-old", "p256", "old-ca", dates=("20191201000000Z", "20200201000000Z"))
    return p


# --- servers ------------------------------------------------------------------------------------


@dataclass
class Seen:
    """One request a test server received."""

    method: str
    path: str
    headers: dict[str, str]


Route = Callable[[BaseHTTPRequestHandler], None] | tuple[int, dict[str, str], bytes]


class RecordingServer:
    """``http.server`` on a loopback address, serving ``routes`` and recording requests."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Route] = {}
        self.seen: list[Seen] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                outer.seen.append(
                    Seen("GET", self.path, {k.lower(): v for k, v in self.headers.items()})
                )
                route = outer.routes.get(self.path.split("?")[0])
                if route is None:
                    route = (404, {}, b"not found")
                if callable(route):
                    route(self)
                    return
                status, headers, body = route
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def requests_to(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path.split("?")[0] == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server() -> Iterator[RecordingServer]:
    server = RecordingServer("127.0.0.1")
    yield server
    server.close()


@pytest.fixture
def other_host_server() -> Iterator[RecordingServer]:
    """A second server on another loopback address: another host, as far as URLs go."""
    server = RecordingServer("127.0.0.2")
    yield server
    server.close()


Scenario = Callable[[int, dict[str, str], socket.socket], None]


class RawServer:
    """A TCP server that reads one request head per connection and runs ``scenario`` on it.

    ``scenario(index, headers, sock)`` writes whatever bytes it likes and may close abruptly.
    """

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.seen: list[dict[str, str]] = []
        self.stop = threading.Event()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                head = b""
                while b"\r\n\r\n" not in head:
                    data = sock.recv(4096)
                    if not data:
                        return
                    head += data
                lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
                headers = {"request-line": lines[0]}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                index = len(outer.seen)
                outer.seen.append(headers)
                with contextlib.suppress(OSError):  # the client hung up: often the point
                    outer.scenario(index, headers, sock)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/artifact.bin") -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def raw_server() -> Iterator[Callable[[Scenario], RawServer]]:
    servers: list[RawServer] = []

    def start(scenario: Scenario) -> RawServer:
        servers.append(RawServer(scenario))
        return servers[-1]

    yield start
    for s in servers:
        s.close()

"""Fixtures for dataset tests: an openssl PKI, a loopback HTTP hub, and a publisher.

The hub serves whatever the test puts in :attr:`Hub.files` (path -> bytes) from a real
``http.server`` on 127.0.0.1. :class:`Publisher` makes a dataset publication the way an operator
does: a payload, a manifest from ``manifest.new_manifest``, a signature from our own
``manifest.sign_manifest`` (or openssl's), put on the hub.
"""

from __future__ import annotations

import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from keystone import manifest
from keystone.datasets import DatasetManager, DatasetSpec, DatasetStore, Resolver
from tests.integration.artifacts.conftest import Pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, an Ed25519 and an RSA signer, an expired signer and one from a rogue CA."""
    p = Pki(tmp_path_factory.mktemp("dataset-pki"))
    p.root_ca("ca")
    p.root_ca("rogue-ca")
    p.issue("signer", "ed25519", "ca")
    p.issue("signer-rsa", "rsa", "ca")
    p.issue("signer-expired", "p256", "ca", dates=("20200101000000Z", "20200201000000Z"))
    p.issue("signer-rogue", "p256", "rogue-ca")
    return p


@dataclass
class Hub:
    """A loopback HTTP server answering from ``files``; records the paths asked for."""

    files: dict[str, bytes] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"


@pytest.fixture
def hub() -> Iterator[Hub]:
    """A running hub on 127.0.0.1."""
    state = Hub()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.seen.append(self.path)
            body = state.files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


BASE = datetime(2026, 8, 14, 3, 0, tzinfo=UTC)


@dataclass
class Publisher:
    """Publishes versions of one dataset on the hub, signed with a PKI signer."""

    hub: Hub
    pki: Pki
    work: Path
    name: str = "cve"
    signer: str = "signer"

    @property
    def manifest_path(self) -> str:
        return f"datasets/{self.name}.manifest.toml"

    def payload(self, day: int, text: str | None = None, extra: tuple[str, ...] = ()) -> Path:
        """An uncompressed tar holding ``data.txt`` (and empty files named in ``extra``)."""
        src = self.work / f"src-{day}"
        src.mkdir(parents=True, exist_ok=True)
        (src / "data.txt").write_text(text if text is not None else f"feed of day {day}\n")
        for name in extra:
            (src / name).write_text("")
        tar = self.work / f"{self.name}-{day}.tar"
        with tarfile.open(tar, "w") as tf:
            for name in ("data.txt", *extra):
                tf.add(src / name, arcname=name)
        return tar

    def publish(
        self,
        day: int,
        *,
        text: str | None = None,
        published: datetime | None = None,
        sign: bool = True,
        tamper_payload: bool = False,
        openssl_signer: bool = False,
        delta_server: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> manifest.Manifest:
        """Put version ``2026-08-<14+day>`` on the hub; return its manifest."""
        tar = self.payload(day, text, extra)
        version = (BASE + timedelta(days=day)).strftime("%Y-%m-%d")
        rel = f"datasets/{self.name}-{version}.tar"
        m = manifest.new_manifest(
            tar,
            name=f"com.example.{self.name}",
            uri=self.hub.url(rel),
            version=version,
            published=published or BASE + timedelta(days=day),
            delta_server=delta_server,
        )
        mpath = self.work / f"{self.name}-{day}.manifest.toml"
        mpath.write_bytes(manifest.render_manifest(m))
        self.hub.files[self.manifest_path] = mpath.read_bytes()
        self.hub.files.pop(self.manifest_path + ".sig", None)
        if sign:
            if openssl_signer:
                sig = self.pki.sign(self.signer, mpath)
            else:
                sig = manifest.sign_manifest(
                    mpath, self.pki.key(self.signer), self.pki.cert(self.signer)
                )
            self.hub.files[self.manifest_path + ".sig"] = sig.read_bytes()
        body = tar.read_bytes()
        self.hub.files[rel] = body + b"tampered" if tamper_payload else body
        self.hub.files["signer.pem"] = self.pki.cert(self.signer).read_bytes()
        return m

    def spec(self, **overrides: object) -> DatasetSpec:
        values: dict[str, object] = {
            "name": self.name,
            "manifest": self.hub.url(self.manifest_path),
            "sig_uri": self.hub.url(self.manifest_path + ".sig"),
            "cert_uri": self.hub.url("signer.pem"),
            "refresh": 3600.0,
            "max_age": 3 * 86400.0,
        }
        values.update(overrides)
        return DatasetSpec(**values)  # type: ignore[arg-type]


@pytest.fixture
def publisher(hub: Hub, pki: Pki, tmp_path: Path) -> Publisher:
    work = tmp_path / "publish"
    work.mkdir()
    return Publisher(hub, pki, work)


@dataclass
class Wall:
    """A wall clock the test sets."""

    now: float

    def __call__(self) -> float:
        return self.now


def make_manager(
    root: Path,
    pki: Pki,
    *,
    wall: Wall | None = None,
    at: datetime | None = None,
    trusted: bool = True,
) -> DatasetManager:
    """A manager over ``root/datasets`` trusting ``pki``'s CA; certificates judged at ``at``."""
    store = DatasetStore(root / "datasets")
    resolver = Resolver(
        store,
        trust_bundle=pki.cert("ca"),
        verification_time=(lambda: at) if at is not None else None,
        environ={},
    )
    clock = wall or Wall((BASE + timedelta(days=1)).timestamp())
    return DatasetManager(store, resolver, wall=clock, clock_trusted=lambda: trusted)

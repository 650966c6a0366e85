"""Artifact preparation through a delta: a real store, our ``serve-artifacts --deltas`` on 127.0.0.1.

Version 1 is fetched whole; version 2, whose recipe declares ``[artifacts.delta]``, is patched from
version 1's tar (far fewer bytes on the wire) and unpacks to the same tree as the full archive;
with the delta server down, or a wrong tar digest, version 2 still comes, downloaded whole.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from keystone.delta import DeltaSpec
from keystone.metrics import Metrics
from keystone.runtime.artifacts import ArtifactPolicy, ArtifactSpec, ArtifactStore
from keystone.serve import DeltaOptions, DeltaService, make_server

pytestmark = pytest.mark.integration


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(body), 0o755, 1_700_000_000
            tf.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def releases() -> tuple[bytes, bytes]:
    """Two versions: a 2 MiB incompressible binary changed in a few places, and a new file."""
    rng = random.Random(7)
    binary = rng.randbytes(2 << 20)
    changed = bytearray(binary)
    for i in range(0, len(changed), 64 << 10):
        changed[i : i + 16] = rng.randbytes(16)
    v1 = tar_of({"bin/app": binary, "VERSION": b"1\n"})
    v2 = tar_of({"bin/app": bytes(changed), "VERSION": b"2\n", "NEW": b"added\n"})
    return v1, v2


class Served:
    def __init__(self, root: Path, cache: Path) -> None:
        service = DeltaService(root, DeltaOptions(cache_dir=cache, generate_wait=60.0))
        self.server = make_server(root, "127.0.0.1:0", deltas=service)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        host, port = self.server.server_address[:2]
        self.url = f"http://{host!s}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Served, dict[str, bytes]]]:
    root = tmp_path / "root"
    root.mkdir()
    v1, v2 = releases()
    data = {"v1": v1, "v2": v2, "gz1": gzip.compress(v1), "gz2": gzip.compress(v2)}
    (root / "app-1.0.0.tar.gz").write_bytes(data["gz1"])
    (root / "app-1.1.0.tar.gz").write_bytes(data["gz2"])
    served = Served(root, tmp_path / "delta-cache")
    yield served, data
    served.stop()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def policy(tmp_path: Path) -> ArtifactPolicy:
    return ArtifactPolicy(
        cache_dir=tmp_path / "artifacts",
        state_dir=tmp_path / "state",
        backoff_base=0.01,
        backoff_max=0.05,
    )


def spec(url: str, name: str, gz: bytes, tar_sha: str | None, server: str) -> ArtifactSpec:
    return ArtifactSpec(
        uri=f"{url}/{name}",
        sha256=sha(gz),
        unpack=True,
        delta=None if tar_sha is None else DeltaSpec(server=server, sha256=tar_sha),
    )


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_upgrade_through_a_delta(tmp_path: Path, world: tuple[Served, dict[str, bytes]]) -> None:
    """v2 comes from a patch of v1's tar: the bytes on the wire are a small part of the archive."""
    served, data = world
    metrics = Metrics()
    with ArtifactStore(policy(tmp_path)) as store:
        first = store.prepare(
            spec(served.url, "app-1.0.0.tar.gz", data["gz1"], sha(data["v1"]), served.url),
            component="app",
        )
        # A first install has no base: the whole archive.
        assert first.via == "full" and first.wire_bytes == len(data["gz1"])
        second = store.prepare(
            spec(served.url, "app-1.1.0.tar.gz", data["gz2"], sha(data["v2"]), served.url),
            component="app",
        )
        for p in (first, second):
            metrics.artifact_fetched(p.via, p.wire_bytes, p.saved_bytes)
        assert second.via == "delta"
        assert second.unpacked is not None
        assert 0 < second.wire_bytes < len(data["gz2"]) // 10
        assert tree(second.unpacked)["VERSION"] == b"2\n"
        assert tree(second.unpacked)["NEW"] == b"added\n"
        assert not second.path.exists()  # no .tar.gz was fetched
        # Asked again (a rollback, a reinstall): the patched tree is reused, nothing fetched.
        again = store.prepare(
            spec(served.url, "app-1.1.0.tar.gz", data["gz2"], sha(data["v2"]), served.url),
            component="app",
        )
        assert again.via == "cache" and again.unpacked == second.unpacked
        work = tmp_path / "work"
        store.install(second, work)
        assert (work / "NEW").read_bytes() == b"added\n"
    rendered = metrics.render()[0].decode()
    print(
        f"\nfull v2 archive {len(data['gz2'])} B, delta on the wire {second.wire_bytes} B, "
        f"saved ~{second.saved_bytes} B"
    )
    if rendered:
        assert 'keystone_artifact_fetches_total{path="delta"} 1.0' in rendered


class Garbage(BaseHTTPRequestHandler):
    """A delta route answering 200 with bytes that are no patch."""

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:
        body = b"\x28\xb5\x2f\xfd not really zstd"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("failure", ["server-down", "no-patch", "corrupt-patch"])
def test_fallback_downloads_the_whole_artifact(
    tmp_path: Path, world: tuple[Served, dict[str, bytes]], failure: str
) -> None:
    """No delta server, no patch for the pair, a corrupt patch: v2 is downloaded whole."""
    served, data = world
    delta_server = served.url
    tar2 = sha(data["v2"])
    garbage: ThreadingHTTPServer | None = None
    if failure == "server-down":
        delta_server = "http://127.0.0.1:9"  # discard port: nothing listens
    elif failure == "no-patch":
        tar2 = sha(b"a tar the server does not hold")
    else:
        garbage = ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
        threading.Thread(target=garbage.serve_forever, daemon=True).start()
        delta_server = f"http://127.0.0.1:{garbage.server_address[1]}"
    waits: list[float] = []
    with ArtifactStore(policy(tmp_path), delta_wait=waits.append) as store:
        store.prepare(
            spec(served.url, "app-1.0.0.tar.gz", data["gz1"], None, served.url), component="app"
        )
        second = store.prepare(
            spec(served.url, "app-1.1.0.tar.gz", data["gz2"], tar2, delta_server),
            component="app",
        )
        assert second.via == "full"
        assert second.wire_bytes == len(data["gz2"])
        assert second.unpacked is not None
        assert tree(second.unpacked)["VERSION"] == b"2\n"
    if failure == "no-patch":
        assert waits  # a 404 is asked again (the server may be computing the patch)
    if garbage is not None:
        garbage.shutdown()
        garbage.server_close()

"""Delta updates over real HTTP on 127.0.0.1: our serve-artifacts --deltas, a stand-in of Go's route.

The client (:func:`keystone.delta.fetch_delta`) is driven against both, through every path that
must fall back to the full download.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import bsdiff4
import httpx
import pytest
import zstandard
from loguru import logger

from keystone import delta
from keystone.serve import DeltaOptions, DeltaService, make_server
from tests.conftest import wait_until

pytestmark = pytest.mark.integration


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_of(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar with fixed metadata, so the same files give the same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(body), 0o755, 1_700_000_000
            tf.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def releases() -> tuple[bytes, bytes]:
    """Two versions of an app: a 300 KiB binary with a few changes, and a new file."""
    rng = random.Random(11)
    binary = rng.randbytes(300 << 10)
    changed = bytearray(binary)
    for i in range(0, len(changed), 4096):
        changed[i] ^= 0xFF
    v1 = tar_of({"bin/app": binary, "README": b"version one\n"})
    v2 = tar_of({"bin/app": bytes(changed), "README": b"version two\n", "NEW": b"added\n"})
    return v1, v2


def go_patch(base: bytes, target: bytes) -> bytes:
    """ota-updater's delta.Generate: bsdiff (BSDIFF40), then zstd."""
    return zstandard.ZstdCompressor(level=19).compress(bsdiff4.diff(base, target))


@dataclass
class Served:
    """A server in a thread and the URL it answers at."""

    url: str
    server: ThreadingHTTPServer
    service: DeltaService | None = None
    requests: list[str] = field(default_factory=list)


def _serve(server: ThreadingHTTPServer) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}"


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    """A served root holding both releases as .tar.gz, and the two uncompressed tars."""
    root = tmp_path / "root"
    (root / "app").mkdir(parents=True)
    v1, v2 = releases()
    (root / "app" / "app-1.0.0.tar.gz").write_bytes(gzip.compress(v1))
    (root / "app" / "app-1.1.0.tar.gz").write_bytes(gzip.compress(v2))
    (root / "notes.txt").write_text("not an archive\n")
    return root, v1, v2


@pytest.fixture
def ours(tmp_path: Path, store: tuple[Path, bytes, bytes]) -> Iterator[Callable[..., Served]]:
    """Start ``serve-artifacts --deltas`` on the store (options per test)."""
    started: list[ThreadingHTTPServer] = []

    def start(**options: object) -> Served:
        service = DeltaService(
            store[0],
            DeltaOptions(cache_dir=tmp_path / "cache", **options),  # type: ignore[arg-type]
        )
        server = make_server(store[0], "127.0.0.1:0", deltas=service)
        started.append(server)
        return Served(_serve(server), server, service)

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (the deadline test) is expected, not an error


@pytest.fixture
def go_route() -> Iterator[Callable[..., Served]]:
    """A stand-in of Go's route: answers 404 ``not_ready`` times, then the patch (or a status)."""
    started: list[ThreadingHTTPServer] = []

    def start(
        payload: bytes,
        *,
        path: str | None = None,
        not_ready: int = 0,
        status: int = 200,
        stall: threading.Event | None = None,
    ) -> Served:
        seen: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_GET(self) -> None:
                seen.append(self.path)
                if stall is not None:
                    stall.wait(30)
                code = status
                if (path is not None and self.path != path) or len(seen) <= not_ready:
                    code = 404
                body = payload if code == 200 else b"404 page not found\n"
                self.send_response(code)
                self.send_header(
                    "Content-Type", "application/octet-stream" if code == 200 else "text/plain"
                )
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = _QuietServer(("127.0.0.1", 0), Handler)
        started.append(server)
        return Served(_serve(server), server, requests=seen)

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def base_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "base.tar"
    path.write_bytes(data)
    return path


class Waits:
    """The client's wait between attempts, recorded (and optionally waiting on a condition)."""

    def __init__(self, until: Callable[[], bool] | None = None) -> None:
        self.calls: list[float] = []
        self.until = until

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.until is not None:
            wait_until(self.until, timeout=60, what="the patch to be generated")


class TestAgainstOurServer:
    """fetch_delta against serve-artifacts --deltas."""

    def test_patch_applied_from_our_server_and_cached(
        self, tmp_path: Path, store: tuple[Path, bytes, bytes], ours: Callable[..., Served]
    ) -> None:
        """The first request computes the patch within generate_wait; the second is from cache."""
        _, v1, v2 = store
        served = ours()
        spec = delta.DeltaSpec(served.url, sha(v2))
        lines: list[str] = []
        sink = logger.add(lambda m: lines.append(str(m)), format="{message}")
        try:
            got = delta.fetch_delta(
                spec,
                base_file(tmp_path, v1),
                tmp_path / "v2.tar",
                full_bytes=len(gzip.compress(v2)),
            )
        finally:
            logger.remove(sink)
        assert got.applied, got.message
        assert (tmp_path / "v2.tar").read_bytes() == v2
        assert 0 < got.patch_bytes < len(v2) // 4 and got.saved_bytes > 0
        assert any("installed from a delta" in line for line in lines)
        again = delta.fetch_delta(spec, base_file(tmp_path, v1), tmp_path / "again.tar")
        assert again.applied and served.service is not None and served.service.generated == 1

    def test_404_while_generating_then_served(
        self, tmp_path: Path, store: tuple[Path, bytes, bytes], ours: Callable[..., Served]
    ) -> None:
        """With generate_wait 0 the server answers 404 + Retry-After, then the patch."""
        _, v1, v2 = store
        served = ours(generate_wait=0.0)
        assert served.service is not None
        ready = served.service.patch_path(sha(v1), sha(v2))
        first = httpx.get(f"{served.url}/delta/{sha(v1)}/{sha(v2)}")
        assert first.status_code == 404 and first.headers["Retry-After"] == "15"
        waits = Waits(until=ready.is_file)
        got = delta.fetch_delta(
            delta.DeltaSpec(served.url, sha(v2)),
            base_file(tmp_path, v1),
            tmp_path / "o.tar",
            wait=waits,
        )
        assert got.applied and (tmp_path / "o.tar").read_bytes() == v2
        assert waits.calls in ([], [15.0])

    def test_the_route(self, store: tuple[Path, bytes, bytes], ours: Callable[..., Served]) -> None:
        """200 octet-stream with Range; 404 for malformed digests and versions not held."""
        root, v1, v2 = store
        served = ours()
        url = f"{served.url}/delta/{sha(v1)}/{sha(v2)}"
        full = httpx.get(url)
        assert (
            full.status_code == 200 and full.headers["Content-Type"] == "application/octet-stream"
        )
        assert (
            zstandard.ZstdDecompressor().decompressobj().decompress(full.content)[:8] == b"BSDIFF40"
        )
        part = httpx.get(url, headers={"Range": "bytes=0-9"})
        assert part.status_code == 206 and part.content == full.content[:10]
        assert httpx.head(url).headers["Content-Length"] == str(len(full.content))
        for bad in (
            f"/delta/{sha(v1)}",
            f"/delta/{sha(v1).upper()}/{sha(v2)}",
            f"/delta/../{sha(v2)}",
            f"/delta/{sha(b'not held')}/{sha(v2)}",
            f"/delta/{sha(v1)}/{sha(b'not held')}",
            f"/delta/{sha(v1)}/{sha(v1)}",
        ):
            assert httpx.get(served.url + bad).status_code == 404, bad
        # The files themselves are still served as before.
        archive = root / "app" / "app-1.0.0.tar.gz"
        assert httpx.get(f"{served.url}/app/app-1.0.0.tar.gz").content == archive.read_bytes()

    def test_versions_over_the_bound_are_not_diffed(
        self, store: tuple[Path, bytes, bytes], ours: Callable[..., Served]
    ) -> None:
        """A tar larger than max_source_bytes gives 404 and no child is started."""
        _, v1, v2 = store
        served = ours(max_source_bytes=1000)
        resp = httpx.get(f"{served.url}/delta/{sha(v1)}/{sha(v2)}")
        assert resp.status_code == 404 and "too-large" in resp.text
        assert served.service is not None and served.service.generated == 0

    def test_index_and_patches_survive_a_restart(
        self, tmp_path: Path, store: tuple[Path, bytes, bytes]
    ) -> None:
        """A new service on the same cache serves the patch without diffing again."""
        root, v1, v2 = store
        options = DeltaOptions(cache_dir=tmp_path / "cache")
        first = DeltaService(root, options)
        assert first.lookup(sha(v1), sha(v2))[0] is not None

        def refuse(argv: list[str], timeout: float) -> tuple[int, str]:
            raise AssertionError("diffed again")

        second = DeltaService(root, options, run=refuse)
        assert second.lookup(sha(v1), sha(v2))[0] == first.patch_path(sha(v1), sha(v2))
        assert (tmp_path / "cache" / "index.json").is_file()

    def test_a_failed_generation_is_not_retried_at_once(
        self, tmp_path: Path, store: tuple[Path, bytes, bytes]
    ) -> None:
        """A diff that fails answers 'failed' and is not started again within retry_failed_after."""
        root, v1, v2 = store
        calls: list[list[str]] = []

        def fail(argv: list[str], timeout: float) -> tuple[int, str]:
            calls.append(argv)
            return 1, "boom"

        service = DeltaService(root, DeltaOptions(cache_dir=tmp_path / "c"), run=fail)
        assert service.lookup(sha(v1), sha(v2)) == (None, "failed")
        assert service.lookup(sha(v1), sha(v2)) == (None, "failed")
        assert len(calls) == 1 and calls[0][1:4] == ["-m", "keystone.delta", "diff"]

    def test_a_new_version_appears_without_restart(
        self, tmp_path: Path, store: tuple[Path, bytes, bytes], ours: Callable[..., Served]
    ) -> None:
        """A version dropped into the root later is found on the next request (plain .tar too)."""
        root, _, v2 = store
        served = ours()
        v3 = v2 + b"\0" * 1024
        (root / "app" / "app-1.2.0.tar").write_bytes(v3)
        got = delta.fetch_delta(
            delta.DeltaSpec(served.url, sha(v3)), base_file(tmp_path, v2), tmp_path / "v3.tar"
        )
        assert got.applied and (tmp_path / "v3.tar").read_bytes() == v3


class TestAgainstGoRoute:
    """fetch_delta against a stand-in of the Go ecosystem's route (ota-updater's behaviour)."""

    def test_two_404s_then_the_patch(self, tmp_path: Path, go_route: Callable[..., Served]) -> None:
        """Like ota-updater: 404 while it generates; the client asks again, 15 s apart."""
        v1, v2 = releases()
        served = go_route(go_patch(v1, v2), path=f"/delta/{sha(v1)}/{sha(v2)}", not_ready=2)
        waits = Waits()
        got = delta.fetch_delta(
            delta.DeltaSpec(served.url + "/", sha(v2)),
            base_file(tmp_path, v1),
            tmp_path / "o.tar",
            wait=waits,
        )
        assert got.applied and (tmp_path / "o.tar").read_bytes() == v2
        assert served.requests == [f"/delta/{sha(v1)}/{sha(v2)}"] * 3 and waits.calls == [
            15.0,
            15.0,
        ]


class TestFallbacks:
    """Every failure is a fallback with its reason, and leaves no file behind."""

    def _fetch(
        self, tmp_path: Path, server: str, base: bytes | None, target: bytes, **kw: object
    ) -> delta.DeltaOutcome:
        spec = kw.pop("spec", None) or delta.DeltaSpec(server, sha(target))
        got = delta.fetch_delta(
            spec,  # type: ignore[arg-type]
            base_file(tmp_path, base) if base is not None else None,
            tmp_path / "out.tar",
            **kw,  # type: ignore[arg-type]
        )
        assert not got.applied and got.path is None and not (tmp_path / "out.tar").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name != "base.tar"] == []
        return got

    def test_no_base(self, tmp_path: Path, go_route: Callable[..., Served]) -> None:
        """First install: nothing to patch, no request made."""
        served = go_route(b"")
        assert self._fetch(tmp_path, served.url, None, b"x").reason == "no-base"
        assert served.requests == []

    def test_404_every_time(self, tmp_path: Path, go_route: Callable[..., Served]) -> None:
        """A server that never has the patch: asked `attempts` times, then not-found."""
        v1, v2 = releases()
        served = go_route(b"", status=404)
        got = self._fetch(tmp_path, served.url, v1, v2, attempts=3, wait=Waits())
        assert got.reason == "not-found" and len(served.requests) == 3

    def test_other_status_is_not_retried(
        self, tmp_path: Path, go_route: Callable[..., Served]
    ) -> None:
        """A 403 is final: one request."""
        v1, v2 = releases()
        served = go_route(b"", status=403)
        assert self._fetch(tmp_path, served.url, v1, v2, wait=Waits()).reason == "http"
        assert len(served.requests) == 1

    def test_digest_mismatch(self, tmp_path: Path, go_route: Callable[..., Served]) -> None:
        """A patch to attacker-chosen bytes applies, is refused, and is never written."""
        v1, v2 = releases()
        served = go_route(go_patch(v1, tar_of({"bin/app": b"attacker"})))
        assert self._fetch(tmp_path, served.url, v1, v2).reason == "digest-mismatch"

    def test_corrupt_patch(self, tmp_path: Path, go_route: Callable[..., Served]) -> None:
        """Bytes that are not a bsdiff+zstd patch."""
        v1, v2 = releases()
        served = go_route(b"<html>an error page</html>")
        assert self._fetch(tmp_path, served.url, v1, v2).reason == "corrupt-patch"

    def test_wrong_base(self, tmp_path: Path, go_route: Callable[..., Served]) -> None:
        """The server's patch is for another base: the result does not match."""
        v1, v2 = releases()
        served = go_route(go_patch(v1, v2))
        other = v1[:5000] + bytes(b ^ 1 for b in v1[5000:6000]) + v1[6000:]
        assert self._fetch(tmp_path, served.url, other, v2).reason == "digest-mismatch"

    def test_unsupported_format(self, tmp_path: Path, go_route: Callable[..., Served]) -> None:
        """Another format is never fed to the decoder: no request."""
        v1, v2 = releases()
        served = go_route(b"")
        spec = delta.DeltaSpec(served.url, sha(v2), format="xdelta3")
        assert self._fetch(tmp_path, served.url, v1, v2, spec=spec).reason == "unsupported-format"
        assert served.requests == []

    def test_base_over_the_limit(self, tmp_path: Path, go_route: Callable[..., Served]) -> None:
        """A base larger than max_base_bytes is not patched."""
        v1, v2 = releases()
        served = go_route(b"")
        assert self._fetch(tmp_path, served.url, v1, v2, max_base_bytes=1000).reason == "too-large"

    def test_patch_larger_than_the_full_download(
        self, tmp_path: Path, go_route: Callable[..., Served]
    ) -> None:
        """A patch as big as the full download saves nothing: the transfer is stopped."""
        v1, v2 = releases()
        served = go_route(b"z" * 200_000)
        assert self._fetch(tmp_path, served.url, v1, v2, full_bytes=100_000).reason == "too-large"

    def test_destination_not_writable(
        self, tmp_path: Path, go_route: Callable[..., Served]
    ) -> None:
        """A local write that fails is a fallback too (io), not an exception."""
        v1, v2 = releases()
        served = go_route(go_patch(v1, v2))
        got = delta.fetch_delta(
            delta.DeltaSpec(served.url, sha(v2)), base_file(tmp_path, v1), tmp_path / "no" / "o.tar"
        )
        assert not got.applied and got.reason == "io"

    def test_server_down(self, tmp_path: Path) -> None:
        """Nothing listening: network."""
        v1, v2 = releases()
        server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        server.server_close()
        assert self._fetch(tmp_path, url, v1, v2).reason == "network"

    def test_deadline(self, tmp_path: Path, go_route: Callable[..., Served]) -> None:
        """A server that does not answer within the deadline: timeout."""
        v1, v2 = releases()
        release = threading.Event()
        served = go_route(b"", stall=release)
        try:
            assert self._fetch(tmp_path, served.url, v1, v2, timeout=0.5).reason == "timeout"
        finally:
            release.set()

    def test_retry_past_the_deadline_is_not_waited_for(
        self, tmp_path: Path, go_route: Callable[..., Served]
    ) -> None:
        """A 404 whose next attempt would fall after the deadline ends at once."""
        v1, v2 = releases()
        served = go_route(b"", status=404)
        waits = Waits()
        got = self._fetch(
            tmp_path, served.url, v1, v2, timeout=5.0, retry_interval=15.0, wait=waits
        )
        assert got.reason == "not-found" and waits.calls == [] and len(served.requests) == 1


class TestServeArtifactsCommand:
    """``keystone serve-artifacts --deltas`` from the command line, as an operator runs it."""

    def test_the_command_serves_files_and_patches(
        self, tmp_path: Path, store: tuple[Path, bytes, bytes]
    ) -> None:
        """--deltas with --deltas-cache: the file route and the delta route, and the patch applies."""
        import re
        import signal
        import subprocess
        import sys

        root, v1, v2 = store
        cache = tmp_path / "cli-cache"
        proc = subprocess.Popen(
            [sys.executable, "-m", "keystone", "serve-artifacts", "--root", str(root),
             "--addr", "127.0.0.1:0", "--deltas", "--deltas-cache", str(cache),
             "--delta-generate-wait", "30"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stderr is not None

            def listening() -> str | None:
                line = proc.stderr.readline() if proc.stderr else ""
                m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
                return m.group(1) if m else None

            url = wait_until(listening, timeout=30, what="serve-artifacts to listen")
            drain = threading.Thread(target=lambda: list(proc.stderr or []), daemon=True)
            drain.start()
            want = (root / "app" / "app-1.0.0.tar.gz").read_bytes()
            assert httpx.get(f"{url}/app/app-1.0.0.tar.gz").content == want
            got = delta.fetch_delta(
                delta.DeltaSpec(url, sha(v2)), base_file(tmp_path, v1), tmp_path / "v2.tar"
            )
            assert got.applied, got.message
            assert (tmp_path / "v2.tar").read_bytes() == v2
            assert list(cache.glob("*.delta.zst")), "the patch is kept in --deltas-cache"
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=20)
            if proc.stderr is not None:
                proc.stderr.close()
        assert code == 0

    def test_a_bad_bound_is_refused(self, tmp_path: Path) -> None:
        """A non-positive --delta-max-source-mb is a usage error (exit 2), nothing served."""
        import subprocess
        import sys

        (tmp_path / "r").mkdir()
        r = subprocess.run(
            [sys.executable, "-m", "keystone", "serve-artifacts", "--root", str(tmp_path / "r"),
             "--addr", "127.0.0.1:0", "--deltas", "--delta-max-source-mb", "0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 2 and "--delta-max-source-mb" in r.stderr

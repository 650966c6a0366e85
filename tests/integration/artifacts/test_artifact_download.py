"""Downloads from misbehaving loopback servers: resume, bounds, deadlines, retries, no token leaks."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from loguru import logger

from keystone.errors import ArtifactFetchError, ArtifactIntegrityError
from keystone.runtime.artifacts import (
    ArtifactDownloadError,
    ArtifactPolicy,
    ArtifactRefusedError,
    ArtifactSpec,
    ArtifactStore,
)

from .conftest import RawServer, RecordingServer, Scenario

pytestmark = pytest.mark.integration

DATA = os.urandom(3 * 1024 * 1024 + 12345)
SHA = hashlib.sha256(DATA).hexdigest()
TOKEN = "ghp_s3cr3tT0kenValue"


@pytest.fixture
def policy(tmp_path: Path) -> ArtifactPolicy:
    return ArtifactPolicy(
        cache_dir=tmp_path / "artifacts",
        state_dir=tmp_path / "state",
        backoff_base=0.01,
        backoff_max=0.05,
        retries=2,
        connect_timeout=5.0,
        read_timeout=5.0,
    )


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """Every log line (any level) emitted while the test runs."""
    lines: list[str] = []
    handler = logger.add(lambda m: lines.append(str(m)), level="TRACE", format="{message}")
    yield lines
    logger.remove(handler)


def head(status: str, headers: dict[str, str]) -> bytes:
    text = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (text + "\r\n").encode()


def assert_nothing_cached(store: ArtifactStore) -> None:
    assert store.cached() == []
    tmp = store.root / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


class TestResume:
    def test_dropped_connection_is_resumed_with_range(
        self, policy: ArtifactPolicy, raw_server: Callable[[Scenario], RawServer]
    ) -> None:
        """A server that drops the connection halfway is resumed from where it stopped."""
        half = len(DATA) // 2

        def scenario(i: int, headers: dict[str, str], sock: socket.socket) -> None:
            if i == 0:
                sock.sendall(head("200 OK", {"Content-Length": str(len(DATA)), "ETag": '"v1"'}))
                sock.sendall(DATA[:half])
                sock.shutdown(socket.SHUT_RDWR)
                return
            start = int(headers["range"].removeprefix("bytes=").rstrip("-"))
            body = DATA[start:]
            sock.sendall(
                head(
                    "206 Partial Content",
                    {
                        "Content-Range": f"bytes {start}-{len(DATA) - 1}/{len(DATA)}",
                        "Content-Length": str(len(body)),
                        "ETag": '"v1"',
                    },
                )
            )
            sock.sendall(body)

        server = raw_server(scenario)
        prepared = ArtifactStore(policy).prepare(
            ArtifactSpec(uri=server.url(), sha256=SHA), component="c"
        )
        assert prepared.sha256 == SHA and prepared.path.read_bytes() == DATA
        assert len(server.seen) == 2
        assert server.seen[1]["range"] == f"bytes={half}-"
        assert server.seen[1]["if-range"] == '"v1"'

    def test_server_ignoring_range_starts_over(
        self, policy: ArtifactPolicy, raw_server: Callable[[Scenario], RawServer]
    ) -> None:
        """If the resumed request gets a full 200, the partial file is discarded, not appended to."""

        def scenario(i: int, headers: dict[str, str], sock: socket.socket) -> None:
            sock.sendall(head("200 OK", {"Content-Length": str(len(DATA))}))
            if i == 0:
                sock.sendall(DATA[:1_000_000])
                sock.shutdown(socket.SHUT_RDWR)
                return
            sock.sendall(DATA)

        server = raw_server(scenario)
        prepared = ArtifactStore(policy).prepare(
            ArtifactSpec(uri=server.url(), sha256=SHA), component="c"
        )
        assert prepared.path.read_bytes() == DATA
        assert "range" in server.seen[1]


class TestBounds:
    def test_body_over_the_bound_is_cut_off(
        self,
        policy: ArtifactPolicy,
        raw_server: Callable[[Scenario], RawServer],
    ) -> None:
        """A server streaming more than max_bytes (no Content-Length) is cut off and refused."""
        sent = [0]

        def scenario(i: int, headers: dict[str, str], sock: socket.socket) -> None:
            sock.sendall(head("200 OK", {"Connection": "close"}))
            chunk = b"\0" * 65536
            while sent[0] < 64 * 1024 * 1024:
                sock.sendall(chunk)
                sent[0] += len(chunk)

        server = raw_server(scenario)
        store = ArtifactStore(replace(policy, max_bytes=1024 * 1024))
        with pytest.raises(ArtifactRefusedError) as info:
            store.prepare(ArtifactSpec(uri=server.url()), component="c")
        assert info.value.reason == "too-large"
        assert isinstance(info.value, ArtifactIntegrityError)
        assert "cut off" in str(info.value)
        assert_nothing_cached(store)
        assert sent[0] < 64 * 1024 * 1024
        assert len(server.seen) == 1  # a size refusal is not retried

    def test_announced_size_over_the_bound_is_refused_before_reading(
        self, policy: ArtifactPolicy, http_server: RecordingServer
    ) -> None:
        """A Content-Length above max_bytes is refused from the headers."""

        def big(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Length", str(10 * 1024 * 1024))
            h.end_headers()
            h.wfile.write(b"x" * 1000)  # then hang up, far short

        http_server.routes["/big"] = big
        store = ArtifactStore(replace(policy, max_bytes=1024 * 1024))
        with pytest.raises(ArtifactRefusedError, match="announces 10485760 bytes"):
            store.prepare(ArtifactSpec(uri=http_server.url("/big")), component="c")
        assert_nothing_cached(store)


def dripping(stop_after: float = 30.0) -> Scenario:
    """A server that announces 100 kB and sends a byte every 20 ms."""

    def scenario(i: int, headers: dict[str, str], sock: socket.socket) -> None:
        sock.sendall(head("200 OK", {"Content-Length": "100000"}))
        deadline = time.monotonic() + stop_after
        while time.monotonic() < deadline:
            sock.sendall(b"x")
            time.sleep(0.02)  # the drip itself, not a wait for a condition

    return scenario


class TestSlowServers:
    def test_drip_is_refused_by_minimum_throughput(
        self, policy: ArtifactPolicy, raw_server: Callable[[Scenario], RawServer]
    ) -> None:
        """A byte at a time never trips a read timeout, but the throughput floor stops it."""
        server = raw_server(dripping())
        store = ArtifactStore(
            replace(policy, min_throughput=1000, throughput_window=0.5, retries=0)
        )
        with pytest.raises(ArtifactDownloadError) as info:
            store.prepare(ArtifactSpec(uri=server.url()), component="c")
        assert info.value.reason == "too-slow"
        assert isinstance(info.value, ArtifactFetchError)
        assert "below the minimum of 1000 B/s" in str(info.value)
        assert_nothing_cached(store)

    def test_total_deadline(
        self, policy: ArtifactPolicy, raw_server: Callable[[Scenario], RawServer]
    ) -> None:
        """With the throughput floor off, the total deadline still ends the download."""
        server = raw_server(dripping())
        store = ArtifactStore(replace(policy, min_throughput=0, download_timeout=1.0))
        with pytest.raises(ArtifactDownloadError) as info:
            store.prepare(ArtifactSpec(uri=server.url()), component="c")
        assert info.value.reason == "deadline"
        assert "KEYSTONE_ARTIFACT_DOWNLOAD_TIMEOUT" in str(info.value)

    def test_silent_server_trips_the_read_timeout(
        self, policy: ArtifactPolicy, raw_server: Callable[[Scenario], RawServer]
    ) -> None:
        """Headers and then silence: a read timeout per attempt, retried, then given up."""

        def silent(i: int, headers: dict[str, str], sock: socket.socket) -> None:
            sock.sendall(head("200 OK", {"Content-Length": "10"}))
            sock.recv(1)  # until the client gives up and closes

        server = raw_server(silent)
        store = ArtifactStore(replace(policy, read_timeout=0.3, retries=1))
        with pytest.raises(ArtifactDownloadError, match="ReadTimeout"):
            store.prepare(ArtifactSpec(uri=server.url()), component="c")
        assert len(server.seen) == 2


class TestRetriesAndCache:
    def test_transient_errors_are_retried(
        self, policy: ArtifactPolicy, http_server: RecordingServer
    ) -> None:
        """503 twice, then the file: three requests, one verified artifact."""
        calls = [0]

        def flaky(h: BaseHTTPRequestHandler) -> None:
            calls[0] += 1
            body = DATA if calls[0] > 2 else b"busy"
            h.send_response(200 if calls[0] > 2 else 503)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

        http_server.routes["/a"] = flaky
        prepared = ArtifactStore(policy).prepare(
            ArtifactSpec(uri=http_server.url("/a"), sha256=SHA), component="c"
        )
        assert prepared.sha256 == SHA and calls[0] == 3

    def test_not_found_is_not_retried(
        self, policy: ArtifactPolicy, http_server: RecordingServer
    ) -> None:
        """A 404 fails at once, retryable at the next sync, with a hint."""
        with pytest.raises(ArtifactDownloadError) as info:
            ArtifactStore(policy).prepare(
                ArtifactSpec(uri=http_server.url("/missing")), component="c"
            )
        assert info.value.reason == "not-found" and "HTTP 404" in str(info.value)
        assert len(http_server.seen) == 1

    def test_cached_artifact_costs_no_request(
        self, policy: ArtifactPolicy, http_server: RecordingServer
    ) -> None:
        """A pinned artifact already in the cache is not downloaded again."""
        http_server.routes["/a"] = (200, {}, DATA)
        store = ArtifactStore(policy)
        entry = ArtifactSpec(uri=http_server.url("/a"), sha256=SHA)
        store.prepare(entry, component="c")
        store.prepare(entry, component="c")
        ArtifactStore(policy).prepare(entry, component="other")
        assert len(http_server.seen) == 1

    def test_hash_mismatch_over_http(
        self, policy: ArtifactPolicy, http_server: RecordingServer
    ) -> None:
        """Bytes that do not match the pin are refused and not cached."""
        tampered = DATA[:-1] + bytes([DATA[-1] ^ 0xFF])  # never equal to DATA, whatever it is
        http_server.routes["/a"] = (200, {}, tampered)
        store = ArtifactStore(policy)
        with pytest.raises(ArtifactRefusedError) as info:
            store.prepare(ArtifactSpec(uri=http_server.url("/a"), sha256=SHA), component="c")
        assert info.value.reason == "hash-mismatch"
        assert_nothing_cached(store)


class TestTokens:
    def redirecting(self, a: RecordingServer, b: RecordingServer, fail_first: int = 0) -> None:
        a.routes["/repos/o/r/releases/assets/1"] = (
            302,
            {"Location": b.url("/blob?X-Sig=abc")},
            b"",
        )
        calls = [0]

        def blob(h: BaseHTTPRequestHandler) -> None:
            calls[0] += 1
            ok = calls[0] > fail_first
            body = DATA if ok else b"try later"
            h.send_response(200 if ok else 503)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

        b.routes["/blob"] = blob

    def test_redirect_to_another_host_drops_the_token(
        self,
        policy: ArtifactPolicy,
        http_server: RecordingServer,
        other_host_server: RecordingServer,
        logs: list[str],
    ) -> None:
        """GitHub's 302 to object storage: the token and private headers stay behind."""
        self.redirecting(http_server, other_host_server, fail_first=1)
        p = replace(policy, github_hosts=frozenset({"127.0.0.1"}), github_token=TOKEN)
        entry = ArtifactSpec(
            uri=http_server.url("/repos/o/r/releases/assets/1"),
            sha256=SHA,
            headers={"Accept": "application/octet-stream", "X-Api-Key": "private"},
        )
        assert ArtifactStore(p).prepare(entry, component="c").sha256 == SHA
        first = http_server.requests_to("/repos/o/r/releases/assets/1")
        assert {s.headers["authorization"] for s in first} == {f"Bearer {TOKEN}"}
        assert all(s.headers["x-api-key"] == "private" for s in first)
        moved = other_host_server.requests_to("/blob")
        assert len(moved) == 2  # one 503, then the file
        for seen in moved:
            assert "authorization" not in seen.headers
            assert "x-api-key" not in seen.headers
            assert seen.headers["accept"] == "application/octet-stream"
        assert any("retrying" in line for line in logs)
        assert not any(TOKEN in line or "X-Sig=abc" in line for line in logs)

    def test_token_never_in_errors_or_logs(
        self,
        policy: ArtifactPolicy,
        http_server: RecordingServer,
        other_host_server: RecordingServer,
        logs: list[str],
    ) -> None:
        """A failing authenticated download names the artifact, never the token."""
        self.redirecting(http_server, other_host_server, fail_first=100)
        p = replace(policy, github_hosts=frozenset({"127.0.0.1"}), retries=1)
        entry = ArtifactSpec(
            uri=http_server.url("/repos/o/r/releases/assets/1"), github_token=TOKEN
        )
        with pytest.raises(ArtifactDownloadError) as info:
            ArtifactStore(p).prepare(entry, component="c")
        assert TOKEN not in str(info.value) and TOKEN not in repr(info.value)
        assert not any(TOKEN in line for line in logs)

    def test_token_is_not_sent_to_other_hosts(
        self, policy: ArtifactPolicy, http_server: RecordingServer
    ) -> None:
        """KEYSTONE_GITHUB_TOKEN goes to github.com / api.github.com only."""
        http_server.routes["/a"] = (200, {}, DATA)
        ArtifactStore(replace(policy, github_token=TOKEN)).prepare(
            ArtifactSpec(uri=http_server.url("/a")), component="c"
        )
        assert "authorization" not in http_server.seen[0].headers

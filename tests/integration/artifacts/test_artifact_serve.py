"""``serve_artifacts`` (the keystoneserver) as a real child process: files, ranges, ETags, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from keystone.runtime.artifacts import ArtifactPolicy, ArtifactSpec, ArtifactStore
from tests.conftest import wait_until

pytestmark = pytest.mark.integration

BODY = os.urandom(200_000)


@dataclass
class Served:
    root: Path
    base: str
    proc: subprocess.Popen[str]

    def raw(self, request_path: str) -> int:
        """Send a request line as written (no client-side normalization); return the status."""
        host, port = self.base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(
                f"GET {request_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
            head = s.recv(4096).decode("latin-1")
        return int(head.split()[1])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    root = tmp_path / "root"
    (root / "rel" / "v1").mkdir(parents=True)
    (root / "rel" / "v1" / "app.bin").write_bytes(BODY)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the root")
    (root / "escape").symlink_to(secret)
    (root / "inside").symlink_to(root / "rel" / "v1" / "app.bin")
    code = (
        "import sys; from pathlib import Path; from keystone.serve import serve_artifacts;"
        "serve_artifacts(Path(sys.argv[1]), sys.argv[2])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(root), "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []

    def listening() -> str | None:
        line = proc.stderr.readline() if proc.stderr else ""
        lines.append(line)
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        return m.group(1) if m else None

    base = wait_until(listening, timeout=20, what="serve_artifacts to listen")
    # Keep reading its request log so that a full pipe never blocks the server.
    drain = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    drain.start()
    yield Served(root, base, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    drain.join(timeout=10)
    proc.stderr.close()


class TestServeArtifacts:
    def test_healthz(self, served: Served) -> None:
        """/healthz answers JSON with status and uptime."""
        r = httpx.get(served.base + "/healthz")
        assert r.status_code == 200
        data = r.json()
        assert data["status"] == "ok" and data["uptime"] >= 0 and "time_utc" in data

    def test_file_etag_and_304(self, served: Served) -> None:
        """A file comes with an ETag; If-None-Match with it answers 304 without a body."""
        r = httpx.get(served.base + "/rel/v1/app.bin")
        assert r.status_code == 200 and r.content == BODY
        etag = r.headers["etag"]
        again = httpx.get(served.base + "/rel/v1/app.bin", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        head = httpx.head(served.base + "/rel/v1/app.bin")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(BODY))

    def test_ranges(self, served: Served) -> None:
        """Single ranges are 206 with Content-Range; past the end is 416."""
        url = served.base + "/rel/v1/app.bin"
        r = httpx.get(url, headers={"Range": "bytes=100-199"})
        assert r.status_code == 206 and r.content == BODY[100:200]
        assert r.headers["content-range"] == f"bytes 100-199/{len(BODY)}"
        tail = httpx.get(url, headers={"Range": "bytes=-10"})
        assert tail.content == BODY[-10:]
        r = httpx.get(url, headers={"Range": f"bytes={len(BODY)}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(BODY)}"
        stale = httpx.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
        assert stale.status_code == 200 and stale.content == BODY

    def test_refusals(self, served: Served) -> None:
        """'..' and symlinks out of the root are 403; a missing file is 404; inner links work."""
        assert served.raw("/../secret.txt") == 403
        assert served.raw("/rel/%2e%2e/%2e%2e/secret.txt") == 403
        assert httpx.get(served.base + "/escape").status_code == 403
        assert httpx.get(served.base + "/nope").status_code == 404
        assert httpx.get(served.base + "/inside").content == BODY
        listing = httpx.get(served.base + "/").text
        assert "rel/" in listing and "escape" not in listing

    def test_agent_downloads_from_it(self, served: Served, tmp_path: Path) -> None:
        """The artifact store fetches and verifies from the server end to end."""
        policy = ArtifactPolicy(cache_dir=tmp_path / "cache", state_dir=tmp_path / "state")
        prepared = ArtifactStore(policy).prepare(
            ArtifactSpec(
                uri=served.base + "/rel/v1/app.bin", sha256=hashlib.sha256(BODY).hexdigest()
            ),
            component="c",
        )
        assert prepared.path.read_bytes() == BODY
        assert json.loads(httpx.get(served.base + "/healthz").text)["status"] == "ok"

"""The sync deadline against a real drip-feeding git server on 127.0.0.1.

A proxy in front of ``git http-backend`` passes answers through, or, once told to drip, sends
the ref advertisement one byte a second: every read is well within the per-read timeout, so
only the overall deadline (``KEYSTONE_SYNC_DEADLINE``) ends the sync.
"""

from __future__ import annotations

import os
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .conftest import SignedFleet
from .test_sync import base_fleet, pids, revision, sync

pytestmark = pytest.mark.integration


@contextmanager
def drip_proxy(upstream: str, drip: threading.Event, stop: threading.Event) -> Iterator[str]:
    """A smart-HTTP proxy to ``upstream``; while ``drip`` is set it drip-feeds its answers."""

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _forward(self, body: bytes | None) -> None:
            req = urllib.request.Request(
                upstream + self.path,
                data=body,
                method=self.command,
                headers={
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() in ("content-type", "accept", "git-protocol")
                },
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                data = resp.read()
                ctype = resp.headers.get("Content-Type", "")
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not drip.is_set():
                self.wfile.write(data)
                return
            for i in range(len(data)):  # one byte a second, until the client hangs up
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
                if stop.wait(1.0):
                    return

        def do_GET(self) -> None:
            with suppress(OSError):
                self._forward(None)

        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            with suppress(OSError):
                self._forward(self.rfile.read(n))

    class S(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: object, client_address: object) -> None:
            pass

    srv = S(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        stop.set()
        srv.shutdown()
        srv.server_close()


def sync_workers(runtime: Path) -> list[int]:
    """Pids of sync workers running in ``runtime``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if b"keystone.sync.worker" in cmd and cwd == str(runtime.resolve()):
            out.append(int(entry))
    return out


class TestSyncDeadline:
    def test_drip_feeding_server_is_cut_at_the_deadline(
        self, signed_fleet: SignedFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        """A sync against a drip-feeding server fails at the deadline, naming it and how to
        raise it; the worker is gone, the components run on; the next sync applies."""
        f = signed_fleet
        first = base_fleet(f)
        drip, stop = threading.Event(), threading.Event()
        upstream = f.url.rsplit("/", 1)[0]
        with drip_proxy(upstream, drip, stop) as base:
            cfg = f.agent_config(tmp_path / "agent.toml", url=f"{base}/fleet.git")
            agent = make_agent("--config", str(cfg), env={"KEYSTONE_SYNC_DEADLINE": "4s"}).start()
            code, out = sync(agent)
            assert code == 0 and out["revision"] == first, out
            agent.wait_states({"db": "healthy", "api": "healthy", "tool": "healthy"})
            before = pids(agent)

            new = f.commit(
                {"recipes/tool.recipe.toml": f.recipe("tool", version="1.2.0")}, "tool 1.2"
            )
            drip.set()
            code, out = sync(agent)
            assert code == 1 and out["result"] == "unreachable", out
            err = out["error"]
            assert "deadline of 4s" in err and "KEYSTONE_SYNC_DEADLINE" in err, err
            assert "[source] deadline" in err
            assert sync_workers(agent.runtime) == []
            assert pids(agent) == before
            assert revision(agent)["applied"] == first

            drip.clear()
            code, out = sync(agent)
            assert code == 0 and out["revision"] == new, out

"""scripts/rollout-gate against a real HTTP server answering as Prometheus and a real git repo."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from keystone import fleet
from keystone.rollout import parse_rollout
from tests.integration.sources.gitserver import git_env

from .conftest import SignedFleet

pytestmark = pytest.mark.integration
GATE = Path(__file__).resolve().parents[3] / "scripts" / "rollout-gate"
ROLLOUT = '# canaries first\nwaves = ["1%", "100%"]  # then everyone\nwait = "1h"\n'


class Prometheus(BaseHTTPRequestHandler):
    answer: dict[str, Any] = {}
    queries: list[str] = []

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/api/v1/query":
            self.send_error(404)
            return
        type(self).queries.append(urllib.parse.parse_qs(url.query)["query"][0])
        body = json.dumps(self.answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def prometheus() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Prometheus)
    Prometheus.queries = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def vector(*values: float) -> dict[str, Any]:
    return {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [{"metric": {}, "value": [1.7e9, str(v)]} for v in values],
        },
    }


def gate(
    f: SignedFleet, prometheus: str, rev: str, *extra: str, python: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    f.git("config", "gpg.format", "ssh")
    f.git("config", "user.signingkey", str(f.key))
    return subprocess.run(
        [
            *(python or (sys.executable,)),
            str(GATE),
            "--repo",
            str(f.work),
            "--prometheus",
            prometheus,
            "--revision",
            rev,
            "--push",
            str(f.bare),
            "--json",
            *extra,
        ],
        env=git_env(f.tmp / "home"),
        capture_output=True,
        text=True,
        timeout=60,
    )


class TestGate:
    def test_failing_canaries_commit_a_signed_halt(
        self, signed_fleet: SignedFleet, prometheus: str
    ) -> None:
        f = signed_fleet
        rev = f.commit({"rollout.toml": ROLLOUT}, "roll out")
        Prometheus.answer = vector(1, 1)  # two canaries rolled back
        r = gate(f, prometheus, rev)
        assert r.returncode == 3, r.stderr
        out = json.loads(r.stdout)
        assert out["decision"] == "halt" and out["value"] == 2.0
        assert Prometheus.queries == [
            f'sum(keystone_rollout_outcome{{revision="{rev}",outcome="rolled-back"}})'
        ]
        halt = out["commit"]
        # Pushed, signed by the key the agents trust, and halted = true with comments kept.
        assert f.git("--git-dir", str(f.bare), "rev-parse", "main").strip() == halt
        verdict = fleet.verify(f.work, halt, allowed_signers=f.allowed)
        assert verdict["ok"] and verdict["signer"] == "ops@example.com", verdict
        text = f.git("show", f"{halt}:rollout.toml")
        assert text.startswith("# canaries first\n") and "# then everyone" in text
        assert parse_rollout(text).default.halted
        assert f.git("log", "-1", "--format=%s", halt).strip() == f"rollout: halt {rev[:12]}"

        # Run again: halted already, no second commit.
        r = gate(f, prometheus, rev)
        assert r.returncode == 3 and json.loads(r.stdout)["commit"] is None
        assert f.git("rev-parse", "HEAD").strip() == halt

    def test_healthy_canaries_change_nothing(
        self, signed_fleet: SignedFleet, prometheus: str
    ) -> None:
        f = signed_fleet
        rev = f.commit({"rollout.toml": ROLLOUT}, "roll out")
        Prometheus.answer = vector()  # no device rolled back: an empty vector
        r = gate(f, prometheus, rev)
        assert r.returncode == 0 and json.loads(r.stdout)["decision"] == "continue", r.stdout
        Prometheus.answer = vector(2)
        r = gate(
            f,
            prometheus,
            rev,
            "--threshold",
            "2",
            "--query",
            'count(keystone_rollout_outcome{revision="{revision}",outcome="healthy"})',
        )
        assert r.returncode == 0, r.stdout
        assert Prometheus.queries[-1] == (
            f'count(keystone_rollout_outcome{{revision="{rev}",outcome="healthy"}})'
        )
        assert f.git("rev-parse", "HEAD").strip() == rev

    def test_prometheus_errors_change_nothing(
        self, signed_fleet: SignedFleet, prometheus: str
    ) -> None:
        f = signed_fleet
        rev = f.commit({"rollout.toml": ROLLOUT}, "roll out")
        Prometheus.answer = {"status": "error", "error": "bad query"}
        r = gate(f, prometheus, rev)
        assert r.returncode == 1 and "bad query" in json.loads(r.stdout)["error"]
        r = gate(f, "http://127.0.0.1:9", rev)
        assert r.returncode == 1 and "failed" in json.loads(r.stdout)["error"]
        assert f.git("rev-parse", "HEAD").strip() == rev

    def test_a_python_without_tomlkit_is_named_not_a_traceback(
        self, signed_fleet: SignedFleet, prometheus: str
    ) -> None:
        """Run by a python3 that lacks Keystone's libraries (``-S``: no site-packages), the gate
        says which Python to use, exits 1 and changes nothing."""
        f = signed_fleet
        rev = f.commit({"rollout.toml": ROLLOUT}, "roll out")
        Prometheus.answer = vector(1)
        r = gate(f, prometheus, rev, python=(sys.executable, "-S"))
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        assert "tomlkit is not installed" in json.loads(r.stdout)["error"]
        assert f.git("rev-parse", "HEAD").strip() == rev
        assert f.git("status", "--porcelain").strip() == ""

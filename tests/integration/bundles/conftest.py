"""Bundles end to end: a signed fleet with artifacts, a bundle/artifact HTTP server, agents.

* :class:`FileServer`: ``http.server`` in a thread serving named blobs the way a CDN serves a
  bundle (``ETag``, ``Last-Modified``, ``304`` for a conditional request that matches, ``206``
  for ``Range`` + ``If-Range``), recording every request; it can drop the connection part way
  through the next body on cue (a server dying mid-download).
* :class:`BundleFleet`: a :class:`SignedFleet` whose component ``app`` carries two pinned
  artifacts, one committed in the repository and one served over HTTP, plus the CLI to make
  bundles of it (``keystone bundle create`` and the real ``git bundle create``).
* :func:`device_config`: an agent.toml for a device, with or without a source.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent.conftest import (  # noqa: F401  (fixture re-export)
    AgentProc,
    make_agent,
    stop_agents,
)
from tests.integration.sources.gitserver import git_env, run_git, serve_git
from tests.integration.sync.conftest import SignedFleet, keygen

PAYLOAD_PATH = "/files/app-{version}/payload.bin"
CONFIG_PATH = "artifacts/app/config.txt"


# -- an HTTP server for bundles and artifacts ---------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One request the server answered: path, request headers (lower-case), status, body bytes."""

    path: str
    headers: dict[str, str]
    status: int
    sent: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str, str]] = {}
        self.seen: list[Seen] = []
        self.cut: int | None = None
        self.lock = threading.Lock()
        self.version = 0
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the request log is ``FileServer.seen``."""

    def _record(self, status: int, sent: int) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.server.lock:
            self.server.seen.append(Seen(self.path, headers, status, sent))

    def do_GET(self) -> None:
        with self.server.lock:
            entry = self.server.files.get(self.path)
        if entry is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._record(404, 0)
            return
        data, etag, modified = entry
        inm, ims = self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since")
        # RFC 9110 13.2.2: If-Modified-Since is ignored when If-None-Match is present.
        if (inm is not None and inm == etag) or (
            inm is None and ims is not None and ims == modified
        ):
            self.send_response(304)
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", modified)
            self.end_headers()
            self._record(304, 0)
            return
        start = 0
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if wanted and self.headers.get("If-Range") in (None, etag):
            start = int(wanted.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                self._record(416, 0)
                return
        body = data[start:]
        status = 206 if start else 200
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", modified)
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        with self.server.lock:
            cut, self.server.cut = self.server.cut, None
        if cut is None:
            self.wfile.write(body)
            self._record(status, len(body))
            return
        # The server dies part way: send some of the body, then hang up.
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self.close_connection = True
        self._record(status, min(cut, len(body)))
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class FileServer:
    """Serves blobs on 127.0.0.1 with validators, conditional requests and ranges."""

    def __init__(self) -> None:
        self._server = _Server()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="bundle-http",
            daemon=True,
        )
        self._thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def put(self, path: str, data: bytes) -> str:
        """Publish ``data`` at ``path`` with a new ETag and a later Last-Modified; return its URL."""
        with self._server.lock:
            self._server.version += 1
            etag = f'"{hashlib.sha256(data).hexdigest()[:20]}"'
            modified = formatdate(1_700_000_000 + 60 * self._server.version, usegmt=True)
            self._server.files[path] = (data, etag, modified)
        return self.url(path)

    def cut_next_body(self, after: int) -> None:
        """The next 200/206 answer sends ``after`` body bytes, then drops the connection."""
        with self._server.lock:
            self._server.cut = after

    @property
    def seen(self) -> list[Seen]:
        with self._server.lock:
            return list(self._server.seen)

    def requests_for(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    server = FileServer()
    try:
        yield server
    finally:
        server.close()


# -- a signed fleet whose component carries artifacts --------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def keystone(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the ``keystone`` CLI as a user would (no agent address unless ``env`` names one)."""
    full = {**os.environ, **(env or {})}
    full.pop("KEYSTONE_API_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "keystone", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def as_json(r: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a ``--json`` command printed; fail with its output when there is none."""
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"no JSON (exit {r.returncode}):\nstdout: {r.stdout}\nstderr: {r.stderr}"
        ) from None


@dataclass
class BundleFleet:
    """A signed fleet: ``app`` (repo artifact + HTTP artifact) for everyone, ``edge-tool`` for
    devices labelled ``edge`` (its own HTTP artifact)."""

    fleet: SignedFleet
    files: FileServer
    payloads: dict[str, bytes] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.fleet.work

    @property
    def allowed(self) -> Path:
        return self.fleet.allowed

    def serve_payload(self, path: str, data: bytes) -> str:
        self.payloads[path] = data
        return self.files.put(path, data)

    def app_recipe(self, version: str, payload: bytes, config: bytes, extra: str = "") -> str:
        url = self.serve_payload(PAYLOAD_PATH.format(version=version), payload)
        return (
            self.fleet.recipe("app", version=version)
            + f'\n[[artifacts]]\nuri = "{CONFIG_PATH}"\nsha256 = "{sha256(config)}"\n'
            + f'\n[[artifacts]]\nuri = "{url}"\nsha256 = "{sha256(payload)}"\n'
            + extra
        )

    def commit_app(
        self,
        version: str,
        *,
        payload: bytes | None = None,
        config: bytes | None = None,
        sign: str | None = "key",
        date: str | None = None,
        artifacts: str = "",
        push: bool = True,
    ) -> str:
        """Commit ``app`` at ``version`` (artifacts derived from it unless given), then push.

        ``artifacts`` is more ``[[artifacts]]`` text for the recipe.
        """
        payload = payload if payload is not None else f"payload {version}\n".encode() * 64
        config = config if config is not None else f"config {version}\n".encode()
        self.add_file(CONFIG_PATH, config)
        return self.fleet.commit(
            {
                "recipes/app.recipe.toml": self.app_recipe(version, payload, config, artifacts),
                "plans/default.toml": self.fleet.plan("app"),
            },
            f"app {version}",
            sign=sign,
            date=date,
            push=push,
        )

    def add_file(self, rel: str, data: bytes) -> None:
        """Write a binary file into the work tree and stage it."""
        (self.work / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.work / rel).write_bytes(data)
        self.fleet.git("add", rel)

    def add_edge_label(self) -> str:
        """Commit a label overlay that adds ``edge-tool`` with an HTTP artifact of its own."""
        tool = b"edge tool\n" * 100
        url = self.serve_payload("/files/edge-tool.bin", tool)
        recipe = self.fleet.recipe("edge-tool") + (
            f'\n[[artifacts]]\nuri = "{url}"\nsha256 = "{sha256(tool)}"\n'
        )
        return self.fleet.commit(
            {
                "recipes/edge-tool.recipe.toml": recipe,
                "labels/edge/plan.toml": self.fleet.plan("edge-tool"),
            },
            "edge label",
        )

    def create(self, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """``keystone bundle create OUT --repo WORK ARGS... --json``."""
        return keystone(
            "bundle", "create", str(out), "--repo", str(self.work), "--json", *args, cwd=self.work
        )

    def bundle(self, out: Path, *args: str) -> Path:
        r = self.create(out, *args)
        assert r.returncode == 0, f"bundle create failed: {r.stdout}\n{r.stderr}"
        return out

    def git_bundle(self, out: Path, *spec: str) -> Path:
        """A bundle made by the real ``git bundle create``."""
        run_git("bundle", "create", "-q", str(out), *spec, cwd=self.work, env=git_env(self.home))
        return out

    @property
    def home(self) -> Path:
        return self.fleet.tmp / "home"


def device_config(
    path: Path,
    fleet: BundleFleet,
    *,
    source: str = "",
    watch: list[str] | None = None,
    trust: str = "",
    soak: str = "1s",
) -> Path:
    """agent.toml for device ``dev-1``: no source unless ``source`` is a ``[source]`` body."""
    text = f'[device]\nid = "dev-1"\nlabels = []\n\n[trust]\nallowed_signers = "{fleet.allowed}"\n'
    text += trust
    if source:
        text += f'\n[source]\ninterval = "1h"\njitter = "0s"\nsoak = "{soak}"\n{source}'
    if watch:
        text += f"\n[bundles]\nwatch = {json.dumps(watch)}\n"
    path.write_text(text)
    return path


@contextlib.contextmanager
def signed_fleet_at(tmp: Path) -> Iterator[SignedFleet]:
    """A :class:`SignedFleet` in ``tmp`` (what the ``signed_fleet`` fixture builds, any scope)."""
    (tmp / "home").mkdir()
    (tmp / "srv").mkdir()
    keygen(tmp / "ops_key")
    keygen(tmp / "stranger_key")
    pub = (tmp / "ops_key.pub").read_text().split()
    allowed = tmp / "allowed_signers"
    allowed.write_text(f'ops@example.com namespaces="git" {pub[0]} {pub[1]}\n')
    env = git_env(tmp / "home")
    run_git("init", "-q", "--bare", "-b", "main", str(tmp / "srv" / "fleet.git"), env=env)
    run_git("init", "-q", "-b", "main", str(tmp / "work"), env=env)
    with serve_git(tmp / "srv") as base:
        yield SignedFleet(
            tmp,
            f"{base}/fleet.git",
            tmp / "ops_key",
            tmp / "stranger_key",
            allowed,
            tmp / "starts.jsonl",
        )


@contextlib.contextmanager
def bundle_fleet_at(tmp: Path) -> Iterator[BundleFleet]:
    server = FileServer()
    try:
        with signed_fleet_at(tmp) as fleet:
            yield BundleFleet(fleet, server)
    finally:
        server.close()


@pytest.fixture
def bfleet(tmp_path: Path) -> Iterator[BundleFleet]:
    """A fresh signed fleet with an artifact server (nothing committed yet)."""
    with bundle_fleet_at(tmp_path) as f:
        yield f


def revision(agent: AgentProc) -> dict[str, Any]:
    """``keystone status --revision --json`` of a running agent."""
    r = agent.cli("status", "--revision", "--json")
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def history(agent: AgentProc) -> list[dict[str, Any]]:
    r = agent.cli("history", "--json")
    assert r.returncode == 0, r.stderr
    rows: list[dict[str, Any]] = json.loads(r.stdout)
    return rows


def cache_blobs(runtime: Path) -> set[str]:
    """The sha256 names in the agent's artifact cache."""
    d = runtime / "artifacts" / "sha256"
    return {p.name for p in d.iterdir()} if d.is_dir() else set()

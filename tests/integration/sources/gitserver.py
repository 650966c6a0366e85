"""Real git servers on 127.0.0.1 for tests, and a git CLI runner with an isolated config.

* :func:`serve_git` - smart HTTP: a threaded HTTP server that runs the reference server,
  ``git http-backend``, as a CGI program for each request (as the current user, so none of the
  root-to-nobody catches of ``http.server --cgi`` apply). Fetch over HTTP; push to the bare
  repository's path (anonymous push over HTTP is off).
* :func:`serve_git_daemon` - ``git daemon`` for ``git://``, in its own process group.
* :func:`run_git` / :func:`git_env` - the git CLI with no global or system config.
* :class:`FleetRepo` - a bare "remote" plus a work tree that commits (with distinct, fixed
  times) and pushes to it.

Only the standard library is used, so any test folder can reuse this module. From another test
folder (no ``__init__.py`` files are needed; ``tests`` is a namespace package)::

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
    from tests.integration.sources.gitserver import run_git, serve_git, serve_git_daemon

    with serve_git(tmp_path / "srv") as base:          # base = "http://127.0.0.1:PORT"
        url = f"{base}/fleet.git"                       # serves tmp_path/srv/fleet.git

Adjust ``parents[3]`` to the depth of your conftest (``tests/integration/<x>/conftest.py`` is 3).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

__all__ = [
    "FleetRepo",
    "GitDaemonUnavailable",
    "git_env",
    "run_git",
    "serve_git",
    "serve_git_daemon",
]

_GIT = shutil.which("git") or "git"


class GitDaemonUnavailable(RuntimeError):
    """``git daemon`` is not installed (Debian ships it in the ``git-daemon-run`` family)."""


def git_env(home: Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the git CLI that ignores the machine's global and system config."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home) if home else os.environ.get("HOME", "/"),
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Keystone Test",
        "GIT_AUTHOR_EMAIL": "test@keystone.invalid",
        "GIT_COMMITTER_NAME": "Keystone Test",
        "GIT_COMMITTER_EMAIL": "test@keystone.invalid",
        "GIT_TERMINAL_PROMPT": "0",
        "LC_ALL": "C",
    }
    if extra:
        env.update(extra)
    return env


def run_git(
    *args: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    check: bool = True,
) -> bytes:
    """Run ``git args...`` and return its stdout; raise with stderr when it fails."""
    proc = subprocess.run(
        [_GIT, *args],
        cwd=cwd,
        env=dict(env) if env is not None else git_env(),
        input=input,
        capture_output=True,
        timeout=120,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"git {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout


def _exec_path() -> str:
    return run_git("--exec-path").decode().strip()


class _GitHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, root: Path, log: list[str] | None, user_agents: list[str] | None = None
    ) -> None:
        self.root = root
        self.log = log
        self.user_agents = user_agents
        self.backend = os.path.join(_exec_path(), "git-http-backend")
        super().__init__(("127.0.0.1", 0), _CGIHandler)


class _CGIHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _GitHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet; the request log is :func:`serve_git`'s ``log``."""

    def do_GET(self) -> None:
        self._run_backend()

    def do_POST(self) -> None:
        self._run_backend()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _run_backend(self) -> None:
        if self.server.log is not None:
            self.server.log.append(f"{self.command} {self.path}")
        if self.server.user_agents is not None:
            self.server.user_agents.append(self.headers.get("User-Agent", ""))
        path, _, query = self.path.partition("?")
        body = self._read_body()
        env = git_env(
            extra={
                "GIT_PROJECT_ROOT": str(self.server.root),
                "GIT_HTTP_EXPORT_ALL": "1",
                # Repositories made by another user would be refused as "dubious ownership".
                "GIT_CONFIG_COUNT": "1",
                "GIT_CONFIG_KEY_0": "safe.directory",
                "GIT_CONFIG_VALUE_0": "*",
                "GATEWAY_INTERFACE": "CGI/1.1",
                "SERVER_PROTOCOL": "HTTP/1.1",
                "REQUEST_METHOD": self.command,
                "PATH_INFO": unquote(path),
                "QUERY_STRING": query,
                "REMOTE_ADDR": self.client_address[0],
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
            }
        )
        for header, var in (
            ("Git-Protocol", "HTTP_GIT_PROTOCOL"),
            ("Content-Encoding", "HTTP_CONTENT_ENCODING"),
        ):
            if self.headers.get(header):
                env[var] = self.headers[header]
        proc = subprocess.run(
            [self.server.backend], input=body, env=env, capture_output=True, timeout=120
        )
        head, sep, rest = proc.stdout.partition(b"\r\n\r\n")
        if not sep:
            head, sep, rest = proc.stdout.partition(b"\n\n")
        status = 200
        headers: list[tuple[str, str]] = []
        for line in head.decode("latin-1").splitlines():
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.split()[0])
            elif key:
                headers.append((key, value.strip()))
        if not sep:
            status, headers, rest = 500, [("Content-Type", "text/plain")], proc.stderr
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        self.wfile.write(rest)


@contextlib.contextmanager
def serve_git(
    root: Path,
    *,
    log: list[str] | None = None,
    tls: ssl.SSLContext | None = None,
    user_agents: list[str] | None = None,
) -> Iterator[str]:
    """Serve every repository under ``root`` over smart HTTP on 127.0.0.1.

    Args:
        root: Directory holding bare repositories (``root/fleet.git`` is ``{base}/fleet.git``).
        log: If given, each request is appended as ``"GET /fleet.git/info/refs?service=..."``.
        tls: A server context: serve HTTPS instead.
        user_agents: If given, each request's ``User-Agent`` is appended.

    Yields:
        The base URL, ``http://127.0.0.1:PORT`` or ``https://...`` (no trailing slash).
    """
    server = _GitHTTPServer(Path(root), log, user_agents)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    # serve_forever checks for shutdown() between requests every poll_interval seconds.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="git-http", daemon=True
    )
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@contextlib.contextmanager
def serve_git_daemon(root: Path) -> Iterator[str]:
    """Serve every repository under ``root`` with ``git daemon`` (``git://``) on 127.0.0.1.

    Yields:
        The base URL, ``git://127.0.0.1:PORT`` (no trailing slash).

    Raises:
        GitDaemonUnavailable: git-daemon is not installed.
    """
    daemon = os.path.join(_exec_path(), "git-daemon")
    if not os.access(daemon, os.X_OK):
        raise GitDaemonUnavailable(f"{daemon} is not installed")
    root = Path(root)
    last_error = ""
    for _attempt in range(3):
        port = _free_port()
        with tempfile.TemporaryFile() as stderr:
            proc = subprocess.Popen(
                [
                    _GIT, "daemon", "--export-all", "--reuseaddr", "--informative-errors",
                    f"--base-path={root}", "--listen=127.0.0.1", f"--port={port}", str(root),
                ],
                env=git_env(extra={"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory",
                                   "GIT_CONFIG_VALUE_0": "*"}),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )  # fmt: skip
            try:
                if _wait_listening(proc, port, timeout=10.0):
                    yield f"git://127.0.0.1:{port}"
                    return
                stderr.seek(0)
                last_error = stderr.read().decode(errors="replace")
            finally:
                _stop_group(proc)
    raise RuntimeError(f"git daemon did not start (port taken?): {last_error}")


def _wait_listening(proc: subprocess.Popen[bytes], port: int, *, timeout: float) -> bool:
    """Wait (with a deadline) until ``port`` accepts connections; False if ``proc`` exited."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    return False


BASE_TIME = 1_700_000_000


class FleetRepo:
    """A bare "remote" repository under ``root`` and a work tree that commits and pushes to it.

    Every commit gets its own committer time (one minute apart), so that commit order is
    well defined for comparisons with ``git rev-list``.
    """

    def __init__(self, tmp: Path, name: str = "fleet.git") -> None:
        self.home = tmp / "home"
        self.home.mkdir(exist_ok=True)
        self.env = git_env(self.home)
        self.root = tmp / "srv"
        self.root.mkdir(exist_ok=True)
        self.bare = self.root / name
        self.work = tmp / f"work-{name}"
        self.ticks = 0
        run_git("init", "-q", "--bare", "-b", "main", str(self.bare), env=self.env)
        run_git("init", "-q", "-b", "main", str(self.work), env=self.env)

    def git(self, *args: str, env: Mapping[str, str] | None = None) -> str:
        """Run git in the work tree and return stdout as text."""
        full = dict(self.env)
        if env:
            full.update(env)
        return run_git(*args, cwd=self.work, env=full).decode()

    def _dated(self) -> dict[str, str]:
        self.ticks += 1
        stamp = f"{BASE_TIME + 60 * self.ticks} +0000"
        return {"GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}

    def commit(
        self,
        files: Mapping[str, str | bytes | None] | None = None,
        message: str = "change",
        *,
        push: bool = True,
        extra: tuple[str, ...] = (),
    ) -> str:
        """Write (or, for None, delete) files, commit them, push main; return the commit id."""
        for rel, content in (files or {}).items():
            path = self.work / rel
            if content is None:
                self.git("rm", "-q", "-r", rel)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
            self.git("add", rel)
        self.git("commit", "-q", "--allow-empty", "--no-gpg-sign", "-m", message, *extra,
                 env=self._dated())  # fmt: skip
        if push:
            self.push()
        return self.rev("HEAD")

    def merge(self, branch: str, message: str = "merge") -> str:
        """Merge ``branch`` into the current branch with a merge commit; return its id."""
        self.git("merge", "-q", "--no-ff", "--no-gpg-sign", "-m", message, branch,
                 env=self._dated())  # fmt: skip
        return self.rev("HEAD")

    def push(self, ref: str = "main") -> None:
        self.git("push", "-q", "--force", str(self.bare), f"{ref}:{ref}")

    def rev(self, rev: str) -> str:
        return self.git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()

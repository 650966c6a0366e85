"""``keystone serve-artifacts``: a small artifact file server (the Go project's keystoneserver).

Serves the files under one root directory over HTTP for devices and tests:

* ``GET``/``HEAD`` of files, a plain HTML listing of directories;
* single ``Range`` requests (``206``, ``416`` when unsatisfiable), ``If-Range``;
* ``ETag`` (mtime and size) with ``If-None-Match`` → ``304``, and ``Last-Modified``;
* ``/healthz``: ``{"status": "ok", "uptime": ..., "time_utc": ...}``;
* a path with a ``..`` segment, or one that resolves outside the root through a symlink, is
  refused with ``403``; a missing file is ``404``;
* with deltas on (:class:`DeltaOptions`), the Go Keystone's and ota-updater's delta route
  ``GET /delta/{from}/{to}`` (see :class:`DeltaService`).

``:9000`` listens on every IPv4 interface, as in Go; ``127.0.0.1:9000`` and ``[::1]:9000`` work.
Standard library only (a patch is computed in a ``python -m keystone.delta`` child).
"""

from __future__ import annotations

import contextlib
import html
import json
import mimetypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, unquote, urlsplit

from loguru import logger

from keystone import delta as _delta
from keystone.errors import UsageError


def parse_addr(addr: str) -> tuple[str, int]:
    """Split a Go-style listen address: ``:9000`` → ``("0.0.0.0", 9000)``, ``[::1]:80`` → ``("::1", 80)``.

    Raises:
        UsageError: not ``[host]:port`` with a port in 0-65535.
    """
    text = addr.strip()
    if text.isdigit():
        host, port_text = "", text
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise UsageError(f"--addr {addr!r}: expected host:port or :port (e.g. :9000)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"--addr {addr!r}: the port must be a number from 0 to 65535")
    return host or "0.0.0.0", int(port_text)


def default_deltas_cache(environ: dict[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/keystone/deltas`` (patches are named by content, so roots may share it)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "keystone" / "deltas"


@dataclass(frozen=True)
class DeltaOptions:
    """How ``serve-artifacts --deltas`` makes patches.

    Attributes:
        cache_dir: where patches (``{from}_{to}.delta.zst``) and the version index are kept
            (default :func:`default_deltas_cache`).
        max_source_bytes: a version whose tar is larger is not diffed (bsdiff needs about 17
            times the old tar in RAM); a patch already cached is still served.
        generate_wait: how long a request that starts a patch waits for it before answering
            ``404`` (the client asks again, as it does with ota-updater).
        generate_timeout: the child computing a patch is killed after this many seconds.
        retry_failed_after: seconds before a pair whose patch failed is tried again.
    """

    cache_dir: Path | None = None
    max_source_bytes: int = 64 << 20
    generate_wait: float = 10.0
    generate_timeout: float = 1800.0
    retry_failed_after: float = 600.0


def _run_diff(argv: list[str], timeout: float) -> tuple[int, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:g}s"
    return proc.returncode, proc.stderr.strip()


@dataclass
class _Job:
    done: threading.Event
    ok: bool = False
    finished_at: float = 0.0


class DeltaService:
    """The versions under a root, by the SHA-256 of their uncompressed tar, and their patches.

    ``GET /delta/{from}/{to}`` (both 64 lowercase hex characters) answers ``200``
    ``application/octet-stream`` with the ``bsdiff+zstd`` patch (``Range`` honoured), or
    ``404``: a malformed digest, a digest of no ``.tar``/``.tar.gz``/``.tgz`` under the root
    (so a request can only make the server diff versions it holds), a version over
    ``max_source_bytes``, or a patch still being computed (``Retry-After`` then says when to ask
    again). A patch is computed once per pair, in a child process, and cached on disk.

    Args:
        root: the served directory.
        options: see :class:`DeltaOptions`.
        run: runs the diff child (argv, timeout) -> (exit code, stderr); tests pass their own.
    """

    def __init__(
        self,
        root: Path,
        options: DeltaOptions,
        *,
        run: Callable[[list[str], float], tuple[int, str]] = _run_diff,
    ) -> None:
        self.root = Path(os.path.realpath(root))
        self.options = options
        self.cache_dir = Path(options.cache_dir or default_deltas_cache())
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._run = run
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._gen_lock = threading.Semaphore(1)
        self._stat: dict[str, tuple[int, int, str, int]] = self._load_index()
        self._by_sha: dict[str, tuple[Path, int]] = {}
        self._jobs: dict[tuple[str, str], _Job] = {}
        self.generated = 0

    # the version index
    def _index_file(self) -> Path:
        return self.cache_dir / "index.json"

    def _load_index(self) -> dict[str, tuple[int, int, str, int]]:
        try:
            data = json.loads(self._index_file().read_text())
            return {k: (int(v[0]), int(v[1]), str(v[2]), int(v[3])) for k, v in data.items()}
        except (OSError, ValueError, TypeError, IndexError, AttributeError):
            return {}

    def _save_index(self) -> None:
        part = self._index_file().with_suffix(f".{os.getpid()}.part")
        part.write_text(json.dumps(self._stat))
        os.replace(part, self._index_file())

    def scan(self) -> dict[str, tuple[Path, int]]:
        """Rescan the root; hash only new or changed archives. Returns ``sha -> (path, tar size)``."""
        with self._scan_lock:  # one walk at a time; a second caller then sees its result
            return self._scan()

    def _scan(self) -> dict[str, tuple[Path, int]]:
        cache_real = os.path.realpath(self.cache_dir)
        seen: dict[str, tuple[int, int, str, int]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = os.path.realpath(dirpath)
            if here == cache_real or here.startswith(cache_real + os.sep):
                dirnames[:] = []
                continue
            for name in filenames:
                if not (name.endswith(".tar") or _delta.is_gzip_name(name)):
                    continue
                full = os.path.join(dirpath, name)
                real = os.path.realpath(full)
                if not real.startswith(str(self.root) + os.sep):
                    continue
                try:
                    st = os.stat(real)
                except OSError:
                    continue
                rel = os.path.relpath(real, self.root)
                old = self._stat.get(rel)
                if old is not None and old[0] == st.st_size and old[1] == st.st_mtime_ns:
                    seen[rel] = old
                    continue
                try:
                    sha, size = _tar_digest(Path(real))
                except (OSError, EOFError) as exc:
                    logger.warning("serve-artifacts: {} is not a readable archive: {}", rel, exc)
                    continue
                seen[rel] = (st.st_size, st.st_mtime_ns, sha, size)
        with self._lock:
            changed = seen != self._stat
            self._stat = seen
            self._by_sha = {v[2]: (self.root / rel, v[3]) for rel, v in sorted(seen.items())}
            if changed:
                self._save_index()
            return dict(self._by_sha)

    def patch_path(self, from_sha: str, to_sha: str) -> Path:
        """Where the patch for a pair is cached."""
        return self.cache_dir / f"{from_sha}_{to_sha}.delta.zst"

    def lookup(self, from_sha: str, to_sha: str) -> tuple[Path | None, str]:
        """Return the cached patch for a pair, computing it if the server holds both versions.

        Returns:
            ``(path, "")`` when the patch is ready, else ``(None, why)`` where ``why`` is
            ``"bad-digest"``, ``"unknown"``, ``"too-large"``, ``"failed"`` or ``"pending"``.
        """
        if not (_delta.is_sha256_hex(from_sha) and _delta.is_sha256_hex(to_sha)):
            return None, "bad-digest"
        cached = self.patch_path(from_sha, to_sha)
        if cached.is_file():
            return cached, ""
        if from_sha == to_sha:
            return None, "unknown"
        with self._lock:
            held = dict(self._by_sha)
        if from_sha not in held or to_sha not in held:
            held = self.scan()
        if from_sha not in held or to_sha not in held:
            return None, "unknown"
        (old, old_size), (new, new_size) = held[from_sha], held[to_sha]
        if max(old_size, new_size) > self.options.max_source_bytes:
            return None, "too-large"
        job = self._start(from_sha, to_sha, old, new)
        if job is None:
            return None, "failed"
        job.done.wait(self.options.generate_wait)
        if job.done.is_set() and job.ok and cached.is_file():
            return cached, ""
        return None, "pending" if not job.done.is_set() else "failed"

    def _start(self, from_sha: str, to_sha: str, old: Path, new: Path) -> _Job | None:
        key = (from_sha, to_sha)
        with self._lock:
            job = self._jobs.get(key)
            if job is not None:
                if not job.done.is_set() or job.ok:
                    return job
                if time.monotonic() - job.finished_at < self.options.retry_failed_after:
                    return None
            job = _Job(done=threading.Event())
            self._jobs[key] = job
        threading.Thread(
            target=self._generate, args=(job, old, new, self.patch_path(*key)), daemon=True
        ).start()
        return job

    def _generate(self, job: _Job, old: Path, new: Path, out: Path) -> None:
        started = time.monotonic()
        try:
            with self._gen_lock:  # one bsdiff at a time: each needs ~17x the tar in RAM
                argv = [
                    sys.executable,
                    "-m",
                    "keystone.delta",
                    "diff",
                    str(old),
                    str(new),
                    str(out),
                ]
                code, err = self._run(argv, self.options.generate_timeout)
            job.ok = code == 0 and out.is_file()
            if job.ok:
                self.generated += 1
                logger.info(
                    "serve-artifacts: patch {} -> {}: {} B in {:.1f}s",
                    old.name,
                    new.name,
                    out.stat().st_size,
                    time.monotonic() - started,
                )
            else:
                logger.warning(
                    "serve-artifacts: patch {} -> {} failed: {}", old.name, new.name, err
                )
        finally:
            job.finished_at = time.monotonic()
            job.done.set()


def _tar_digest(path: Path) -> tuple[str, int]:
    import hashlib

    h = hashlib.sha256()
    size = 0
    with _delta.open_tar_stream(path) as src:
        while block := src.read(1 << 20):
            size += len(block)
            h.update(block)
    return h.hexdigest(), size


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self, address: tuple[str, int], root: Path, deltas: DeltaService | None = None
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.root_real = os.path.realpath(root)
        self.started = time.monotonic()
        self.deltas = deltas
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "keystone-serve-artifacts"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        logger.info("serve-artifacts {} {}", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle(body=True)

    def do_HEAD(self) -> None:
        self._handle(body=False)

    # helpers
    def _simple(
        self, status: int, text: str, *, body: bool, headers: dict[str, str] | None = None
    ) -> None:
        data = text.encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _handle(self, *, body: bool) -> None:
        raw_path = urlsplit(self.path).path
        if raw_path == "/healthz":
            payload = json.dumps(
                {
                    "status": "ok",
                    "uptime": round(time.monotonic() - self.server.started, 3),
                    "time_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
            ).encode()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)
            return
        if self.server.deltas is not None and raw_path.startswith("/delta/"):
            self._delta(raw_path, body=body)
            return
        path = unquote(raw_path)
        if "\x00" in path:
            self._simple(HTTPStatus.BAD_REQUEST, "bad path\n", body=body)
            return
        segments = path.split("/")
        if ".." in segments:
            self._simple(HTTPStatus.FORBIDDEN, "forbidden: '..' in path\n", body=body)
            return
        rel = "/".join(s for s in segments if s not in ("", "."))
        root = self.server.root_real
        real = os.path.realpath(os.path.join(root, rel))
        if real != root and not real.startswith(root + os.sep):
            self._simple(HTTPStatus.FORBIDDEN, "forbidden: outside the root\n", body=body)
            return
        if os.path.isdir(real):
            if not raw_path.endswith("/"):
                self._simple(
                    HTTPStatus.MOVED_PERMANENTLY,
                    "moved\n",
                    body=body,
                    headers={"Location": quote(raw_path) + "/"},
                )
                return
            self._listing(real, path, body=body)
            return
        try:
            fh = open(real, "rb")  # noqa: SIM115 - closed in _send_file
        except (FileNotFoundError, NotADirectoryError):
            self._simple(HTTPStatus.NOT_FOUND, "not found\n", body=body)
            return
        except OSError:
            self._simple(HTTPStatus.FORBIDDEN, "forbidden\n", body=body)
            return
        with fh:
            self._send_file(fh, real, body=body)

    def _delta(self, raw_path: str, *, body: bool) -> None:
        deltas = self.server.deltas
        assert deltas is not None
        parts = raw_path.split("/")
        if len(parts) != 4:
            self._simple(HTTPStatus.NOT_FOUND, "not found\n", body=body)
            return
        found, why = deltas.lookup(parts[2], parts[3])
        if found is None:
            headers = {"Retry-After": "15"} if why == "pending" else {}
            self._simple(HTTPStatus.NOT_FOUND, f"no patch: {why}\n", body=body, headers=headers)
            return
        try:
            fh = open(found, "rb")  # noqa: SIM115 - closed below
        except OSError:
            self._simple(HTTPStatus.NOT_FOUND, "no patch: gone\n", body=body)
            return
        with fh:
            self._send_file(fh, str(found), body=body, ctype="application/octet-stream")

    def _listing(self, real: str, shown: str, *, body: bool) -> None:
        root = self.server.root_real
        items = []
        for name in sorted(os.listdir(real)):
            full = os.path.join(real, name)
            target = os.path.realpath(full)
            if target != root and not target.startswith(root + os.sep):
                continue  # a symlink out of the root is not shown either
            suffix = "/" if os.path.isdir(full) else ""
            items.append(
                f'<li><a href="{quote(name)}{suffix}">{html.escape(name)}{suffix}</a></li>'
            )
        page = (
            f"<!doctype html><title>{html.escape(shown)}</title><h1>{html.escape(shown)}</h1>"
            f"<ul>{''.join(items)}</ul>\n"
        ).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        if body:
            self.wfile.write(page)

    def _send_file(self, fh: BinaryIO, real: str, *, body: bool, ctype: str | None = None) -> None:
        st = os.fstat(fh.fileno())
        size = st.st_size
        etag = f'"{st.st_mtime_ns:x}-{size:x}"'
        modified = formatdate(st.st_mtime, usegmt=True)
        common = {"ETag": etag, "Last-Modified": modified, "Accept-Ranges": "bytes"}
        inm = self.headers.get("If-None-Match")
        if inm is not None and (
            inm.strip() == "*" or etag in [t.strip().removeprefix("W/") for t in inm.split(",")]
        ):
            self.send_response(HTTPStatus.NOT_MODIFIED)
            for name, value in common.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, size - 1
        status = HTTPStatus.OK
        range_header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if range_header and (if_range is None or if_range.strip() in (etag, modified)):
            parsed = _parse_range(range_header, size)
            if parsed == "unsatisfiable":
                self._simple(
                    HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                    "range not satisfiable\n",
                    body=body,
                    headers={**common, "Content-Range": f"bytes */{size}"},
                )
                return
            if isinstance(parsed, tuple):
                start, end = parsed
                status = HTTPStatus.PARTIAL_CONTENT
        length = max(0, end - start + 1)
        self.send_response(status)
        for name, value in common.items():
            self.send_header(name, value)
        ctype = ctype or mimetypes.guess_type(real)[0] or "application/octet-stream"
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body and length:
            self.wfile.flush()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.connection.sendfile(fh, start, length)


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=`` range → ``(start, end)``; ``"unsatisfiable"``; ``None`` to ignore it.

    Several ranges, or a header that does not parse, are ignored (the whole file is sent), as
    RFC 9110 allows.
    """
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return "unsatisfiable"
            return (max(0, size - n), size - 1) if size else "unsatisfiable"
        start = int(first)
        end = int(last) if last else None
    except ValueError:
        return None
    if start < 0 or (end is not None and end < start):
        return None
    if start >= size:
        return "unsatisfiable"
    return start, size - 1 if end is None else min(end, size - 1)


def make_server(
    root: Path, addr: str, *, deltas: DeltaOptions | DeltaService | None = None
) -> ThreadingHTTPServer:
    """Bind the artifact server (not yet serving); ``server.server_address`` has the real port.

    Args:
        root: the directory served.
        addr: ``[host]:port``.
        deltas: serve ``GET /delta/{from}/{to}`` too (``serve-artifacts --deltas``).

    Raises:
        UsageError: ``root`` is not a directory or the address is malformed.
    """
    if not Path(root).is_dir():
        raise UsageError(f"--root {root}: not a directory")
    host, port = parse_addr(addr)
    service = DeltaService(Path(root), deltas) if isinstance(deltas, DeltaOptions) else deltas
    try:
        return _Server((host, port), Path(root), service)
    except OSError as exc:
        raise UsageError(f"--addr {addr}: cannot listen ({exc.strerror})") from exc


def serve_artifacts(root: Path, addr: str, *, deltas: DeltaOptions | None = None) -> None:
    """Serve ``root`` at ``addr`` until SIGINT/SIGTERM (blocking).

    Logs ``serving <root> on http://<host>:<port>`` once listening. With ``deltas``, the delta
    route is served as well (patches between the versions under ``root``).
    """
    server = make_server(root, addr, deltas=deltas)
    host, port = str(server.server_address[0]), int(server.server_address[1])
    shown = f"[{host}]" if ":" in host else host
    logger.info("serving {} on http://{}:{}", root, shown, port)

    def stop(_signum: int, _frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

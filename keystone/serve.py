"""``keystone serve-artifacts``: a small artifact file server (the Go project's keystoneserver).

Serves the files under one root directory over HTTP for devices and tests:

* ``GET``/``HEAD`` of files, a plain HTML listing of directories;
* single ``Range`` requests (``206``, ``416`` when unsatisfiable), ``If-Range``;
* ``ETag`` (mtime and size) with ``If-None-Match`` → ``304``, and ``Last-Modified``;
* ``/healthz``: ``{"status": "ok", "uptime": ..., "time_utc": ...}``;
* a path with a ``..`` segment, or one that resolves outside the root through a symlink, is
  refused with ``403``; a missing file is ``404``.

``:9000`` listens on every IPv4 interface, as in Go; ``127.0.0.1:9000`` and ``[::1]:9000`` work.
Standard library only.
"""

from __future__ import annotations

import contextlib
import html
import json
import mimetypes
import os
import signal
import socket
import threading
import time
from datetime import UTC, datetime
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, unquote, urlsplit

from loguru import logger

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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], root: Path) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.root_real = os.path.realpath(root)
        self.started = time.monotonic()
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

    def _send_file(self, fh: BinaryIO, real: str, *, body: bool) -> None:
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
        ctype = mimetypes.guess_type(real)[0] or "application/octet-stream"
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


def make_server(root: Path, addr: str) -> ThreadingHTTPServer:
    """Bind the artifact server (not yet serving); ``server.server_address`` has the real port.

    Raises:
        UsageError: ``root`` is not a directory or the address is malformed.
    """
    if not Path(root).is_dir():
        raise UsageError(f"--root {root}: not a directory")
    host, port = parse_addr(addr)
    try:
        return _Server((host, port), Path(root))
    except OSError as exc:
        raise UsageError(f"--addr {addr}: cannot listen ({exc.strerror})") from exc


def serve_artifacts(root: Path, addr: str) -> None:
    """Serve ``root`` at ``addr`` until SIGINT/SIGTERM (blocking).

    Logs ``serving <root> on http://<host>:<port>`` once listening.
    """
    server = make_server(root, addr)
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

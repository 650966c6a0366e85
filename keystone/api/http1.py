"""The API's HTTP/1.1 connections: request heads read and answers framed, without http.server.

``http.server`` imports ``http.client``, ``email``, ``html`` and ``mimetypes`` for its
request handler, about 1.7 MB resident in an agent that needs none of them. This module is
the part of ``BaseHTTPRequestHandler`` the API uses, on ``socketserver`` as that class is:
the request line and its errors (400, 505), the header block as ``email`` parses it (first
value of a name wins, folded lines kept with their line break, a line without a colon ends
the block), ``Connection`` and ``Expect: 100-continue``, keep-alive, 501 for an unknown
method, and the ``Server`` and ``Date`` headers of each answer. Errors of the request line are
answered with the API's JSON error body, not http.server's HTML page.

``tests/unit/test_http1.py`` feeds the same raw requests to this handler and to
``http.server``'s and checks that they read them the same way.
"""

from __future__ import annotations

import json
import re
import socketserver
import time
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any, overload

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

#: A header or a continuation line, as ``email.feedparser`` recognises one; any other line
#: (the blank one included) ends the header block.
_HEADER_LINE = re.compile(r"From |[\041-\071\073-\176]*:|[\t ]")
#: Line ends as ``email`` splits a header block: CR, LF or CRLF.
_LINES = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")
_EOL = re.compile(r"(\r\n|\r|\n)\Z")

#: The reason phrase of each status code.
REASONS = {int(s): s.phrase for s in HTTPStatus}


def http_date(t: float | None = None) -> str:
    """``t`` (now when None) as an HTTP date: ``Wed, 02 Dec 2026 19:25:52 GMT``.

    The names are English whatever the locale, as ``email.utils.formatdate(usegmt=True)``.
    """
    tm = time.gmtime(t)
    return (
        f"{_DAYS[tm.tm_wday]}, {tm.tm_mday:02d} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year:04d} "
        f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} GMT"
    )


class Headers:
    """A request's header fields in order; names compare without case, the first one wins."""

    __slots__ = ("_fields",)

    def __init__(self, fields: list[tuple[str, str]] | None = None) -> None:
        self._fields = fields if fields is not None else []

    @overload
    def get(self, name: str) -> str | None: ...

    @overload
    def get(self, name: str, default: str) -> str: ...

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of the first field called ``name``, else ``default``."""
        want = name.lower()
        for key, value in self._fields:
            if key.lower() == want:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of fields called ``name``, in order."""
        want = name.lower()
        return [value for key, value in self._fields if key.lower() == want]

    def __getitem__(self, name: str) -> str | None:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def items(self) -> list[tuple[str, str]]:
        """``(name, value)`` pairs in order, names as sent."""
        return list(self._fields)


def parse_headers(block: bytes) -> Headers:
    """The header fields of ``block``, the lines after the request line (ISO-8859-1).

    As ``email``'s parser reads them (``http.server`` hands the block to it): lines split at
    CR, LF or CRLF; the block ends at the first line that is neither ``name:`` nor a folded
    continuation; a ``From`` envelope line, a field with an empty name and a continuation
    with no field before it are dropped; a folded value keeps its line breaks.
    """
    lines: list[str] = []
    for m in _LINES.finditer(block.decode("iso-8859-1")):
        line = m.group()
        if not _HEADER_LINE.match(line):
            break
        lines.append(line)
    fields: list[tuple[str, str]] = []
    name, source = "", []
    for line in lines:
        if line[0] in " \t":
            if name:
                source.append(line)
            continue
        if name:
            fields.append(_field(source))
            name, source = "", []
        if line.startswith("From "):  # an envelope line, to email
            continue
        name, source = line[: line.find(":")], [line]  # an empty name is no field
    if name:
        fields.append(_field(source))
    return Headers(fields)


def _field(source: list[str]) -> tuple[str, str]:
    name, value = source[0].split(":", 1)
    value = value.lstrip(" \t") + "".join(source[1:])
    return name, value.rstrip("\r\n")


class RequestError(Exception):
    """A request head that cannot be answered: the status and the reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_request_line(line: str) -> tuple[str, str, str, bool | None]:
    """``(command, path, version, keep_alive)`` of a request line (its line end stripped).

    ``keep_alive`` is True for HTTP/1.1 and later, None for an older version (the headers
    decide), False for an HTTP/0.9 ``GET path``. Raises :class:`RequestError` for what
    http.server answers 400 or 505; an empty line is ``("", "", "", False)`` (no answer).
    """
    words = line.split()
    if not words:
        return "", "", "", False
    version, keep_alive = "HTTP/0.9", None
    if len(words) >= 3:
        version = words[-1]
        number = _version(version)
        if number is None:
            raise RequestError(400, f"Bad request version ({version!r})")
        if number >= (2, 0):
            raise RequestError(505, f"Invalid HTTP version ({version.split('/', 1)[1]})")
        keep_alive = True if number >= (1, 1) else None
    if not 2 <= len(words) <= 3:
        raise RequestError(400, f"Bad request syntax ({line!r})")
    command, path = words[:2]
    if len(words) == 2:
        keep_alive = False
        if command != "GET":
            raise RequestError(400, f"Bad HTTP/0.9 request type ({command!r})")
    if path.startswith("//"):  # //host/path is a scheme-relative URL to a client
        path = "/" + path.lstrip("/")
    return command, path, version, keep_alive


def _version(text: str) -> tuple[int, int] | None:
    if not text.startswith("HTTP/"):
        return None
    parts = text[5:].split(".")
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= 10 for p in parts):
        return None
    return int(parts[0]), int(parts[1])


class RequestHandler(socketserver.StreamRequestHandler):
    """One HTTP/1.x connection: requests in turn until one closes it.

    A subclass defines ``do_<METHOD>`` for each method it answers and may override
    :meth:`handle_expect_100`. The names and the order of calls are ``BaseHTTPRequestHandler``'s
    (``handle_one_request``, ``parse_request``, ``send_response``, ``send_header``,
    ``end_headers``, ``log_request``, ``log_message``), so a handler reads like one.
    """

    protocol_version = "HTTP/1.0"
    server_version = "keystone"
    #: Bound of the request line (and of each header line) read by this class itself.
    max_line = 65536

    command: str
    path: str
    request_version: str
    requestline: str
    raw_requestline: bytes
    headers: Headers
    close_connection: bool

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            self.handle_one_request()

    def handle_one_request(self) -> None:
        """Read one request and answer it (``do_<METHOD>``); set ``close_connection``."""
        try:
            self.raw_requestline = bytes(self.rfile.readline(self.max_line + 1))
            if len(self.raw_requestline) > self.max_line:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(501, f"Unsupported method ({self.command!r})")
                return
            method()
            self.wfile.flush()
        except TimeoutError as exc:  # a read or a write timed out: drop the connection
            self.log_error("Request timed out: %r", exc)
            self.close_connection = True

    def parse_request(self) -> bool:
        """Read the head of the request whose line is ``raw_requestline``.

        Sets ``command``, ``path``, ``request_version``, ``headers`` and
        ``close_connection``; False when an error was answered (or the line was empty).
        """
        self.command = ""
        self.request_version = "HTTP/0.9"
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        try:
            command, path, version, keep_alive = parse_request_line(self.requestline)
        except RequestError as exc:
            # Answered with a status line (http.server sends a bad version's error bare, as
            # to an HTTP/0.9 client, and no client can read its status then).
            self.request_version = "HTTP/1.0"
            self.send_error(exc.status, str(exc))
            return False
        if not command:
            return False
        if keep_alive and self.protocol_version >= "HTTP/1.1":
            self.close_connection = False
        self.command, self.path, self.request_version = command, path, version
        try:
            self.headers = parse_headers(self._read_head())
        except RequestError as exc:
            self.send_error(exc.status, str(exc))
            return False
        connection = (self.headers.get("Connection") or "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive" and self.protocol_version >= "HTTP/1.1":
            self.close_connection = False
        expect = (self.headers.get("Expect") or "").lower()
        if (
            expect == "100-continue"
            and self.protocol_version >= "HTTP/1.1"
            and self.request_version >= "HTTP/1.1"
        ):
            return self.handle_expect_100()
        return True

    def _read_head(self) -> bytes:
        """The header lines up to and with the blank one (or the end of the stream)."""
        lines = []
        while True:
            line = bytes(self.rfile.readline(self.max_line + 1))
            if len(line) > self.max_line:
                raise RequestError(431, "a request header line is too long")
            lines.append(line)
            if line in (b"\r\n", b"\n", b""):
                return b"".join(lines)

    def handle_expect_100(self) -> bool:
        """Answer ``100 Continue`` to a client that waits for it before sending its body."""
        self.send_response_only(100)
        self.end_headers()
        return True

    # --- answers ---

    def send_error(self, code: int, message: str | None = None) -> None:
        """Answer ``code`` with a JSON error body and close the connection."""
        message = message or REASONS.get(code, "")
        self.log_error("code %d, message %s", code, message)
        self.send_response(code)
        self.send_header("Connection", "close")
        body = b""
        if code >= 200 and code not in (204, 205, 304):
            body = json.dumps({"error": message, "status": code, "kind": "usage"}).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_response(self, code: int, message: str | None = None) -> None:
        """Start an answer: its status line, ``Server`` and ``Date`` (logged by code)."""
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Server", self.version_string())
        self.send_header("Date", self.date_time_string())

    def send_response_only(self, code: int, message: str | None = None) -> None:
        """The status line alone (none for an HTTP/0.9 request)."""
        if self.request_version != "HTTP/0.9":
            phrase = REASONS.get(code, "") if message is None else message
            self._buffer().append(f"{self.protocol_version} {code} {phrase}\r\n".encode())

    def send_header(self, keyword: str, value: str) -> None:
        """One header line of the answer; ``Connection`` also decides whether to close."""
        if self.request_version != "HTTP/0.9":
            self._buffer().append(f"{keyword}: {value}\r\n".encode("latin-1", "strict"))
        if keyword.lower() == "connection":
            if value.lower() == "close":
                self.close_connection = True
            elif value.lower() == "keep-alive":
                self.close_connection = False

    def end_headers(self) -> None:
        """End the head and send it."""
        if self.request_version != "HTTP/0.9":
            self._buffer().append(b"\r\n")
            self.flush_headers()

    def flush_headers(self) -> None:
        buffer: list[bytes] = self.__dict__.pop("_head", [])
        if buffer:
            self.wfile.write(b"".join(buffer))

    def _buffer(self) -> list[bytes]:
        head: list[bytes] = self.__dict__.setdefault("_head", [])
        return head

    # --- logging and names ---

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.log_message('"%s" %s %s', self.requestline, str(code), str(size))

    def log_error(self, format: str, *args: Any) -> None:
        self.log_message(format, *args)

    def log_message(self, format: str, *args: Any) -> None:
        """Where request and error lines go: nowhere here; a subclass logs them."""

    def version_string(self) -> str:
        return self.server_version

    def date_time_string(self, timestamp: float | None = None) -> str:
        return http_date(timestamp)

    def address_string(self) -> str:
        return str(self.client_address[0])

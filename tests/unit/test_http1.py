"""keystone.api.http1 reads requests as http.server does: the same raw heads, the same parse.

The reference is the standard library's ``BaseHTTPRequestHandler`` (with ``http.client`` and
``email`` under it), fed the same bytes; hypothesis writes request lines and header blocks,
tidy and broken, and both handlers must agree on the command, path, version, every header
field, whether the connection stays open, which error is answered, and the bytes of a
``100 Continue``. Where keystone answers differently on purpose (a JSON error body; a status
line on a bad version's error) the tests say so.
"""

from __future__ import annotations

import email.utils
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from keystone.api.http1 import Headers, RequestHandler, http_date, parse_headers


class _Record:
    """What a handler made of a request head."""

    protocol_version = "HTTP/1.1"
    errors: list[int]

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.errors.append(int(code))
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Reference(_Record, BaseHTTPRequestHandler):  # type: ignore[misc]
    pass


class Ours(_Record, RequestHandler):  # type: ignore[misc]
    pass


def parse(cls: type[Any], raw: bytes) -> dict[str, Any]:
    """Run ``parse_request`` of ``cls`` on ``raw`` without a socket; what it found."""
    h = cls.__new__(cls)
    h.errors = []
    h.rfile = io.BytesIO(raw)
    h.wfile = io.BytesIO()
    h.client_address = ("127.0.0.1", 0)
    h.raw_requestline = h.rfile.readline(65537)
    ok = h.parse_request()
    out: dict[str, Any] = {"ok": ok, "errors": h.errors, "close": h.close_connection}
    if ok:
        out.update(
            command=h.command,
            path=h.path,
            version=h.request_version,
            headers=list(h.headers.items()),
            written=h.wfile.getvalue(),
            rest=h.rfile.read(),
        )
    return out


def same(raw: bytes) -> dict[str, Any]:
    ref, ours = parse(Reference, raw), parse(Ours, raw)
    assert ours == ref, raw
    return ours


# --- what hypothesis writes ---------------------------------------------------------------

METHODS = st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "BREW", "get", "G\xe9T"])
VERSIONS = st.sampled_from(
    ["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/3", "HTTP/1", "HTTP/1.1.1",
     "HTTP/x.1", "HTTP/01.01", "HTTP/1.12345678901", "http/1.1", "FOO/1.1", "HTTP/", "1.1"]
)  # fmt: skip
PATHS = st.one_of(
    st.sampled_from(["/", "/v1/status", "//evil.example/x", "///a//b", "/a?b=c&d", "*", "x"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF), min_size=1, max_size=12),
)
SPACE = st.sampled_from([" ", "  ", "\t", " \t "])
EOL = st.sampled_from(["\r\n", "\n"])


@st.composite
def request_lines(draw: st.DrawFn) -> str:
    words = [draw(METHODS), draw(PATHS)]
    shape = draw(st.sampled_from(["full", "full", "full", "short", "extra", "one", "empty"]))
    if shape == "full":
        words.append(draw(VERSIONS))
    elif shape == "extra":
        words += [draw(PATHS), draw(VERSIONS)]
    elif shape == "one":
        words = words[:1]
    elif shape == "empty":
        words = []
    line = draw(SPACE).join(words)
    if draw(st.booleans()):
        line = draw(SPACE) + line + draw(SPACE)
    return line + draw(EOL)


NAMES = st.one_of(
    st.sampled_from(
        ["Host", "host", "Connection", "Expect", "Content-Length", "Authorization", "X-A",
         "From", "", "X Y", "Cookie"]
    ),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"),
            min_size=1, max_size=8),
)  # fmt: skip
VALUES = st.one_of(
    st.sampled_from(["close", "keep-alive", "Keep-Alive", "100-continue", "100-Continue", "",
                     "Bearer t", " spaced ", "a:b", "x\ty"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=10),
)  # fmt: skip


@st.composite
def header_lines(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["field"] * 6 + ["fold", "from", "nocolon", "colon", "cr"]))
    if kind == "field":
        sep = draw(st.sampled_from([":", ": ", ":\t", ":  "]))
        text = draw(NAMES) + sep + draw(VALUES)
    elif kind == "fold":
        text = draw(st.sampled_from([" ", "\t"])) + draw(VALUES)
    elif kind == "from":
        text = "From " + draw(VALUES)
    elif kind == "nocolon":
        text = draw(NAMES)
    elif kind == "colon":
        text = ":" + draw(VALUES)
    else:  # a bare CR inside a line: email splits lines there, http.client does not
        text = draw(NAMES) + ": a\r" + draw(NAMES) + ": b"
    return text + draw(EOL)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    head = draw(request_lines()) + "".join(draw(st.lists(header_lines(), max_size=8)))
    end = draw(st.sampled_from(["\r\n", "\n", ""]))
    body = draw(st.sampled_from(["", "body", "GET /next HTTP/1.1\r\n\r\n"]))
    return (head + end + body).encode("latin-1")


class TestSameAsHttpServer:
    @settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(requests())
    @example(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    @example(b"GET / HTTP/1.1\r\nX-A: one\r\n  two\r\n\tthree\r\nX-A: again\r\n\r\n")
    @example(b"GET / HTTP/1.1\r\n folded-first\r\nHost: a\r\n\r\n")
    @example(b"GET / HTTP/1.1\r\nFrom a\r\nHost: a\r\nFrom b\r\nX: y\r\nFrom c\r\n\r\n")
    @example(b"GET / HTTP/1.1\r\nHost: a\r\nnot a header\r\nX: y\r\n\r\n")
    @example(b"GET / HTTP/1.1\r\n: empty name\r\n more\r\nX: y\r\n\r\n")
    @example(b"GET / HTTP/1.1\r\nX: a\rY: b\r\n\r\n")
    @example(b"GET / HTTP/1.1\r\nX: a\r\rY: b\r\n\r\n")
    @example(b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc")
    @example(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    @example(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    @example(b"GET //evil.example/x HTTP/1.1\r\n\r\n")
    @example(b"GET /\r\n")
    @example(b"POST /\r\n")
    @example(b"GET / x HTTP/1.1\r\n\r\n")
    @example(b"  \r\n")
    @example(b"GET / HTTP/1.1\r\nHost: \xe9t\xe9\r\n\r\n")
    @example(b"GET / HTTP/1.1\r\nHost: a")
    def test_the_same_parse(self, raw: bytes) -> None:
        """Command, path, version, fields, keep-alive, errors and 100 Continue all agree."""
        same(raw)

    @pytest.mark.parametrize(
        ("raw", "status"),
        [
            (b"GET / HTTP/1.1.1\r\n\r\n", 400),
            (b"GET / FOO/1.1\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\n\r\n", 505),
            (b"GET / x HTTP/1.1\r\n\r\n", 400),
            (b"POST /\r\n", 400),
        ],
    )
    def test_errors_of_the_request_line(self, raw: bytes, status: int) -> None:
        """Bad versions, bad syntax and a non-GET HTTP/0.9 request: the same status as
        http.server, and the connection closes."""
        out = same(raw)
        assert out["errors"] == [status] and out["close"] is True


class TestHeaders:
    def test_first_field_wins_without_case(self) -> None:
        h = parse_headers(b"Host: a\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
        assert h.get("x-A") == "1" and h.get_all("X-A") == ["1", "2"] and h["HOST"] == "a"
        assert "host" in h and "nope" not in h and h.get("nope", "d") == "d"
        assert list(h) == ["Host", "X-A", "x-a"] and len(h) == 3
        assert Headers().get("x") is None


@given(st.floats(min_value=0, max_value=2**34, allow_nan=False))
def test_http_date_is_email_utils_formatdate(t: float) -> None:
    """The Date header is ``email.utils.formatdate(t, usegmt=True)``, whatever the locale."""
    assert http_date(t) == email.utils.formatdate(t, usegmt=True)


# --- whole connections over a socket pair ------------------------------------------------------


class _Answering:
    protocol_version = "HTTP/1.1"
    server_version = "keystone"
    sys_version = ""

    def do_GET(self) -> None:
        body = f"{self.command} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def date_time_string(self, timestamp: float | None = None) -> str:
        return "Thu, 01 Jan 1970 00:00:00 GMT"

    def version_string(self) -> str:
        return "keystone"


class RefServer(_Answering, BaseHTTPRequestHandler):  # type: ignore[misc]
    pass


class OurServer(_Answering, RequestHandler):  # type: ignore[misc]
    pass


def converse(cls: type[Any], raw: bytes) -> bytes:
    """Everything ``cls`` answers on a connection that sends ``raw`` and then ends."""
    a, b = socket.socketpair()
    with a:
        a.settimeout(10)
        b.settimeout(10)
        t = threading.Thread(target=cls, args=(b, ("127.0.0.1", 0), None), daemon=True)
        t.start()
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        t.join(10)
        assert not t.is_alive()
        b.close()  # the server's part once the handler returns
        chunks = []
        while data := a.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


class TestConnections:
    @pytest.mark.parametrize(
        "raw",
        [
            b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            b"POST /a HTTP/1.1\r\nExpect: 100-continue\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            b"GET /a\r\n",
            b"\r\nGET /a HTTP/1.1\r\n\r\n",
        ],
    )
    def test_the_same_answers(self, raw: bytes) -> None:
        """Keep-alive, closing, 100 Continue and HTTP/0.9: byte for byte http.server's."""
        assert converse(OurServer, raw) == converse(RefServer, raw)

    def test_an_unknown_method_is_501_in_json(self) -> None:
        """501 like http.server, with the standard reason phrase and the API's JSON error
        (http.server puts its message in the status line and an HTML page in the body)."""
        out = converse(OurServer, b"BREW /pot HTTP/1.1\r\n\r\n")
        ref = converse(RefServer, b"BREW /pot HTTP/1.1\r\n\r\n")
        assert ref.startswith(b"HTTP/1.1 501 ")
        assert out.split(b"\r\n")[0] == b"HTTP/1.1 501 Not Implemented"
        assert b"Connection: close\r\n" in out and out.endswith(
            b'{"error": "Unsupported method (\'BREW\')", "status": 501, "kind": "usage"}'
        )

    def test_a_bad_version_is_answered_with_a_status_line(self) -> None:
        """http.server answers a bad version bare (as to HTTP/0.9); keystone with a status."""
        out = converse(OurServer, b"GET / HTTP/9.9\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")
        assert not converse(RefServer, b"GET / HTTP/9.9\r\n\r\n").startswith(b"HTTP/")

    def test_a_line_over_the_bound_is_414(self) -> None:
        out = converse(OurServer, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 414 Request-URI Too Long\r\n")

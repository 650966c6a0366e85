"""The status page's way in: login, session cookies, CSRF header, expiry, logout, page files,
and the API additions it uses (log tails, graph pictures, dry stop)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keystone.api import ApiServer
from keystone.ui.session import COOKIE, Sessions, clear_cookie, session_id, set_cookie
from tests.unit.test_api_server import TOKEN, Api, FakeControl


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ui(tmp_path: Path, clock: Clock) -> Iterator[Api]:
    control = FakeControl()
    server = ApiServer(
        control,
        listen="127.0.0.1:0",
        token=TOKEN,
        token_file=tmp_path / "api.token",
        log_root=tmp_path / "logs",
        sessions=Sessions(ttl=600, idle=60, limit=3, clock=clock),
    )
    server.start()
    try:
        yield Api(server, control)
    finally:
        server.stop()


def login(ui: Api, token: str = TOKEN, **headers: str) -> tuple[int, Any, Any]:
    return ui.request(
        "POST",
        "/ui/login",
        f"token={token}".encode(),
        token=None,
        headers={"Content-Type": "application/x-www-form-urlencoded", **headers},
    )


def cookie_of(resp: Any) -> str:
    value = resp.getheader("Set-Cookie")
    assert value, "no Set-Cookie"
    return str(value.split(";", 1)[0])


def as_page(ui: Api, method: str, path: str, cookie: str, *, csrf: bool = True) -> Any:
    headers = {"Cookie": cookie}
    if csrf:
        headers["X-Keystone-UI"] = "1"
    return ui.request(method, path, b"", token=None, headers=headers)


class TestSessions:
    def test_open_check_close(self, clock: Clock) -> None:
        """A session id is random, checks while live, and stops checking once closed."""
        s = Sessions(clock=clock)
        a, b = s.open(), s.open()
        assert a != b and len(a) >= 40
        assert s.check(a) and s.check(b)
        s.close(a)
        assert not s.check(a) and s.check(b)
        assert not s.check("") and not s.check(None) and not s.check("made-up")

    def test_idle_and_absolute_expiry(self, clock: Clock) -> None:
        """A session ends after idle seconds unused, and after ttl seconds whatever happens."""
        s = Sessions(ttl=100, idle=30, clock=clock)
        sid = s.open()
        for _ in range(3):
            clock.now += 29
            assert s.check(sid)  # each use restarts the idle time
        clock.now += 14  # 101 s after login
        assert not s.check(sid)
        idle = s.open()
        clock.now += 30
        assert not s.check(idle)
        assert len(s) == 0

    def test_table_is_bounded(self, clock: Clock) -> None:
        """Past the limit, the session idle longest makes room."""
        s = Sessions(limit=2, clock=clock)
        first = s.open()
        clock.now += 1
        second = s.open()
        clock.now += 1
        assert s.check(first)  # now second is the one idle longest
        third = s.open()
        assert len(s) == 2
        assert s.check(first) and s.check(third) and not s.check(second)

    def test_only_digests_are_kept(self, clock: Clock) -> None:
        """The table holds digests, not the ids the browsers carry."""
        s = Sessions(clock=clock)
        sid = s.open()
        assert sid.encode() not in s._table and all(len(k) == 32 for k in s._table)

    @pytest.mark.parametrize(
        ("header", "want"),
        [
            (None, None),
            ("", None),
            (f"{COOKIE}=abc", "abc"),
            (f"other=1; {COOKIE}=abc; x=y", "abc"),
            (f"{COOKIE}=", None),
            (f"x{COOKIE}=abc", None),
        ],
    )
    def test_cookie_header(self, header: str | None, want: str | None) -> None:
        assert session_id(header) == want

    def test_cookie_attributes(self) -> None:
        """HttpOnly, SameSite=Strict, Path=/, and Secure when served over TLS."""
        plain = set_cookie("sid", secure=False)
        assert plain.startswith(f"{COOKIE}=sid;")
        for attr in ("HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="):
            assert attr in plain
        assert "Secure" not in plain
        assert set_cookie("sid", secure=True).endswith("; Secure")
        assert "Max-Age=0" in clear_cookie(secure=False)


class TestLogin:
    def test_login_sets_a_session_cookie_that_is_not_the_token(self, ui: Api) -> None:
        """The right token: 303 to the page, a cookie with a random session id."""
        status, _, resp = login(ui)
        assert status == 303 and resp.getheader("Location") == "/ui/"
        header = resp.getheader("Set-Cookie")
        assert "HttpOnly" in header and "SameSite=Strict" in header and "Path=/" in header
        cookie = cookie_of(resp)
        assert TOKEN not in cookie and cookie.startswith(f"{COOKIE}=")
        status, body, _ = as_page(ui, "GET", "/v1/components", cookie)
        assert status == 200 and [c["name"] for c in body] == ["api", "db"]

    def test_json_login(self, ui: Api) -> None:
        status, body, resp = ui.request(
            "POST", "/ui/login", b'{"token": "%s"}' % TOKEN.encode(), token=None
        )
        assert status == 200 and body == {"login": True} and cookie_of(resp)

    @pytest.mark.parametrize("token", ["wrong", "", TOKEN + "x", TOKEN[:-1]])
    def test_wrong_token(self, ui: Api, token: str) -> None:
        """A wrong token: 401 with the login form again, no cookie, no session."""
        status, body, resp = login(ui, token)
        assert status == 401 and resp.getheader("Set-Cookie") is None
        assert b"Wrong token" in body and b'name="token"' in body
        assert ui.control.calls == []

    def test_login_from_another_origin_is_refused(self, ui: Api) -> None:
        """A form posted from another site cannot log the browser in."""
        status, _, resp = login(ui, Origin="http://evil.example")
        assert status == 403 and resp.getheader("Set-Cookie") is None
        port = ui.port
        status, _, _ = login(ui, Origin=f"http://127.0.0.1:{port}")
        assert status == 303

    def test_made_up_cookie_is_refused(self, ui: Api) -> None:
        status, _, resp = as_page(ui, "GET", "/v1/components", f"{COOKIE}=made-up")
        assert status == 401 and resp.getheader("WWW-Authenticate", "").startswith("Bearer")
        assert ui.control.calls == []


class TestCsrf:
    def test_state_change_needs_the_header(self, ui: Api) -> None:
        """With the cookie, a POST without X-Keystone-UI is 403 and changes nothing."""
        cookie = cookie_of(login(ui)[2])
        status, body, _ = as_page(ui, "POST", "/v1/plan/stop", cookie, csrf=False)
        assert status == 403 and "X-Keystone-UI" in body["error"]
        status, _, _ = ui.request(
            "POST",
            "/v1/plan/stop",
            b"",
            token=None,
            headers={"Cookie": cookie, "X-Keystone-UI": "yes"},
        )
        assert status == 403
        assert ui.control.mutations() == []
        status, _, _ = as_page(ui, "POST", "/v1/plan/stop", cookie)
        assert status == 204 and ui.control.mutations() == ["stop_plan"]

    def test_reads_need_no_header(self, ui: Api) -> None:
        cookie = cookie_of(login(ui)[2])
        assert as_page(ui, "GET", "/v1/revision", cookie, csrf=False)[0] == 200

    def test_bearer_needs_no_header(self, ui: Api) -> None:
        """Bearer clients (the CLI, scripts) keep working unchanged."""
        status, _, _ = ui.request("POST", "/v1/plan/stop")
        assert status == 204


class TestExpiryAndLogout:
    def test_expired_session_is_refused(self, ui: Api, clock: Clock) -> None:
        cookie = cookie_of(login(ui)[2])
        clock.now += 59
        assert as_page(ui, "GET", "/v1/components", cookie)[0] == 200
        clock.now += 60
        assert as_page(ui, "GET", "/v1/components", cookie)[0] == 401
        status, _, resp = as_page(ui, "GET", "/ui/", cookie)
        assert status == 303 and resp.getheader("Location") == "/ui/login"

    def test_logout(self, ui: Api) -> None:
        """Logout needs the header too, ends the session and clears the cookie."""
        cookie = cookie_of(login(ui)[2])
        assert as_page(ui, "POST", "/ui/logout", cookie, csrf=False)[0] == 403
        status, _, resp = as_page(ui, "POST", "/ui/logout", cookie)
        assert status == 204 and "Max-Age=0" in resp.getheader("Set-Cookie")
        assert as_page(ui, "GET", "/v1/components", cookie)[0] == 401
        assert as_page(ui, "GET", "/ui/app.js", cookie)[0] == 401


class TestPageFiles:
    def test_without_a_session_only_the_login_page(self, ui: Api) -> None:
        status, _, resp = ui.request("GET", "/ui", token=None)
        assert status == 303 and resp.getheader("Location") == "/ui/login"
        status, body, resp = ui.request("GET", "/ui/login", token=None)
        assert status == 200 and b'action="/ui/login"' in body
        assert "script-src" not in resp.getheader("Content-Security-Policy")
        for path in ("/ui/app.js", "/ui/app.css", "/ui/index.html", "/ui/nope.js"):
            assert ui.request("GET", path, token=None)[0] == 401, path
        assert ui.request("POST", "/ui/logout", token=None)[0] == 401

    def test_with_a_session(self, ui: Api) -> None:
        cookie = cookie_of(login(ui)[2])
        status, body, resp = as_page(ui, "GET", "/ui/", cookie)
        assert status == 200 and b'src="/ui/app.js"' in body
        assert "script-src 'self'" in resp.getheader("Content-Security-Policy")
        assert resp.getheader("X-Content-Type-Options") == "nosniff"
        status, _, resp = as_page(ui, "GET", "/ui/app.js", cookie)
        assert status == 200 and resp.getheader("Content-Type").startswith("text/javascript")
        assert as_page(ui, "GET", "/ui/app.css", cookie)[0] == 200
        for bad in ("/ui/nope.js", "/ui/..%2Fsession.py", "/ui/.hidden.js", "/ui/login.html"):
            assert as_page(ui, "GET", bad, cookie)[0] == 404, bad
        status, _, resp = as_page(ui, "GET", "/ui/login", cookie)
        assert status == 303 and resp.getheader("Location") == "/ui/"

    def test_no_cdn(self) -> None:
        """The page's files name no other host."""
        static = Path(__file__).resolve().parents[2] / "keystone" / "ui" / "static"
        for f in static.iterdir():
            text = f.read_text()
            assert "http://" not in text and "https://" not in text.replace(
                "http://www.w3.org", ""
            ), f.name


class TestApiAdditions:
    def test_log_tail(self, ui: Api, tmp_path: Path) -> None:
        logs = tmp_path / "logs" / "db"
        logs.mkdir(parents=True)
        (logs / "stdout.log").write_text("".join(f"line {i}\n" for i in range(100)))
        status, body, _ = ui.request("GET", "/v1/components/db/logs?lines=3")
        assert status == 200
        assert body == {
            "component": "db",
            "lines": 3,
            "stdout": ["line 97", "line 98", "line 99"],
            "stderr": [],
        }
        assert ui.request("GET", "/v1/components/nope/logs")[0] == 404
        for bad in ("0", "1001", "x", "-1"):
            assert ui.request("GET", f"/v1/components/db/logs?lines={bad}")[0] == 400
        assert ui.request("GET", "/v1/components/db/logs", token=None)[0] == 401

    def test_graph_pictures(self, ui: Api) -> None:
        status, body, resp = ui.request("GET", "/v1/plan/graph?format=svg")
        assert status == 200 and resp.getheader("Content-Type") == "image/svg+xml"
        assert ET.fromstring(body).tag.endswith("svg")
        status, body, _ = ui.request("GET", "/v1/plan/graph?format=dot")
        assert status == 200 and body.startswith(b"digraph")
        status, body, _ = ui.request("GET", "/v1/plan/graph?format=mermaid")
        assert status == 200 and body.startswith(b"flowchart LR")
        assert ui.request("GET", "/v1/plan/graph?format=png")[0] == 400
        assert ui.request("GET", "/v1/plan/graph")[1]["nodes"] == ["db"]

    def test_dry_stop_changes_nothing(self, ui: Api) -> None:
        status, body, _ = ui.request("POST", "/v1/components/db:stop?dry=true")
        assert status == 200 and body == {"stopOrder": ["db"], "dependents": []}
        assert ui.control.mutations() == []
        assert ui.request("POST", "/v1/components/nope:stop?dry=true")[0] == 404


def test_nothing_of_the_page_is_imported_until_it_is_asked_for(tmp_path: Path) -> None:
    """An API serving bearer clients never imports keystone.ui or keystone.graph."""
    script = textwrap.dedent(
        f"""
        import sys, urllib.request
        from pathlib import Path
        from keystone.api import ApiServer
        from tests.unit.test_api_server import FakeControl
        s = ApiServer(FakeControl(), listen="127.0.0.1:0", token="t",
                      token_file=Path({str(tmp_path / "api.token")!r}))
        s.start()
        req = urllib.request.Request(s.address + "/v1/components",
                                     headers={{"Authorization": "Bearer t"}})
        urllib.request.urlopen(req).read()
        before = sorted(m for m in sys.modules if m.startswith(("keystone.ui", "keystone.graph")))
        urllib.request.urlopen(s.address + "/ui/login").read()
        after = "keystone.ui.assets" in sys.modules
        print(before, after)
        s.stop()
        """
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] True"

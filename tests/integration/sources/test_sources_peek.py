"""The agent's own look at a source: a smart-HTTP ref advertisement, read against the real
``git http-backend``, and what makes it step aside for the worker (a proxy, an error status, a
dumb server, an advertisement over its bound, a missing ref, credentials sent as basic auth,
chunked and close-delimited bodies)."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from keystone.limits import Limits
from keystone.sources.transport import advertised_tip, ref_candidates
from tests.integration.sources.gitserver import FleetRepo, run_git

pytestmark = pytest.mark.integration

MAIN = ["refs/heads/main"]


def tip(url: str, refs: list[str] = MAIN, **kw: object) -> object:
    opts: dict[str, object] = {"timeout": 10, "max_bytes": Limits().max_ref_advertisement_bytes}
    opts.update(kw)
    return asyncio.run(advertised_tip(url, refs, **opts))  # type: ignore[arg-type]


class TestAdvertisedTip:
    def test_one_get_names_the_branch_tip(
        self, fleet: FleetRepo, http_base: str, http_log: list[str]
    ) -> None:
        """The tip of main, as ``git rev-parse`` has it, for exactly one GET of info/refs."""
        rev = fleet.commit({"a.txt": "1"})
        seen = asyncio.run(
            advertised_tip(f"{http_base}/fleet.git", MAIN, timeout=10, max_bytes=1 << 20)
        )
        assert seen is not None
        assert (seen.ref, seen.sha, seen.revision, seen.peeled) == (MAIN[0], rev, rev, None)
        assert seen.bytes > 0
        assert http_log == ["GET /fleet.git/info/refs?service=git-upload-pack"]

    def test_short_names_try_heads_then_tags_and_tags_are_peeled(
        self, fleet: FleetRepo, http_base: str
    ) -> None:
        """``v1`` is found as refs/tags/v1; an annotated tag's revision is its commit."""
        rev = fleet.commit({"a.txt": "1"})
        fleet.git("tag", "-a", "-m", "release", "v1")
        fleet.push("refs/tags/v1")
        seen = tip(f"{http_base}/fleet.git", ref_candidates("v1"))
        assert seen is not None
        assert seen.ref == "refs/tags/v1"  # type: ignore[attr-defined]
        assert seen.sha != rev and seen.revision == rev  # type: ignore[attr-defined]

    def test_head_is_advertised(self, fleet: FleetRepo, http_base: str) -> None:
        rev = fleet.commit({"a.txt": "1"})
        seen = tip(f"{http_base}/fleet.git", ["HEAD"])
        assert seen is not None and seen.revision == rev  # type: ignore[attr-defined]

    def test_missing_ref_empty_repo_and_missing_repo_leave_it_to_the_worker(
        self, fleet: FleetRepo, http_base: str
    ) -> None:
        """No such ref, an empty repository, a 404: None (the worker reports them)."""
        assert tip(f"{http_base}/fleet.git") is None  # empty: no commit yet
        fleet.commit({"a.txt": "1"})
        assert tip(f"{http_base}/fleet.git", ["refs/heads/nope"]) is None
        assert tip(f"{http_base}/nope.git") is None

    def test_an_advertisement_over_the_bound_is_not_read(
        self, fleet: FleetRepo, http_base: str
    ) -> None:
        """Over ``max_ref_advertisement_bytes``: None, whatever the ref."""
        fleet.commit({"a.txt": "1"})
        for i in range(40):
            fleet.git("branch", f"branch-{i:03d}")
        fleet.git("push", "-q", str(fleet.bare), "--all")
        assert tip(f"{http_base}/fleet.git", max_bytes=512) is None
        assert tip(f"{http_base}/fleet.git", max_bytes=1 << 20) is not None

    def test_the_env_bound(self) -> None:
        lim = Limits.from_env({"KEYSTONE_MAX_REF_ADVERTISEMENT_BYTES": "4096"})
        assert lim.max_ref_advertisement_bytes == 4096
        assert Limits.from_env({}).max_ref_advertisement_bytes == 1 << 20

    @pytest.mark.parametrize("var", ["https_proxy", "http_proxy", "all_proxy"])
    def test_a_proxy_leaves_it_to_the_worker_without_a_request(
        self, fleet: FleetRepo, http_base: str, http_log: list[str], var: str
    ) -> None:
        fleet.commit({"a.txt": "1"})
        assert tip(f"{http_base}/fleet.git", environ={var: "http://127.0.0.1:9"}) is None
        assert http_log == []

    def test_not_http_or_no_server(self, tmp_path: Path) -> None:
        assert tip(str(tmp_path)) is None
        assert tip("ssh://git@127.0.0.1/fleet.git") is None
        assert tip("http://127.0.0.1:9/fleet.git", timeout=2) is None


# -- a server that answers what the test says ------------------------------------------------------


class _Canned(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.status = 200
        self.ctype = "application/x-git-upload-pack-advertisement"
        self.body = b""
        self.headers_seen: list[dict[str, str]] = []
        self.location = ""
        self.framing = "length"
        super().__init__(("127.0.0.1", 0), _CannedHandler)


class _CannedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Canned

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        self.server.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
        srv = self.server
        if srv.location and "moved" not in self.path:
            self.send_response(302)
            self.send_header("Location", srv.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(srv.status)
        self.send_header("Content-Type", srv.ctype)
        if srv.framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = len(srv.body) // 2
            for part in (srv.body[:half], srv.body[half:]):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        if srv.framing == "close":
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(srv.body)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(srv.body)))
        self.end_headers()
        self.wfile.write(srv.body)


@pytest.fixture
def canned() -> Iterator[_Canned]:
    srv = _Canned()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)


def pkt(payload: bytes) -> bytes:
    return b"%04x" % (len(payload) + 4) + payload


SHA = "1" * 40


def advert(*lines: bytes) -> bytes:
    return pkt(b"# service=git-upload-pack\n") + b"0000" + b"".join(map(pkt, lines)) + b"0000"


class TestWhatIsJudgedHere:
    def url(self, srv: _Canned, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{srv.server_address[1]}/fleet.git"

    def test_credentials_in_the_url_go_as_basic_auth(self, canned: _Canned) -> None:
        canned.body = advert(f"{SHA} refs/heads/main\0side-band-64k\n".encode())
        seen = tip(self.url(canned, "ops:s%40cret@"))
        assert seen is not None and seen.revision == SHA  # type: ignore[attr-defined]
        auth = canned.headers_seen[0]["authorization"]
        assert base64.b64decode(auth.split()[1]) == b"ops:s@cret"
        assert canned.headers_seen[0]["user-agent"].startswith("git/")

    def test_protocol_v1_line_and_capabilities_only(self, canned: _Canned) -> None:
        canned.body = advert(b"version 1\n", f"{SHA} refs/heads/main\0caps\n".encode())
        assert tip(self.url(canned)) is not None
        canned.body = advert(b"0" * 40 + b" capabilities^{}\0caps\n")
        assert tip(self.url(canned)) is None

    @pytest.mark.parametrize(
        ("status", "ctype", "body"),
        [
            (401, "text/plain", b"who are you"),
            (500, "text/plain", b"oops"),
            (200, "text/plain", f"{SHA}\trefs/heads/main\n".encode()),  # a dumb server
            (200, "application/x-git-upload-pack-advertisement", b"zzzz"),
            (200, "application/x-git-upload-pack-advertisement", b"0050" + b"x" * 10),
            (200, "application/x-git-upload-pack-advertisement", advert(b"version 2\n")),
            (200, "application/x-git-upload-pack-advertisement", advert(b"nothex refs/heads/main\n")),
        ],
    )  # fmt: skip
    def test_anything_unexpected_is_left_to_the_worker(
        self, canned: _Canned, status: int, ctype: str, body: bytes
    ) -> None:
        canned.status, canned.ctype, canned.body = status, ctype, body
        assert tip(self.url(canned)) is None
        assert len(canned.headers_seen) == 1

    @pytest.mark.parametrize("framing", ["chunked", "close"])
    def test_chunked_and_close_delimited_bodies(self, canned: _Canned, framing: str) -> None:
        canned.body = advert(f"{SHA} refs/heads/main\0caps\n".encode())
        canned.framing = framing
        seen = tip(self.url(canned))
        assert seen is not None and seen.revision == SHA  # type: ignore[attr-defined]
        assert tip(self.url(canned), max_bytes=20) is None  # over the bound either way

    def test_redirects_are_followed(self, canned: _Canned) -> None:
        canned.body = advert(f"{SHA} refs/heads/main\0caps\n".encode())
        canned.location = "/moved/fleet.git/info/refs?service=git-upload-pack"
        seen = tip(self.url(canned))
        assert seen is not None and seen.revision == SHA  # type: ignore[attr-defined]
        assert len(canned.headers_seen) == 2


def test_the_tip_matches_what_git_ls_remote_says(fleet: FleetRepo, http_base: str) -> None:
    """The reader and git agree on every ref of a repository with branches and tags."""
    fleet.commit({"a.txt": "1"})
    fleet.git("tag", "light")
    fleet.git("tag", "-a", "-m", "x", "heavy")
    fleet.commit({"a.txt": "2"})
    fleet.git("push", "-q", str(fleet.bare), "--tags")
    listed = run_git("ls-remote", str(fleet.bare)).decode().split("\n")
    for line in filter(None, listed):
        sha, name = line.split("\t")
        if name.endswith("^{}"):
            continue
        seen = tip(f"{http_base}/fleet.git", [name])
        assert seen is not None and seen.sha == sha, name  # type: ignore[attr-defined]

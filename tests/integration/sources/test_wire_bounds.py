"""Wire bounds of keystone.limits against real servers on 127.0.0.1: an oversized ref
advertisement, too many refs, an oversized pack, header floods on git and bundle answers.

Each refusal names the bound and how to raise it, and the mirror is left as it was.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from keystone.errors import LimitExceeded
from keystone.limits import Limits
from keystone.sources import FETCHED_REF, GitMirror, GitSource, PackTooLarge
from keystone.sources.http import HttpBundleSource
from tests.integration.sources.gitserver import FleetRepo

pytestmark = pytest.mark.integration

SHA = "1" * 40


def pkt(line: bytes) -> bytes:
    return b"%04x" % (len(line) + 4) + line


def advertisement(refs: int) -> bytes:
    """A smart-HTTP v0 ref advertisement with ``refs`` branches."""
    out = [pkt(b"# service=git-upload-pack\n"), b"0000"]
    out.append(pkt(f"{SHA} HEAD\0multi_ack side-band-64k ofs-delta\n".encode()))
    out += [pkt(f"{SHA} refs/heads/b{i:07d}\n".encode()) for i in range(refs)]
    out.append(b"0000")
    return b"".join(out)


@contextmanager
def stub(respond: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[str]:
    """A tiny HTTP server whose every GET is answered by ``respond``; yields the base URL."""

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            with suppress(OSError):  # the client hung up after its refusal
                respond(self)

    class S(ThreadingHTTPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            pass  # a client that refuses an answer and hangs up is what these tests do

    srv = S(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def send_advertisement(body: bytes, extra_headers: int = 0, long_header: int = 0):
    def respond(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/x-git-upload-pack-advertisement")
        h.send_header("Content-Length", str(len(body)))
        for i in range(extra_headers):
            h.send_header(f"X-Flood-{i}", "x")
        if long_header:
            h.send_header("X-Long", "y" * long_header)
        h.end_headers()
        h.wfile.write(body)

    return respond


class TestRefAdvertisement:
    def test_oversized_advertisement_refused_as_it_arrives(self, mirror: GitMirror) -> None:
        """A ref advertisement over max_ref_advertisement_bytes is refused naming the bound."""
        limits = Limits(max_ref_advertisement_bytes=64 << 10)
        with stub(send_advertisement(advertisement(20_000))) as base:
            src = GitSource(f"{base}/fleet.git", "main", mirror, timeout=10, limits=limits)
            with pytest.raises(LimitExceeded) as info:
                src.fetch()
        msg = str(info.value)
        assert "ref advertisement" in msg and "64 KiB" in msg
        assert "KEYSTONE_MAX_REF_ADVERTISEMENT_BYTES" in msg
        assert "[limits] max_ref_advertisement_bytes" in msg
        assert mirror.ref(FETCHED_REF) is None

    def test_too_many_refs_refused(self, fleet: FleetRepo, mirror: GitMirror) -> None:
        """A real git server advertising more refs than max_refs is refused, nothing fetched."""
        fleet.commit({"a": "1"})
        for i in range(5):
            fleet.git("branch", f"extra{i}")
            fleet.push(f"extra{i}")
        from tests.integration.sources.gitserver import serve_git

        with serve_git(fleet.root) as base:
            src = GitSource(f"{base}/fleet.git", "main", mirror, limits=Limits(max_refs=3))
            with pytest.raises(LimitExceeded, match=r"KEYSTONE_MAX_REFS or \[limits\] max_refs"):
                src.fetch()
        assert mirror.ref(FETCHED_REF) is None

    def test_header_flood_on_git_answer_refused(self, mirror: GitMirror) -> None:
        """A git answer with more header lines than max_headers is refused naming the bound."""
        limits = Limits(max_headers=20)
        with stub(send_advertisement(advertisement(1), extra_headers=40)) as base:
            src = GitSource(f"{base}/fleet.git", "main", mirror, timeout=10, limits=limits)
            with pytest.raises(LimitExceeded, match="KEYSTONE_MAX_HEADERS"):
                src.fetch()
        assert mirror.ref(FETCHED_REF) is None

    def test_long_header_line_on_git_answer_refused(self, mirror: GitMirror) -> None:
        """A header line longer than max_header_line_bytes is refused naming the bound."""
        limits = Limits(max_header_line_bytes=1024)
        with stub(send_advertisement(advertisement(1), long_header=4000)) as base:
            src = GitSource(f"{base}/fleet.git", "main", mirror, timeout=10, limits=limits)
            with pytest.raises(LimitExceeded, match=r"X-Long.*KEYSTONE_MAX_HEADER_LINE_BYTES"):
                src.fetch()


class TestPackBound:
    def test_pack_bound_from_the_environment(
        self, fleet: FleetRepo, mirror: GitMirror, http_base: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """KEYSTONE_MAX_PACK_BYTES bounds the pack from a real git server; the mirror is kept."""
        fleet.commit({"blob": os.urandom(64 * 1024)})
        monkeypatch.setenv("KEYSTONE_MAX_PACK_BYTES", "16K")
        before = set(os.listdir(mirror.objects_dir / "pack"))
        with pytest.raises(PackTooLarge, match="KEYSTONE_MAX_PACK_BYTES"):
            GitSource(f"{http_base}/fleet.git", "main", mirror).fetch()
        assert set(os.listdir(mirror.objects_dir / "pack")) == before
        assert mirror.ref(FETCHED_REF) is None


class TestBundleAnswerHeaders:
    def test_header_flood_on_bundle_answer_refused(self, tmp_path: Path) -> None:
        """A bundle URL answering with a header flood is refused; nothing is downloaded."""

        def respond(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            for i in range(60):
                h.send_header(f"X-Flood-{i}", "x")
            h.send_header("Content-Length", "4")
            h.end_headers()
            h.wfile.write(b"junk")

        with stub(respond) as base:
            src = HttpBundleSource(
                f"{base}/fleet.bundle",
                state_file=tmp_path / "state.json",
                work_dir=tmp_path / "work",
                mirror=tmp_path / "repo",  # never opened: the answer is refused first
                max_bytes=1 << 20,
                timeout=10,
                limits=Limits(max_headers=30),
            )
            with pytest.raises(LimitExceeded, match=r"\[limits\] max_headers"):
                src.fetch()
        assert not (tmp_path / "repo").exists()
        assert not list((tmp_path / "work").glob("*"))

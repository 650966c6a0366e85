"""Bundle sources against real files and a real HTTP server on 127.0.0.1.

:class:`HttpBundleSource`: conditional polls (200, 304 with and without a kept bundle), resumed
downloads (206), a refused resume (416), the size bound from Content-Length and from the stream,
the overall deadline (on a driven clock), and a bundle refused as a file being deleted.
:class:`BundleFileSource` and :func:`cache_bundle_artifacts` on bundles made by
:func:`create_bundle` and by ``git bundle create``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from keystone.errors import ArtifactIntegrityError, BundleError, SourceUnreachable
from keystone.sources import (
    FETCHED_REF,
    BundleFileSource,
    FetchResult,
    GitMirror,
    HttpBundleSource,
    Source,
    cache_bundle_artifacts,
    create_bundle,
    open_bundle,
)
from tests.integration.sources.gitserver import FleetRepo, run_git

pytestmark = pytest.mark.integration

PATH = "/fleet.ksb"


# -- a bundle server -----------------------------------------------------------------------------


@dataclass
class Seen:
    """One request: its headers (lower-case), the status answered and the body bytes sent."""

    headers: dict[str, str]
    status: int
    sent: int


@dataclass
class _Blob:
    data: bytes = b""
    etag: str = '"0"'
    modified: str = ""
    status: int | None = None  # answer this status instead (e.g. 500)
    cut: int | None = None  # the next body stops after this many bytes, then the server hangs up
    hide_length: bool = False  # send no Content-Length (the body ends when the connection does)
    seen: list[Seen] = field(default_factory=list)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.blob = _Blob()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the request log is ``BundleServer.seen``."""

    def _answer(self, status: int, headers: dict[str, str], body: bytes, cut: int | None) -> None:
        sent = body if cut is None else body[:cut]
        # Recorded before answering: once the client has its answer, the test may look.
        with self.server.lock:
            self.server.blob.seen.append(
                Seen({k.lower(): v for k, v in self.headers.items()}, status, len(sent))
            )
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(sent)
        self.wfile.flush()
        if cut is not None or "Content-Length" not in headers:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def do_GET(self) -> None:
        with self.server.lock:
            blob = self.server.blob
            cut, blob.cut = blob.cut, None
        if self.path != PATH or blob.status is not None:
            self._answer(blob.status or 404, {"Content-Length": "0"}, b"", None)
            return
        validators = {"ETag": blob.etag, "Last-Modified": blob.modified}
        inm, ims = self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since")
        if (inm is not None and inm == blob.etag) or (inm is None and ims == blob.modified):
            self._answer(304, validators, b"", None)
            return
        start = 0
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if wanted and self.headers.get("If-Range") in (None, blob.etag):
            start = int(wanted.group(1))
            if start >= len(blob.data):
                self._answer(416, {"Content-Length": "0"}, b"", None)
                return
        body = blob.data[start:]
        headers = dict(validators)
        if not blob.hide_length:
            headers["Content-Length"] = str(len(body))
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(blob.data) - 1}/{len(blob.data)}"
        self._answer(206 if start else 200, headers, body, cut)


class BundleServer:
    """Serves one bundle at :data:`PATH` with ETag, Last-Modified, 304, 206 and 416."""

    def __init__(self) -> None:
        self._server = _Server()
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.version = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{PATH}"

    def put(self, data: bytes, **options: Any) -> None:
        """Publish ``data`` with a new ETag and a later Last-Modified."""
        self.version += 1
        with self._server.lock:
            seen = self._server.blob.seen
            self._server.blob = _Blob(
                data,
                f'"{hashlib.sha256(data).hexdigest()[:16]}"',
                formatdate(1_700_000_000 + 60 * self.version, usegmt=True),
                seen=seen,
                **options,
            )

    def set(self, **options: Any) -> None:
        with self._server.lock:
            for key, value in options.items():
                setattr(self._server.blob, key, value)

    @property
    def seen(self) -> list[Seen]:
        with self._server.lock:
            return list(self._server.blob.seen)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def server() -> Iterator[BundleServer]:
    s = BundleServer()
    try:
        yield s
    finally:
        s.close()


# -- bundles ------------------------------------------------------------------------------------


@dataclass
class Made:
    path: Path
    revision: str
    artifacts: list[tuple[str, Path]]


@pytest.fixture
def made(fleet: FleetRepo, tmp_path: Path) -> Made:
    """A Keystone bundle of main (carrying two artifacts, one of 300 KiB) and its revision."""
    rev = fleet.commit({"plans/default.toml": "[[components]]\n"}, "fleet")
    arts = []
    for name, data in (("big.bin", os.urandom(300 << 10)), ("cfg.json", b"{}\n")):
        path = tmp_path / "art" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        arts.append((hashlib.sha256(data).hexdigest(), path))
    out = tmp_path / "made" / "fleet.ksb"
    create_bundle(out, fleet.work, "main", None, arts)
    return Made(out, rev, arts)


@dataclass
class Runtime:
    """A device's runtime layout and its mirror, opened on demand and counted."""

    root: Path
    opened: int = 0
    _mirror: GitMirror | None = None

    def mirror(self) -> GitMirror:
        self.opened += 1
        if self._mirror is None:
            self._mirror = GitMirror(self.root / "repo")
        return self._mirror

    @property
    def state_file(self) -> Path:
        return self.root / "state" / "http-source.json"

    @property
    def work(self) -> Path:
        return self.root / "bundles" / "http"

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state_file.read_text())
        return data


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    rt = Runtime(tmp_path / "runtime")
    try:
        yield rt
    finally:
        if rt._mirror is not None:
            rt._mirror.close()


def source(
    server: BundleServer,
    runtime: Runtime,
    *,
    max_bytes: int = 64 << 20,
    settled: Callable[[str], bool] | None = None,
    clock: Callable[[], float] | None = None,
) -> HttpBundleSource:
    extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
    return HttpBundleSource(
        server.url,
        state_file=runtime.state_file,
        work_dir=runtime.work,
        mirror=runtime.mirror,
        max_bytes=max_bytes,
        timeout=10,
        settled=settled,
        **extra,
    )


def applied(rev: str) -> Callable[[str], bool]:
    """The worker's gate when ``rev`` is applied and nothing is forced."""
    return lambda candidate: candidate == rev


# -- HttpBundleSource ----------------------------------------------------------------------------


class TestConditionalPolls:
    def test_new_bundle_is_downloaded_imported_and_kept(
        self, server: BundleServer, runtime: Runtime, made: Made
    ) -> None:
        """A 200 imports the bundle: revision, artifacts and wire stats; the bundle is kept and
        its validators and revision are remembered."""
        data = made.path.read_bytes()
        server.put(data)
        src = source(server, runtime)
        assert isinstance(src, Source)
        result = src.fetch()
        assert result.revision == made.revision and result.changed and result.revision_known
        assert result.bytes_received == len(data) and result.requests == 1
        assert result.source == server.url
        assert dict(result.detail) == {
            "requests": 1, "bytes": len(data), "status": 200, "resumed_from": 0,
        }  # fmt: skip
        assert result.bundle is not None and result.bundle.kind == "keystone"
        assert result.bundle.path == runtime.work / "current.bundle"
        assert sorted(result.bundle.artifacts) == sorted(sha for sha, _ in made.artifacts)
        assert result.bundle.path.read_bytes() == data
        state = runtime.state()
        assert state["url"] == server.url and state["bundle_revision"] == made.revision
        assert state["etag"] and state["last_modified"] and "partial_etag" not in state
        assert runtime.mirror().ref(FETCHED_REF) == made.revision
        assert not (runtime.work / "download.partial").exists()

    def test_304_for_a_settled_revision_imports_nothing(
        self, server: BundleServer, runtime: Runtime, made: Made
    ) -> None:
        """An unchanged bundle whose revision the consumer settled costs one conditional request
        and opens no mirror."""
        server.put(made.path.read_bytes())
        source(server, runtime).fetch()
        runtime.opened = 0
        result = source(server, runtime, settled=applied(made.revision)).fetch()
        assert result == FetchResult(
            made.revision, False, 0, server.url, requests=1,
            detail={"requests": 1, "bytes": 0, "status": 304, "resumed_from": 0},
        )  # fmt: skip
        assert result.bundle is None and runtime.opened == 0
        poll = server.seen[-1]
        assert (poll.status, poll.sent) == (304, 0)
        assert poll.headers["if-none-match"] and poll.headers["if-modified-since"]
        assert "range" not in poll.headers

    def test_304_for_an_unsettled_revision_imports_the_kept_bundle_again(
        self, server: BundleServer, runtime: Runtime, made: Made
    ) -> None:
        """After a 304, a revision not yet settled (an import cut short, --retry) is imported
        again from the kept bundle, without downloading it."""
        server.put(made.path.read_bytes())
        source(server, runtime).fetch()
        for settled in (None, lambda _rev: False):
            result = source(server, runtime, settled=settled).fetch()
            assert result.revision == made.revision and result.changed
            assert result.bundle is not None and result.bundle.path.is_file()
            assert result.detail["status"] == 304 and result.bytes_received == 0
        assert [s.status for s in server.seen] == [200, 304, 304]

    def test_304_with_the_revision_unknown_imports_the_kept_bundle(
        self, server: BundleServer, runtime: Runtime, made: Made
    ) -> None:
        """A kept bundle whose import never finished (no revision remembered) is imported on
        the next 304, even when the consumer would settle every revision."""
        server.put(made.path.read_bytes())
        source(server, runtime).fetch()
        state = runtime.state()
        del state["bundle_revision"]
        runtime.state_file.write_text(json.dumps(state))
        result = source(server, runtime, settled=lambda _rev: True).fetch()
        assert result.revision == made.revision and result.bundle is not None
        assert runtime.state()["bundle_revision"] == made.revision

    def test_304_without_a_kept_bundle_knows_no_revision(
        self, server: BundleServer, runtime: Runtime, made: Made
    ) -> None:
        """With nothing kept, a 304 says "unchanged, no revision known" and imports nothing."""
        server.put(made.path.read_bytes())
        source(server, runtime).fetch()
        (runtime.work / "current.bundle").unlink()
        runtime.opened = 0
        result = source(server, runtime).fetch()
        assert not result.revision_known and result.revision == "" and not result.changed
        assert result.bundle is None and runtime.opened == 0
        assert result.detail["status"] == 304

    def test_new_url_forgets_the_old_validators(
        self, server: BundleServer, runtime: Runtime, made: Made
    ) -> None:
        """State belongs to one URL: another URL starts with an unconditional request."""
        server.put(made.path.read_bytes())
        source(server, runtime).fetch()
        state = runtime.state()
        runtime.state_file.write_text(json.dumps({**state, "url": "http://elsewhere/x"}))
        result = source(server, runtime).fetch()
        assert result.detail["status"] == 200
        assert "if-none-match" not in server.seen[-1].headers


class TestDownloads:
    def test_cut_download_resumes_with_range(
        self, server: BundleServer, runtime: Runtime, made: Made
    ) -> None:
        """A body cut off part way is unreachable, its bytes kept; the next poll asks only for
        the rest (Range + If-Range, 206) and imports the bundle."""
        data = made.path.read_bytes()
        cut = 100_001
        server.put(data, cut=cut)
        src = source(server, runtime)
        with pytest.raises(SourceUnreachable, match="partial download resumes"):
            src.fetch()
        assert src.last_detail is None  # the download itself failed
        assert (runtime.work / "download.partial").stat().st_size == cut
        assert runtime.state()["partial_etag"]
        assert not (runtime.work / "current.bundle").exists()

        result = source(server, runtime).fetch()
        assert result.revision == made.revision
        assert result.detail["status"] == 206 and result.detail["resumed_from"] == cut
        assert result.bytes_received == len(data) - cut
        first, second = server.seen
        assert (first.status, first.sent) == (200, cut)
        assert second.headers["range"] == f"bytes={cut}-"
        assert second.headers["if-range"] and "if-none-match" not in second.headers
        assert (runtime.work / "current.bundle").read_bytes() == data
        assert "partial_etag" not in runtime.state()

    def test_refused_resume_starts_again_next_poll(
        self, server: BundleServer, runtime: Runtime, made: Made
    ) -> None:
        """A 416 (the partial file is no prefix any more) drops the partial download; the poll
        after that downloads the whole bundle."""
        data = made.path.read_bytes()
        server.put(data, cut=5000)
        with pytest.raises(SourceUnreachable):
            source(server, runtime).fetch()
        (runtime.work / "download.partial").write_bytes(data + b"longer")
        with pytest.raises(SourceUnreachable, match="HTTP 416"):
            source(server, runtime).fetch()
        assert not (runtime.work / "download.partial").exists()
        assert "partial_etag" not in runtime.state()
        result = source(server, runtime).fetch()
        assert result.revision == made.revision and result.detail["status"] == 200
        assert [s.status for s in server.seen] == [200, 416, 200]

    def test_oversized_by_content_length_is_refused_and_nothing_kept(
        self, server: BundleServer, runtime: Runtime, made: Made
    ) -> None:
        """A declared length over the bound is refused before any byte is stored."""
        data = made.path.read_bytes()
        server.put(data)
        limit = len(data) - 1
        with pytest.raises(BundleError, match=f"over the limit of {limit}"):
            source(server, runtime, max_bytes=limit).fetch()
        assert list(runtime.work.iterdir()) == []
        assert "partial_etag" not in runtime.state()
        assert runtime.opened == 0

    def test_oversized_by_stream_is_stopped_and_nothing_kept(
        self, server: BundleServer, runtime: Runtime, made: Made
    ) -> None:
        """Without a Content-Length, the bound is enforced while the body streams."""
        data = made.path.read_bytes()
        server.put(data, hide_length=True)
        with pytest.raises(BundleError, match="download stopped"):
            source(server, runtime, max_bytes=len(data) // 2).fetch()
        assert list(runtime.work.iterdir()) == []
        assert "partial_etag" not in runtime.state()

    def test_download_over_its_deadline_resumes_next_poll(
        self, server: BundleServer, runtime: Runtime, made: Made
    ) -> None:
        """The overall deadline is checked as chunks arrive; what arrived before stays for the
        next poll to resume from."""
        data = made.path.read_bytes()
        server.put(data)
        ticks = iter([0.0, 0.0])  # the deadline is set, the first chunk arrives in time

        def clock() -> float:
            return next(ticks, 1e9)  # then time runs out

        with pytest.raises(SourceUnreachable, match="took too long"):
            source(server, runtime, clock=clock).fetch()
        kept = (runtime.work / "download.partial").stat().st_size
        assert 0 < kept < len(data)
        result = source(server, runtime).fetch()
        assert result.revision == made.revision and result.detail["resumed_from"] == kept
        assert server.seen[-1].headers["range"] == f"bytes={kept}-"

    @pytest.mark.parametrize("status", [404, 500])
    def test_error_status_is_unreachable(
        self, server: BundleServer, runtime: Runtime, made: Made, status: int
    ) -> None:
        """An HTTP error answer is retryable and keeps nothing."""
        server.put(made.path.read_bytes(), status=status)
        with pytest.raises(SourceUnreachable, match=f"HTTP {status}"):
            source(server, runtime).fetch()

    def test_no_server_is_unreachable(self, runtime: Runtime) -> None:
        """A refused connection is retryable."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        src = HttpBundleSource(
            f"http://127.0.0.1:{port}/x", state_file=runtime.state_file,
            work_dir=runtime.work, mirror=runtime.mirror, max_bytes=1 << 20, timeout=5,
        )  # fmt: skip
        with pytest.raises(SourceUnreachable, match="unreachable"):
            src.fetch()


class TestRefusedBundles:
    def test_bundle_refused_as_a_file_is_deleted_and_later_304s_cost_nothing(
        self, server: BundleServer, runtime: Runtime
    ) -> None:
        """A download that is no bundle is refused on import and deleted; the validators stay,
        so the next poll is a 304 that knows no revision."""
        server.put(b"this is no bundle\n" * 100)
        src = source(server, runtime)
        with pytest.raises(BundleError, match="not a Keystone bundle"):
            src.fetch()
        assert src.last_detail is not None and src.last_detail["bytes"] == 1800
        assert not (runtime.work / "current.bundle").exists()
        assert runtime.state()["etag"]
        result = source(server, runtime).fetch()
        assert not result.revision_known and result.detail["status"] == 304


# -- BundleFileSource and the artifact cache ----------------------------------------------------


class TestBundleFileSource:
    def test_keystone_bundle_imports_with_its_artifacts(self, runtime: Runtime, made: Made) -> None:
        """A bundle file's revision and artifact hashes come back; the source names the file."""
        result = BundleFileSource(made.path, runtime.mirror(), max_bytes=64 << 20).fetch()
        assert result.revision == made.revision and result.changed
        assert result.source == "bundle:fleet.ksb"
        assert result.bytes_received == made.path.stat().st_size
        assert result.bundle is not None and result.bundle.kind == "keystone"
        with open_bundle(made.path) as bundle:
            assert result.bundle.artifacts == tuple(a.sha256 for a in bundle.artifacts)
        assert runtime.mirror().ref(FETCHED_REF) == made.revision

    def test_git_bundle_carries_no_artifacts(
        self, fleet: FleetRepo, runtime: Runtime, tmp_path: Path
    ) -> None:
        """A bundle made by `git bundle create` imports, labelled as asked."""
        rev = fleet.commit({"plans/default.toml": "[[components]]\n"}, "fleet")
        out = tmp_path / "plain.bundle"
        run_git("bundle", "create", "-q", str(out), "main", cwd=fleet.work, env=fleet.env)
        result = BundleFileSource(out, runtime.mirror, max_bytes=1 << 30, label="usb").fetch()
        assert result.revision == rev and result.source == "usb"
        assert result.bundle is not None and (result.bundle.kind, result.bundle.artifacts) == (
            "git",
            (),
        )

    def test_over_the_bound_or_missing_is_refused_before_the_mirror(
        self, runtime: Runtime, made: Made, tmp_path: Path
    ) -> None:
        """The whole file is checked against the bound; a missing file is a BundleError."""
        with pytest.raises(BundleError, match="KEYSTONE_MAX_BUNDLE_BYTES"):
            BundleFileSource(made.path, runtime.mirror, max_bytes=100).fetch()
        with pytest.raises(BundleError, match="cannot read bundle"):
            BundleFileSource(tmp_path / "absent.ksb", runtime.mirror, max_bytes=100).fetch()
        assert runtime.opened == 0


class TestCacheBundleArtifacts:
    def test_all_artifacts_land_read_only(self, made: Made, tmp_path: Path) -> None:
        """Every artifact is copied under sha256/ and made read-only; a second call copies
        nothing and leaves no staging directory."""
        root = tmp_path / "artifacts"
        root.mkdir()
        shas = [sha for sha, _ in made.artifacts]
        cache_bundle_artifacts(made.path, shas, artifacts_dir=root)
        for sha, src in made.artifacts:
            blob = root / "sha256" / sha
            assert blob.read_bytes() == src.read_bytes()
            assert blob.stat().st_mode & 0o777 == 0o444
        cache_bundle_artifacts(made.path, shas, artifacts_dir=root)
        assert sorted(p.name for p in root.iterdir()) == ["sha256"]

    def test_one_damaged_artifact_caches_none(self, made: Made, tmp_path: Path) -> None:
        """A bundle with one damaged artifact leaves the cache as it was."""
        (big, big_file), (small, _small_file) = made.artifacts
        raw = bytearray(made.path.read_bytes())
        at = raw.index(big_file.read_bytes()[:64]) + 1000
        raw[at] ^= 0xFF
        damaged = tmp_path / "damaged.ksb"
        damaged.write_bytes(bytes(raw))
        root = tmp_path / "artifacts"
        root.mkdir()
        with pytest.raises(ArtifactIntegrityError):
            cache_bundle_artifacts(damaged, [small, big], artifacts_dir=root)
        assert not list((root / "sha256").iterdir())
        assert sorted(p.name for p in root.iterdir()) == ["sha256"]

"""HTTP downloads of artifacts: retries with backoff, resume, a deadline and size bounds.

Every byte is hashed while it streams to a temp file (on a second thread, so hashing overlaps
the receiving); a download is bounded in size, total time and minimum throughput (a server
dripping a byte a second cannot hold the agent). A token is sent only to the GitHub hosts and
never across a redirect to another host. ``httpx`` is imported only when a download happens.
"""

from __future__ import annotations

import hashlib
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from loguru import logger

from keystone.runtime.artifacts.model import ArtifactDownloadError, ArtifactRefusedError
from keystone.runtime.artifacts.policy import (
    MAX_REDIRECTS,
    USER_AGENT,
    ArtifactPolicy,
    backoff_delay,
    redact_uri,
    request_headers,
)

if TYPE_CHECKING:
    import httpx

#: HTTP statuses worth a retry.
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

# --- downloading --------------------------------------------------------------------------------


class _Transient(Exception):
    """An attempt that failed in a way a retry may fix."""

    def __init__(self, message: str, *, reason: str = "network", wait: float | None = None) -> None:
        self.reason = reason
        self.wait = wait
        super().__init__(message)


class Sink:
    """The temp file a download streams into, with its running hash."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.hasher = hashlib.sha256()
        self.size = 0

    def reset(self) -> None:
        self.fh.seek(0)
        self.fh.truncate()
        self.hasher = hashlib.sha256()
        self.size = 0


class _PipelinedWriter:
    """Hash and write chunks on a second thread while the first one receives.

    ``hashlib`` and file writes release the GIL, so receiving (h11's parsing, in Python) overlaps
    with hashing and the disk. The queue is short (``_QUEUE_CHUNKS`` chunks of ~64 KiB): memory
    does not grow with the artifact. Leaving the ``with`` block waits until every accepted chunk is
    written, so the sink is consistent afterwards, and re-raises a write error (disk full).
    """

    _QUEUE_CHUNKS = 32

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._queue: queue.Queue[bytes | None] = queue.Queue(self._QUEUE_CHUNKS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="artifact-writer", daemon=True)

    def __enter__(self) -> _PipelinedWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def write(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)
        self.sink.size += len(chunk)

    def _run(self) -> None:
        update = self.sink.hasher.update
        write = self.sink.fh.write
        while (chunk := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain, so that the receiving thread never blocks
            try:
                update(chunk)
                write(chunk)
            except BaseException as exc:
                self._error = exc


@dataclass
class Fetch:
    """One artifact (or signature, or certificate) download in progress."""

    url: str
    headers: Mapping[str, str]
    token: str | None
    limit: int
    label: str
    component: str | None
    validator: str | None = None  # ETag or Last-Modified of what we have, for If-Range
    resumable: bool = True


class Downloader:
    """HTTP downloads with retries, resume, deadlines and bounds (one ``httpx.Client``)."""

    def __init__(self, policy: ArtifactPolicy, monotonic: Callable[[], float]) -> None:
        self.policy = policy
        self._monotonic = monotonic
        self._client: httpx.Client | None = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def client(self) -> httpx.Client:
        import httpx  # lazy: heavy, and only a download needs it

        if self._client is None:
            p = self.policy
            self._client = httpx.Client(
                timeout=httpx.Timeout(
                    connect=p.connect_timeout,
                    read=p.read_timeout,
                    write=p.read_timeout,
                    pool=p.connect_timeout,
                ),
                verify=True,  # always, as in the Go agent (KEYSTONE_INSECURE_SKIP_VERIFY is not TLS)
                follow_redirects=False,
                headers={"User-Agent": USER_AGENT},
            )
        return self._client

    def download(self, job: Fetch, sink: Sink) -> None:
        """Fill ``sink`` with the resource, retrying and resuming until the deadline."""
        p = self.policy
        deadline = self._monotonic() + p.download_timeout
        failures = 0
        while True:
            before = sink.size
            try:
                self._attempt(job, sink, deadline)
                return
            except _Transient as exc:
                progressed = sink.size > before and exc.reason != "too-slow"
                failures = 1 if progressed else failures + 1
                remaining = deadline - self._monotonic()
                if failures > p.retries or remaining <= 0:
                    raise ArtifactDownloadError(
                        f"{job.label}: download failed after {failures} attempt(s) without "
                        f"progress: {exc}; it is tried again at the next sync or apply",
                        reason=exc.reason,
                        component=job.component,
                        uri=redact_uri(job.url),
                    ) from exc
                wait = backoff_delay(failures, p.backoff_base, p.backoff_max)
                if exc.wait is not None:
                    wait = max(wait, min(exc.wait, p.backoff_max))
                wait = max(0.0, min(wait, remaining))
                logger.warning(
                    "{}: {} (attempt {}, {} bytes so far); retrying in {:.1f}s",
                    job.label,
                    exc,
                    failures,
                    sink.size,
                    wait,
                )
                time.sleep(wait)

    def _attempt(self, job: Fetch, sink: Sink, deadline: float) -> None:
        import httpx  # lazy: heavy, and only a download needs it

        p = self.policy
        extra: dict[str, str] = {"Accept-Encoding": "identity"}
        if sink.size and job.resumable:
            extra["Range"] = f"bytes={sink.size}-"
            if job.validator:
                extra["If-Range"] = job.validator
        elif sink.size:
            sink.reset()
        url = job.url
        for _hop in range(MAX_REDIRECTS + 1):
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                self._deadline(job)
            headers = {
                **request_headers(url, job.url, job.headers, job.token, p.github_hosts),
                **extra,
            }
            timeout = httpx.Timeout(
                connect=min(p.connect_timeout, remaining),
                read=min(p.read_timeout, remaining),
                write=min(p.read_timeout, remaining),
                pool=min(p.connect_timeout, remaining),
            )
            try:
                request = self.client().build_request("GET", url, headers=headers, timeout=timeout)
                response = self.client().send(request, stream=True)
            except httpx.TransportError as exc:
                raise _Transient(f"{type(exc).__name__}: {exc or 'connection failed'}") from exc
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                raise self._permanent(
                    job, f"the URL is not usable ({exc})", "unsupported-uri"
                ) from exc
            try:
                location = response.headers.get("location")
                if response.status_code in (301, 302, 303, 307, 308) and location:
                    url = urljoin(url, location)
                    if urlsplit(url).scheme not in ("http", "https"):
                        raise self._permanent(
                            job,
                            "a redirect leads to a non-HTTP location",
                            "unsupported-uri",
                        )
                    continue
                self._receive(job, sink, response, deadline)
                return
            finally:
                response.close()
        raise self._permanent(job, f"more than {MAX_REDIRECTS} redirects", "http-status")

    def _receive(self, job: Fetch, sink: Sink, response: httpx.Response, deadline: float) -> None:
        import httpx  # lazy: heavy, and only a download needs it

        status = response.status_code
        if status in RETRY_STATUS:
            raise _Transient(f"HTTP {status}", reason="http-status", wait=_retry_after(response))
        if status == 416:
            sink.reset()
            raise _Transient(
                "HTTP 416 (the server cannot resume); starting over",
                reason="http-status",
            )
        if status not in (200, 206):
            hint = ""
            if status in (401, 403):
                hint = " (check the artifact's github_token / headers, or KEYSTONE_GITHUB_TOKEN)"
            elif status == 404:
                hint = " (check the uri; a private GitHub asset also answers 404 without a token)"
            raise ArtifactDownloadError(
                f"{job.label}: the server answered HTTP {status}{hint}",
                reason="not-found" if status == 404 else "http-status",
                component=job.component,
                uri=redact_uri(job.url),
            )
        total: int | None = None
        if status == 206:
            start, total = _content_range(response.headers.get("content-range", ""))
            if start != sink.size:
                sink.reset()
                raise _Transient(
                    f"the server resumed at byte {start}, not {sink.size}; starting over"
                )
        else:
            if sink.size:
                # The server ignored Range (or If-Range found the file changed): start over.
                sink.reset()
            length = response.headers.get("content-length")
            if length is not None and length.isdigit():
                total = int(length)
        if total is not None and total > job.limit:
            raise self._too_large(job, f"the server announces {total} bytes")
        encoding = response.headers.get("content-encoding", "identity").lower()
        job.resumable = encoding in ("", "identity")
        job.validator = _validator(response) if job.resumable else None
        chunks: Iterator[bytes] = response.iter_raw() if job.resumable else response.iter_bytes()
        window_start = self._monotonic()
        window_bytes = sink.size
        try:
            with _PipelinedWriter(sink) as writer:
                self._stream(job, chunks, writer, deadline, window_start, window_bytes)
        except httpx.TransportError as exc:
            raise _Transient(
                f"the connection broke after {sink.size} bytes ({type(exc).__name__}: {exc})"
            ) from exc
        except httpx.DecodingError as exc:
            sink.reset()
            raise _Transient(f"the response did not decode ({exc})") from exc

    def _stream(
        self,
        job: Fetch,
        chunks: Iterator[bytes],
        writer: _PipelinedWriter,
        deadline: float,
        window_start: float,
        window_bytes: int,
    ) -> None:
        p = self.policy
        sink = writer.sink
        for chunk in chunks:
            size = sink.size + len(chunk)
            if size > job.limit:
                raise self._too_large(job, f"the server sent more than {job.limit} bytes")
            writer.write(chunk)
            now = self._monotonic()
            if now > deadline:
                self._deadline(job)
            if p.min_throughput and now - window_start >= p.throughput_window:
                rate = (size - window_bytes) / (now - window_start)
                if rate < p.min_throughput:
                    raise _Transient(
                        f"the transfer ran at {rate:.0f} B/s over {now - window_start:.0f}s, "
                        f"below the minimum of {p.min_throughput} B/s",
                        reason="too-slow",
                    )
                window_start, window_bytes = now, size

    def _deadline(self, job: Fetch) -> None:
        raise ArtifactDownloadError(
            f"{job.label}: the download did not finish within {self.policy.download_timeout:.0f}s "
            "(KEYSTONE_ARTIFACT_DOWNLOAD_TIMEOUT); it is tried again at the next sync or apply",
            reason="deadline",
            component=job.component,
            uri=redact_uri(job.url),
        )

    def _too_large(self, job: Fetch, what: str) -> ArtifactRefusedError:
        return ArtifactRefusedError(
            f"{job.label}: {what}, over the bound of {job.limit} bytes; the download was cut off "
            "(raise KEYSTONE_ARTIFACT_MAX_BYTES if the artifact is genuinely that large)",
            reason="too-large",
            component=job.component,
            uri=redact_uri(job.url),
        )

    def _permanent(self, job: Fetch, what: str, reason: str) -> ArtifactRefusedError:
        return ArtifactRefusedError(
            f"{job.label}: {what}",
            reason=reason,
            component=job.component,
            uri=redact_uri(job.url),
        )


def _retry_after(response: httpx.Response) -> float | None:
    value = str(response.headers.get("retry-after", "")).strip()
    return float(value) if value.isdigit() else None


def _validator(response: httpx.Response) -> str | None:
    etag: str | None = response.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    modified: str | None = response.headers.get("last-modified")
    return modified


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


def _content_range(value: str) -> tuple[int, int | None]:
    m = _CONTENT_RANGE.match(value)
    if not m:
        raise _Transient(f"a 206 answer with an unreadable Content-Range {value!r}")
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), total

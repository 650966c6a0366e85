"""A bundle served over HTTP as a source: ``[source] type = "http"``.

:class:`HttpBundleSource` polls one URL for a bundle file. An unchanged bundle costs one
conditional request (``If-None-Match`` / ``If-Modified-Since``, answered 304 with no body); a
download cut short is resumed where it stopped (``Range`` + ``If-Range``) on the next poll; the
size is bounded by the declared ``Content-Length`` and again while the body streams; the whole
download has a wall-clock deadline. A complete download is kept as ``current.bundle`` in the
work directory and imported into the mirror like any bundle file
(:class:`keystone.sources.file.BundleFileSource`).

What it remembers between polls lives in a small JSON state file: the validators of the last
complete download (``etag``, ``last_modified``), the ETag of a partial one (``partial_etag``)
and the revision the kept bundle brought (``bundle_revision``). A kept bundle that is refused as
a file (damaged, too large, missing a prerequisite) is deleted, so the 304s that follow cost
nothing.

httpx is imported inside :meth:`HttpBundleSource.fetch`: the resident agent imports
``keystone.sources`` and must stay small. :func:`unchanged_bundle` is the agent's own
conditional request (standard library only): a 304 there needs no worker at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keystone.errors import BundleError, KeystoneError, SourceUnreachable
from keystone.limits import Limits, how_to_raise
from keystone.sources.base import FetchResult, redact_url
from keystone.sources.transport import http_get, proxy_configured
from keystone.state import read_json, write_json

if TYPE_CHECKING:
    import ssl

    from keystone.sources.file import MirrorRef

__all__ = [
    "KEPT_BUNDLE",
    "PARTIAL_DOWNLOAD",
    "HttpBundleSource",
    "UnchangedBundle",
    "unchanged_bundle",
]

KEPT_BUNDLE = "current.bundle"
PARTIAL_DOWNLOAD = "download.partial"


class HttpBundleSource:
    """Poll a bundle URL and import a new bundle into the mirror.

    Implements :class:`keystone.sources.base.Source`. :meth:`fetch` answers, after a 304:

    * nothing kept from before (the last bundle was refused as a file): ``revision == ""``
      (:attr:`FetchResult.revision_known` False) and nothing is imported;
    * the kept bundle's revision when ``settled`` says the consumer will not verify it again
      (applied, or known bad, and not forced): nothing is imported, ``bundle`` is None;
    * otherwise (an import cut short, a dry run, ``sync --retry``) the kept bundle is imported
      again and its revision returned, as after a 200.

    Args:
        url: The bundle URL (``http://`` or ``https://``).
        state_file: Where the poll state is kept (``runtime/state/http-source.json``).
        work_dir: Where downloads and the kept bundle live (``runtime/bundles/http``).
        mirror: The device's mirror, or a function that opens it (called only to import).
        max_bytes: The largest bundle accepted (``KEYSTONE_MAX_BUNDLE_BYTES``).
        timeout: Seconds allowed for each read (default 60); connecting gets 15.
        total_timeout: Wall-clock bound on the whole download, checked as data arrives
            (default ten times ``timeout``, or 1200 s when no timeout is given); a download
            over it fails as unreachable and resumes on the next poll.
        settled: Whether a revision needs no import after a 304: the consumer's own gate
            (``lambda rev: not force and (rev == applied or rev in known_bad)``). Without it
            the kept bundle is imported after every 304.
        clock: Monotonic seconds, for the deadline (tests pass a fake one).
        limits: The header bounds of the answer (``max_headers``, ``max_header_line_bytes``;
            default ``Limits.from_env()``).

    Attributes:
        last_detail: The wire stats of the last :meth:`fetch` whose download finished, or None
            when it did not (what a consumer reports when the bundle is then refused).
    """

    def __init__(
        self,
        url: str,
        *,
        state_file: Path,
        work_dir: Path,
        mirror: MirrorRef,
        max_bytes: int,
        timeout: float | None = None,
        total_timeout: float | None = None,
        settled: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        limits: Limits | None = None,
    ) -> None:
        self.url = url
        self.display_url = redact_url(url)
        self.state_file = Path(state_file)
        self.work_dir = Path(work_dir)
        self.max_bytes = int(max_bytes)
        self.timeout = float(timeout or 60)
        self.total_timeout = float(total_timeout or (timeout or 120) * 10)
        self.settled = settled
        self.clock = clock
        self.limits = limits or Limits.from_env()
        self._mirror = mirror
        # Wire stats of the last fetch whose download finished (None when it did not): what a
        # consumer reports when the bundle is then refused on import.
        self.last_detail: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"HttpBundleSource({self.display_url!r})"

    @property
    def kept_bundle(self) -> Path:
        """The last complete download (``current.bundle``), while it has not been refused."""
        return self.work_dir / KEPT_BUNDLE

    def fetch(self) -> FetchResult:
        """Poll the URL once; import a new (or not yet settled) bundle into the mirror.

        Raises:
            keystone.errors.SourceUnreachable: no answer, an HTTP error status, a download cut
                short or over its deadline (it resumes on the next poll), or a refused resume
                (HTTP 416: it restarts from byte 0 on the next poll).
            keystone.errors.BundleError: the bundle is over ``max_bytes`` (nothing is kept), or
                it was refused as a file on import (then it is deleted).
        """
        self.last_detail = None
        state = self._load_state()
        path, stats = self._download(state)
        self.last_detail = dict(stats)
        wire: dict[str, Any] = {
            "bytes_received": stats["bytes"],
            "requests": stats["requests"],
            "detail": dict(stats),
            "source": self.display_url,
        }
        if path is None:
            kept = self.kept_bundle
            rev = state.get("bundle_revision")
            if not kept.is_file():
                return FetchResult(revision="", changed=False, **wire)
            if rev and self.settled is not None and self.settled(rev):
                return FetchResult(revision=rev, changed=False, **wire)
            path = kept  # never verified (an import cut short), or verified but not deployed
        # lazy: the bundle reader and the mirror (dulwich) only for a bundle to import
        from keystone.sources.file import BundleFileSource

        try:
            imported = BundleFileSource(
                path, self._mirror, max_bytes=self.max_bytes, label=self.display_url
            ).fetch()
        except KeystoneError:
            path.unlink(missing_ok=True)  # refused as a file: later 304s cost nothing
            raise
        state["bundle_revision"] = imported.revision
        write_json(self.state_file, state)
        return dataclasses.replace(imported, **wire)

    # -- the download ------------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        return _load_state(self.state_file, self.url)

    def _download(self, state: dict[str, Any]) -> tuple[Path | None, dict[str, Any]]:
        """Fetch the URL conditionally; resume a partial download; bound the size.

        Returns (path of a complete new bundle, or None when unchanged (304), wire stats).
        """
        import httpx  # lazy: httpx is heavy, and the resident agent imports keystone.sources

        url, shown, limit = self.url, self.display_url, self.max_bytes
        self.work_dir.mkdir(parents=True, exist_ok=True)
        partial = self.work_dir / PARTIAL_DOWNLOAD
        # Offsets in Range and the size bound count the bundle's own bytes: no content coding.
        headers: dict[str, str] = {"Accept-Encoding": "identity"}
        have = partial.stat().st_size if partial.exists() and state.get("partial_etag") else 0
        if have:
            headers["Range"] = f"bytes={have}-"
            headers["If-Range"] = state["partial_etag"]
        elif state.get("etag") or state.get("last_modified"):
            if state.get("etag"):
                headers["If-None-Match"] = state["etag"]
            if state.get("last_modified"):
                headers["If-Modified-Since"] = state["last_modified"]
        stats: dict[str, Any] = {"requests": 1, "bytes": 0, "status": None, "resumed_from": have}
        deadline = self.clock() + self.total_timeout
        timeout = httpx.Timeout(self.timeout, connect=15.0)
        try:
            with (
                httpx.Client(timeout=timeout, follow_redirects=True) as client,
                client.stream("GET", url, headers=headers) as resp,
            ):
                stats["status"] = resp.status_code
                self.limits.check_headers(resp.headers.raw, what=f"the answer of {shown}")
                if resp.status_code == 304:
                    return None, stats
                if resp.status_code == 416 and have:
                    # The partial file is no prefix of the bundle (it is complete, or the bundle
                    # shrank without a new ETag): start again from byte 0 on the next poll.
                    partial.unlink(missing_ok=True)
                    state.pop("partial_etag", None)
                    write_json(self.state_file, state)
                    raise SourceUnreachable(
                        f"bundle URL {shown} refused to resume at byte {have} (HTTP 416); the "
                        "download restarts from the beginning on the next poll"
                    )
                if resp.status_code not in (200, 206):
                    raise SourceUnreachable(f"bundle URL {shown} answered HTTP {resp.status_code}")
                append = resp.status_code == 206 and have > 0
                total = have if append else 0
                declared = resp.headers.get("Content-Length")
                if declared and int(declared) + total > limit:
                    raise BundleError(
                        f"bundle at {shown} is {int(declared) + total} bytes, over the limit of "
                        f"{limit} bytes; nothing was imported; " + how_to_raise("max_bundle_bytes")
                    )
                etag = resp.headers.get("ETag")
                state.update({"partial_etag": etag} if etag else {})
                write_json(self.state_file, state)
                with partial.open("ab" if append else "wb") as out:
                    # Chunks as they arrive (no re-chunking buffer): every byte received before
                    # a connection breaks is on disk, so the next poll resumes exactly there.
                    for chunk in resp.iter_bytes():
                        total += len(chunk)
                        stats["bytes"] += len(chunk)
                        if total > limit:
                            raise BundleError(
                                f"bundle at {shown} is over the limit of {limit} bytes; "
                                "download stopped, nothing was imported; "
                                + how_to_raise("max_bundle_bytes")
                            )
                        if self.clock() > deadline:
                            raise SourceUnreachable(
                                f"bundle download from {shown} took too long; will resume"
                            )
                        out.write(chunk)
                last_modified = resp.headers.get("Last-Modified")
        except BundleError:
            partial.unlink(missing_ok=True)
            state.pop("partial_etag", None)
            write_json(self.state_file, state)
            raise
        except httpx.HTTPError as exc:
            if "Receive buffer too long" in str(exc):  # h11: a header block over 100 KiB
                raise self.limits.refuse(
                    "max_header_line_bytes",
                    "more than 100 KiB of header",
                    what=f"the header block of the answer of {shown}",
                ) from None
            raise SourceUnreachable(
                f"bundle URL {shown} unreachable: {exc}; a partial download resumes next poll"
            ) from exc
        done = self.kept_bundle
        partial.replace(done)
        state.pop("partial_etag", None)
        state.pop("bundle_revision", None)
        state.update({"etag": etag, "last_modified": last_modified, "fetched_at": time.time()})
        write_json(self.state_file, state)
        return done, stats


def _load_state(state_file: Path, url: str) -> dict[str, Any]:
    state = read_json(state_file, {}) or {}
    if not isinstance(state, dict) or state.get("url") != url:
        state = {"url": url}
    return state


HTTPX_PROXY_VARIABLES = tuple(
    v for name in ("http_proxy", "https_proxy", "all_proxy") for v in (name, name.upper())
)
"""The variables httpx (the worker's bundle download) takes a proxy from."""


@dataclass(frozen=True)
class UnchangedBundle:
    """A bundle URL answered 304: what :meth:`HttpBundleSource.fetch` would have seen.

    Attributes:
        kept: A complete earlier download is kept (``current.bundle``).
        revision: The revision the kept bundle brought, ``""`` when not known (an import cut
            short) or when none is kept.
        detail: The wire stats, as the source reports them.
    """

    kept: bool
    revision: str
    detail: dict[str, Any]


def _httpx_tls() -> ssl.SSLContext:
    # lazy: ssl only for an https URL. The same trust as the worker's httpx client: the
    # SSL_CERT_FILE or SSL_CERT_DIR of the environment, else certifi's bundle.
    import ssl

    import certifi

    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    return ssl.create_default_context(cafile=certifi.where())


async def unchanged_bundle(
    url: str,
    *,
    state_file: Path,
    work_dir: Path,
    timeout: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> UnchangedBundle | None:
    """The one conditional request of a poll, made with the standard library.

    Sends exactly what :meth:`HttpBundleSource.fetch` would send (``If-None-Match`` /
    ``If-Modified-Since`` from the same state file) and returns the 304 as the source would
    report it. None when the source must run instead: nothing to be conditional on, a partial
    download to resume, a proxy in the environment, any other status (the body is not read),
    or no answer; the source then makes the request itself.
    """
    env = os.environ if environ is None else environ
    if proxy_configured(HTTPX_PROXY_VARIABLES, env):
        return None
    state = _load_state(Path(state_file), url)
    partial = Path(work_dir) / PARTIAL_DOWNLOAD
    if state.get("partial_etag") and partial.exists():
        return None
    if not (state.get("etag") or state.get("last_modified")):
        return None
    headers = {"Accept-Encoding": "identity"}
    if state.get("etag"):
        headers["If-None-Match"] = str(state["etag"])
    if state.get("last_modified"):
        headers["If-Modified-Since"] = str(state["last_modified"])
    try:
        async with asyncio.timeout(min(float(timeout or 60), 15.0)):
            answer = await http_get(url, headers, tls=_httpx_tls)
    except Exception:  # any failure: the source asks again and reports it in full
        return None
    if answer.status != 304:
        return None  # its body is left unread: the source downloads it
    kept = (Path(work_dir) / KEPT_BUNDLE).is_file()
    revision = str(state.get("bundle_revision") or "") if kept else ""
    detail = {"requests": 1, "bytes": 0, "status": 304, "resumed_from": 0}
    return UnchangedBundle(kept, revision, detail)

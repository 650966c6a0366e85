"""One refresh of a dataset: fetch the signed manifest, verify it, refuse replays, stage the payload.

The order is Go's (``resolveDataset``), each step only after the one before it:

1. fetch the manifest, its signature and (with ``cert_uri``) the signer certificate: small
   documents, bounded in size and by one overall deadline;
2. verify the signature against the trust bundle (:func:`keystone.manifest.verify_manifest`):
   a hard failure, never a fallback;
3. anti-replay: the manifest must be strictly newer (by ``published``) than the last accepted
   one; the very document already accepted is "unchanged", and a manifest rolled back on this
   device is refused;
4. fetch the payload and check it against the manifest's ``sha256`` (nothing unverified is kept);
5. place it in a fresh version directory (a tar or zip is unpacked safely).

Activation, the reload and the health-gated rollback are :mod:`keystone.datasets.manager`'s.
``httpx`` and the artifact store are imported where used: the resident agent stays light.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urljoin, urlsplit

from keystone import manifest as _manifest
from keystone.datasets.spec import DatasetSpec, check_name
from keystone.datasets.store import DatasetStore
from keystone.errors import KeystoneError, Refused, Retryable, UsageError, ValidationError
from keystone.runtime.archive import ArchiveLimits, ArchiveRefused, remove_tree

if TYPE_CHECKING:
    from keystone.runtime.clock import TrustedClock

MAX_MANIFEST_BYTES = _manifest.MAX_MANIFEST_BYTES
MAX_SIGNATURE_BYTES = 64 * 1024
MAX_CERT_BYTES = 1 << 20
DOCUMENT_DEADLINE = 120.0  # Go's fetchTo: two minutes for the manifest and its companions
MAX_REDIRECTS = 5


class DatasetRefused(Refused):
    """A manifest or payload refused: bad signature, replay, digest, bad document. Not retried.

    Attributes:
        dataset: the dataset name.
        reason: ``no-trust-bundle``, ``missing-signature``, ``no-certificate``, ``replayed``,
            ``rolled-back``, ``bad-manifest``, ``hash-mismatch``, ``bad-archive``, ``bad-version``
            or a :class:`keystone.runtime.signing.SignatureRejected` reason (``expired``...).
    """

    def __init__(self, message: str, *, dataset: str, reason: str) -> None:
        self.dataset = dataset
        self.reason = reason
        super().__init__(message)


class DatasetUnavailable(Retryable):
    """A manifest, signature or payload could not be fetched (network, 5xx, deadline)."""

    def __init__(self, message: str, *, dataset: str, reason: str = "fetch") -> None:
        self.dataset = dataset
        self.reason = reason
        super().__init__(message)


class DocumentNotFound(Exception):
    """The server answered 404, or the local file does not exist."""


class DocumentFetcher(Protocol):
    """Fetches a small document (manifest, signature, certificate) in full, bounded."""

    def fetch(
        self, uri: str, *, headers: Mapping[str, str], limit: int, deadline: float
    ) -> bytes: ...

    def close(self) -> None:
        """Release connections (called after each refresh's documents)."""
        ...


class PayloadFetcher(Protocol):
    """Fetches a dataset payload and verifies it against a digest; returns a readable path."""

    def fetch(self, spec: DatasetSpec, uri: str, sha256: str) -> Path: ...

    def collect(self, spec: DatasetSpec, keep: set[str]) -> None: ...


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


def _local_path(uri: str) -> Path | None:
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        return None
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme and len(parts.scheme) > 1:
        raise ValueError(f"scheme {parts.scheme!r} is not supported (https, http, file or a path)")
    return Path(uri)


def _read_bounded(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError as exc:
        raise DocumentNotFound(str(path)) from exc
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data


class HttpDocumentFetcher:
    """Small documents over http(s) (httpx, imported lazily) or from a local path / ``file://``.

    Nothing is cached: a manifest exists to change. Redirects are followed by hand, up to five;
    the recipe's headers go to the manifest's own origin only. The whole exchange, redirects and
    body included, must finish before ``deadline`` (a monotonic time).
    """

    def __init__(
        self,
        *,
        tls_verify: bool = True,
        connect_timeout: float = 15.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tls_verify = tls_verify
        self.connect_timeout = connect_timeout
        self._monotonic = monotonic
        # One client per thread and refresh: its TLS context is costly to build three times,
        # and refreshes of two datasets may run in two threads at once.
        self._local = threading.local()

    def close(self) -> None:
        """Close this thread's client, if one is open."""
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None

    def fetch(self, uri: str, *, headers: Mapping[str, str], limit: int, deadline: float) -> bytes:
        """Return the document's bytes.

        Raises:
            DocumentNotFound: HTTP 404 / no such file.
            ValueError: over ``limit`` bytes, or an unusable URI.
            OSError: any other transport failure, a non-200 answer, or the deadline.
        """
        local = _local_path(uri)
        if local is not None:
            return _read_bounded(local, limit)
        import httpx  # lazy: the resident agent does not load httpx until a dataset is fetched

        url = uri
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(
                verify=self.tls_verify, follow_redirects=False
            )
        for _ in range(MAX_REDIRECTS + 1):
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{uri}: not fetched within the deadline")
            sent = dict(headers) if _origin(url) == _origin(uri) else {}
            timeout = httpx.Timeout(remaining, connect=min(self.connect_timeout, remaining))
            try:
                with client.stream("GET", url, headers=sent, timeout=timeout) as resp:
                    if resp.status_code in (301, 302, 303, 307, 308):
                        url = urljoin(url, resp.headers.get("location", ""))
                        if urlsplit(url).scheme not in ("http", "https"):
                            raise ValueError(f"{uri}: a redirect leaves http(s)")
                        continue
                    if resp.status_code == 404:
                        raise DocumentNotFound(f"{url} answered 404")
                    if resp.status_code != 200:
                        raise OSError(f"{url} answered HTTP {resp.status_code}")
                    body = bytearray()
                    for chunk in resp.iter_bytes():
                        body += chunk
                        if len(body) > limit:
                            raise ValueError(f"{url} sent more than {limit} bytes")
                        if self._monotonic() > deadline:
                            raise TimeoutError(f"{uri}: not fetched within the deadline")
                    return bytes(body)
            except httpx.HTTPError as exc:
                raise OSError(f"{url}: {type(exc).__name__}: {exc}") from exc
        raise OSError(f"{uri}: more than {MAX_REDIRECTS} redirects")


@dataclass(frozen=True)
class _PayloadArtifact:
    """What :class:`keystone.runtime.artifacts.ArtifactStore` needs of a download (ArtifactLike)."""

    uri: str
    sha256: str | None
    sig_uri: str | None = None
    cert_uri: str | None = None
    unpack: bool = False
    github_token: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class ArtifactPayloadFetcher:
    """Payloads through the artifact store: retries, resume, size and time bounds, local paths.

    Each dataset gets its own content-addressed cache (``runtime/datasets/<name>/.cache``), so
    the artifact cache's size-driven GC can never take a rollback target.

    Args:
        store: the dataset tree (for the cache directories).
        environ: ``KEYSTONE_ARTIFACT_*`` bounds and ``KEYSTONE_GITHUB_TOKEN``.
    """

    def __init__(self, store: DatasetStore, environ: Mapping[str, str] | None = None) -> None:
        self.store = store
        self.environ = dict(os.environ if environ is None else environ)

    def _artifact_store(self, spec: DatasetSpec) -> Any:
        # Lazy: the artifact module pulls in the download machinery.
        from keystone.runtime.artifacts import ArtifactPolicy, ArtifactStore

        policy = ArtifactPolicy.from_env(
            self.store.cache_dir(spec.name),
            self.environ,
            allow_unsigned=True,  # the signed manifest's digest is what vouches for the bytes
            require_sha256=True,
            state_dir=None,
        )
        return ArtifactStore(policy)

    def fetch(self, spec: DatasetSpec, uri: str, sha256: str) -> Path:
        """Download (or find cached) and verify; raise DatasetRefused / DatasetUnavailable."""
        # lazy: these errors come with the artifact store this payload fetcher uses
        from keystone.errors import ArtifactFetchError, ArtifactIntegrityError, UnsafeArchiveError

        artifact = _PayloadArtifact(
            uri=uri,
            sha256=sha256,
            github_token=spec.github_token or None,
            headers=dict(spec.headers),
        )
        try:
            with self._artifact_store(spec) as store:
                return Path(store.prepare(artifact, component=f"dataset {spec.name}").path)
        except ArtifactIntegrityError as exc:
            reason = getattr(exc, "reason", "refused")
            raise DatasetRefused(
                f"dataset {spec.name}: payload refused: {exc}",
                dataset=spec.name,
                reason="hash-mismatch" if reason == "hash-mismatch" else reason,
            ) from exc
        except UnsafeArchiveError as exc:
            raise DatasetRefused(str(exc), dataset=spec.name, reason="bad-archive") from exc
        except ArtifactFetchError as exc:
            raise DatasetUnavailable(
                f"dataset {spec.name}: payload not fetched: {exc}", dataset=spec.name
            ) from exc

    def collect(self, spec: DatasetSpec, keep: set[str]) -> None:
        """Drop cached payloads that no kept version needs (the store's ``sha256/<hex>`` blobs)."""
        cache = self.store.cache_dir(spec.name)
        try:
            names = os.listdir(cache / "sha256")
        except OSError:
            return
        for sha in names:
            if sha not in keep:
                for path in (
                    cache / "sha256" / sha,
                    cache / "unpacked" / sha,
                    cache / "meta" / sha,
                ):
                    remove_tree(path)


def artifact_name(uri: str) -> str:
    """The file name a single-file payload gets in its version directory."""
    path = unquote(urlsplit(uri).path) if "://" in uri else uri
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return "data" if name in ("", ".", "..") or "\x00" in name else name


def _limits_from_env(environ: Mapping[str, str]) -> ArchiveLimits:
    """The artifact unpack bounds (``KEYSTONE_MAX_EXTRACT_BYTES`` / ``_FILES``) for payloads."""
    # lazy: only a bound given as a size string needs it
    from keystone.units import parse_size

    base = ArchiveLimits()
    try:
        return ArchiveLimits(
            max_bytes=parse_size(environ.get("KEYSTONE_MAX_EXTRACT_BYTES") or base.max_bytes),
            max_files=parse_size(environ.get("KEYSTONE_MAX_EXTRACT_FILES") or base.max_files),
        )
    except ValueError as exc:
        raise UsageError(f"KEYSTONE_MAX_EXTRACT_BYTES / _FILES: {exc}") from None


def trusted_clock_hooks(
    clock: TrustedClock,
) -> tuple[Callable[[], datetime], Callable[[datetime], None], Callable[[], bool]]:
    """``(verification_time, observe_published, clock_trusted)`` over the agent's trusted clock.

    Certificates are judged at the clock's floor-protected time; an accepted manifest's
    ``published`` advances its high-water mark; ages are unknown while the clock is behind.
    """

    def verification_time() -> datetime:
        return datetime.fromtimestamp(clock.verification_time().now, UTC)

    def observe(when: datetime) -> None:
        clock.observe(when.timestamp())

    def trusted() -> bool:
        return clock.read().trusted

    return verification_time, observe, trusted


@dataclass(frozen=True)
class Documents:
    """A manifest with its detached signature and (optionally) its signer certificate."""

    manifest: bytes
    signature: bytes | None
    certificate: bytes | None = None
    source: str = ""


@dataclass(frozen=True)
class Staged:
    """The outcome of :meth:`Resolver.resolve`.

    ``changed`` False: the manifest is the one already active (``version`` is active).
    """

    manifest: _manifest.Manifest
    version: str
    changed: bool


class Resolver:
    """Verifies documents and stages payloads for one dataset tree.

    Args:
        store: the dataset tree.
        trust_bundle: PEM roots (``KEYSTONE_TRUST_BUNDLE``); ``None`` refuses every manifest
            unless ``insecure_skip_verify``.
        documents: how manifests are fetched.
        payloads: how payloads are fetched and verified.
        verification_time: the time certificates are judged at (the trusted clock's).
        observe_published: told each accepted ``published`` (the trusted clock's high-water mark
            may advance to it: a signed time the device has provably reached).
        insecure_skip_verify: accept unsigned manifests (development only; logged loudly).
        environ: where ``KEYSTONE_LEAF_CERT`` is read.
        limits: bounds on an unpacked payload.
        monotonic: the clock for the document deadline.
    """

    def __init__(
        self,
        store: DatasetStore,
        *,
        trust_bundle: Path | None,
        documents: DocumentFetcher | None = None,
        payloads: PayloadFetcher | None = None,
        verification_time: Callable[[], datetime] | None = None,
        observe_published: Callable[[datetime], None] | None = None,
        insecure_skip_verify: bool = False,
        environ: Mapping[str, str] | None = None,
        limits: ArchiveLimits | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.trust_bundle = trust_bundle
        self.documents = documents or HttpDocumentFetcher(monotonic=monotonic)
        self.payloads = payloads or ArtifactPayloadFetcher(store, environ)
        self.verification_time = verification_time or (lambda: datetime.now(UTC))
        self.observe_published = observe_published
        self.insecure_skip_verify = insecure_skip_verify
        self.environ = dict(os.environ if environ is None else environ)
        self.limits = limits or _limits_from_env(self.environ)
        self._monotonic = monotonic

    # --- step 1 -------------------------------------------------------------------------------

    def fetch_documents(self, spec: DatasetSpec) -> Documents:
        """Fetch the manifest, its signature and the ``cert_uri`` certificate, by one deadline.

        Raises:
            DatasetUnavailable: a fetch failed (retryable).
            DatasetRefused: ``missing-signature`` (the signature is not there: 404).
        """
        deadline = self._monotonic() + DOCUMENT_DEADLINE

        def get(uri: str, limit: int, what: str) -> bytes:
            try:
                return self.documents.fetch(
                    uri, headers=spec.headers, limit=limit, deadline=deadline
                )
            except DocumentNotFound as exc:
                raise DatasetUnavailable(
                    f"dataset {spec.name}: the {what} {uri} is not there ({exc})",
                    dataset=spec.name,
                    reason="not-found",
                ) from exc
            except (OSError, ValueError) as exc:
                raise DatasetUnavailable(
                    f"dataset {spec.name}: fetching the {what} {uri} failed: {exc}",
                    dataset=spec.name,
                ) from exc

        try:
            return self._fetch_documents(spec, get)
        finally:
            self.documents.close()

    def _fetch_documents(
        self, spec: DatasetSpec, get: Callable[[str, int, str], bytes]
    ) -> Documents:
        body = get(spec.manifest, _manifest.max_manifest_bytes(), "manifest")
        sig: bytes | None = None
        cert: bytes | None = None
        if not self.insecure_skip_verify:
            try:
                sig = get(spec.sig_uri, MAX_SIGNATURE_BYTES, "manifest signature")
            except DatasetUnavailable as exc:
                if exc.reason != "not-found":
                    raise
                raise DatasetRefused(
                    f"dataset {spec.name} refused: the manifest is unsigned ({spec.sig_uri} is "
                    "not there); sign it with keystonectl manifest sign",
                    dataset=spec.name,
                    reason="missing-signature",
                ) from exc
            if spec.cert_uri:
                cert = get(spec.cert_uri, MAX_CERT_BYTES, "signing certificate")
        return Documents(body, sig, cert, source=spec.manifest)

    # --- steps 2 and 3 ------------------------------------------------------------------------

    def verify(self, spec: DatasetSpec, docs: Documents) -> _manifest.Manifest:
        """Check the signature (unless skipped) and parse the manifest.

        Raises:
            DatasetRefused: unsigned, no trust bundle, no certificate, bad signature or chain,
                expired certificate, or an invalid document.
        """
        # lazy: signature checks load cryptography, only for a manifest to verify
        from keystone.runtime.signing import SignatureRejected

        def refuse(message: str, reason: str) -> DatasetRefused:
            return DatasetRefused(
                f"dataset {spec.name} refused: {message}", dataset=spec.name, reason=reason
            )

        try:
            at = self.verification_time()
        except KeystoneError as exc:
            # KEYSTONE_CLOCK_POLICY=strict with the clock behind: NTP clears it, so retry later.
            raise DatasetUnavailable(
                f"dataset {spec.name}: certificates cannot be judged now: {exc}",
                dataset=spec.name,
                reason="clock-behind",
            ) from exc
        with tempfile.TemporaryDirectory(prefix="keystone-manifest-") as tmp:
            path = Path(tmp) / "manifest.toml"
            path.write_bytes(docs.manifest)
            try:
                if self.insecure_skip_verify:
                    return _manifest.parse_manifest(docs.manifest, source=docs.source or None)
                if self.trust_bundle is None:
                    raise refuse(
                        "no trust bundle is configured to check its manifest with; set "
                        "KEYSTONE_TRUST_BUNDLE (or --insecure-skip-verify for development)",
                        "no-trust-bundle",
                    )
                if not docs.signature:
                    raise refuse("the manifest is unsigned", "missing-signature")
                (Path(tmp) / "manifest.toml.sig").write_bytes(docs.signature)
                cert: Path | None = None
                if docs.certificate:
                    cert = Path(tmp) / "leaf.pem"
                    cert.write_bytes(docs.certificate)
                elif self.environ.get("KEYSTONE_LEAF_CERT"):
                    cert = Path(self.environ["KEYSTONE_LEAF_CERT"])
                if cert is None:
                    raise refuse(
                        "no certificate for the manifest signature (set cert_uri or "
                        "KEYSTONE_LEAF_CERT)",
                        "no-certificate",
                    )
                return _manifest.verify_manifest(
                    path,
                    trust_bundle=self.trust_bundle,
                    cert=cert,
                    at=at,
                    environ={},
                )
            except SignatureRejected as exc:
                raise refuse(f"its manifest signature does not verify: {exc}", exc.reason) from exc
            except _manifest.ManifestError as exc:
                raise refuse(f"invalid manifest: {exc}", "bad-manifest") from exc
            except (UsageError, OSError) as exc:
                raise refuse(f"cannot check its manifest: {exc}", "bad-certificate") from exc

    def check_fresh(self, spec: DatasetSpec, m: _manifest.Manifest) -> bool:
        """Apply the anti-replay rule; return False when ``m`` is the document already active.

        Raises:
            DatasetRefused: ``replayed`` (not newer than the accepted one) or ``rolled-back``.
        """
        state = self.store.load_state(spec.name)
        if m.published == state.accepted_published and m.artifact.sha256 == state.accepted_sha256:
            bad = state.is_bad(m.published, m.artifact.sha256)
            if bad is not None:
                raise DatasetRefused(
                    f"dataset {spec.name} refused: version {m.version} published "
                    f"{_manifest.format_time(m.published)} was rolled back on this device "
                    f"({bad.reason}); publish a newer one",
                    dataset=spec.name,
                    reason="rolled-back",
                )
        else:
            try:
                _manifest.check_not_replayed(m, state.accepted_published)
            except _manifest.ManifestReplayed as exc:
                raise DatasetRefused(
                    f"dataset {spec.name} refused: {exc}", dataset=spec.name, reason="replayed"
                ) from exc
        # Already serving these bytes under this label (also after a crash between the switch
        # and the record): nothing to stage.
        active = self.store.active(spec.name)
        record = state.versions.get(active)
        return not (
            active == m.version and record is not None and record.sha256 == m.artifact.sha256
        )

    # --- steps 4 and 5 ------------------------------------------------------------------------

    def stage(self, spec: DatasetSpec, m: _manifest.Manifest, *, payload_uri: str) -> str:
        """Fetch and verify the payload, then build its version directory; return the version.

        Raises:
            DatasetRefused: a digest mismatch, an unsafe archive, an unusable version label.
            DatasetUnavailable: the payload could not be fetched.
        """
        why = check_name(m.version)
        if why:
            raise DatasetRefused(
                f"dataset {spec.name} refused: manifest version {m.version!r} cannot name a "
                f"directory: {why}",
                dataset=spec.name,
                reason="bad-version",
            )
        with tempfile.TemporaryDirectory(prefix="keystone-dataset-", dir=self._tmp_root(spec)) as t:
            patched = self._try_delta(spec, m, Path(t)) if payload_uri == m.artifact.uri else None
            # A rebuilt tar goes through the same digest check as a download.
            payload = self.payloads.fetch(spec, str(patched or payload_uri), m.artifact.sha256)
        try:
            self.store.place(
                spec.name,
                m.version,
                payload,
                file_name=artifact_name(m.artifact.uri),
                limits=self.limits,
            )
        except ArchiveRefused as exc:
            raise DatasetRefused(
                f"dataset {spec.name}: {exc}", dataset=spec.name, reason="bad-archive"
            ) from exc
        except ValidationError as exc:
            raise DatasetRefused(str(exc), dataset=spec.name, reason="bad-version") from exc
        return m.version

    def _tmp_root(self, spec: DatasetSpec) -> Path:
        root = self.store.cache_dir(spec.name)
        root.mkdir(parents=True, exist_ok=True)
        return root

    def _try_delta(self, spec: DatasetSpec, m: _manifest.Manifest, tmp: Path) -> Path | None:
        """Rebuild the payload from the active version's and a patch; None: download it whole.

        Only for a manifest with ``[delta]`` whose payload is an uncompressed tar (the patch
        turns one tar into the next, both named by their SHA-256, Go's route), when the active
        version's payload is still cached. Every failure falls back to the full download.
        """
        if m.delta is None:
            return None
        state = self.store.load_state(spec.name)
        record = state.versions.get(self.store.active(spec.name))
        if record is None:
            return None
        base = self.store.cache_dir(spec.name) / "sha256" / record.sha256
        if not base.is_file():
            return None
        from keystone import delta  # lazy: bsdiff4 and zstandard load only for a patch

        outcome = delta.fetch_delta(
            delta.DeltaSpec(
                server=m.delta.server,
                sha256=m.artifact.sha256,
                format=m.delta.format or delta.DELTA_FORMAT,
            ),
            base,
            tmp / "payload.tar",
            full_bytes=m.artifact.size or None,
            headers=spec.headers,
            attempts=1,
            label=f"dataset {spec.name} {m.version}",
        )
        return outcome.path if outcome.applied else None

    def resolve(
        self, spec: DatasetSpec, docs: Documents | None = None, *, payload_uri: str | None = None
    ) -> Staged:
        """Steps 1 to 5: fetch (unless ``docs`` are given), verify, refuse replays, stage.

        Args:
            spec: the dataset.
            docs: documents already in hand (a bundle); fetched from the spec when None.
            payload_uri: where the payload is read from instead of the manifest's uri (a
                bundle's local file); its digest is checked the same way.

        Raises:
            DatasetRefused, DatasetUnavailable.
        """
        if docs is None:
            docs = self.fetch_documents(spec)
        m = self.verify(spec, docs)
        if not self.check_fresh(spec, m):
            return Staged(m, m.version, changed=False)
        if self.observe_published is not None:
            # After the signature and the replay rule, never before (Go's clock.Advance).
            with contextlib.suppress(OSError, KeystoneError):
                self.observe_published(m.published)
        version = self.stage(spec, m, payload_uri=payload_uri or m.artifact.uri)
        return Staged(m, version, changed=True)

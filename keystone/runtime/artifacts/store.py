"""The content-addressed artifact cache: prepare (fetch, verify, sign-check, unpack), install, GC.

::

    runtime/artifacts/
        sha256/<hex>        the blobs (read-only)
        unpacked/<hex>/     the unpacked tree of an archive (read-only, reused by a rollback)
        meta/<hex>/         cached signature and certificate files, the unpacked size
        tmp/                downloads in progress
        .lock               shared by prepare, exclusive for GC

Only a verified file is renamed into the cache, under its hash.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator, Set
from datetime import UTC, datetime
from pathlib import Path

from loguru import logger

from keystone import delta as _delta
from keystone.errors import UsageError
from keystone.runtime.archive import (
    ArchiveLimits,
    ArchiveRefused,
    remove_tree,
    unpack,
)
from keystone.runtime.artifacts.download import Downloader, Fetch, Sink
from keystone.runtime.artifacts.files import (
    ensure_real_dir,
    fsync_dir_quietly,
    hash_file,
    place_file,
    place_symlink,
)
from keystone.runtime.artifacts.model import (
    ArtifactArchiveError,
    ArtifactDownloadError,
    ArtifactLike,
    ArtifactRefusedError,
    GcReport,
    PreparedArtifact,
)
from keystone.runtime.artifacts.policy import (
    CHUNK,
    HEX64,
    MAX_CERT_BYTES,
    MAX_SIGNATURE_BYTES,
    ArtifactPolicy,
    artifact_name,
    locate,
    normalize_sha256,
    redact_uri,
)
from keystone.runtime.clock import ClockBehind, TrustedClock
from keystone.runtime.signing import (
    SignatureCheck,
    SignatureRejected,
    load_certificates,
    verify_signature,
)
from keystone.state import write_json

# --- the store ----------------------------------------------------------------------------------


class ArtifactStore:
    """Fetch, verify, cache, unpack, install and collect artifacts under one policy.

    Each :meth:`prepare` opens its HTTP client and closes it before returning, so a store holds
    no sockets between calls; the context manager form is kept for symmetry.

    Args:
        policy: where and how.
        wall_clock: the system clock for certificate expiry (a seam for tests).
        monotonic: the clock for deadlines and throughput (a seam for tests).
        delta_wait: how to wait before asking a delta server again for a patch it is still
            computing (a seam for tests).
    """

    def __init__(
        self,
        policy: ArtifactPolicy,
        *,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        delta_wait: Callable[[float], None] = time.sleep,
    ) -> None:
        self.policy = policy
        self._delta_wait = delta_wait
        self.root = policy.cache_dir
        self._wall = wall_clock
        self._downloader = Downloader(policy, monotonic)

    def __enter__(self) -> ArtifactStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP client if one is open (prepare closes its own)."""
        self._downloader.close()

    # layout
    def blob_path(self, sha: str) -> Path:
        """Where the blob of ``sha`` lives (whether or not it is cached)."""
        return self.root / "sha256" / sha

    def unpacked_path(self, sha: str) -> Path:
        """Where the unpacked tree of ``sha`` lives."""
        return self.root / "unpacked" / sha

    def _meta(self, sha: str) -> Path:
        return self.root / "meta" / sha

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    # prepare
    def prepare(self, artifact: ArtifactLike, *, component: str) -> PreparedArtifact:
        """Fetch (or find in the cache), verify and, if asked, unpack one artifact.

        Nothing unverified enters the cache. A cached blob whose hash matches its pin is never
        fetched again (it is re-hashed, so a damaged cache file is fetched afresh).

        Raises:
            ArtifactRefusedError: hash, signature, trust, size or policy (names the component,
                the URI and the reason).
            ArtifactArchiveError: an unsafe or damaged archive.
            ArtifactDownloadError: the download failed after its retries (retryable).
        """
        label = f"artifact {redact_uri(artifact.uri)} of component {component!r}"

        def refuse(message: str, reason: str) -> ArtifactRefusedError:
            return ArtifactRefusedError(
                f"{label}: {message}",
                reason=reason,
                component=component,
                uri=redact_uri(artifact.uri),
            )

        try:
            pinned = normalize_sha256(artifact.sha256)
        except ValueError as exc:
            raise refuse(f"{exc}; fix the recipe's sha256", "bad-pin") from None
        insecure = self.policy.insecure_skip_verify
        if pinned is None and self.policy.require_sha256:
            if not insecure:
                raise refuse(
                    "the recipe pins no sha256, and recipes from a signed revision must (the pin "
                    'is the root of trust); add sha256 = "<hex>" to the [[artifacts]] entry',
                    "missing-pin",
                )
            logger.warning(
                "{}: no sha256 pin, accepted only because of KEYSTONE_INSECURE_SKIP_VERIFY "
                "(--insecure-skip-verify): NOT authenticated; development only",
                label,
            )
        if not artifact.sig_uri and not self.policy.allow_unsigned:
            if not insecure:
                raise refuse(
                    "has no sig_uri, and this agent accepts signed artifacts only "
                    "(allow_unsigned_artifacts = false); sign it (docs/trust.md) and add sig_uri",
                    "missing-signature",
                )
            logger.warning(
                "{}: no signature, accepted only because of KEYSTONE_INSECURE_SKIP_VERIFY "
                "(--insecure-skip-verify): NOT authenticated; development only",
                label,
            )
        # One HTTP client per prepare (artifact, signature, certificate share its connections);
        # closing it here leaves no socket open between syncs.
        with self._locked(fcntl.LOCK_SH), contextlib.closing(self._downloader):
            patched, no_delta = self._from_delta(artifact, pinned, label, component)
            if patched is not None:
                return patched
            sha, size, tmp = self._obtain(artifact, pinned, label, component)
            try:
                if pinned is not None and sha != pinned:
                    raise refuse(
                        f"sha256 mismatch: the recipe pins {pinned}, the bytes hash to {sha} "
                        "(a corrupted or tampered file, or a stale pin)",
                        "hash-mismatch",
                    )
                signed_by = None
                if artifact.sig_uri:
                    signed_by = self._verify_signature(artifact, sha, label, component)
                fetched = tmp is not None
                if tmp is not None:
                    blob = self.blob_path(sha)
                    blob.parent.mkdir(parents=True, exist_ok=True)
                    os.chmod(tmp, 0o444)
                    os.replace(tmp, blob)
                    tmp = None
                    fsync_dir_quietly(blob.parent)
                    self._record_origin(sha, component, artifact.uri)
            finally:
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
            unpacked = (
                self._unpack(sha, label, component, artifact.uri) if artifact.unpack else None
            )
            self._touch(sha)
        return PreparedArtifact(
            sha256=sha,
            path=self.blob_path(sha),
            size=size,
            name=artifact_name(artifact.uri),
            unpacked=unpacked,
            signed_by=signed_by,
            via="full" if fetched else "cache",
            wire_bytes=size if fetched else 0,
            delta_fallback=no_delta if fetched else "",
        )

    # delta updates
    def _record_origin(self, sha: str, component: str, uri: str) -> None:
        # Which component a blob was fetched for: a later version of it finds its delta base here.
        meta = self._meta(sha)
        with contextlib.suppress(OSError):
            meta.mkdir(parents=True, exist_ok=True)
            write_json(meta / "origin.json", {"component": component, "name": artifact_name(uri)})

    def _delta_base(self, component: str, exclude: str) -> Path | None:
        """The newest cached ``.tar.gz``/``.tgz`` blob fetched for ``component`` (Go: one candidate)."""
        best: tuple[float, Path] | None = None
        meta_root = self.root / "meta"
        if not meta_root.is_dir():
            return None
        for sha in os.listdir(meta_root):
            if sha == exclude or not HEX64.match(sha):
                continue
            try:
                origin = json.loads((meta_root / sha / "origin.json").read_text(encoding="utf-8"))
                blob = self.blob_path(sha)
                mtime = blob.stat().st_mtime
            except (OSError, ValueError):
                continue
            if not isinstance(origin, dict) or origin.get("component") != component:
                continue
            if not _delta.is_gzip_name(str(origin.get("name") or "")):
                continue
            if best is None or mtime > best[0]:
                best = (mtime, blob)
        return None if best is None else best[1]

    def _from_delta(
        self, artifact: ArtifactLike, pinned: str | None, label: str, component: str
    ) -> tuple[PreparedArtifact | None, str]:
        """Prepare from a patch of the previous version's tar, or ``(None, why not)``: download it.

        Taken (as in Go) only for an unpacked archive whose recipe declares ``[artifacts.delta]``
        and which is not cached. The patched tar is verified against the recipe's
        ``delta.sha256``: that digest, in a recipe the agent verified, is what vouches for the
        bytes on this path (the archive's own pin and signature are of the ``.tar.gz``, which a
        patch never reproduces). Every failure falls back to the full download.
        """
        spec: _delta.DeltaSpec | None = getattr(artifact, "delta", None)
        if spec is None:
            return None, ""
        if not artifact.unpack:
            logger.info("{}: delta skipped: only unpacked archives are patched", label)
            return None, "only unpacked archives are patched"
        if pinned is None:
            return None, "the artifact pins no sha256 to cache the patched tree under"
        tree = self.unpacked_path(pinned)
        marker = self._meta(pinned) / "delta.json"
        if self.blob_path(pinned).is_file():
            return None, ""  # cached whole: the ordinary path re-hashes it
        if tree.is_dir():
            try:
                made = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None, ""
            if isinstance(made, dict) and made.get("tar_sha256") == spec.sha256:
                self._touch(pinned)
                return self._delta_prepared(artifact, pinned, tree, int(made.get("bytes") or 0)), ""
            return None, ""
        base = self._delta_base(component, pinned)
        work = self.root / "tmp" / f"delta-{secrets.token_hex(8)}"
        work.mkdir(parents=True, exist_ok=True)
        try:
            base_tar: Path | None = None
            if base is not None:
                try:
                    base_tar = work / "base.tar"
                    # Blobs are named by their hash; the link gives the decompressor the name.
                    named = work / "base.tar.gz"
                    named.symlink_to(base)
                    _delta.decompress_to_tar(
                        named, base_tar, max_bytes=self.policy.max_extract_bytes
                    )
                except _delta.DeltaError as exc:
                    logger.info(
                        "{}: delta unavailable ({}: {}); downloading the whole artifact",
                        label,
                        exc.reason,
                        exc,
                    )
                    return None, f"{exc.reason}: {exc}"
            outcome = _delta.fetch_delta(
                spec,
                base_tar,
                work / "target.tar",
                full_bytes=base.stat().st_size if base is not None else None,
                headers=artifact.headers,
                wait=self._delta_wait,
                label=label,
            )
            if not outcome.applied or outcome.path is None:
                return None, f"{outcome.reason}: {outcome.message}"
            limits = ArchiveLimits(
                max_bytes=self.policy.max_extract_bytes, max_files=self.policy.max_files
            )
            try:
                result = unpack(outcome.path, tree, limits, what=f"{label} (patched)")
            except FileExistsError:
                pass  # another process made the same tree meanwhile
            except ArchiveRefused as exc:
                logger.warning(
                    "{}: the patched tar does not unpack ({}); downloading the whole artifact",
                    label,
                    exc,
                )
                return None, f"the patched tar does not unpack: {exc}"
            else:
                meta = self._meta(pinned)
                meta.mkdir(parents=True, exist_ok=True)
                write_json(meta / "unpacked.json", {"bytes": result.bytes, "files": result.files})
                write_json(
                    marker,
                    {
                        "tar_sha256": spec.sha256,
                        "bytes": outcome.target_bytes,
                        "patch_bytes": outcome.patch_bytes,
                        "base": base.name if base is not None else None,
                    },
                )
            logger.info(
                "{}: installed from a delta patch: {} B on the wire, ~{} B saved",
                label,
                outcome.patch_bytes,
                outcome.saved_bytes,
            )
            self._touch(pinned)
            return self._delta_prepared(
                artifact,
                pinned,
                tree,
                outcome.target_bytes,
                wire=outcome.patch_bytes,
                saved=outcome.saved_bytes,
            ), ""
        finally:
            remove_tree(work)

    def _delta_prepared(
        self,
        artifact: ArtifactLike,
        sha: str,
        tree: Path,
        size: int,
        *,
        wire: int = 0,
        saved: int = 0,
    ) -> PreparedArtifact:
        return PreparedArtifact(
            sha256=sha,
            path=self.blob_path(sha),
            size=size,
            name=artifact_name(artifact.uri),
            unpacked=tree,
            via="delta" if wire else "cache",
            wire_bytes=wire,
            saved_bytes=saved,
        )

    def _obtain(
        self, artifact: ArtifactLike, pinned: str | None, label: str, component: str
    ) -> tuple[str, int, Path | None]:
        """Return ``(sha, size, temp file or None for a cache hit)``."""
        if pinned is not None:
            blob = self.blob_path(pinned)
            if blob.is_file():
                sha, size = hash_file(blob)
                if sha == pinned:
                    logger.debug("{}: cache hit {}", label, pinned)
                    return sha, size, None
                logger.warning(
                    "{}: cached blob {} is damaged (hashes to {}); fetching it again",
                    label,
                    pinned,
                    sha,
                )
                blob.unlink(missing_ok=True)
        tmp, sha, size = self._fetch_to_temp(
            artifact.uri, artifact, label, component, limit=self.policy.max_bytes
        )
        return sha, size, tmp

    def _fetch_to_temp(
        self,
        uri: str,
        artifact: ArtifactLike,
        label: str,
        component: str,
        *,
        limit: int,
    ) -> tuple[Path, str, int]:
        try:
            location = locate(uri, self.policy.repo_root)
        except ValueError as exc:
            reason, message = exc.args
            raise ArtifactRefusedError(
                f"{label}: {redact_uri(uri)}: {message}",
                reason=reason,
                component=component,
                uri=redact_uri(uri),
            ) from None
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        path = tmp_dir / f"dl-{secrets.token_hex(8)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w+b") as fh:
            sink = Sink(fh)
            try:
                if location.kind == "http":
                    assert location.url is not None
                    job = Fetch(
                        url=location.url,
                        headers=dict(artifact.headers),
                        token=artifact.github_token or self.policy.github_token,
                        limit=limit,
                        label=label if uri == artifact.uri else f"{label}: {redact_uri(uri)}",
                        component=component,
                    )
                    self._downloader.download(job, sink)
                else:
                    assert location.path is not None
                    self._copy_local(location.path, sink, limit, label, component, uri)
                fh.flush()
            except OSError as exc:  # disk full, a medium pulled out mid-copy
                path.unlink(missing_ok=True)
                raise ArtifactDownloadError(
                    f"{label}: I/O error while fetching into the cache {self.root} "
                    f"({exc.strerror or exc}); it is tried again at the next sync or apply",
                    reason="io",
                    component=component,
                    uri=redact_uri(uri),
                ) from exc
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        return path, sink.hasher.hexdigest(), sink.size

    def _copy_local(
        self, path: Path, sink: Sink, limit: int, label: str, component: str, uri: str
    ) -> None:
        try:
            src = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError as exc:
            raise ArtifactDownloadError(
                f"{label}: {path} does not exist (is the medium mounted, is the repo checked out?)",
                reason="not-found",
                component=component,
                uri=redact_uri(uri),
            ) from exc
        except OSError as exc:
            raise ArtifactDownloadError(
                f"{label}: cannot read {path} ({exc.strerror})",
                reason="io",
                component=component,
                uri=redact_uri(uri),
            ) from exc
        with src:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                raise ArtifactRefusedError(
                    f"{label}: {path} is not a regular file",
                    reason="unsupported-uri",
                    component=component,
                    uri=redact_uri(uri),
                )
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while True:
                n = src.readinto(buf)
                if not n:
                    break
                if sink.size + n > limit:
                    raise ArtifactRefusedError(
                        f"{label}: {path} is larger than the bound of {limit} bytes "
                        "(KEYSTONE_ARTIFACT_MAX_BYTES)",
                        reason="too-large",
                        component=component,
                        uri=redact_uri(uri),
                    )
                sink.hasher.update(view[:n])
                sink.fh.write(view[:n])
                sink.size += n

    # signatures
    def _aux(
        self,
        sha: str,
        uri: str,
        kind: str,
        limit: int,
        artifact: ArtifactLike,
        label: str,
        component: str,
    ) -> tuple[bytes, bool]:
        """Return a signature or certificate file (cached beside the blob) and whether cached."""
        key = hashlib.sha256(uri.encode()).hexdigest()[:16]
        cached = self._meta(sha) / f"{kind}-{key}"
        if cached.is_file():
            return cached.read_bytes(), True
        tmp, _sha, _size = self._fetch_to_temp(uri, artifact, label, component, limit=limit)
        try:
            data = tmp.read_bytes()
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
        return data, False

    def _drop_aux(self, sha: str) -> None:
        meta = self._meta(sha)
        for path in meta.glob("sig-*"):
            path.unlink(missing_ok=True)
        for path in meta.glob("cert-*"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            meta.rmdir()  # only if nothing else (the unpacked size) is left in it

    def _verify_signature(
        self, artifact: ArtifactLike, sha: str, label: str, component: str
    ) -> str:
        assert artifact.sig_uri is not None

        def refuse(message: str, reason: str) -> ArtifactRefusedError:
            return ArtifactRefusedError(
                f"{label}: {message}",
                reason=reason,
                component=component,
                uri=redact_uri(artifact.uri),
            )

        policy = self.policy
        if artifact.cert_uri is None and policy.leaf_cert is None:
            raise refuse(
                "has a sig_uri but no certificate to check it with: add cert_uri to the recipe or "
                "set KEYSTONE_LEAF_CERT",
                "no-certificate",
            )
        if policy.trust_bundle is None and artifact.cert_uri is not None:
            raise refuse(
                "its certificate comes from cert_uri, but no trust bundle is configured to judge "
                "it: set KEYSTONE_TRUST_BUNDLE to your CA bundle (docs/trust.md)",
                "no-trust-bundle",
            )
        roots = None
        if policy.trust_bundle is not None:
            try:
                bundle = policy.trust_bundle.read_bytes()
            except OSError as exc:
                raise UsageError(
                    f"KEYSTONE_TRUST_BUNDLE={policy.trust_bundle}: cannot read it ({exc.strerror})"
                ) from exc
            try:
                roots = tuple(load_certificates(bundle, what=f"trust bundle {policy.trust_bundle}"))
            except SignatureRejected as exc:
                raise UsageError(f"KEYSTONE_TRUST_BUNDLE: {exc}") from exc
        try:
            reading = TrustedClock(
                policy.state_dir, policy.clock_policy, wall=self._wall
            ).verification_time()
        except ClockBehind as exc:
            raise refuse(f"signature not judged: {exc}", "clock-behind") from exc
        at = datetime.fromtimestamp(reading.now, UTC)
        sig_label = redact_uri(artifact.sig_uri)
        for attempt in (1, 2):
            sig, sig_cached = self._aux(
                sha,
                artifact.sig_uri,
                "sig",
                MAX_SIGNATURE_BYTES,
                artifact,
                label,
                component,
            )
            cert_cached = False
            if artifact.cert_uri is not None:
                cert_data, cert_cached = self._aux(
                    sha,
                    artifact.cert_uri,
                    "cert",
                    MAX_CERT_BYTES,
                    artifact,
                    label,
                    component,
                )
                cert_what = f"certificate {redact_uri(artifact.cert_uri)}"
            else:
                assert policy.leaf_cert is not None
                try:
                    cert_data = policy.leaf_cert.read_bytes()
                except OSError as exc:
                    raise UsageError(
                        f"KEYSTONE_LEAF_CERT={policy.leaf_cert}: cannot read it ({exc.strerror})"
                    ) from exc
                cert_what = f"certificate {policy.leaf_cert}"
            try:
                chain = tuple(load_certificates(cert_data, what=cert_what))
                return verify_signature(
                    bytes.fromhex(sha),
                    sig,
                    SignatureCheck(chain, roots, at, reading.describe()),
                )
            except SignatureRejected as exc:
                if attempt == 1 and (sig_cached or cert_cached):
                    # The publisher may have re-signed since we cached the files: fetch afresh.
                    self._drop_aux(sha)
                    continue
                # Keep no files of a refused signature: a fixed one at the same URI is fetched.
                self._drop_aux(sha)
                raise refuse(f"signature {sig_label} refused: {exc}", exc.reason) from exc
        raise AssertionError("unreachable")

    # unpack
    def _unpack(self, sha: str, label: str, component: str, uri: str) -> Path:
        dest = self.unpacked_path(sha)
        if dest.is_dir():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        limits = ArchiveLimits(
            max_bytes=self.policy.max_extract_bytes, max_files=self.policy.max_files
        )
        try:
            result = unpack(self.blob_path(sha), dest, limits, what=f"{label}")
        except FileExistsError:
            return dest  # another process unpacked it meanwhile: same bytes, same tree
        except ArchiveRefused as exc:
            raise ArtifactArchiveError(
                str(exc), reason=exc.reason, component=component, uri=redact_uri(uri)
            ) from exc
        meta = self._meta(sha)
        meta.mkdir(parents=True, exist_ok=True)
        write_json(meta / "unpacked.json", {"bytes": result.bytes, "files": result.files})
        return dest

    def _touch(self, sha: str) -> None:
        now = self._wall()
        for path in (self.blob_path(sha), self.unpacked_path(sha)):
            with contextlib.suppress(OSError):
                os.utime(path, (now, now), follow_symlinks=False)

    # install
    def install(self, prepared: PreparedArtifact, workdir: Path) -> None:
        """Make a prepared artifact available in a component work dir.

        An unpacked tree's contents are copied into ``workdir`` (merged; same names replaced);
        a plain artifact is copied as ``workdir/<name>``. Copies, not hard links: a hard link
        shares the inode, so an install script's ``chmod``/``chown`` or a component writing
        its own file would change the cached tree that a rollback reuses. ``copy_file_range``
        makes the copy in the kernel, and a reflink on filesystems that can (btrfs, XFS).
        Existing symlinks in the work dir are replaced, never followed.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        if prepared.unpacked is not None:
            self._install_tree(prepared.unpacked, workdir)
        else:
            place_file(prepared.path, workdir, prepared.name, 0o644)
        fsync_dir_quietly(workdir)

    def _install_tree(self, tree: Path, workdir: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(tree):
            rel = Path(dirpath).relative_to(tree)
            target_dir = workdir / rel
            ensure_real_dir(target_dir)
            for name in list(dirnames):
                src = Path(dirpath) / name
                if src.is_symlink():
                    dirnames.remove(name)
                    place_symlink(os.readlink(src), target_dir, name)
            for name in filenames:
                src = Path(dirpath) / name
                if src.is_symlink():
                    place_symlink(os.readlink(src), target_dir, name)
                else:
                    mode = (src.stat().st_mode & 0o555) | 0o200
                    place_file(src, target_dir, name, mode)

    # gc
    def _entries(self) -> list[tuple[str, int, float]]:
        """``(sha, bytes, last_used)`` for every cached blob or tree."""
        shas: set[str] = set()
        for sub in ("sha256", "unpacked"):
            d = self.root / sub
            if d.is_dir():
                shas.update(n for n in os.listdir(d) if HEX64.match(n))
        out = []
        for sha in shas:
            size = 0
            used = 0.0
            blob = self.blob_path(sha)
            with contextlib.suppress(OSError):
                st = blob.stat()
                size += st.st_size
                used = max(used, st.st_mtime)
            tree = self.unpacked_path(sha)
            if tree.is_dir():
                size += self._tree_bytes(sha)
                with contextlib.suppress(OSError):
                    used = max(used, tree.lstat().st_mtime)
            out.append((sha, size, used))
        return out

    def _tree_bytes(self, sha: str) -> int:
        try:
            data = json.loads((self._meta(sha) / "unpacked.json").read_text(encoding="utf-8"))
            return int(data["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            total = 0
            for dirpath, _dirs, files in os.walk(self.unpacked_path(sha)):
                for name in files:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(dirpath, name)).st_size
            return total

    def cache_bytes(self) -> int:
        """Bytes the cache holds (blobs and unpacked trees), for the cache-size metric."""
        return sum(size for _sha, size, _used in self._entries())

    def cached(self) -> list[str]:
        """The sha256s whose blob or unpacked tree is in the cache."""
        return sorted(sha for sha, _size, _used in self._entries())

    def gc(self, keep: Set[str]) -> GcReport:
        """Evict least recently used artifacts until the cache fits its limit.

        Never evicts a sha256 in ``keep`` (what the applied and the last known-good plans need);
        leftovers of interrupted downloads and unpacks are removed too.
        """
        pinned = {s for s in (normalize_sha256(k) for k in keep) if s is not None}
        evicted: list[str] = []
        freed = 0
        with self._locked(fcntl.LOCK_EX):
            tmp = self.root / "tmp"
            if tmp.is_dir():
                for name in os.listdir(tmp):
                    with contextlib.suppress(OSError):
                        (tmp / name).unlink()
            unpacked_root = self.root / "unpacked"
            if unpacked_root.is_dir():
                for name in os.listdir(unpacked_root):
                    if name.startswith(".staging-"):
                        remove_tree(unpacked_root / name)
            meta_root = self.root / "meta"
            if meta_root.is_dir():
                for name in os.listdir(meta_root):
                    if not self.blob_path(name).exists() and not self.unpacked_path(name).exists():
                        remove_tree(meta_root / name)  # signature files of nothing cached
            entries = self._entries()
            total = sum(size for _sha, size, _used in entries)
            limit = self.policy.cache_limit_bytes
            for sha, size, _used in sorted(entries, key=lambda e: (e[2], e[0])):
                if total <= limit:
                    break
                if sha in pinned:
                    continue
                self._evict(sha)
                evicted.append(sha)
                freed += size
                total -= size
        if evicted:
            logger.info(
                "artifact cache GC: evicted {} artifact(s), {} bytes",
                len(evicted),
                freed,
            )
        return GcReport(
            evicted=tuple(evicted),
            freed_bytes=freed,
            remaining_bytes=total,
            limit_bytes=limit,
            over_limit=total > limit,
        )

    def _evict(self, sha: str) -> None:
        self.blob_path(sha).unlink(missing_ok=True)
        remove_tree(self.unpacked_path(sha))
        remove_tree(self._meta(sha))

"""Delta artifact updates: the Go Keystone's ``bsdiff+zstd`` patches, applied and made.

The wire format (Go ``internal/artifact/delta.go``, ``carlosprados/ota-updater`` ``pkg/delta``):
a patch is a zstd frame whose content is a classic bsdiff 4 patch (``BSDIFF40``: a 32-byte
header ``magic, len(bzip2 ctrl), len(bzip2 diff), len(new)`` as sign-magnitude little-endian
int64, then three bzip2 streams: control triples, diff bytes, extra bytes), the format
``gabstv/go-bsdiff`` and the ``bsdiff4`` library share. It transforms the **uncompressed tar**
of one version into the uncompressed tar of the next; both ends name them by the SHA-256 of that
tar, and the patch lives at ``GET {server}/delta/{from_sha256}/{to_sha256}`` (``200``
``application/octet-stream``; ``404`` when the server has no patch yet: it may be computing
one, so the client asks again a few times).

Memory: :func:`apply_patch` streams. The zstd layer is decompressed to a file, the three bzip2
blocks are read as streams, the base is read where the control triples point, and the byte-wise
additions are done by ``bsdiff4``'s C core one bounded piece of a control triple at a time, the
result going to disk as it is hashed. The base is read with ``pread`` piece by piece rather than
memory-mapped: mapped pages count in the process's RSS, read ones stay in the page cache.
``bsdiff4.patch`` would hold the base, the decompressed diff block (about the size of the new
file) and the new file at once.

``bsdiff4`` and ``zstandard`` are imported inside the functions that use them, and without them
every delta falls back to the full download. The resident agent loads none of this module: what
recipes need of it (``[artifacts.delta]``) is :mod:`keystone.deltaspec`.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import urlsplit, urlunsplit

from loguru import logger

# The spec half lives in keystone.deltaspec (no patcher for the resident agent); its names stay
# importable from here.
from keystone.deltaspec import DELTA_FORMAT as DELTA_FORMAT
from keystone.deltaspec import DeltaSpec as DeltaSpec
from keystone.deltaspec import absolute_http
from keystone.deltaspec import is_sha256_hex as is_sha256_hex
from keystone.deltaspec import parse_delta_table as parse_delta_table
from keystone.errors import KeystoneError

BSDIFF_MAGIC = b"BSDIFF40"
DEFAULT_MAX_BASE_BYTES = 256 << 20  # Go's KEYSTONE_DELTA_MAX_BASE_BYTES default
DEFAULT_MAX_OUTPUT_BYTES = 4 << 30
CHUNK = 4 << 20
_ZSTD_MAX_WINDOW = 1 << 27


class DeltaError(KeystoneError):
    """A delta that cannot be used; the caller downloads the whole artifact instead.

    Attributes:
        reason: ``no-base``, ``bad-input`` (a relative server, a malformed digest),
            ``too-large``, ``unsupported-format``, ``not-found``, ``http`` (another status),
            ``network``, ``timeout``, ``corrupt-patch``, ``digest-mismatch``, ``unavailable``
            (bsdiff4/zstandard not installed); :class:`DeltaOutcome` adds ``io`` (a local
            file that cannot be written or read).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message)


def delta_url(server: str, from_sha: str, to_sha: str) -> str:
    """``{server}/delta/{from}/{to}``, keeping a base path and not doubling a trailing slash.

    Raises:
        DeltaError: ``http`` for a relative server or digests that are not lowercase hex.
    """
    if not server or not absolute_http(server):
        raise DeltaError(f"delta server {server!r} must be an absolute URL", reason="bad-input")
    for what, sha in (("base", from_sha), ("target", to_sha)):
        if not is_sha256_hex(sha):
            raise DeltaError(
                f"{what} digest {sha!r} is not a sha256 hex digest", reason="bad-input"
            )
    parts = urlsplit(server)
    path = parts.path.rstrip("/") + f"/delta/{from_sha}/{to_sha}"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _libs() -> tuple[Any, Any]:
    # Heavy-ish C extensions, only needed when a delta is actually used or made.
    try:
        import bsdiff4.core
        import zstandard
    except ImportError as exc:
        raise DeltaError(
            f"delta updates need the bsdiff4 and zstandard packages ({exc.name} is missing)",
            reason="unavailable",
        ) from exc
    return bsdiff4.core, zstandard


def is_gzip_name(name: str) -> bool:
    """A name the base or a held version may be gzip-compressed under (``.tar.gz``, ``.tgz``)."""
    return name.endswith((".tar.gz", ".tgz"))


def open_tar_stream(path: Path) -> BinaryIO:
    """Open an archive as its uncompressed tar stream (``.tar.gz``/``.tgz`` are gunzipped)."""
    if is_gzip_name(Path(path).name):
        return cast(BinaryIO, gzip.open(path, "rb"))
    return open(path, "rb")


def decompress_to_tar(
    archive: Path, dest: Path, *, max_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
) -> str:
    """Write the uncompressed tar of ``archive`` to ``dest`` (streamed); return its SHA-256.

    Raises:
        DeltaError: ``too-large`` past ``max_bytes``; ``no-base`` when it does not decompress.
    """
    h = hashlib.sha256()
    total = 0
    try:
        with open_tar_stream(archive) as src, open(dest, "wb") as out:
            while block := src.read(1 << 20):
                total += len(block)
                if total > max_bytes:
                    raise DeltaError(
                        f"{archive} expands beyond {max_bytes} bytes", reason="too-large"
                    )
                h.update(block)
                out.write(block)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        with contextlib.suppress(OSError):
            os.unlink(dest)
        raise DeltaError(f"{archive} does not decompress: {exc}", reason="no-base") from exc
    except DeltaError:
        with contextlib.suppress(OSError):
            os.unlink(dest)
        raise
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    # Local, not runtime.signing's: the recipe model imports this module and must not reach
    # into the runtime.
    h = hashlib.sha256()
    with open(path, "rb") as src:
        while block := src.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def tar_sha256(path: Path) -> str:
    """The SHA-256 of an archive's uncompressed tar (what delta URLs name a version by)."""
    h = hashlib.sha256()
    with open_tar_stream(path) as src:
        while block := src.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class _Bz2Block:
    """One bzip2 block of a BSDIFF40 patch, read as a stream of exact-sized pieces."""

    def __init__(self, path: Path, offset: int, length: int, what: str) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._fh.seek(offset)
        self._left = length
        self._dec = bz2.BZ2Decompressor()
        self._what = what

    def close(self) -> None:
        self._fh.close()

    def read(self, n: int) -> bytes:
        parts: list[bytes] = []
        need = n
        while need:
            data = b""
            if self._dec.needs_input:
                if self._dec.eof or self._left <= 0:
                    raise DeltaError(
                        f"corrupt patch: the {self._what} block is short", reason="corrupt-patch"
                    )
                data = self._fh.read(min(1 << 16, self._left))
                if not data:
                    raise DeltaError("corrupt patch: truncated", reason="corrupt-patch")
                self._left -= len(data)
            elif self._dec.eof:
                raise DeltaError(
                    f"corrupt patch: the {self._what} block is short", reason="corrupt-patch"
                )
            try:
                piece = self._dec.decompress(data, max_length=need)
            except (OSError, EOFError, ValueError) as exc:
                raise DeltaError(
                    f"corrupt patch: the {self._what} block does not decompress ({exc})",
                    reason="corrupt-patch",
                ) from exc
            parts.append(piece)
            need -= len(piece)
        return b"".join(parts)


def _unzstd(patch: Path, dest: Path, *, max_bytes: int) -> None:
    _, zstandard = _libs()
    dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
    total = 0
    try:
        with open(patch, "rb") as src, open(dest, "wb") as out:
            reader = dctx.stream_reader(src, read_across_frames=True)
            while block := reader.read(1 << 20):
                total += len(block)
                if total > max_bytes:
                    raise DeltaError(
                        f"corrupt patch: it expands beyond {max_bytes} bytes",
                        reason="corrupt-patch",
                    )
                out.write(block)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"corrupt patch: not zstd ({exc})", reason="corrupt-patch") from exc


def apply_patch(
    base: Path,
    patch: Path,
    out: Path,
    want_sha256: str,
    *,
    max_output: int = DEFAULT_MAX_OUTPUT_BYTES,
    chunk: int = CHUNK,
) -> int:
    """Apply a ``bsdiff+zstd`` patch to the uncompressed tar ``base``, writing ``out`` if verified.

    Memory stays bounded by ``chunk`` (a few times it), whatever the artifact size: see the
    module docstring. ``out`` appears only when its SHA-256 is ``want_sha256``.

    Returns:
        The size of the result in bytes.

    Raises:
        DeltaError: ``corrupt-patch`` (not zstd, not BSDIFF40, truncated, impossible control
            values), ``too-large`` (the header announces more than ``max_output``),
            ``digest-mismatch`` (it applied, to something else), ``unavailable``.
    """
    core, _ = _libs()
    if not is_sha256_hex(want_sha256):
        raise DeltaError(
            f"declared digest {want_sha256!r} is not a sha256 hex digest", reason="bad-input"
        )
    out = Path(out)
    raw = out.with_name(out.name + ".bsdiff.part")
    part = out.with_name(out.name + ".part")
    try:
        _unzstd(patch, raw, max_bytes=max_output + (max_output >> 3) + (1 << 20))
        size = raw.stat().st_size
        with open(raw, "rb") as fh:
            header = fh.read(32)
        if len(header) < 32 or header[:8] != BSDIFF_MAGIC:
            raise DeltaError("corrupt patch: no BSDIFF40 header", reason="corrupt-patch")
        ctrl_len, diff_len, new_size = (core.decode_int64(header[i : i + 8]) for i in (8, 16, 24))
        if ctrl_len < 0 or diff_len < 0 or new_size < 0 or 32 + ctrl_len + diff_len > size:
            raise DeltaError("corrupt patch: impossible block lengths", reason="corrupt-patch")
        if new_size > max_output:
            raise DeltaError(
                f"the patch makes {new_size} bytes, over the {max_output}-byte bound",
                reason="too-large",
            )
        written = _apply_streams(
            core, Path(base), raw, part, ctrl_len, diff_len, size, new_size, chunk, want_sha256
        )
        os.replace(part, out)
        return written
    finally:
        for leftover in (raw, part):
            with contextlib.suppress(OSError):
                os.unlink(leftover)


def _apply_streams(
    core: Any,
    base: Path,
    raw: Path,
    part: Path,
    ctrl_len: int,
    diff_len: int,
    size: int,
    new_size: int,
    chunk: int,
    want_sha256: str,
) -> int:
    ctrl = _Bz2Block(raw, 32, ctrl_len, "control")
    diff = _Bz2Block(raw, 32 + ctrl_len, diff_len, "diff")
    extra = _Bz2Block(raw, 32 + ctrl_len + diff_len, size - 32 - ctrl_len - diff_len, "extra")
    h = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        for block in (ctrl, diff, extra):
            stack.callback(block.close)
        base_fh = stack.enter_context(open(base, "rb"))
        base_fd = base_fh.fileno()
        old_size = os.fstat(base_fd).st_size
        out = stack.enter_context(open(part, "wb"))
        newpos = oldpos = 0
        one = core.encode_int64(0)
        while newpos < new_size:
            triple = ctrl.read(24)
            x, y, z = (core.decode_int64(triple[i : i + 8]) for i in (0, 8, 16))
            if x < 0 or y < 0 or newpos + x + y > new_size:
                raise DeltaError("corrupt patch: a control triple overruns", reason="corrupt-patch")
            left = x
            while left:
                n = min(chunk, left)
                lo, hi = max(oldpos, 0), min(oldpos + n, old_size)
                # Bytes of the base outside it count as zero, as in bspatch; bsdiff4 pads a
                # short source with zeros at the end, so only a negative start needs padding.
                src = os.pread(base_fd, hi - lo, lo) if hi > lo else b""
                if oldpos < 0:
                    src = bytes(min(n, -oldpos)) + src
                try:
                    piece = core.patch(src, n, core.encode_int64(n) + one + one, diff.read(n), b"")
                except ValueError as exc:
                    raise DeltaError(f"corrupt patch: {exc}", reason="corrupt-patch") from exc
                h.update(piece)
                out.write(piece)
                oldpos += n
                left -= n
            left = y
            while left:
                n = min(chunk, left)
                piece = extra.read(n)
                h.update(piece)
                out.write(piece)
                left -= n
            newpos += x + y
            oldpos += z
    got = h.hexdigest()
    if got != want_sha256:
        raise DeltaError(
            f"the patched artifact is {got}, not the declared {want_sha256}: the patch, the "
            "base or the declared digest is wrong",
            reason="digest-mismatch",
        )
    return new_size


def make_patch(old: Path, new: Path, out: Path, *, level: int = 19) -> int:
    """Compute the ``bsdiff+zstd`` patch from ``old`` to ``new`` (tars, or .tar.gz read as tars).

    Diffing needs both versions and a suffix array in memory (about 17 times the old tar):
    the server runs it in a child process (``python -m keystone.delta diff``) and bounds the
    size it tries. Writes ``out`` atomically; returns its size.
    """
    _, zstandard = _libs()
    import bsdiff4  # heavy: only the server diffs

    with open_tar_stream(old) as fh:
        old_bytes = fh.read()
    with open_tar_stream(new) as fh:
        new_bytes = fh.read()
    raw = bsdiff4.diff(old_bytes, new_bytes)
    del old_bytes, new_bytes
    data = zstandard.ZstdCompressor(level=level).compress(raw)
    part = Path(out).with_name(Path(out).name + f".{os.getpid()}.part")
    with open(part, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, out)
    return len(data)


@dataclass(frozen=True)
class DeltaOutcome:
    """What :func:`fetch_delta` did.

    Attributes:
        applied: the target tar was reconstructed and verified at ``path``.
        path: the verified uncompressed tar, when applied.
        reason: why the full download is needed (a :class:`DeltaError` reason), when not.
        message: the human explanation.
        patch_bytes: bytes of patch received on the wire.
        target_bytes: the size of the reconstructed tar.
        saved_bytes: ``full_bytes`` (or ``target_bytes``) minus ``patch_bytes``, when applied.
    """

    applied: bool
    path: Path | None = None
    reason: str = ""
    message: str = ""
    patch_bytes: int = 0
    target_bytes: int = 0
    saved_bytes: int = 0


def _download(
    url: str,
    dest: Path,
    *,
    headers: Mapping[str, str],
    deadline: float,
    max_bytes: int,
    clock: Callable[[], float],
    verify: Any,
) -> int:
    import httpx  # heavy: the artifact worker has it loaded already

    remaining = deadline - clock()
    if remaining <= 0:
        raise DeltaError("the delta deadline passed", reason="timeout")
    try:
        with (
            httpx.Client(timeout=remaining, follow_redirects=True, verify=verify) as client,
            client.stream("GET", url, headers=dict(headers)) as resp,
        ):
            if resp.status_code == 404:
                raise DeltaError(f"{url}: 404, the server has no such patch", reason="not-found")
            if resp.status_code != 200:
                raise DeltaError(f"{url}: HTTP {resp.status_code}", reason="http")
            total = 0
            with open(dest, "wb") as out:
                for block in resp.iter_bytes(1 << 16):
                    total += len(block)
                    if total > max_bytes:
                        raise DeltaError(
                            f"{url}: the patch is larger than {max_bytes} bytes, no saving",
                            reason="too-large",
                        )
                    if clock() > deadline:
                        raise DeltaError(f"{url}: the delta deadline passed", reason="timeout")
                    out.write(block)
            return total
    except httpx.TimeoutException as exc:
        raise DeltaError(f"{url}: timed out ({exc})", reason="timeout") from exc
    except httpx.HTTPError as exc:
        raise DeltaError(f"{url}: {exc}", reason="network") from exc


def fetch_delta(
    spec: DeltaSpec,
    base_tar: Path | None,
    dest: Path,
    *,
    full_bytes: int | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    attempts: int = 4,
    retry_interval: float = 15.0,
    max_base_bytes: int = DEFAULT_MAX_BASE_BYTES,
    wait: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    verify: Any = True,
    label: str = "",
) -> DeltaOutcome:
    """Try to reconstruct the target tar from a local base and a patch; never raise for a fallback.

    Asks ``GET {server}/delta/{sha256(base)}/{spec.sha256}``; a ``404`` is asked again up to
    ``attempts`` times ``retry_interval`` apart (a server may answer 404 while it computes the
    patch, as ota-updater does); any other failure is final. The result is written to ``dest``
    only once its SHA-256 is ``spec.sha256``.

    Args:
        spec: the recipe's ``[artifacts.delta]``.
        base_tar: the previous version's uncompressed tar (``None``: first install).
        dest: where the verified tar goes.
        full_bytes: the size of the full download, to report the bytes saved.
        headers: request headers (e.g. authorization) for the delta server.
        timeout: the deadline for the whole attempt, in seconds (waits included).
        attempts: how many times a 404 is asked.
        retry_interval: seconds between them.
        max_base_bytes: a larger base is not patched (Go's ``KEYSTONE_DELTA_MAX_BASE_BYTES``).
        wait: how to wait between attempts (tests pass one that drives a fake clock).
        clock: monotonic seconds.
        verify: TLS verification for httpx (a path to a CA bundle, or ``True``).
        label: the artifact, for log lines.

    Returns:
        A :class:`DeltaOutcome`; ``applied=False`` means download the whole artifact.
    """
    what = label or spec.sha256[:12]
    try:
        outcome = _fetch_delta(
            spec,
            base_tar,
            Path(dest),
            full_bytes,
            headers or {},
            clock() + timeout,
            attempts,
            retry_interval,
            max_base_bytes,
            wait,
            clock,
            verify,
        )
    except OSError as exc:
        logger.info(
            "artifact {}: delta unavailable (io: {}); downloading the whole artifact", what, exc
        )
        return DeltaOutcome(applied=False, reason="io", message=str(exc))
    except DeltaError as exc:
        logger.info(
            "artifact {}: delta unavailable ({}: {}); downloading the whole artifact",
            what,
            exc.reason,
            exc,
        )
        return DeltaOutcome(applied=False, reason=exc.reason, message=str(exc))
    logger.info(
        "artifact {}: installed from a delta: {} B patch -> {} B, {} B saved",
        what,
        outcome.patch_bytes,
        outcome.target_bytes,
        outcome.saved_bytes,
    )
    return outcome


def _fetch_delta(
    spec: DeltaSpec,
    base_tar: Path | None,
    dest: Path,
    full_bytes: int | None,
    headers: Mapping[str, str],
    deadline: float,
    attempts: int,
    retry_interval: float,
    max_base_bytes: int,
    wait: Callable[[float], None],
    clock: Callable[[], float],
    verify: Any,
) -> DeltaOutcome:
    if spec.format not in ("", DELTA_FORMAT):
        raise DeltaError(
            f"unsupported delta format {spec.format!r} (this build implements {DELTA_FORMAT!r})",
            reason="unsupported-format",
        )
    if base_tar is None or not Path(base_tar).is_file():
        raise DeltaError("no local base version to patch from", reason="no-base")
    base_size = Path(base_tar).stat().st_size
    if max_base_bytes > 0 and base_size > max_base_bytes:
        raise DeltaError(
            f"the base is {base_size} bytes, over the {max_base_bytes}-byte delta limit",
            reason="too-large",
        )
    _libs()
    base_sha = _sha256_file(Path(base_tar))
    url = delta_url(spec.server, base_sha, spec.sha256)
    patch = dest.with_name(dest.name + ".delta.zst.part")
    # A patch as large as the full download saves nothing.
    max_patch = full_bytes if full_bytes else max(base_size, 1 << 20) * 2
    try:
        received = 0
        for attempt in range(max(1, attempts)):
            if attempt:
                logger.info(
                    "delta {}: patch not ready yet; asking again in {:g}s ({}/{})",
                    url,
                    retry_interval,
                    attempt + 1,
                    attempts,
                )
                if clock() + retry_interval > deadline:
                    raise DeltaError(f"{url}: still 404 at the deadline", reason="not-found")
                wait(retry_interval)
            try:
                received = _download(
                    url,
                    patch,
                    headers=headers,
                    deadline=deadline,
                    max_bytes=max_patch,
                    clock=clock,
                    verify=verify,
                )
                break
            except DeltaError as exc:
                if exc.reason != "not-found" or attempt == max(1, attempts) - 1:
                    raise
        target = apply_patch(Path(base_tar), patch, dest, spec.sha256)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(patch)
    full = full_bytes if full_bytes is not None else target
    return DeltaOutcome(
        applied=True,
        path=dest,
        patch_bytes=received,
        target_bytes=target,
        saved_bytes=max(0, full - received),
    )


def _main(argv: list[str]) -> int:
    """``python -m keystone.delta diff OLD NEW OUT``: make one patch (the server's child)."""
    if len(argv) != 4 or argv[0] != "diff":
        print("usage: python -m keystone.delta diff OLD NEW OUT", file=sys.stderr)
        return 2
    try:
        size = make_patch(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    except (OSError, EOFError, DeltaError) as exc:
        print(f"delta: {exc}", file=sys.stderr)
        return 1
    print(size)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))

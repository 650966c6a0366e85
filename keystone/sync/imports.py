"""Bundle files arriving at the agent: uploads through the API, staged files, watched mounts."""

from __future__ import annotations

import glob
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO

from keystone.errors import BundleError
from keystone.limits import BOUNDS, Limits, how_to_raise

DEFAULT_MAX_BUNDLE = BOUNDS["max_bundle_bytes"].default


def max_bundle_bytes() -> int:
    """``KEYSTONE_MAX_BUNDLE_BYTES`` (default 4 GiB; see keystone.limits)."""
    return Limits.from_env().max_bundle_bytes


def incoming_path(runtime: Path) -> Path:
    """Where API uploads land (the path only; see ``incoming_dir``)."""
    return runtime / "bundles" / "incoming"


def incoming_dir(runtime: Path) -> Path:
    """Where API uploads land, created if missing."""
    d = incoming_path(runtime)
    d.mkdir(parents=True, exist_ok=True)
    return d


def staged_dir(runtime: Path) -> Path:
    d = runtime / "bundles" / "staged"
    d.mkdir(parents=True, exist_ok=True)
    return d


def receive_bundle(runtime: Path, stream: BinaryIO, length: int | None) -> Path:
    """Stream an uploaded bundle to ``runtime/bundles/incoming`` within the size bound."""
    limit = max_bundle_bytes()
    if length is not None and length > limit:
        raise BundleError(
            f"bundle of {length} bytes is over the limit of {limit} bytes; "
            + how_to_raise("max_bundle_bytes")
        )
    dest = incoming_dir(runtime) / f"upload-{int(time.time() * 1000)}-{os.getpid()}.bundle"
    total = 0
    with dest.open("wb") as out:
        while True:
            want = 1 << 20 if length is None else min(1 << 20, length - total)
            if want <= 0:
                break
            chunk = stream.read(want)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                out.close()
                dest.unlink(missing_ok=True)
                raise BundleError(
                    f"bundle is over the limit of {limit} bytes; "
                    + how_to_raise("max_bundle_bytes")
                )
            out.write(chunk)
    if length is not None and total != length:
        dest.unlink(missing_ok=True)
        raise BundleError(f"bundle upload ended after {total} of {length} bytes")
    return dest


def stage_bundle(runtime: Path, src: Path) -> Path:
    """Copy a bundle where the agent picks it up at its next start."""
    if not src.is_file():
        raise BundleError(f"{src}: no such bundle file")
    dest = staged_dir(runtime) / (file_digest(src)[:16] + ".bundle")
    tmp = dest.with_suffix(".partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest


def staged_bundles(runtime: Path) -> list[Path]:
    """Bundles staged while no agent ran, oldest first."""
    d = runtime / "bundles" / "staged"
    if not d.is_dir():
        return []
    return sorted(d.glob("*.bundle"), key=lambda p: p.stat().st_mtime)


def file_digest(path: Path) -> str:
    import hashlib  # lazy: OpenSSL's speed for files, loaded by the first (keystone.openssl)

    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def watched_bundles(patterns: list[str]) -> list[Path]:
    """Bundle files (``*.bundle``, ``*.ksb``) in directories matching the watch patterns."""
    out: list[Path] = []
    for pattern in patterns:
        for d in sorted(glob.glob(pattern)):
            p = Path(d)
            if p.is_file() and p.suffix in (".bundle", ".ksb"):
                out.append(p)
            elif p.is_dir():
                try:
                    entries = list(p.iterdir())
                except OSError:
                    continue  # unmounted while we looked, or unreadable: the next scan sees it
                out.extend(
                    sorted(x for x in entries if x.is_file() and x.suffix in (".bundle", ".ksb"))
                )
    return out

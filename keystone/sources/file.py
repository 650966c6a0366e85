"""A bundle file on disk as a source: USB sticks, the staging directory, API uploads.

:class:`BundleFileSource` imports one bundle file (a Keystone bundle or a plain git bundle) into
the mirror and says what it brought. The file's artifacts are left where they are: the consumer
copies them into the cache once the revision is verified
(:func:`keystone.sources.bundle.cache_bundle_artifacts`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from keystone.errors import BundleError
from keystone.limits import how_to_raise
from keystone.sources.base import FetchResult, ImportedBundle
from keystone.sources.bundle import import_bundle
from keystone.sources.git import GitMirror

__all__ = ["BundleFileSource", "MirrorRef", "open_mirror"]

MirrorRef: TypeAlias = GitMirror | Callable[[], GitMirror]
"""A mirror, or a function that opens it: sources that may need none open it only when they do."""


def open_mirror(mirror: MirrorRef) -> GitMirror:
    """The mirror a :data:`MirrorRef` names, opening it if it is a function."""
    return mirror if isinstance(mirror, GitMirror) else mirror()


class BundleFileSource:
    """Import one bundle file into the mirror; implements :class:`keystone.sources.base.Source`.

    Every :meth:`fetch` imports the file again (an import of objects the mirror has is cheap
    and changes nothing); ``changed`` is therefore always True.

    Args:
        path: The bundle file.
        mirror: The device's mirror, or a function that opens it (called only once the file
            passed its size check).
        max_bytes: The largest bundle accepted (``KEYSTONE_MAX_BUNDLE_BYTES``); the whole file
            is checked, since a staged or watched file never passed an upload bound.
        label: What :attr:`FetchResult.source` says (default ``bundle:<file name>``).
        ref: For a plain git bundle with several refs, the one to import.
    """

    def __init__(
        self,
        path: Path,
        mirror: MirrorRef,
        *,
        max_bytes: int,
        label: str | None = None,
        ref: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.label = label or f"bundle:{self.path.name}"
        self.ref = ref
        self._mirror = mirror

    def __repr__(self) -> str:
        return f"BundleFileSource({str(self.path)!r})"

    def fetch(self) -> FetchResult:
        """Check the file's size, import its objects, and point ``refs/keystone/fetched`` at it.

        Raises:
            keystone.errors.BundleError: unreadable, over ``max_bytes``, damaged, truncated or
                missing a prerequisite; nothing was imported.
        """
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            raise BundleError(f"cannot read bundle {self.path}: {exc.strerror or exc}") from exc
        if size > self.max_bytes:
            raise BundleError(
                f"{self.path}: bundle of {size} bytes is over the limit of {self.max_bytes} "
                "bytes; nothing was imported; " + how_to_raise("max_bundle_bytes")
            )
        mirror = open_mirror(self._mirror)
        info = import_bundle(self.path, mirror, max_bytes=self.max_bytes, ref=self.ref)
        return FetchResult(
            revision=info.revision,
            changed=True,
            bytes_received=info.size,
            source=self.label,
            bundle=ImportedBundle(
                kind=info.kind,
                path=self.path,
                artifacts=tuple(a.sha256 for a in info.artifacts),
                datasets=tuple(d.path for d in info.datasets),
                images=tuple(i.sha256 for i in info.images),
            ),
        )

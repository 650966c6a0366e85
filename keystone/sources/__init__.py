"""Where revisions come from: git remotes, bundles, and the local mirror they land in.

The public surface, importable without loading dulwich (it is imported inside the functions
that need it, so the resident agent stays small). Each name loads its own module on first use
(PEP 562), so a git poll does not also load the bundle and HTTP readers:

* :class:`FetchResult`, :class:`ImportedBundle`, :class:`Source`, :class:`FileSource`,
  :class:`DirectoryReader` (base; the module docstring says how a consumer uses a source)
* :class:`GitMirror`, :class:`TreeReader`, :class:`GitSource` (git)
* :class:`HttpBundleSource` (http), :class:`BundleFileSource` (file)
* :class:`BundleInfo`, :class:`BundleArtifact`, :class:`BundleReader`, :func:`open_bundle`,
  :func:`create_bundle`, :func:`inspect_bundle`, :func:`cache_bundle_artifacts`,
  :func:`import_bundle`, :func:`extract_bundle_artifact`, :func:`write_git_bundle` (bundle)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; at run time each name loads on first use
    from keystone.sources.base import (
        DirectoryReader,
        FetchResult,
        FileSource,
        HistoryLimitExceeded,
        ImportedBundle,
        IncompleteHistory,
        PackTooLarge,
        RemoteRefNotFound,
        Source,
        UnknownRevision,
        redact_url,
        split_repo_path,
    )
    from keystone.sources.bundle import (
        BundleArtifact,
        BundleInfo,
        BundleReader,
        cache_bundle_artifacts,
        create_bundle,
        extract_bundle_artifact,
        import_bundle,
        inspect_bundle,
        open_bundle,
        write_git_bundle,
    )
    from keystone.sources.file import BundleFileSource
    from keystone.sources.git import (
        DEFAULT_MAX_PACK_BYTES,
        FETCHED_REF,
        GitMirror,
        GitSource,
        TreeReader,
    )
    from keystone.sources.http import HttpBundleSource

_WHERE: dict[str, str] = {
    "BundleArtifact": "keystone.sources.bundle",
    "BundleFileSource": "keystone.sources.file",
    "BundleInfo": "keystone.sources.bundle",
    "BundleReader": "keystone.sources.bundle",
    "DEFAULT_MAX_PACK_BYTES": "keystone.sources.git",
    "DirectoryReader": "keystone.sources.base",
    "FETCHED_REF": "keystone.sources.git",
    "FetchResult": "keystone.sources.base",
    "FileSource": "keystone.sources.base",
    "GitMirror": "keystone.sources.git",
    "GitSource": "keystone.sources.git",
    "HistoryLimitExceeded": "keystone.sources.base",
    "HttpBundleSource": "keystone.sources.http",
    "ImportedBundle": "keystone.sources.base",
    "IncompleteHistory": "keystone.sources.base",
    "PackTooLarge": "keystone.sources.base",
    "RemoteRefNotFound": "keystone.sources.base",
    "Source": "keystone.sources.base",
    "TreeReader": "keystone.sources.git",
    "UnknownRevision": "keystone.sources.base",
    "cache_bundle_artifacts": "keystone.sources.bundle",
    "create_bundle": "keystone.sources.bundle",
    "extract_bundle_artifact": "keystone.sources.bundle",
    "import_bundle": "keystone.sources.bundle",
    "inspect_bundle": "keystone.sources.bundle",
    "open_bundle": "keystone.sources.bundle",
    "redact_url": "keystone.sources.base",
    "split_repo_path": "keystone.sources.base",
    "write_git_bundle": "keystone.sources.bundle",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'keystone.sources' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_MAX_PACK_BYTES",
    "FETCHED_REF",
    "BundleArtifact",
    "BundleFileSource",
    "BundleInfo",
    "BundleReader",
    "DirectoryReader",
    "FetchResult",
    "FileSource",
    "GitMirror",
    "GitSource",
    "HistoryLimitExceeded",
    "HttpBundleSource",
    "ImportedBundle",
    "IncompleteHistory",
    "PackTooLarge",
    "RemoteRefNotFound",
    "Source",
    "TreeReader",
    "UnknownRevision",
    "cache_bundle_artifacts",
    "create_bundle",
    "extract_bundle_artifact",
    "import_bundle",
    "inspect_bundle",
    "open_bundle",
    "redact_url",
    "split_repo_path",
    "write_git_bundle",
]

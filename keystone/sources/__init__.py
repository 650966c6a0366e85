"""Where revisions come from: git remotes, bundles, and the local mirror they land in.

The public surface, importable without loading dulwich (it is imported inside the functions
that need it, so the resident agent stays small):

* :class:`FetchResult`, :class:`ImportedBundle`, :class:`Source`, :class:`FileSource`,
  :class:`DirectoryReader` (base; the module docstring says how a consumer uses a source)
* :class:`GitMirror`, :class:`TreeReader`, :class:`GitSource` (git)
* :class:`HttpBundleSource` (http), :class:`BundleFileSource` (file)
* :class:`BundleInfo`, :class:`BundleArtifact`, :class:`BundleReader`, :func:`open_bundle`,
  :func:`create_bundle`, :func:`inspect_bundle`, :func:`cache_bundle_artifacts`,
  :func:`import_bundle`, :func:`extract_bundle_artifact`, :func:`write_git_bundle` (bundle)
"""

from __future__ import annotations

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

"""The Go agent's view of the artifact cache: ``<cache>/<recipe>/<version>/<file>`` links."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from keystone.runtime.artifacts.files import CACHE_DIRS, link_go_view, prune_go_view


def _blob(root: Path, data: bytes) -> Path:
    blob = root / "sha256" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    blob.chmod(0o444)
    return blob


def test_link_is_relative_and_resolves_from_a_go_work_dir(tmp_path: Path) -> None:
    """The link is relative (the runtime may move) and ``../../../artifacts/...`` from
    ``components/<name>/<version>`` reaches it."""
    root = tmp_path / "artifacts"
    blob = _blob(root, b"binary")
    link = link_go_view(root, blob, "app-v1", "com.demo.app", "1.0.0")
    assert link == root / "com.demo.app" / "1.0.0" / "app-v1"
    assert not os.readlink(link).startswith("/")
    workdir = tmp_path / "components" / "app" / "1.0.0"
    workdir.mkdir(parents=True)
    assert (workdir / "../../../artifacts/com.demo.app/1.0.0/app-v1").read_bytes() == b"binary"


def test_relink_replaces_and_a_missing_blob_links_nothing(tmp_path: Path) -> None:
    """Installing again points the link at the new blob; no blob (a delta-built tree), no link."""
    root = tmp_path / "artifacts"
    link_go_view(root, _blob(root, b"one"), "f", "r", "1")
    link = link_go_view(root, _blob(root, b"two"), "f", "r", "1")
    assert link is not None and link.read_bytes() == b"two"
    assert link_go_view(root, root / "sha256" / ("0" * 64), "g", "r", "1") is None
    assert not (root / "r" / "1" / "g").exists()


def test_names_of_the_cache_are_never_shadowed(tmp_path: Path) -> None:
    """A recipe named like one of the cache's directories gets no link (logged)."""
    root = tmp_path / "artifacts"
    blob = _blob(root, b"x")
    for name in (*CACHE_DIRS, ".hidden"):
        assert link_go_view(root, blob, "f", name, "1") is None
    assert sorted(os.listdir(root)) == ["sha256"]


def test_prune_removes_dangling_links_only(tmp_path: Path) -> None:
    """After GC evicts a blob, its links (and empty directories) go; live links stay."""
    root = tmp_path / "artifacts"
    gone = _blob(root, b"old")
    kept = _blob(root, b"new")
    link_go_view(root, gone, "f", "r", "1")
    link_go_view(root, kept, "f", "r", "2")
    gone.unlink()
    prune_go_view(root)
    assert not (root / "r" / "1").exists()
    assert (root / "r" / "2" / "f").read_bytes() == b"new"
    assert (root / "sha256").is_dir()

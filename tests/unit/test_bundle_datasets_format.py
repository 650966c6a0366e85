"""Bundle datasets in the format: listed in the manifest only when present, checked on read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from keystone.errors import ArtifactIntegrityError, BundleError
from keystone.sources.bundle import (
    _BLOCK,
    BundleDatasetFile,
    _manifest_bytes,
    _tar_header,
    extract_bundle_datasets,
    inspect_bundle,
)

A = "a" * 40
REPO = f"# v2 git bundle\n{A} refs/heads/main\n\n".encode() + b"PACK\0\0\0\2" + b"\0" * 40


def _member(name: str, data: bytes) -> bytes:
    return _tar_header(name, len(data)) + data + b"\0" * (-len(data) % _BLOCK)


def _bundle(
    path: Path,
    files: dict[str, bytes],
    *,
    listed: list[BundleDatasetFile] | None = None,
    stored: dict[str, bytes] | None = None,
) -> Path:
    entries = listed
    if entries is None:
        entries = [
            BundleDatasetFile(p, hashlib.sha256(d).hexdigest(), len(d))
            for p, d in sorted(files.items())
        ]
    manifest = _manifest_bytes(
        A, "refs/heads/main", (), len(REPO), hashlib.sha256(REPO).hexdigest(), (), entries
    )
    body = _member("keystone-bundle.json", manifest) + _member("repo.bundle", REPO)
    for name, data in sorted((stored if stored is not None else files).items()):
        body += _member(name, data)
    path.write_bytes(body + b"\0" * (2 * _BLOCK))
    return path


FILES = {
    "datasets/cve/cve.manifest.toml": b"manifest\n",
    "datasets/cve/cve.manifest.toml.sig": b"sig\n",
    "datasets/cve/feed.tar": b"payload" * 100,
}


def test_without_datasets_the_manifest_is_as_before() -> None:
    """No ``datasets`` key at all: the bytes are those of a bundle made before datasets."""
    doc = json.loads(_manifest_bytes(A, "refs/heads/main", (), 1, "0" * 64, ()))
    assert "datasets" not in doc


def test_listed_read_and_extracted(tmp_path: Path) -> None:
    info = inspect_bundle(_bundle(tmp_path / "b.ksb", FILES))
    assert [d.path for d in info.datasets] == sorted(FILES)
    assert {d.dataset for d in info.datasets} == {"cve"}
    dest = extract_bundle_datasets(tmp_path / "b.ksb", tmp_path / "out")
    assert dest == tmp_path / "out"
    for rel, data in FILES.items():
        assert (dest / rel).read_bytes() == data


def test_a_bundle_without_datasets_extracts_nothing(tmp_path: Path) -> None:
    path = _bundle(tmp_path / "b.ksb", {})
    assert inspect_bundle(path).datasets == ()
    assert extract_bundle_datasets(path, tmp_path / "out") is None
    assert not (tmp_path / "out").exists()


def test_a_damaged_member_is_refused_and_nothing_left(tmp_path: Path) -> None:
    good = dict(FILES)
    listed = [
        BundleDatasetFile(p, hashlib.sha256(d).hexdigest(), len(d)) for p, d in sorted(good.items())
    ]
    stored = {**good, "datasets/cve/feed.tar": b"PAYLOAD" * 100}
    path = _bundle(tmp_path / "b.ksb", good, listed=listed, stored=stored)
    with pytest.raises(ArtifactIntegrityError, match=r"feed\.tar hashes to"):
        extract_bundle_datasets(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("listed", "stored", "reason"),
    [
        (["datasets/../evil"], ["datasets/../evil"], "is not datasets/<name>/<file>"),
        (["datasets/cve/a/b"], ["datasets/cve/a/b"], "is not datasets/<name>/<file>"),
        (["datasets/Cve/a"], ["datasets/Cve/a"], "is not datasets/<name>/<file>"),
        (["datasets/cve/a"], [], "do not match the manifest"),
        ([], ["datasets/cve/a"], "do not match the manifest"),
    ],
)
def test_refused_layouts(tmp_path: Path, listed: list[str], stored: list[str], reason: str) -> None:
    entries = [BundleDatasetFile(p, hashlib.sha256(b"x").hexdigest(), 1) for p in listed]
    path = _bundle(tmp_path / "b.ksb", {}, listed=entries, stored={p: b"x" for p in stored})
    with pytest.raises(BundleError, match=reason.replace("(", r"\(")):
        inspect_bundle(path)

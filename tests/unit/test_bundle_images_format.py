"""Container image archives in bundles: listed only when present, checked on read and extract."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from keystone.errors import ArtifactIntegrityError, BundleError
from keystone.sources.bundle import (
    _BLOCK,
    _manifest_bytes,
    _tar_header,
    extract_bundle_images,
    inspect_bundle,
)
from keystone.sources.bundleformat import BundleImage

A = "a" * 40
REPO = f"# v2 git bundle\n{A} refs/heads/main\n\n".encode() + b"PACK\0\0\0\2" + b"\0" * 40
ARCHIVE = b"oci archive bytes" * 300


def _member(name: str, data: bytes) -> bytes:
    return _tar_header(name, len(data)) + data + b"\0" * (-len(data) % _BLOCK)


def _bundle(path: Path, listed: list[BundleImage], stored: dict[str, bytes]) -> Path:
    manifest = _manifest_bytes(
        A, "refs/heads/main", (), len(REPO), hashlib.sha256(REPO).hexdigest(), (), (), listed
    )
    body = _member("keystone-bundle.json", manifest) + _member("repo.bundle", REPO)
    for name, data in sorted(stored.items()):
        body += _member(name, data)
    path.write_bytes(body + b"\0" * (2 * _BLOCK))
    return path


SHA = hashlib.sha256(ARCHIVE).hexdigest()
IMAGE = BundleImage(SHA, len(ARCHIVE), "web.tar")


def test_without_images_the_manifest_is_as_before() -> None:
    """No ``images`` key: the manifest bytes are exactly those written before images existed."""
    without = _manifest_bytes(A, "refs/heads/main", (), 1, "0" * 64, ())
    assert without == _manifest_bytes(A, "refs/heads/main", (), 1, "0" * 64, (), (), ())
    assert "images" not in json.loads(without)


def test_listed_read_and_extracted(tmp_path: Path) -> None:
    path = _bundle(tmp_path / "b.ksb", [IMAGE], {f"images/{SHA}": ARCHIVE})
    assert inspect_bundle(path).images == (IMAGE,)
    dest = extract_bundle_images(path, tmp_path / "out")
    assert dest == tmp_path / "out"
    assert (dest / f"{SHA}.tar").read_bytes() == ARCHIVE


def test_a_bundle_without_images_extracts_nothing(tmp_path: Path) -> None:
    path = _bundle(tmp_path / "b.ksb", [], {})
    assert inspect_bundle(path).images == ()
    assert extract_bundle_images(path, tmp_path / "out") is None
    assert not (tmp_path / "out").exists()


def test_a_damaged_archive_is_refused_and_nothing_left(tmp_path: Path) -> None:
    bad = ARCHIVE.replace(b"oci", b"OCI", 1)
    path = _bundle(tmp_path / "b.ksb", [IMAGE], {f"images/{SHA}": bad})
    with pytest.raises(ArtifactIntegrityError, match=r"web\.tar\) hashes to"):
        extract_bundle_images(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("listed", "stored", "reason"),
    [
        ([IMAGE], {}, "do not match the manifest"),
        ([], {f"images/{SHA}": ARCHIVE}, "do not match the manifest"),
        ([BundleImage("x" * 64, 1, "a")], {"images/" + "x" * 64: b"x"}, "malformed image entry"),
        ([IMAGE, IMAGE], {f"images/{SHA}": ARCHIVE}, "listed twice"),
        ([BundleImage(SHA, 5, "web.tar")], {f"images/{SHA}": ARCHIVE}, "manifest says 5"),
    ],
)
def test_refused_layouts(
    tmp_path: Path, listed: list[BundleImage], stored: dict[str, bytes], reason: str
) -> None:
    path = _bundle(tmp_path / "b.ksb", listed, stored)
    with pytest.raises(BundleError, match=reason):
        inspect_bundle(path)

"""The artifact store with local sources: cache, pins, policy, unpack reuse, install, GC."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from keystone.errors import ArtifactFetchError, ArtifactIntegrityError, UnsafeArchiveError
from keystone.runtime.artifacts import (
    ArtifactPolicy,
    ArtifactRefusedError,
    ArtifactSpec,
    ArtifactStore,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def tar_gz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tf.addfile(info, io.BytesIO(data))
    return path


class FakeWall:
    """A system clock the test sets (for LRU order)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def policy(tmp_path: Path) -> ArtifactPolicy:
    (tmp_path / "repo" / "artifacts").mkdir(parents=True)
    return ArtifactPolicy(
        cache_dir=tmp_path / "runtime" / "artifacts",
        repo_root=tmp_path / "repo",
        state_dir=tmp_path / "runtime" / "state",
    )


@pytest.fixture
def store(policy: ArtifactPolicy) -> ArtifactStore:
    return ArtifactStore(policy)


class TestCache:
    def test_cached_artifact_is_never_fetched_again(
        self, tmp_path: Path, store: ArtifactStore
    ) -> None:
        """Once cached, a pinned artifact is served from the cache even if its source is gone."""
        data = os.urandom(10_000)
        src = write(tmp_path / "src" / "tool.bin", data)
        spec = ArtifactSpec(uri=src.as_uri(), sha256="sha256:" + sha(data))
        first = store.prepare(spec, component="c")
        src.unlink()
        again = store.prepare(spec, component="c")
        assert again == first
        assert first.path.read_bytes() == data
        assert first.name == "tool.bin" and first.size == len(data)
        assert first.path.stat().st_mode & 0o222 == 0

    def test_damaged_cache_blob_is_fetched_afresh(
        self, tmp_path: Path, store: ArtifactStore
    ) -> None:
        """A cached blob whose bytes no longer match its name is replaced from the source."""
        data = b"good bytes" * 100
        src = write(tmp_path / "src" / "a.bin", data)
        spec = ArtifactSpec(uri=src.as_uri(), sha256=sha(data))
        blob = store.prepare(spec, component="c").path
        os.chmod(blob, 0o644)
        blob.write_bytes(b"rot")
        assert store.prepare(spec, component="c").path.read_bytes() == data

    def test_hash_mismatch_is_refused_and_not_cached(
        self, tmp_path: Path, store: ArtifactStore
    ) -> None:
        """A flipped byte is refused naming the component, the uri and both hashes."""
        data = bytearray(os.urandom(4096))
        pin = sha(bytes(data))
        data[100] ^= 0x01
        src = write(tmp_path / "src" / "a.bin", bytes(data))
        with pytest.raises(ArtifactRefusedError) as info:
            store.prepare(ArtifactSpec(uri=src.as_uri(), sha256=pin), component="api")
        err = info.value
        assert isinstance(err, ArtifactIntegrityError)
        assert err.reason == "hash-mismatch" and err.component == "api"
        assert "'api'" in str(err) and src.as_uri() in str(err) and pin in str(err)
        assert store.cached() == []
        assert list((store.root / "tmp").iterdir()) == []

    def test_missing_local_file_is_retryable(self, tmp_path: Path, store: ArtifactStore) -> None:
        """A file not (yet) there, e.g. an unmounted stick, is a fetch error to retry."""
        with pytest.raises(ArtifactFetchError, match="does not exist"):
            store.prepare(ArtifactSpec(uri=(tmp_path / "nope").as_uri()), component="c")

    def test_local_file_over_the_bound_is_refused(
        self, tmp_path: Path, policy: ArtifactPolicy
    ) -> None:
        """The size bound holds for local files too."""
        from dataclasses import replace

        src = write(tmp_path / "big.bin", bytes(5000))
        with pytest.raises(ArtifactRefusedError) as info:
            ArtifactStore(replace(policy, max_bytes=1000)).prepare(
                ArtifactSpec(uri=src.as_uri()), component="c"
            )
        assert info.value.reason == "too-large"


class TestPolicy:
    def test_signed_revision_requires_a_pin(self, tmp_path: Path, policy: ArtifactPolicy) -> None:
        """Recipes from a signed revision must pin sha256."""
        from dataclasses import replace

        src = write(tmp_path / "a.bin", b"x")
        with pytest.raises(ArtifactRefusedError) as info:
            ArtifactStore(replace(policy, require_sha256=True)).prepare(
                ArtifactSpec(uri=src.as_uri()), component="c"
            )
        assert info.value.reason == "missing-pin"

    def test_strict_policy_requires_a_signature(
        self, tmp_path: Path, policy: ArtifactPolicy
    ) -> None:
        """allow_unsigned = false refuses an artifact without sig_uri, before fetching it."""
        from dataclasses import replace

        src = write(tmp_path / "a.bin", b"x")
        with pytest.raises(ArtifactRefusedError) as info:
            ArtifactStore(replace(policy, allow_unsigned=False)).prepare(
                ArtifactSpec(uri=src.as_uri(), sha256=sha(b"x")), component="web"
            )
        assert info.value.reason == "missing-signature"
        assert "'web'" in str(info.value) and "sig_uri" in str(info.value)

    def test_insecure_skip_verify_drops_the_mandatory_integrity_only(
        self, tmp_path: Path, policy: ArtifactPolicy
    ) -> None:
        """KEYSTONE_INSECURE_SKIP_VERIFY means what it means in Go: an artifact without a
        signature (strict policy) or without a pin (signed revision) is accepted, with a
        WARNING naming it; a pin the recipe does give is still checked."""
        from dataclasses import replace

        from loguru import logger

        insecure = ArtifactPolicy.from_env(
            policy.cache_dir,
            {"KEYSTONE_INSECURE_SKIP_VERIFY": "true"},
            repo_root=policy.repo_root,
            allow_unsigned=False,
            require_sha256=True,
        )
        assert insecure.insecure_skip_verify
        src = write(tmp_path / "a.bin", b"x")
        messages: list[str] = []
        sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
        try:
            prepared = ArtifactStore(insecure).prepare(
                ArtifactSpec(uri=src.as_uri()), component="web"
            )
        finally:
            logger.remove(sink)
        assert prepared.sha256 == sha(b"x")
        assert any("no sha256 pin" in m and "INSECURE_SKIP_VERIFY" in m for m in messages)
        assert any("no signature" in m and "NOT authenticated" in m for m in messages)
        with pytest.raises(ArtifactRefusedError) as info:
            ArtifactStore(insecure).prepare(
                ArtifactSpec(uri=src.as_uri(), sha256=sha(b"other")), component="web"
            )
        assert info.value.reason == "hash-mismatch"
        # Without it, the same artifact is refused (the tests above), and "false" is off.
        off = ArtifactPolicy.from_env(
            policy.cache_dir, {"KEYSTONE_INSECURE_SKIP_VERIFY": "false"}, allow_unsigned=False
        )
        with pytest.raises(ArtifactRefusedError):
            ArtifactStore(replace(off, repo_root=policy.repo_root)).prepare(
                ArtifactSpec(uri=src.as_uri(), sha256=sha(b"x")), component="web"
            )

    def test_repo_relative_paths(self, policy: ArtifactPolicy, store: ArtifactStore) -> None:
        """A path relative to the fleet repo works; one leaving it is refused."""
        assert policy.repo_root is not None
        write(policy.repo_root / "artifacts" / "cfg.json", b"{}")
        prepared = store.prepare(
            ArtifactSpec(uri="artifacts/cfg.json", sha256=sha(b"{}")), component="c"
        )
        assert prepared.name == "cfg.json"
        with pytest.raises(ArtifactRefusedError) as info:
            store.prepare(ArtifactSpec(uri="../outside"), component="c")
        assert info.value.reason == "uri-escapes-repo"

    def test_bad_pin_is_refused(self, store: ArtifactStore) -> None:
        """A malformed sha256 in the recipe is a refusal naming the field."""
        with pytest.raises(ArtifactRefusedError, match="sha256"):
            store.prepare(ArtifactSpec(uri="artifacts/x", sha256="beef"), component="c")


class TestUnpackAndInstall:
    def test_unpacked_tree_is_reused_and_install_copies(
        self, tmp_path: Path, store: ArtifactStore
    ) -> None:
        """The tree is unpacked once per hash; work dirs get private copies of it."""
        archive = tar_gz(tmp_path / "app.tar.gz", {"bin/app": b"#!/bin/sh\n", "etc/conf": b"a=1"})
        spec = ArtifactSpec(uri=archive.as_uri(), sha256=sha(archive.read_bytes()), unpack=True)
        first = store.prepare(spec, component="c")
        assert first.unpacked is not None
        inode = first.unpacked.stat().st_ino
        again = store.prepare(spec, component="c")
        assert again.unpacked == first.unpacked and again.unpacked.stat().st_ino == inode

        work = tmp_path / "components" / "c" / "1.0"
        store.install(first, work)
        conf = work / "etc" / "conf"
        assert conf.read_bytes() == b"a=1"
        assert os.stat(work / "bin" / "app").st_mode & 0o100
        assert conf.stat().st_ino != (first.unpacked / "etc" / "conf").stat().st_ino
        conf.write_bytes(b"changed by the component")
        os.chmod(work / "bin" / "app", 0o700)
        assert (first.unpacked / "etc" / "conf").read_bytes() == b"a=1"
        assert os.stat(first.unpacked / "bin" / "app").st_mode & 0o777 == 0o555

    def test_install_replaces_a_planted_symlink(self, tmp_path: Path, store: ArtifactStore) -> None:
        """A symlink left in the work dir is replaced, never written through."""
        archive = tar_gz(tmp_path / "app.tar.gz", {"etc/conf": b"a=1"})
        prepared = store.prepare(ArtifactSpec(uri=archive.as_uri(), unpack=True), component="c")
        victim = tmp_path / "victim"
        victim.mkdir()
        work = tmp_path / "work"
        work.mkdir()
        (work / "etc").symlink_to(victim)
        store.install(prepared, work)
        assert list(victim.iterdir()) == []
        assert not (work / "etc").is_symlink()
        assert (work / "etc" / "conf").read_bytes() == b"a=1"

    def test_plain_artifact_lands_under_its_name(
        self, tmp_path: Path, store: ArtifactStore
    ) -> None:
        """A non-archive artifact is copied to work/<basename>, writable by its owner."""
        src = write(tmp_path / "src" / "agent-linux-arm64", b"ELF...")
        prepared = store.prepare(ArtifactSpec(uri=src.as_uri()), component="c")
        store.install(prepared, tmp_path / "work")
        placed = tmp_path / "work" / "agent-linux-arm64"
        assert placed.read_bytes() == b"ELF..." and placed.stat().st_mode & 0o200

    def test_unsafe_archive_is_refused_with_the_component(
        self, tmp_path: Path, store: ArtifactStore
    ) -> None:
        """An archive escaping its directory refuses the artifact, naming the component."""
        evil = tmp_path / "evil.tar"
        with tarfile.open(evil, "w") as tf:
            info = tarfile.TarInfo("../escape")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
        with pytest.raises(UnsafeArchiveError) as info_:
            store.prepare(ArtifactSpec(uri=evil.as_uri(), unpack=True), component="db")
        assert "'db'" in str(info_.value)
        assert not (tmp_path / "runtime" / "escape").exists()
        assert not (store.root / "escape").exists()


class TestGc:
    def test_lru_eviction_keeps_pinned(self, tmp_path: Path, policy: ArtifactPolicy) -> None:
        """Over the limit, the least recently used go first, but never a kept sha256."""
        from dataclasses import replace

        wall = FakeWall()
        store = ArtifactStore(replace(policy, cache_limit_bytes=2500), wall_clock=wall)
        shas = []
        for i in range(4):  # oldest first: 0, 1, 2, 3 (1000 bytes each)
            data = bytes([i]) * 1000
            src = write(tmp_path / f"a{i}", data)
            shas.append(
                store.prepare(
                    ArtifactSpec(uri=src.as_uri(), sha256=sha(data)), component="c"
                ).sha256
            )
            wall.now += 60
        assert store.cache_bytes() == 4000
        report = store.gc({shas[0]})  # the oldest is pinned by the last known-good plan
        assert report.evicted == (shas[1], shas[2])
        assert report.freed_bytes == 2000 and report.remaining_bytes == 2000
        assert set(store.cached()) == {shas[0], shas[3]}
        assert not report.over_limit

    def test_pinned_set_larger_than_the_limit_stays(
        self, tmp_path: Path, policy: ArtifactPolicy
    ) -> None:
        """If what is kept exceeds the limit, nothing kept is evicted and the report says so."""
        from dataclasses import replace

        store = ArtifactStore(replace(policy, cache_limit_bytes=10))
        data = bytes(100)
        prepared = store.prepare(
            ArtifactSpec(uri=write(tmp_path / "x", data).as_uri()), component="c"
        )
        report = store.gc({"sha256:" + prepared.sha256.upper()})
        assert report.evicted == () and report.over_limit
        assert store.cached() == [prepared.sha256]

    def test_gc_removes_trees_and_leftovers(self, tmp_path: Path, policy: ArtifactPolicy) -> None:
        """Evicting an archive removes its read-only tree; interrupted downloads are swept."""
        from dataclasses import replace

        store = ArtifactStore(replace(policy, cache_limit_bytes=0))
        archive = tar_gz(tmp_path / "t.tar.gz", {"f": b"1" * 100})
        prepared = store.prepare(ArtifactSpec(uri=archive.as_uri(), unpack=True), component="c")
        write(store.root / "tmp" / "dl-leftover", b"partial")
        store.gc(set())
        assert prepared.unpacked is not None and not prepared.unpacked.exists()
        assert store.cached() == [] and list((store.root / "tmp").iterdir()) == []


class TestFootprint:
    def test_resident_imports_stay_light(self) -> None:
        """Importing the store and the worker client loads neither httpx nor cryptography."""
        code = (
            "import sys, keystone.runtime.artifacts, keystone.runtime.artifact_worker, keystone.serve;"
            "print(sorted(m for m in ('httpx', 'cryptography') if m in sys.modules))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "[]"

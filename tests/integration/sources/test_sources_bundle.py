"""Bundles against the git CLI: git-made bundles import, ours verify and clone, damage refused."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from pathlib import Path

import pytest

from keystone.errors import ArtifactIntegrityError, BundleError
from keystone.sources import (
    FETCHED_REF,
    GitMirror,
    GitSource,
    create_bundle,
    extract_bundle_artifact,
    import_bundle,
    inspect_bundle,
    open_bundle,
    write_git_bundle,
)
from tests.integration.sources.gitserver import FleetRepo, run_git

pytestmark = pytest.mark.integration

MAX = 64 * 1024 * 1024


def _state(mirror: GitMirror) -> tuple[dict[str, str], set[str], list[str]]:
    """Refs, pack files and stray entries of a mirror: what a refused import must not change."""
    stray = [p.name for p in mirror.path.iterdir() if p.name.startswith("keystone-incoming-")]
    return mirror.refs(), set(os.listdir(mirror.objects_dir / "pack")), stray


@pytest.fixture
def two_revisions(fleet: FleetRepo) -> tuple[str, str]:
    """An old revision and a newer one (with a merge in between) on main."""
    fleet.commit({"plans/default.toml": "[[components]]\n", "big.bin": os.urandom(4096)}, "base")
    old = fleet.commit({"recipes/a.recipe.toml": "v = 1\n"}, "old")
    fleet.git("checkout", "-q", "-b", "side", old)
    fleet.commit({"labels/edge/plan.toml": "x\n"}, "side", push=False)
    fleet.git("checkout", "-q", "main")
    fleet.commit({"recipes/a.recipe.toml": "v = 2\n"}, "main moves")
    fleet.merge("side")
    new = fleet.commit({"devices/gw-1/plan.toml": "y\n"}, "new")
    return old, new


def _git_bundle(fleet: FleetRepo, out: Path, *spec: str, options: tuple[str, ...] = ()) -> Path:
    run_git("bundle", "create", "-q", *options, str(out), *spec, cwd=fleet.work, env=fleet.env)
    return out


class TestBundlesMadeByGit:
    def test_full_bundle_imports(
        self, fleet: FleetRepo, mirror: GitMirror, two_revisions: tuple[str, str], tmp_path: Path
    ) -> None:
        """A `git bundle create f main` bundle imports and moves refs/keystone/fetched."""
        _old, new = two_revisions
        bundle = _git_bundle(fleet, tmp_path / "full.bundle", "main")
        info = import_bundle(bundle, mirror, max_bytes=MAX)
        assert (info.kind, info.revision, info.ref, info.prerequisites) == (
            "git",
            new,
            "refs/heads/main",
            (),
        )
        assert mirror.ref(FETCHED_REF) == new
        assert mirror.read_file(new, "devices/gw-1/plan.toml") == b"y\n"

    def test_incremental_bundle_imports_onto_the_old_revision(
        self, fleet: FleetRepo, mirror: GitMirror, two_revisions: tuple[str, str], tmp_path: Path
    ) -> None:
        """`git bundle create f OLD..main` imports into a mirror that has OLD."""
        old, new = two_revisions
        fleet.git("branch", "-f", "old", old)
        import_bundle(_git_bundle(fleet, tmp_path / "old.bundle", "old"), mirror, max_bytes=MAX)
        bundle = _git_bundle(fleet, tmp_path / "inc.bundle", f"{old}..main")
        info = import_bundle(bundle, mirror, max_bytes=MAX)
        assert info.prerequisites == (old,)
        assert mirror.ref(FETCHED_REF) == new
        assert mirror.commits_between(old, new) == fleet.git("rev-list", f"{old}..{new}").split()

    def test_v3_bundle_imports(
        self, fleet: FleetRepo, mirror: GitMirror, two_revisions: tuple[str, str], tmp_path: Path
    ) -> None:
        """A version 3 bundle (with @object-format=sha1) is accepted too."""
        bundle = _git_bundle(fleet, tmp_path / "v3.bundle", "main", options=("--version=3",))
        assert bundle.read_bytes().startswith(b"# v3 git bundle\n")
        assert import_bundle(bundle, mirror, max_bytes=MAX).revision == two_revisions[1]

    def test_annotated_tag_bundle_yields_the_commit(
        self, fleet: FleetRepo, mirror: GitMirror, two_revisions: tuple[str, str], tmp_path: Path
    ) -> None:
        """A bundle of an annotated tag imports; the revision is the tagged commit."""
        fleet.git("tag", "-a", "-m", "release", "v1", "--no-sign")
        bundle = _git_bundle(fleet, tmp_path / "tag.bundle", "v1")
        info = import_bundle(bundle, mirror, max_bytes=MAX)
        assert (info.ref, info.revision) == ("refs/tags/v1", two_revisions[1])
        assert mirror.ref(FETCHED_REF) == two_revisions[1]

    def test_missing_prerequisite_is_refused_first(
        self, fleet: FleetRepo, mirror: GitMirror, two_revisions: tuple[str, str], tmp_path: Path
    ) -> None:
        """An incremental bundle for a device without its base names the missing commit."""
        old, _new = two_revisions
        bundle = _git_bundle(fleet, tmp_path / "inc.bundle", f"{old}..main")
        before = _state(mirror)
        with pytest.raises(BundleError, match=f"needs commit {old} which this device does not"):
            import_bundle(bundle, mirror, max_bytes=MAX)
        assert _state(mirror) == before

    def test_several_refs_need_a_choice(
        self, fleet: FleetRepo, mirror: GitMirror, two_revisions: tuple[str, str], tmp_path: Path
    ) -> None:
        """A bundle of several branches without HEAD asks which one; naming it works."""
        bundle = _git_bundle(fleet, tmp_path / "two.bundle", "side", "main")
        # main is the conventional default when there is no HEAD to follow.
        assert inspect_bundle(bundle).ref == "refs/heads/main"
        info = import_bundle(bundle, mirror, max_bytes=MAX, ref="side")
        assert info.ref == "refs/heads/side"
        assert info.revision == fleet.rev("side")


class TestSameRevisionAnyMedium:
    def test_fetch_after_bundle_import_is_unchanged(
        self, fleet: FleetRepo, mirror: GitMirror, two_revisions: tuple[str, str], tmp_path: Path
    ) -> None:
        """A bundle of the remote's tip leaves nothing for the next git fetch to download."""
        _old, new = two_revisions
        out = tmp_path / "usb.kbundle"
        create_bundle(out, fleet.work, "main", None, [])
        assert import_bundle(out, mirror, max_bytes=MAX).revision == new
        result = GitSource(str(fleet.bare), "main", mirror).fetch()
        assert (result.revision, result.changed, result.bytes_received) == (new, False, 0)


class TestBundlesWeWrite:
    def test_full_bundle_verifies_and_clones(
        self, fleet: FleetRepo, two_revisions: tuple[str, str], tmp_path: Path
    ) -> None:
        """write_git_bundle's output passes `git bundle verify` and `git clone` checks it out."""
        _old, new = two_revisions
        out = tmp_path / "ours.bundle"
        with out.open("wb") as f:
            info = write_git_bundle(fleet.bare, "main", None, f)
        assert (info.revision, info.prerequisites, info.size) == (new, (), out.stat().st_size)
        run_git("bundle", "verify", "-q", str(out), cwd=fleet.work, env=fleet.env)
        clone = tmp_path / "clone"
        run_git("clone", "-q", str(out), str(clone), env=fleet.env)
        assert run_git("rev-parse", "HEAD", cwd=clone, env=fleet.env).decode().strip() == new
        assert (clone / "devices" / "gw-1" / "plan.toml").read_text() == "y\n"
        run_git("fsck", "--strict", "--no-dangling", cwd=clone, env=fleet.env)

    def test_incremental_bundle_has_gits_prerequisites_and_fetches(
        self, fleet: FleetRepo, two_revisions: tuple[str, str], tmp_path: Path
    ) -> None:
        """Our OLD..main bundle lists the same prerequisites as git's and `git fetch` takes it."""
        old, new = two_revisions
        # A boundary beyond OLD itself: the side branch forked from OLD's parent.
        base = fleet.rev(f"{old}~1")
        ours = tmp_path / "ours.bundle"
        with ours.open("wb") as f:
            write_git_bundle(fleet.bare, "main", base, f)
        theirs = _git_bundle(fleet, tmp_path / "theirs.bundle", f"{base}..main")

        def prerequisites(path: Path) -> set[str]:
            lines = path.read_bytes().split(b"\n\n", 1)[0].split(b"\n")
            return {ln[1:41].decode() for ln in lines if ln.startswith(b"-")}

        assert prerequisites(ours) == prerequisites(theirs) == {base}
        clone = tmp_path / "clone"
        run_git("clone", "-q", "--no-checkout", str(fleet.bare), str(clone), env=fleet.env)
        run_git("update-ref", "refs/heads/main", base, cwd=clone, env=fleet.env)
        run_git("reflog", "expire", "--expire=now", "--all", cwd=clone, env=fleet.env)
        run_git("bundle", "verify", "-q", str(ours), cwd=clone, env=fleet.env)
        run_git("fetch", "-q", str(ours), "main:refs/heads/fetched", cwd=clone, env=fleet.env)
        fetched = run_git("rev-parse", "refs/heads/fetched", cwd=clone, env=fleet.env)
        assert fetched.decode().strip() == new

    def test_incremental_bundle_is_refused_by_git_without_its_base(
        self, fleet: FleetRepo, two_revisions: tuple[str, str], tmp_path: Path
    ) -> None:
        """`git bundle verify` in a repo lacking the prerequisite fails: the header is honest."""
        old, _new = two_revisions
        ours = tmp_path / "ours.bundle"
        with ours.open("wb") as f:
            write_git_bundle(fleet.bare, "main", old, f)
        empty = tmp_path / "empty"
        run_git("init", "-q", str(empty), env=fleet.env)
        proc = subprocess.run(
            ["git", "bundle", "verify", str(ours)], cwd=empty, env=fleet.env,
            capture_output=True, check=False,
        )  # fmt: skip
        assert proc.returncode != 0 and old.encode() in proc.stderr

    def test_our_incremental_bundle_imports(
        self, fleet: FleetRepo, mirror: GitMirror, two_revisions: tuple[str, str], tmp_path: Path
    ) -> None:
        """Our own OLD..main bundle imports into a mirror that has OLD."""
        old, new = two_revisions
        fleet.git("push", "-q", str(fleet.bare), f"{old}:refs/heads/old")
        GitSource(str(fleet.bare), "old", mirror).fetch()
        out = tmp_path / "inc.bundle"
        with out.open("wb") as f:
            write_git_bundle(fleet.bare, "main", old, f)
        assert import_bundle(out, mirror, max_bytes=MAX).revision == new
        assert mirror.is_ancestor(old, new)

    def test_nothing_new_is_refused(self, fleet: FleetRepo, two_revisions: tuple[str, str]) -> None:
        """A bundle since the very revision it carries would be empty; that is an error."""
        _old, new = two_revisions
        with pytest.raises(Exception, match="adds no commit"):
            write_git_bundle(fleet.bare, new, new, io.BytesIO())


@pytest.fixture
def artifacts(tmp_path: Path) -> list[tuple[str, Path]]:
    """Three artifact files and their sha256, one of them empty."""
    out = []
    for name, data in [("api.tar.gz", os.urandom(70_000)), ("cfg.json", b"{}\n"), ("empty", b"")]:
        path = tmp_path / "art" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        out.append((hashlib.sha256(data).hexdigest(), path))
    return out


class TestKeystoneBundles:
    def test_create_inspect_import_extract(
        self,
        fleet: FleetRepo,
        mirror: GitMirror,
        two_revisions: tuple[str, str],
        artifacts: list[tuple[str, Path]],
        tmp_path: Path,
    ) -> None:
        """A Keystone bundle round-trips: inspect, import, then every artifact hash-checked out."""
        _old, new = two_revisions
        seen: list[tuple[int, int]] = []
        out = tmp_path / "site.kbundle"
        info = create_bundle(out, fleet.work, "main", None, artifacts,
                             progress=lambda d, t: seen.append((d, t)))  # fmt: skip
        assert info.kind == "keystone" and info.revision == new and info.size == out.stat().st_size
        assert seen and seen[-1][0] == seen[-1][1]
        assert inspect_bundle(out) == info
        listing = subprocess.run(["tar", "tf", str(out)], capture_output=True, check=True)
        names = listing.stdout.decode().split()
        assert names[:2] == ["keystone-bundle.json", "repo.bundle"]
        assert sorted(names[2:]) == sorted(f"artifacts/{sha}" for sha, _ in artifacts)

        assert import_bundle(out, mirror, max_bytes=MAX) == info
        assert mirror.ref(FETCHED_REF) == new
        for sha, path in artifacts:
            dest = tmp_path / "cache" / sha
            extract_bundle_artifact(out, sha, dest)
            assert dest.read_bytes() == path.read_bytes()

    def test_reader_hands_out_each_part(
        self,
        fleet: FleetRepo,
        two_revisions: tuple[str, str],
        artifacts: list[tuple[str, Path]],
        tmp_path: Path,
    ) -> None:
        """open_bundle gives the manifest, the inner git bundle, its pack and each artifact as
        bounded sections; a plain git bundle is all git bundle and has no artifacts."""
        out = tmp_path / "site.kbundle"
        info = create_bundle(out, fleet.work, "main", None, artifacts)
        with open_bundle(out) as bundle:
            assert bundle.info == info and bundle.size == out.stat().st_size
            assert {a.sha256 for a in bundle.artifacts} == {sha for sha, _ in artifacts}
            inner = bundle.git_bundle().read()
            assert inner.startswith(b"# v2 git bundle\n")
            assert hashlib.sha256(inner).hexdigest() == bundle.repo_sha256
            pack = bundle.pack().read()
            assert pack.startswith(b"PACK") and inner.endswith(pack)
            for sha, path in artifacts:
                section = bundle.artifact(sha)
                assert section is not None and section.read() == path.read_bytes()
            assert bundle.artifact("f" * 64) is None
        plain = _git_bundle(fleet, tmp_path / "plain.bundle", "main")
        with open_bundle(plain) as bundle:
            assert bundle.info.kind == "git" and bundle.artifacts == ()
            assert bundle.repo_sha256 is None and bundle.git_bundle().length == bundle.size
            assert bundle.pack().read(4) == b"PACK"

    def test_reader_refuses_what_is_no_bundle(self, tmp_path: Path) -> None:
        """Opening garbage or a missing file is a BundleError, and nothing stays open."""
        junk = tmp_path / "junk"
        junk.write_bytes(b"x" * 4096)
        with pytest.raises(BundleError, match="not a Keystone bundle"):
            open_bundle(junk)
        with pytest.raises(BundleError, match="cannot open bundle"):
            open_bundle(tmp_path / "absent")

    def test_inner_git_bundle_is_standard(
        self,
        fleet: FleetRepo,
        two_revisions: tuple[str, str],
        artifacts: list[tuple[str, Path]],
        tmp_path: Path,
    ) -> None:
        """repo.bundle, taken out with tar, is a bundle git verifies and clones from."""
        out = tmp_path / "site.kbundle"
        create_bundle(out, fleet.bare, "main", None, artifacts[:1])
        subprocess.run(["tar", "xf", str(out), "-C", str(tmp_path), "repo.bundle"], check=True)
        run_git("bundle", "verify", "-q", str(tmp_path / "repo.bundle"), cwd=fleet.work,
                env=fleet.env)  # fmt: skip
        run_git("clone", "-q", str(tmp_path / "repo.bundle"), str(tmp_path / "c"), env=fleet.env)

    def test_reproducible_bytes(
        self,
        fleet: FleetRepo,
        two_revisions: tuple[str, str],
        artifacts: list[tuple[str, Path]],
        tmp_path: Path,
    ) -> None:
        """Same commit and artifacts give identical bytes: any order, any packing, any time."""
        old, _new = two_revisions
        a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
        create_bundle(a, fleet.work, "main", old, artifacts)
        run_git("gc", "-q", "--aggressive", "--prune=now", cwd=fleet.work, env=fleet.env)
        os.utime(artifacts[0][1], (1, 1))
        create_bundle(b, fleet.work, "main", old, list(reversed(artifacts + artifacts)))
        create_bundle(c, fleet.bare, "refs/heads/main", old, artifacts)
        assert a.read_bytes() == b.read_bytes() == c.read_bytes()

    def test_wrong_artifact_hash_is_refused_and_nothing_is_left(
        self,
        fleet: FleetRepo,
        two_revisions: tuple[str, str],
        artifacts: list[tuple[str, Path]],
        tmp_path: Path,
    ) -> None:
        """An artifact that does not hash to its pin refuses the bundle, naming the file."""
        sha, path = artifacts[0]
        wrong = [(sha, artifacts[1][1])]
        out = tmp_path / "out" / "site.kbundle"
        with pytest.raises(ArtifactIntegrityError, match=str(artifacts[1][1])):
            create_bundle(out, fleet.work, "main", None, wrong)
        assert not out.exists()
        assert list((tmp_path / "out").iterdir()) == []
        assert path.exists()


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _pack_offset(path: Path) -> int:
    return path.read_bytes().index(b"PACK")


class TestDamagedBundles:
    @pytest.fixture
    def kbundle(
        self, fleet: FleetRepo, two_revisions: tuple[str, str],
        artifacts: list[tuple[str, Path]], tmp_path: Path,
    ) -> Path:  # fmt: skip
        out = tmp_path / "site.kbundle"
        create_bundle(out, fleet.work, "main", None, artifacts)
        return out

    @pytest.fixture
    def gbundle(self, fleet: FleetRepo, two_revisions: tuple[str, str], tmp_path: Path) -> Path:
        return _git_bundle(fleet, tmp_path / "plain.bundle", "main")

    @pytest.mark.parametrize("kind", ["kbundle", "gbundle"])
    @pytest.mark.parametrize("where", [0.05, 0.5, 0.9, 0.999])
    def test_truncated_bundle_is_refused(
        self, kind: str, where: float, request: pytest.FixtureRequest, mirror: GitMirror
    ) -> None:
        """A bundle cut short anywhere is a BundleError, and the mirror is unchanged."""
        path: Path = request.getfixturevalue(kind)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * where)])
        before = _state(mirror)
        with pytest.raises(BundleError):
            inspect_bundle(path)
            import_bundle(path, mirror, max_bytes=MAX)
        with pytest.raises(BundleError):
            import_bundle(path, mirror, max_bytes=MAX)
        assert _state(mirror) == before

    @pytest.mark.parametrize("kind", ["kbundle", "gbundle"])
    @pytest.mark.parametrize("delta", [20, 200, -30, -2])
    def test_flipped_byte_in_the_pack_is_refused(
        self, kind: str, delta: int, request: pytest.FixtureRequest, mirror: GitMirror
    ) -> None:
        """One flipped bit in the pack (objects or checksum) refuses the import."""
        path: Path = request.getfixturevalue(kind)
        start = _pack_offset(path)
        if kind == "gbundle":
            offset = start + delta if delta > 0 else path.stat().st_size + delta
        else:
            end = path.read_bytes().index(b"artifacts/") - 512
            offset = start + delta if delta > 0 else end + delta
        _flip(path, offset)
        before = _state(mirror)
        with pytest.raises(BundleError) as info:
            import_bundle(path, mirror, max_bytes=MAX)
        assert str(path) in str(info.value)
        assert _state(mirror) == before

    def test_flipped_byte_in_the_git_header_is_refused(
        self, gbundle: Path, mirror: GitMirror
    ) -> None:
        """A damaged tip id in the header: the pack lacks that commit, so the import fails."""
        data = gbundle.read_bytes()
        line = data.index(b" refs/heads/main") - 40
        damaged = data[:line] + (b"0" if data[line : line + 1] != b"0" else b"1") + data[line + 1 :]
        gbundle.write_bytes(damaged)
        before = _state(mirror)
        with pytest.raises(BundleError, match="does not contain its tip"):
            import_bundle(gbundle, mirror, max_bytes=MAX)
        assert _state(mirror)[0] == before[0]

    def test_flipped_byte_in_an_artifact(
        self, kbundle: Path, artifacts: list[tuple[str, Path]], tmp_path: Path
    ) -> None:
        """A damaged artifact is refused on extraction and never appears at its destination."""
        sha = artifacts[0][0]
        offset = kbundle.read_bytes().index(f"artifacts/{sha}".encode()) + 512 + 1000
        _flip(kbundle, offset)
        dest = tmp_path / "cache" / sha
        with pytest.raises(ArtifactIntegrityError, match=sha):
            extract_bundle_artifact(kbundle, sha, dest)
        assert not dest.exists() and list(dest.parent.iterdir()) == []

    @pytest.mark.parametrize(
        "content",
        [b"", b"hello\n", b"# v2 git bundle\n", b"# v2 git bundle\n\nPACK", os.urandom(4096)],
    )
    def test_garbage_is_refused(self, content: bytes, tmp_path: Path, mirror: GitMirror) -> None:
        """Files that are not bundles are refused with a BundleError saying why."""
        path = tmp_path / "junk"
        path.write_bytes(content)
        with pytest.raises(BundleError) as info:
            import_bundle(path, mirror, max_bytes=MAX)
        assert str(path) in str(info.value)

    def test_pack_over_the_bound_is_refused(self, kbundle: Path, mirror: GitMirror) -> None:
        """max_bytes bounds the pack; over it, nothing is imported."""
        before = _state(mirror)
        with pytest.raises(BundleError, match="over the bound"):
            import_bundle(kbundle, mirror, max_bytes=1000)
        assert _state(mirror) == before

    def test_artifact_not_in_bundle(self, kbundle: Path, gbundle: Path, tmp_path: Path) -> None:
        """Asking for an artifact the bundle does not carry is a clear BundleError."""
        with pytest.raises(BundleError, match="not in the bundle"):
            extract_bundle_artifact(kbundle, "0" * 64, tmp_path / "x")
        with pytest.raises(BundleError, match="no artifacts"):
            extract_bundle_artifact(gbundle, "0" * 64, tmp_path / "x")

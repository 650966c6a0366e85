"""GitMirror reads checked against the git CLI: raw commits, ancestry, trees, export."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
from pathlib import Path

import pytest

from keystone.errors import UnsafeArchiveError, ValidationError
from keystone.sources import (
    FETCHED_REF,
    GitMirror,
    GitSource,
    HistoryLimitExceeded,
    TreeReader,
    UnknownRevision,
)
from tests.integration.sources.gitserver import FleetRepo, run_git

pytestmark = pytest.mark.integration


def _fetch(fleet: FleetRepo, mirror: GitMirror, ref: str = "main") -> str:
    return GitSource(str(fleet.bare), ref, mirror).fetch().revision


class TestRawCommit:
    def test_bytes_equal_git_cat_file_for_every_kind_of_commit(
        self, fleet: FleetRepo, mirror: GitMirror, tmp_path: Path
    ) -> None:
        """raw_commit is byte-for-byte `git cat-file commit`: signed, merge, latin-1, odd text."""
        key = tmp_path / "signing-key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ci", "-f", str(key)], check=True
        )
        commits = [fleet.commit({"a": "1"}, "plain")]
        commits.append(_signed_commit(fleet, key))
        fleet.git("checkout", "-q", "-b", "side", commits[0])
        fleet.commit({"c": "3"}, "side", push=False)
        fleet.git("checkout", "-q", "main")
        commits.append(fleet.merge("side", "merge side"))
        latin = "caf\xe9 d\xe9j\xe0 vu".encode("latin-1")
        (fleet.work / "msg").write_bytes(latin + b"\n")
        fleet.git("-c", "i18n.commitEncoding=ISO-8859-1", "commit", "-q", "--allow-empty",
                  "--no-gpg-sign", "-F", "msg")  # fmt: skip
        commits.append(fleet.rev("HEAD"))
        commits.append(fleet.commit(message="trailing   \n\n\n", extra=("--cleanup=verbatim",)))
        fleet.push()
        _fetch(fleet, mirror)
        for sha in commits:
            expected = run_git("cat-file", "commit", sha, cwd=fleet.work, env=fleet.env)
            assert mirror.raw_commit(sha) == expected, sha
        assert b"gpgsig -----BEGIN SSH SIGNATURE-----" in mirror.raw_commit(commits[1])

    def test_commit_time_and_parents(self, fleet: FleetRepo, mirror: GitMirror) -> None:
        """commit_time and parents agree with git's %ct and %P."""
        fleet.commit({"a": "1"})
        tip = fleet.commit({"a": "2"})
        _fetch(fleet, mirror)
        ct, parents = fleet.git("log", "-1", "--format=%ct %P", tip).split()
        assert mirror.commit_time(tip) == int(ct)
        assert mirror.parents(tip) == (parents,)


def _signed_commit(fleet: FleetRepo, key: Path) -> str:
    (fleet.work / "b").write_text("2")
    fleet.git("add", "b")
    fleet.git("-c", "gpg.format=ssh", "-c", f"user.signingkey={key}", "commit", "-q", "-S",
              "-m", "signed")  # fmt: skip
    fleet.push()
    return fleet.rev("HEAD")


@pytest.fixture
def history(fleet: FleetRepo, mirror: GitMirror) -> dict[str, str]:
    """A - B - C ------- M - E on main, B - D1 - D2 merged at M, and an unrelated root U."""
    c: dict[str, str] = {}
    c["A"] = fleet.commit({"f": "a"}, "A")
    c["B"] = fleet.commit({"f": "b"}, "B")
    c["C"] = fleet.commit({"f": "c"}, "C")
    fleet.git("checkout", "-q", "-b", "side", c["B"])
    c["D1"] = fleet.commit({"g": "1"}, "D1", push=False)
    c["D2"] = fleet.commit({"g": "2"}, "D2", push=False)
    fleet.git("checkout", "-q", "main")
    c["M"] = fleet.merge("side")
    c["E"] = fleet.commit({"f": "e"}, "E")
    fleet.git("checkout", "-q", "--orphan", "orphan")
    c["U"] = fleet.commit({"u": "u"}, "U", push=False)
    fleet.push("orphan")
    fleet.git("checkout", "-q", "main")
    _fetch(fleet, mirror, "orphan")
    _fetch(fleet, mirror, "main")
    return c


class TestAncestry:
    def test_is_ancestor_agrees_with_git_merge_base(
        self, fleet: FleetRepo, mirror: GitMirror, history: dict[str, str]
    ) -> None:
        """For every pair of commits, is_ancestor equals `git merge-base --is-ancestor`."""
        for (na, a), (nb, b) in itertools.product(history.items(), repeat=2):
            proc = subprocess.run(
                ["git", "merge-base", "--is-ancestor", a, b], cwd=fleet.work, env=fleet.env,
                capture_output=True, check=False,
            )  # fmt: skip
            assert proc.returncode in (0, 1)
            assert mirror.is_ancestor(a, b) is (proc.returncode == 0), f"{na} -> {nb}"

    def test_commits_between_agrees_with_git_rev_list(
        self, fleet: FleetRepo, mirror: GitMirror, history: dict[str, str]
    ) -> None:
        """commits_between(old, new) lists exactly `git rev-list new ^old`, in the same order."""
        olds: list[str | None] = [None, *history.values()]
        for old, new in itertools.product(olds, history.values()):
            args = ["rev-list", new] + ([f"^{old}"] if old else [])
            expected = fleet.git(*args).split()
            assert mirror.commits_between(old, new) == expected, (old, new)

    def test_walks_are_bounded(self, mirror: GitMirror, history: dict[str, str]) -> None:
        """A walk that would visit more commits than its limit refuses instead of guessing."""
        with pytest.raises(HistoryLimitExceeded):
            mirror.is_ancestor(history["U"], history["E"], limit=3)
        with pytest.raises(HistoryLimitExceeded):
            mirror.commits_between(None, history["E"], limit=3)


def _random_history(fleet: FleetRepo, seed: int, count: int, skew: bool) -> list[str]:
    """Commits with random parents (forks and merges), made with `git commit-tree`.

    With ``skew``, one commit in five has a committer time far in the past, as a device with
    a wrong clock would write it. The last commit merges every tip, so one ref holds them all.
    """
    rng = random.Random(seed)
    tree = fleet.git("write-tree").strip()
    commits: list[str] = []
    tips: set[str] = set()
    for i in range(count):
        parents = rng.sample(commits, k=min(len(commits), rng.choice([1, 1, 1, 2])))
        when = BASE + 60 * i - (86400 * rng.randint(1, 30) if skew and rng.random() < 0.2 else 0)
        stamp = {"GIT_COMMITTER_DATE": f"{when} +0000", "GIT_AUTHOR_DATE": f"{when} +0000"}
        args = ["commit-tree", tree, "-m", f"c{i}"]
        for parent in parents:
            args += ["-p", parent]
        sha = fleet.git(*args, env=stamp).strip()
        commits.append(sha)
        tips.difference_update(parents)
        tips.add(sha)
    args = ["commit-tree", tree, "-m", "all"]
    for tip in sorted(tips):
        args += ["-p", tip]
    top = fleet.git(*args, env={"GIT_COMMITTER_DATE": f"{BASE + 60 * count} +0000"}).strip()
    fleet.git("update-ref", "refs/heads/main", top)
    fleet.push()
    return [*commits, top]


BASE = 1_700_000_000


class TestAncestryOnRandomHistories:
    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_matches_git_on_sampled_pairs(
        self, seed: int, fleet: FleetRepo, mirror: GitMirror
    ) -> None:
        """On random forked and merged histories, both walks agree with git for sampled pairs."""
        commits = _random_history(fleet, seed, 60, skew=False)
        _fetch(fleet, mirror)
        rng = random.Random(seed)
        for _ in range(40):
            old, new = rng.choice(commits), rng.choice(commits)
            expected = fleet.git("rev-list", new, f"^{old}").split()
            assert mirror.commits_between(old, new) == expected, (old, new)
            proc = subprocess.run(
                ["git", "merge-base", "--is-ancestor", old, new], cwd=fleet.work, env=fleet.env,
                capture_output=True, check=False,
            )  # fmt: skip
            assert mirror.is_ancestor(old, new) is (proc.returncode == 0)

    @pytest.mark.parametrize("seed", [4, 5])
    def test_skewed_clocks_never_hide_a_new_commit(
        self, seed: int, fleet: FleetRepo, mirror: GitMirror
    ) -> None:
        """With committer clocks that go backwards, every truly new commit is still listed."""
        commits = _random_history(fleet, seed, 60, skew=True)
        _fetch(fleet, mirror)
        rng = random.Random(seed)
        exact_answers = 0
        for _ in range(40):
            old, new = rng.choice(commits), rng.choice(commits)
            truth = set(fleet.git("rev-list", new).split()) - set(
                fleet.git("rev-list", old).split()
            )
            ours = mirror.commits_between(old, new)
            assert truth <= set(ours), (old, new)
            assert len(ours) == len(set(ours))
            exact_answers += set(ours) == truth
        assert exact_answers >= 20  # the rest list a few extra (already-applied) commits


class TestResolve:
    def test_names_and_ids(self, mirror: GitMirror, history: dict[str, str]) -> None:
        """Full refs, short names, full and abbreviated ids all resolve to the commit id."""
        mirror.set_ref("refs/heads/main", history["E"])
        mirror.set_ref("refs/tags/v1", history["C"])
        assert mirror.resolve("refs/heads/main") == history["E"]
        assert mirror.resolve("main") == history["E"]
        assert mirror.resolve("v1") == history["C"]
        assert mirror.resolve(FETCHED_REF) == history["E"]
        assert mirror.resolve(history["D1"]) == history["D1"]
        assert mirror.resolve(history["D1"][:10]) == history["D1"]
        assert mirror.resolve_named("main") == ("refs/heads/main", history["E"])
        assert mirror.has("main") and mirror.has(history["A"])
        assert not mirror.has("refs/heads/nope") and not mirror.has("0" * 40)

    @pytest.mark.parametrize("name", ["refs/heads/nope", "nope", "0" * 40, "abcdef1"])
    def test_unknown_names_the_ref(self, name: str, mirror: GitMirror) -> None:
        """An unknown ref is UnknownRevision (a KeyError and a ValidationError) naming it."""
        with pytest.raises(UnknownRevision) as info:
            mirror.resolve(name)
        assert isinstance(info.value, KeyError) and isinstance(info.value, ValidationError)
        assert name in str(info.value)

    @pytest.mark.parametrize("name", ["", "a b", "main\n", "x" * 2000])
    def test_malformed_names_are_refused(self, name: str, mirror: GitMirror) -> None:
        """Names that cannot be refs are refused before any lookup."""
        with pytest.raises(ValidationError):
            mirror.resolve(name)

    @pytest.mark.parametrize("name", ["main", "refs/heads/a..b", "refs/heads/x.lock", "refs/"])
    def test_set_ref_checks_the_name(
        self, name: str, mirror: GitMirror, history: dict[str, str]
    ) -> None:
        """set_ref only writes well-formed refs/... names."""
        with pytest.raises(ValidationError):
            mirror.set_ref(name, history["A"])


class TestTrees:
    @pytest.fixture
    def tip(self, fleet: FleetRepo, mirror: GitMirror) -> str:
        fleet.commit(
            {
                "plans/default.toml": "[[components]]\n",
                "labels/edge/plan.toml": "x",
                "labels/lab/plan.toml": "y",
                "artifacts/tool.sh": "#!/bin/sh\necho hi\n",
                "artifacts/data/a.bin": b"\x00\x01",
            }
        )
        (fleet.work / "artifacts" / "tool.sh").chmod(0o755)
        fleet.git("add", "artifacts/tool.sh")
        os.symlink("/etc/passwd", fleet.work / "plans" / "link.toml")
        fleet.git("add", "plans/link.toml")
        tip = fleet.commit(message="exec bit and a symlink")
        _fetch(fleet, mirror)
        return tip

    def test_read_and_list(self, mirror: GitMirror, tip: str) -> None:
        """read_file and list_dir see the committed files; absent paths are None / []."""
        assert mirror.read_file(tip, "plans/default.toml") == b"[[components]]\n"
        assert mirror.read_file(tip, "./plans//default.toml") == b"[[components]]\n"
        assert mirror.read_file(tip, "plans/absent.toml") is None
        assert mirror.read_file(tip, "plans/default.toml/x") is None
        assert mirror.list_dir(tip, "") == [("artifacts", True), ("labels", True),
                                            ("plans", True)]  # fmt: skip
        assert mirror.list_dir(tip, "labels") == [("edge", True), ("lab", True)]
        assert mirror.list_dir(tip, "plans") == [("default.toml", False), ("link.toml", False)]
        assert mirror.list_dir(tip, "devices") == []

    @pytest.mark.parametrize("path", ["../x", "plans/../../etc/passwd", "/etc/passwd", "a\\b", ""])
    def test_unsafe_paths_are_refused(self, mirror: GitMirror, tip: str, path: str) -> None:
        """Paths that could leave the repository root are refused, never looked up."""
        with pytest.raises(ValidationError):
            mirror.read_file(tip, path)

    def test_directories_and_symlinks_are_not_files(self, mirror: GitMirror, tip: str) -> None:
        """Reading a directory or a symlink is refused with a message naming the path."""
        with pytest.raises(ValidationError, match="directory"):
            mirror.read_file(tip, "plans")
        with pytest.raises(ValidationError, match="symlink"):
            mirror.read_file(tip, "plans/link.toml")

    def test_tree_reader_is_bound_to_one_revision(
        self, fleet: FleetRepo, mirror: GitMirror, tip: str
    ) -> None:
        """A TreeReader keeps reading its revision after the mirror moves on."""
        reader = mirror.file_source(tip)
        assert isinstance(reader, TreeReader) and reader.revision == tip
        fleet.commit({"plans/default.toml": "changed"})
        _fetch(fleet, mirror)
        assert reader.read("plans/default.toml") == b"[[components]]\n"
        assert reader.listdir("labels/edge") == [("plan.toml", False)]

    def test_export_directory_and_file(self, mirror: GitMirror, tip: str, tmp_path: Path) -> None:
        """export_tree writes regular files with git's executable bit, and single files."""
        dest = tmp_path / "out"
        mirror.export_tree(tip, "artifacts", dest)
        assert (dest / "tool.sh").read_text() == "#!/bin/sh\necho hi\n"
        assert (dest / "tool.sh").stat().st_mode & 0o777 == 0o755
        assert (dest / "data" / "a.bin").read_bytes() == b"\x00\x01"
        assert (dest / "data" / "a.bin").stat().st_mode & 0o777 == 0o644
        mirror.export_tree(tip, "artifacts/data/a.bin", tmp_path / "single")
        assert (tmp_path / "single").read_bytes() == b"\x00\x01"

    def test_export_refuses_symlinks_and_cleans_up(
        self, mirror: GitMirror, tip: str, tmp_path: Path
    ) -> None:
        """A symlink under the exported path refuses the export and leaves nothing behind."""
        with pytest.raises(UnsafeArchiveError, match="symlink"):
            mirror.export_tree(tip, "plans", tmp_path / "plans")
        assert not (tmp_path / "plans").exists()

    def test_export_bounds(self, mirror: GitMirror, tip: str, tmp_path: Path) -> None:
        """max_files and max_bytes bound an export."""
        with pytest.raises(UnsafeArchiveError):
            mirror.export_tree(tip, "artifacts", tmp_path / "a", max_files=2)
        with pytest.raises(UnsafeArchiveError):
            mirror.export_tree(tip, "artifacts", tmp_path / "b", max_bytes=4)
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    def test_export_refuses_existing_destination(
        self, mirror: GitMirror, tip: str, tmp_path: Path
    ) -> None:
        """export_tree never writes into an existing path."""
        (tmp_path / "there").mkdir()
        with pytest.raises(ValidationError):
            mirror.export_tree(tip, "artifacts", tmp_path / "there")


class TestHostileTrees:
    def test_tree_entry_named_dotdot_never_reaches_the_disk(
        self, tmp_path: Path, mirror: GitMirror
    ) -> None:
        """A crafted tree with a '..' entry is refused when listed or exported."""
        from dulwich.objects import Blob, Commit, Tree
        from dulwich.repo import Repo

        evil = Repo.init_bare(str(tmp_path / "evil.git"), mkdir=True)
        try:
            blob = Blob.from_string(b"owned\n")
            inner = Tree()
            inner.add(b"x", 0o100644, blob.id)
            tree = Tree()
            tree.add(b"..", 0o040000, inner.id)
            tree.add(b"ok", 0o100644, blob.id)
            commit = Commit()
            commit.tree = tree.id
            commit.author = commit.committer = b"Mallory <m@example.invalid>"
            commit.author_time = commit.commit_time = 1_700_000_000
            commit.author_timezone = commit.commit_timezone = 0
            commit.message = b"crafted\n"
            for obj in (blob, inner, tree, commit):
                evil.object_store.add_object(obj)
            evil.refs[b"refs/heads/main"] = commit.id
        finally:
            evil.close()
        rev = GitSource(str(tmp_path / "evil.git"), "main", mirror).fetch().revision
        with pytest.raises(ValidationError):
            mirror.list_dir(rev, "")
        with pytest.raises(UnsafeArchiveError):
            mirror.export_tree(rev, "", tmp_path / "export" / "root")
        assert not (tmp_path / "export" / "x").exists()
        assert not (tmp_path / "export" / "root").exists()
        assert mirror.read_file(rev, "ok") == b"owned\n"

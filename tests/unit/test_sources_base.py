"""Source seams: repository paths, URL redaction, DirectoryReader, errors, import cost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import keystone.sources as sources
from keystone.errors import Refused, Retryable, SourceUnreachable, ValidationError
from keystone.sources import (
    DirectoryReader,
    FetchResult,
    FileSource,
    ImportedBundle,
    PackTooLarge,
    RemoteRefNotFound,
    Source,
    UnknownRevision,
    redact_url,
    split_repo_path,
)


class TestSplitRepoPath:
    @pytest.mark.parametrize(
        ("path", "parts"),
        [
            ("plans/default.toml", ["plans", "default.toml"]),
            ("./plans//default.toml/", ["plans", "default.toml"]),
            ("a/./b", ["a", "b"]),
            ("..x/y..", ["..x", "y.."]),
            ("ünïcode/ok", ["ünïcode", "ok"]),
        ],
    )
    def test_accepted(self, path: str, parts: list[str]) -> None:
        """Relative '/'-separated paths split into their segments; '.' and '' vanish."""
        assert split_repo_path(path) == parts

    @pytest.mark.parametrize(
        "path",
        ["../x", "a/../../b", "a/..", "/etc/passwd", "a\\b", "a\x00b", "a\nb", "", ".", "./"],
    )
    def test_refused(self, path: str) -> None:
        """Escapes, absolute paths, backslashes, control characters and empty paths are refused."""
        with pytest.raises(ValidationError) as info:
            split_repo_path(path)
        assert info.value.field == "path"

    @pytest.mark.parametrize("path", ["", ".", "./", ".//."])
    def test_root_when_allowed(self, path: str) -> None:
        """With allow_root, the empty path is the root."""
        assert split_repo_path(path, allow_root=True) == []


class TestRedactUrl:
    @pytest.mark.parametrize(
        ("url", "shown"),
        [
            (
                "https://user:secret@git.example.com/fleet.git",
                "https://user@git.example.com/fleet.git",
            ),
            ("https://:tok@git.example.com:8443/f.git", "https://git.example.com:8443/f.git"),
            ("https://git.example.com/fleet.git", "https://git.example.com/fleet.git"),
            ("http://u:p@[::1]:8080/r.git", "http://u@[::1]:8080/r.git"),
            ("git@github.com:org/fleet.git", "git@github.com:org/fleet.git"),
            ("/srv/git/fleet.git", "/srv/git/fleet.git"),
            ("ssh://deploy@host/fleet.git", "ssh://deploy@host/fleet.git"),
        ],
    )
    def test_password_removed(self, url: str, shown: str) -> None:
        """Passwords are removed from URLs shown to people; everything else stays."""
        assert redact_url(url) == shown


class TestDirectoryReader:
    @pytest.fixture
    def checkout(self, tmp_path: Path) -> Path:
        (tmp_path / "plans").mkdir()
        (tmp_path / "plans" / "default.toml").write_text("[[components]]\n")
        (tmp_path / "labels" / "edge").mkdir(parents=True)
        (tmp_path / ".git").mkdir()
        os.symlink("/etc/passwd", tmp_path / "plans" / "link.toml")
        os.symlink(tmp_path / "plans", tmp_path / "linkdir")
        return tmp_path

    def test_reads_like_a_tree(self, checkout: Path) -> None:
        """It reads files, lists directories (no .git) and answers None / [] when absent."""
        reader = DirectoryReader(checkout)
        assert isinstance(reader, FileSource)
        assert reader.read("plans/default.toml") == b"[[components]]\n"
        assert reader.read("plans/absent.toml") is None
        assert reader.read("plans/default.toml/x") is None
        assert reader.listdir("") == [("labels", True), ("linkdir", False), ("plans", True)]
        assert reader.listdir("plans") == [("default.toml", False), ("link.toml", False)]
        assert reader.listdir("devices") == []

    @pytest.mark.parametrize("path", ["plans/link.toml", "linkdir/default.toml"])
    def test_symlinks_are_refused(self, checkout: Path, path: str) -> None:
        """A symlink on the way is refused, as it would be in a git tree."""
        with pytest.raises(ValidationError, match="symlink"):
            DirectoryReader(checkout).read(path)

    def test_escapes_are_refused(self, checkout: Path) -> None:
        """A path that leaves the checkout is refused before touching the disk."""
        with pytest.raises(ValidationError):
            DirectoryReader(checkout / "plans").read("../labels")

    def test_directory_is_not_a_file(self, checkout: Path) -> None:
        """Reading a directory is refused; listing a file is refused."""
        reader = DirectoryReader(checkout)
        with pytest.raises(ValidationError, match="directory"):
            reader.read("plans")
        with pytest.raises(ValidationError, match="not a directory"):
            reader.listdir("plans/default.toml")


class TestErrorsAndValues:
    def test_unknown_revision_is_a_key_error_with_a_readable_message(self) -> None:
        """UnknownRevision is both a ValidationError and a KeyError, and prints unquoted."""
        err = UnknownRevision("'main' is not in the mirror", rev="main")
        assert isinstance(err, KeyError) and isinstance(err, ValidationError)
        assert str(err) == "revision: 'main' is not in the mirror"
        assert err.rev == "main" and err.exit_code == 3

    def test_classification(self) -> None:
        """A missing remote ref is retryable; an oversized pack is refused."""
        missing = RemoteRefNotFound("no ref", ref="main", url="https://h/r.git")
        assert isinstance(missing, SourceUnreachable) and isinstance(missing, Retryable)
        assert isinstance(PackTooLarge("big"), Refused)

    def test_fetch_result_is_frozen(self) -> None:
        """FetchResult is an immutable value."""
        result = FetchResult("a" * 40, True, 10, "https://h/r.git")
        with pytest.raises(AttributeError):
            result.changed = False  # type: ignore[misc]

    def test_fetch_result_defaults_keep_old_callers_working(self) -> None:
        """The four original fields still make a FetchResult; the new ones default to empty."""
        result = FetchResult("a" * 40, True, 10, "https://h/r.git")
        assert (result.requests, dict(result.detail), result.bundle) == (0, {}, None)
        assert result.revision_known
        assert hash(result) == hash(FetchResult("a" * 40, True, 10, "https://h/r.git"))

    def test_unchanged_with_no_revision_known(self) -> None:
        """A revision of "" says: nothing new, and nothing to verify."""
        assert not FetchResult("", False, 0, "https://h/b.ksb").revision_known

    def test_imported_bundle_names_its_artifacts(self, tmp_path: Path) -> None:
        """What a bundle import reports: kind, where the file is, its artifact hashes."""
        bundle = ImportedBundle("keystone", tmp_path / "b.ksb", ("0" * 64,))
        result = FetchResult("a" * 40, True, 10, "bundle:b.ksb", bundle=bundle)
        assert result.bundle is not None and result.bundle.artifacts == ("0" * 64,)
        assert ImportedBundle("git", tmp_path / "g.bundle").artifacts == ()

    @pytest.mark.parametrize("source", ["GitSource", "HttpBundleSource", "BundleFileSource"])
    def test_every_source_kind_is_a_source(self, source: str) -> None:
        """The three fetchers implement the Source protocol (structurally)."""
        assert issubclass(getattr(sources, source), Source)


class TestImportCost:
    def test_importing_sources_loads_no_dulwich(self) -> None:
        """The resident agent can import keystone.sources without dulwich, urllib3 or tarfile."""
        code = (
            "import sys, keystone.sources, keystone.sources.git, keystone.sources.bundle\n"
            "heavy = [m for m in ('dulwich', 'urllib3', 'tarfile', 'httpx') if m in sys.modules]\n"
            "print(','.join(heavy))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == ""

"""The one repository-path rule (keystone.repopath), and that every layer applies it."""

from __future__ import annotations

from pathlib import Path

import pytest

from keystone.errors import ValidationError
from keystone.plan import safe_join
from keystone.repopath import repo_path, repo_path_problem, split_repo_path
from keystone.runtime.artifacts import locate
from keystone.sources import base
from keystone.sources.base import DirectoryReader
from keystone.sync.resolve import repo_path as resolve_repo_path

REFUSED = ["../x", "a/../b", "a/../../b", "a/..", "/etc/passwd", "a\\b", "a\x00b", "a\nb", "a\x7fb"]


@pytest.mark.parametrize(
    ("path", "plain"),
    [
        ("a/b.toml", "a/b.toml"),
        ("./a//b.toml/", "a/b.toml"),
        ("a/./b", "a/b"),
        ("..x/y..", "..x/y.."),
    ],
)
def test_accepted_paths_have_one_plain_form(path: str, plain: str) -> None:
    """'.' and empty segments vanish; the segments are kept as they are."""
    assert repo_path(path) == plain
    assert split_repo_path(path) == plain.split("/")
    assert repo_path_problem(path) is None


@pytest.mark.parametrize("path", REFUSED)
def test_refused_paths_are_refused_with_the_field(path: str) -> None:
    """Absolute paths, '..' (also when it would stay inside), backslashes and controls."""
    assert repo_path_problem(path) is not None
    with pytest.raises(ValidationError) as info:
        split_repo_path(path, file="plans/default.toml", line=3, field="recipe")
    assert (info.value.file, info.value.line, info.value.field) == (
        "plans/default.toml",
        3,
        "recipe",
    )


def test_empty_path_names_the_root_only_when_allowed() -> None:
    """The empty path is refused unless the root is wanted."""
    assert repo_path_problem("") is not None
    assert split_repo_path("", allow_root=True) == []
    assert repo_path_problem(".", allow_root=True) is None


def test_old_name_stays_importable() -> None:
    """sources.base re-exports the validator under its old name."""
    assert base.split_repo_path is split_repo_path


@pytest.mark.parametrize("path", REFUSED)
def test_every_layer_refuses_what_the_rule_refuses(path: str, tmp_path: Path) -> None:
    """Plans in the repository, a checkout, local plan files and artifact URIs agree."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").write_text("x")
    with pytest.raises(ValidationError):
        resolve_repo_path(path)
    with pytest.raises(ValidationError):
        DirectoryReader(tmp_path).read(path)
    if not path.startswith("/"):
        with pytest.raises(ValidationError):
            safe_join(tmp_path, path)
        with pytest.raises(ValueError) as info:
            locate(path, tmp_path)
        assert info.value.args[0] == "uri-escapes-repo"

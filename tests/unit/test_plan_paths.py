"""Where a plan's recipe path leads: ``safe_join`` against ``Path.resolve``, symlinks included.

``safe_join`` walks a plain relative path with ``lstat`` and only falls back to
``Path.resolve`` when a component is a symlink. These tests hold it to what resolving the whole
path and checking it stays under the root gives, on a tree with symlinks that stay inside,
leave the root, dangle or loop, and show the refusal a user sees for a recipe symlinked out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from keystone.errors import ValidationError
from keystone.plan import load_desired, safe_join
from keystone.repopath import repo_path_problem

RECIPE = (
    '[metadata]\nname = "{name}"\nversion = "1.0.0"\n'
    '[lifecycle.run.exec]\ncommand = "sleep"\nargs = ["1"]\n'
)


def reference(root: Path, rel: str) -> Path | str:
    """Resolve the whole path, then check it: the rule ``safe_join`` must keep to."""
    try:
        candidate = (root / rel).resolve()
    except (OSError, ValueError, RuntimeError):
        return "cannot resolve"
    if repo_path_problem(rel) is not None or not candidate.is_relative_to(root.resolve()):
        return "escapes"
    return candidate


def outcome(root: Path, rel: str) -> Path | str:
    try:
        return safe_join(root, rel)
    except ValidationError as exc:
        return "cannot resolve" if "cannot resolve" in str(exc) else "escapes"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``top/root`` (the plan root, reached through a symlinked parent) and ``top/outside``."""
    top = tmp_path_factory.mktemp("paths")
    real = top / "real-root"
    (real / "a").mkdir(parents=True)
    (real / "a" / "f.toml").write_text("x")
    (real / "f.toml").write_text("x")
    (top / "outside").mkdir()
    (top / "outside" / "f.toml").write_text("x")
    links = {
        "l_in": "a/f.toml",
        "d_in": "a",
        "abs_in": str(real / "a"),
        "l_out": "../outside/f.toml",
        "d_out": "../outside",
        "abs_out": str(top / "outside"),
        "dangling": "nothing-here",
        "loop1": "loop2",
        "loop2": "loop1",
    }
    for name, target in links.items():
        os.symlink(target, real / name)
    os.symlink(real, top / "root")  # the root itself is reached through a symlink
    yield top / "root"


SEGMENTS = st.sampled_from(
    ["a", "f.toml", "l_in", "d_in", "abs_in", "l_out", "d_out", "abs_out", "dangling",
     "loop1", "missing", ".", ""]
)  # fmt: skip


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(SEGMENTS, min_size=1, max_size=4).map("/".join))
@example("l_out")
@example("d_out/f.toml")
@example("d_in/f.toml")
@example("abs_out/f.toml")
@example("missing/f.toml")
@example("f.toml/x")
@example("loop1/f.toml")
@example("a/../f.toml")
def test_safe_join_resolves_as_path_resolve_does(tree: Path, rel: str) -> None:
    """The same path for every path that stays under the root; refused otherwise."""
    assert outcome(tree, rel) == reference(tree, rel)


@pytest.mark.parametrize(
    ("recipe", "inside"),
    [("l_in", True), ("d_in/f.toml", True), ("l_out", False), ("d_out/f.toml", False)],
)
def test_a_recipe_symlinked_out_of_the_plan_root_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: str, inside: bool
) -> None:
    """A symlink that stays inside is followed; one that leaves is refused naming the plan's
    line, and the file it points to is never read."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    for where in (root / "a", outside):
        (where / "f.toml").write_text(RECIPE.format(name="web"))
    os.symlink("a/f.toml", root / "l_in")
    os.symlink("a", root / "d_in")
    os.symlink("../outside/f.toml", root / "l_out")
    os.symlink("../outside", root / "d_out")
    plan = root / "plan.toml"
    plan.write_text(f'[[components]]\nname = "web"\nrecipe = "{recipe}"\n')
    monkeypatch.chdir(root)
    if inside:
        desired = load_desired(plan, root=root)
        assert desired.components["web"].recipe.source == "a/f.toml"
        return
    with pytest.raises(ValidationError, match=r"escapes the plan root") as info:
        load_desired(plan, root=root)
    assert info.value.file == str(plan) and info.value.line == 3
    assert info.value.field == "recipe"

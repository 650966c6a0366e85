"""Resolving two revisions of a real git repository: only the recipes whose tree entries
changed are read and parsed again, and the answer is the one an uncached resolve gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from keystone.diff import diff_plans
from keystone.errors import ValidationError
from keystone.plan import LRU, RECIPES, parse_plan
from keystone.recipe import parse_recipe
from keystone.sources.git import GitMirror
from keystone.sync.resolve import resolve
from tests.integration.sources.gitserver import FleetRepo

pytestmark = pytest.mark.integration

RECIPE = (
    '[metadata]\nname = "{n}"\nversion = "{v}"\n\n'
    '[lifecycle.run.exec]\ncommand = "/bin/sleep"\nargs = ["{arg}"]\n'
)


def files(n: int, changed: set[int] = frozenset(), arg: str = "100") -> dict[str, str]:  # type: ignore[assignment]
    out = {
        f"recipes/c{i}.recipe.toml": RECIPE.format(
            n=f"c{i}", v="2.0.0" if i in changed else "1.0.0", arg=arg
        )
        for i in range(n)
    }
    out["plans/default.toml"] = "".join(
        f'[[components]]\nname = "c{i}"\nrecipe = "recipes/c{i}.recipe.toml"\n' for i in range(n)
    )
    return out


class Counting:
    """A revision's tree that counts the files read from it."""

    def __init__(self, tree: Any) -> None:
        self.tree = tree
        self.reads: list[str] = []

    def read(self, path: str) -> bytes | None:
        self.reads.append(path)
        data: bytes | None = self.tree.read(path)
        return data

    def blob_id(self, path: str) -> str | None:
        found: str | None = self.tree.blob_id(path)
        return found


def test_only_changed_tree_entries_are_read_again(tmp_path: Path) -> None:
    fleet = FleetRepo(tmp_path)
    a = fleet.commit(files(30), "a")
    b = fleet.commit(files(30, changed={3, 7}), "b")
    cache = LRU(256)
    with GitMirror(fleet.bare, create=False) as m:
        ta, tb = Counting(m.file_source(a)), Counting(m.file_source(b))
        pa = resolve(ta, device_id="d", labels=[], environ={}, revision=a, cache=cache)
        pb = resolve(tb, device_id="d", labels=[], environ={}, revision=b, cache=cache)
        assert len([p for p in ta.reads if p.startswith("recipes/")]) == 30
        assert sorted(p for p in tb.reads if p.startswith("recipes/")) == [
            "recipes/c3.recipe.toml",
            "recipes/c7.recipe.toml",
        ]
        fresh = resolve(m.file_source(b), device_id="d", labels=[], environ={}, cache={})
    assert {n: c.recipe for n, c in pb.components.items()} == {
        n: c.recipe for n, c in fresh.components.items()
    }
    assert diff_plans(pa, pb).changed == ("c3", "c7")
    # Unchanged recipes are the very same objects: nothing was parsed twice.
    assert pa.components["c0"].recipe is pb.components["c0"].recipe


def test_a_variable_the_recipe_names_is_part_of_the_key(tmp_path: Path) -> None:
    fleet = FleetRepo(tmp_path)
    rev = fleet.commit(files(2, arg="${DELAY:-5}"), "a")
    cache = LRU(64)
    with GitMirror(fleet.bare, create=False) as m:
        tree = m.file_source(rev)
        one = resolve(tree, device_id="d", labels=[], environ={"DELAY": "1"}, cache=cache)
        two = resolve(tree, device_id="d", labels=[], environ={"DELAY": "2"}, cache=cache)
        again = resolve(tree, device_id="d", labels=[], environ={"DELAY": "1"}, cache=cache)
    assert one.components["c0"].recipe.run.exec.args == ("1",)  # type: ignore[union-attr]
    assert two.components["c0"].recipe.run.exec.args == ("2",)  # type: ignore[union-attr]
    assert again.components["c0"].recipe is one.components["c0"].recipe


def test_a_broken_recipe_in_the_new_revision_still_names_file_and_line(tmp_path: Path) -> None:
    fleet = FleetRepo(tmp_path)
    a = fleet.commit(files(3), "a")
    broken = files(3)
    broken["recipes/c1.recipe.toml"] = '[metadata]\nname = "c1"\nversion = 7\n'
    b = fleet.commit(broken, "b")
    cache = LRU(64)
    with GitMirror(fleet.bare, create=False) as m:
        resolve(m.file_source(a), device_id="d", labels=[], environ={}, revision=a, cache=cache)
        with pytest.raises(ValidationError) as err:
            resolve(m.file_source(b), device_id="d", labels=[], environ={}, revision=b, cache=cache)
    assert err.value.file == f"recipes/c1.recipe.toml@{b[:12]}" and err.value.line == 3
    # A missing recipe is still "not found", not a cache miss.
    gone = files(3)
    del gone["recipes/c2.recipe.toml"]
    fleet.commit({"recipes/c2.recipe.toml": None, **gone}, "c")
    with (
        GitMirror(fleet.bare, create=False) as m,
        pytest.raises(ValidationError, match="recipe file not found"),
    ):
        resolve(m.file_source("HEAD"), device_id="d", labels=[], environ={}, cache=cache)


def test_the_shared_caches_are_bounded() -> None:
    lru = LRU(3)
    for i in range(10):
        lru[i] = i
    assert list(lru) == [7, 8, 9]
    assert lru[7] == 7 and list(lru) == [8, 9, 7]
    assert isinstance(RECIPES, LRU) and RECIPES.size >= 2000


def test_content_hash_is_computed_once_and_unchanged() -> None:
    text = RECIPE.format(n="x", v="1.0.0", arg="1")
    r = parse_recipe(text, file="x.toml")
    first = r.content_hash()
    assert r.content_hash() is first
    assert parse_recipe(text, file="other.toml").content_hash() == first


def test_a_plan_file_is_parsed_once_per_text() -> None:
    text = files(3)["plans/default.toml"]
    assert parse_plan(text, file="plans/default.toml") is parse_plan(
        text, file="plans/default.toml"
    )
    assert parse_plan(text, file="p.toml").file == "p.toml"

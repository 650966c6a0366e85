"""Plans, the dependency graph, change sets and deployment order (pure, table-driven)."""

from __future__ import annotations

from pathlib import Path

import pytest

from keystone.dag import build_graph
from keystone.diff import diff_plans
from keystone.errors import GraphError, ValidationError
from keystone.plan import (
    DesiredPlan,
    PlanEntry,
    load_desired,
    merge_entries,
    parse_plan,
    resolve_entries,
)
from keystone.recipe import Recipe, parse_recipe
from keystone.runtime.deployer import plan_actions


def recipe(name: str, version: str = "1.0.0", deps: str = "", args: str = "") -> Recipe:
    text = f'[metadata]\nname = "{name}"\nversion = "{version}"\n{deps}\n[lifecycle.run.exec]\ncommand = "true"\nargs = [{args}]\n'
    return parse_recipe(text, file=f"{name}.recipe.toml")


def dep(name: str, kind: str = "hard", version: str = "") -> str:
    return f'[[dependencies]]\nname = "{name}"\ntype = "{kind}"\nversion = "{version}"\n'


def plan(recipes: dict[str, Recipe]) -> DesiredPlan:
    texts = {n: r for n, r in recipes.items()}
    entries = [PlanEntry(n, n, True, "plan.toml", None) for n in recipes]

    def reader(e: PlanEntry) -> tuple[str, str]:
        r = texts[e.name]
        return r.text, r.source

    return resolve_entries(entries, reader, environ={})


STACK = {
    "db": recipe("db"),
    "cache": recipe("cache", deps=dep("db")),
    "api": recipe("api", deps=dep("cache") + dep("metrics", "soft")),
    "ui": recipe("ui", deps=dep("api", "ordering")),
}


class TestGraph:
    def test_layers(self) -> None:
        """Layers follow dependencies; an absent soft dependency is skipped with a warning."""
        g = build_graph(STACK)
        assert g.layers == (("db",), ("cache",), ("api",), ("ui",))
        assert any("soft dependency metrics" in w for w in g.warnings)

    def test_parallel_layer(self) -> None:
        """Independent components share a layer."""
        g = build_graph(
            {"a": recipe("a"), "b": recipe("b"), "c": recipe("c", deps=dep("a") + dep("b"))}
        )
        assert g.layers == (("a", "b"), ("c",))

    def test_cycle_is_printed(self) -> None:
        """A cycle names every member in order."""
        with pytest.raises(GraphError, match=r"dependency cycle: api -> db -> cache -> api"):
            build_graph(
                {
                    "db": recipe("db", deps=dep("cache")),
                    "cache": recipe("cache", deps=dep("api")),
                    "api": recipe("api", deps=dep("db")),
                }
            )

    def test_missing_hard_dependency(self) -> None:
        """A missing hard dependency is named with the component that needs it."""
        with pytest.raises(GraphError, match=r"component 'cache' has a hard dependency on 'db'"):
            build_graph({"cache": recipe("cache", deps=dep("db"))})

    def test_missing_ordering_dependency(self) -> None:
        """Ordering dependencies must be present too."""
        with pytest.raises(GraphError, match="ordering dependency"):
            build_graph({"ui": recipe("ui", deps=dep("api", "ordering"))})

    def test_version_constraint(self) -> None:
        """A hard dependency out of range is an error; a soft one is skipped."""
        with pytest.raises(GraphError, match=r"needs db \^2.0, the plan has 1.0.0"):
            build_graph({"db": recipe("db"), "c": recipe("c", deps=dep("db", "hard", "^2.0"))})
        g = build_graph({"db": recipe("db"), "c": recipe("c", deps=dep("db", "soft", "^2.0"))})
        assert g.layers == (("c", "db"),)

    def test_duplicate_recipe(self) -> None:
        """Two components may not use recipes with the same metadata.name."""
        with pytest.raises(GraphError, match="both use recipe"):
            build_graph({"a": recipe("x"), "b": recipe("x")})

    def test_cascade_skips_ordering(self) -> None:
        """Dependents cascade along hard and soft edges, never ordering ones."""
        g = build_graph(STACK)
        assert g.dependents(["db"]) == {"cache", "api"}
        assert g.dependents(["db"], cascading_only=False) == {"cache", "api", "ui"}


class TestChangeSet:
    def test_diff_and_actions(self) -> None:
        """A changed db restarts its hard dependents in order; ordering dependents stay up."""
        cur = plan(STACK)
        new = dict(STACK)
        new["db"] = recipe("db", "1.1.0")
        del new["ui"]
        new["extra"] = recipe("extra")
        want = plan(new)
        changes = diff_plans(cur, want)
        assert changes.added == ("extra",)
        assert changes.removed == ("ui",)
        assert changes.changed == ("db",)
        assert changes.restarted == ("api", "cache")
        _, actions = plan_actions(cur, want)
        assert [(a.action, a.component) for a in actions] == [
            ("stop", "ui"),
            ("stop", "api"),
            ("stop", "cache"),
            ("stop", "db"),
            ("start", "db"),
            ("start", "extra"),
            ("start", "cache"),
            ("start", "api"),
        ]

    def test_unchanged_plan_is_empty(self) -> None:
        """Re-applying the same plan changes nothing."""
        assert diff_plans(plan(STACK), plan(STACK)).empty

    def test_equal_recipes_parsed_twice_are_unchanged(self) -> None:
        """Two parses of one recipe (distinct objects, same content) are not a change; a new
        version is."""
        again = {n: parse_recipe(r.text, file=f"{n}.toml") for n, r in STACK.items()}
        assert all(again[n] is not STACK[n] for n in STACK)
        assert diff_plans(plan(STACK), plan(again)).empty
        again["db"] = recipe("db", "1.1.0")
        assert diff_plans(plan(STACK), plan(again)).changed == ("db",)

    def test_first_apply_starts_everything_in_layers(self) -> None:
        """From nothing, every component starts, layer by layer."""
        _, actions = plan_actions(DesiredPlan.empty(), plan(STACK))
        assert [(a.component, a.layer) for a in actions] == [
            ("db", 0),
            ("cache", 1),
            ("api", 2),
            ("ui", 3),
        ]


class TestPlanFiles:
    def test_go_plan_loads(self, tmp_path: Path) -> None:
        """The Go README's plan (recipe path relative to the working dir) loads."""
        (tmp_path / "configs/examples").mkdir(parents=True)
        (tmp_path / "configs/examples/com.example.hello.recipe.toml").write_text(
            recipe("com.example.hello").text
        )
        p = tmp_path / "configs/examples/plan.toml"
        p.write_text(
            '[[components]]\nname = "hello"\nrecipe = "configs/examples/com.example.hello.recipe.toml"\n'
        )
        d = load_desired(p, root=tmp_path, environ={})
        assert list(d.components) == ["hello"]
        # ... and relative to the plan file as well.
        p.write_text('[[components]]\nname = "hello"\nrecipe = "com.example.hello.recipe.toml"\n')
        assert list(load_desired(p, root=tmp_path / "elsewhere", environ={}).components) == [
            "hello"
        ]

    def test_duplicate_names(self) -> None:
        """Duplicate component names are refused with both lines."""
        text = (
            '[[components]]\nname = "a"\nrecipe = "x"\n\n[[components]]\nname = "a"\nrecipe = "y"\n'
        )
        with pytest.raises(
            ValidationError,
            match=r"plan.toml:6: components\[1\].name: duplicate component name 'a' \(first at line 1\)",
        ):
            parse_plan(text, file="plan.toml")

    def test_escaping_path(self, tmp_path: Path) -> None:
        """A recipe path that leaves the plan root is refused."""
        p = tmp_path / "plan.toml"
        p.write_text('[[components]]\nname = "a"\nrecipe = "../../etc/passwd"\n')
        with pytest.raises(ValidationError, match="escapes the plan root"):
            load_desired(p, root=tmp_path, environ={})

    def test_missing_recipe(self, tmp_path: Path) -> None:
        """A missing recipe file is named with the plan line."""
        p = tmp_path / "plan.toml"
        p.write_text('[[components]]\nname = "a"\nrecipe = "missing.recipe.toml"\n')
        with pytest.raises(
            ValidationError,
            match=r"plan.toml:3: recipe: recipe file not found: missing.recipe.toml",
        ):
            load_desired(p, root=tmp_path, environ={})

    def test_unknown_plan_field(self) -> None:
        """Unknown plan keys are reported with their line."""
        pf = parse_plan('[[components]]\nname = "a"\nrecipe = "x"\nreplicas = 3\n', file="p.toml")
        assert pf.unknown_fields == ("p.toml:4: unknown field components[0].replicas",)

    def test_merge_overlay(self) -> None:
        """A later entry replaces an earlier one whole; enabled = false removes it."""
        base = parse_plan(
            '[[components]]\nname = "a"\nrecipe = "a1"\n[[components]]\nname = "b"\nrecipe = "b"\n',
            file="d",
        )
        over = parse_plan(
            '[[components]]\nname = "a"\nrecipe = "a2"\n[[components]]\nname = "b"\nrecipe = "b"\nenabled = false\n',
            file="l",
        )
        entries, _ = merge_entries([base, over])
        assert [(e.name, e.recipe, e.file) for e in entries] == [("a", "a2", "l")]

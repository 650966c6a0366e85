"""The plan drawn: DOT, Mermaid and SVG text for a small plan (pure)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from keystone import graph
from keystone.dag import build_graph
from keystone.diff import diff_plans
from keystone.plan import DesiredPlan, PlanEntry, resolve_entries
from keystone.recipe import Recipe, parse_recipe

SVG = "{http://www.w3.org/2000/svg}"


def recipe(name: str, deps: str = "", version: str = "1.0.0") -> Recipe:
    text = (
        f'[metadata]\nname = "{name}"\nversion = "{version}"\n{deps}\n'
        '[lifecycle.run.exec]\ncommand = "true"\n'
    )
    return parse_recipe(text, file=f"{name}.recipe.toml")


def dep(name: str, kind: str = "hard") -> str:
    return f'[[dependencies]]\nname = "{name}"\ntype = "{kind}"\n'


SMALL = {
    "db": recipe("db"),
    "cache": recipe("cache", dep("db")),
    "metrics": recipe("metrics", dep("db", "ordering")),
    "api": recipe("api", dep("cache") + dep("metrics", "soft")),
}


def plan(recipes: dict[str, Recipe]) -> DesiredPlan:
    entries = [PlanEntry(n, n, True, "plan.toml", None) for n in recipes]
    return resolve_entries(entries, lambda e: (recipes[e.name].text, e.name), environ={})


def svg_parts(text: str) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    root = ET.fromstring(text)
    assert root.tag == f"{SVG}svg"
    nodes = {
        g.get("data-name", ""): g.get("data-state", "")
        for g in root.iter(f"{SVG}g")
        if g.get("class") == "node"
    }
    edges = [
        (p.get("data-to", ""), p.get("data-from", ""), (p.get("class") or "").split("edge-")[-1])
        for p in root.iter(f"{SVG}path")
        if (p.get("class") or "").startswith("edge ")
    ]
    return nodes, edges


class TestText:
    def test_dot(self) -> None:
        """DOT: left to right, a rank per layer, dependency -> dependent styled by type."""
        text = graph.to_dot(graph.picture(build_graph(SMALL)))
        assert text == (
            "digraph keystone {\n"
            "  rankdir=LR;\n"
            '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="sans-serif"];\n'
            '  { rank=same; "db"; }\n'
            '  { rank=same; "cache"; "metrics"; }\n'
            '  { rank=same; "api"; }\n'
            '  "api";\n'
            '  "cache";\n'
            '  "db";\n'
            '  "metrics";\n'
            '  "db" -> "cache" [style=solid, label="hard"];\n'
            '  "db" -> "metrics" [style=dotted, label="ordering"];\n'
            '  "cache" -> "api" [style=solid, label="hard"];\n'
            '  "metrics" -> "api" [style=dashed, label="soft"];\n'
            "}\n"
        )

    def test_dot_with_states(self) -> None:
        """With states, a node carries its state in the label and its colours."""
        text = graph.to_dot(graph.picture(build_graph(SMALL), {"db": "failed"}))
        assert '"db" [label="db\\nfailed", fillcolor="#f9c9c5", color="#b71c1c"];' in text

    def test_mermaid(self) -> None:
        """Mermaid: flowchart LR, arrows by type, a class per state."""
        text = graph.to_mermaid(
            graph.picture(build_graph(SMALL), {"db": "healthy", "api": "healthy"})
        )
        assert text == (
            "flowchart LR\n"
            '  n0["api<br/>healthy"]\n'
            '  n1["cache"]\n'
            '  n2["db<br/>healthy"]\n'
            '  n3["metrics"]\n'
            "  n2 --> n1\n"
            "  n2 -- ordering --o n3\n"
            "  n1 --> n0\n"
            "  n3 -. soft .-> n0\n"
            "  classDef s_healthy fill:#e3f4e4,stroke:#2e7d32\n"
            "  class n0,n2 s_healthy\n"
        )

    def test_names_are_quoted(self) -> None:
        """Quotes in names cannot break out of DOT strings or Mermaid labels."""
        doc = {"nodes": ['a"b'], "edges": [], "order": [['a"b']]}
        assert '"a\\"b";' in graph.render(graph.picture(doc), "dot")
        assert 'n0["a#quot;b"]' in graph.render(graph.picture(doc), "mermaid")

    def test_unknown_format(self) -> None:
        with pytest.raises(ValueError, match="dot, mermaid, svg"):
            graph.render(graph.picture(build_graph(SMALL)), "png")


class TestSvg:
    def test_well_formed_with_a_node_per_component_and_an_edge_per_dependency(self) -> None:
        """The SVG parses as XML; one node group per component, one path per dependency."""
        g = build_graph(SMALL)
        nodes, edges = svg_parts(graph.to_svg(graph.picture(g, {"db": "healthy"})))
        assert nodes == {"db": "healthy", "cache": "", "metrics": "", "api": ""}
        assert sorted(edges) == sorted((e.component, e.dependency, e.type.value) for e in g.edges)

    def test_layers_run_left_to_right(self) -> None:
        """Each layer's boxes stand right of the layer before; a layer's boxes share a column."""
        pic = graph.picture(build_graph(SMALL))
        lay = graph.layout(pic)
        xs = [{lay.boxes[n].x for n in layer} for layer in pic.layers]
        assert all(len(x) == 1 for x in xs)
        flat = [x.pop() for x in xs]
        assert flat == sorted(flat) and len(set(flat)) == len(flat)

    def test_no_style_attributes_or_scripts(self) -> None:
        """Presentation attributes only: shows under a strict CSP and as an image."""
        text = graph.to_svg(graph.picture(build_graph(SMALL), {"api": "failed"}))
        root = ET.fromstring(text)
        for el in root.iter():
            assert "style" not in el.attrib
            assert el.tag not in (f"{SVG}script", f"{SVG}style", f"{SVG}foreignObject")

    def test_names_are_escaped(self) -> None:
        """A name with markup in it is text in the SVG."""
        doc = {"nodes": ["<b>&"], "edges": [], "order": [["<b>&"]]}
        nodes, _ = svg_parts(graph.render(graph.picture(doc), "svg"))
        assert list(nodes) == ["<b>&"]

    def test_empty_plan(self) -> None:
        """An empty plan is an empty but valid drawing."""
        nodes, edges = svg_parts(graph.to_svg(graph.picture(build_graph({}))))
        assert nodes == {} and edges == []

    def test_long_edges_avoid_boxes(self) -> None:
        """An edge that skips a layer crosses it in a gap between boxes, not through one."""
        recipes = {
            "a": recipe("a"),
            "b": recipe("b", dep("a")),
            "c": recipe("c", dep("b") + dep("a", "soft")),
        }
        pic = graph.picture(build_graph(recipes))
        lay = graph.layout(pic)
        b = lay.boxes["b"]
        lane = graph._free_y(lay, lay.column_of["b"], b.y + b.h / 2)
        assert not b.y <= lane <= b.y + b.h


class TestFromJson:
    def test_api_json_and_graph_agree(self) -> None:
        """The /v1/plan/graph JSON draws the same picture as the Graph it came from."""
        g = build_graph(SMALL)
        assert graph.to_svg(graph.picture(g.to_json())) == graph.to_svg(graph.picture(g))

    def test_graph_command_colours_by_component_state(self) -> None:
        """``keystone graph``'s body: the API's graph, states from /v1/components."""
        g = build_graph(SMALL).to_json()
        comps = [{"name": "db", "state": "healthy"}, {"name": "api", "state": "backoff"}]
        nodes, _ = svg_parts(graph.graph_command(g, "svg", comps))
        assert nodes["db"] == "healthy" and nodes["api"] == "backoff"
        assert "classDef s_backoff" in graph.graph_command(g, "mermaid", comps)


class TestDiff:
    def test_marks_and_removed_nodes(self) -> None:
        """A plan diff: added, changed and restarted nodes marked; a removed one greyed in."""
        old = plan({**SMALL, "legacy": recipe("legacy", dep("db"))})
        new = plan({**SMALL, "cache": recipe("cache", dep("db"), "1.1.0"), "web": recipe("web")})
        changes = diff_plans(old, new).to_json()
        pic = graph.diff_picture(old.graph, new.graph, changes)
        assert pic.states == {
            "api": "restarted",
            "cache": "changed",
            "db": "unchanged",
            "metrics": "unchanged",
            "web": "added",
            "legacy": "removed",
        }
        assert pic.removed == {"legacy"}
        assert ("legacy", "db", "hard") in pic.edges
        nodes, edges = svg_parts(graph.plan_diff_command(old.graph, new.graph, changes, "svg"))
        assert nodes["legacy"] == "removed" and len(edges) == len(new.graph.edges) + 1
        assert 'style="rounded,filled,dashed"' in graph.plan_diff_command(
            old.graph, new.graph, changes, "dot"
        )

"""The plan's dependency graph as a picture: Graphviz DOT, Mermaid, and SVG from our own layout.

Pure functions over a graph, given either as ``keystone.dag.Graph`` or as the ``{nodes, edges,
order}`` JSON of ``GET /v1/plan/graph``. Layers run left to right in start order (dag.py's
layering); an arrow goes from a dependency to the component that needs it, so the picture
reads in the order things start. Edges are styled by dependency type (``hard`` solid, ``soft``
dashed, ``ordering`` dotted) and nodes are coloured by state when states are given: component
states (``healthy``, ``failed``...) or, for a plan diff, change marks (``added``, ``changed``,
``restarted``, ``removed``, ``unchanged``).

The SVG uses presentation attributes only (no ``style`` attributes, no ``<style>``, no script),
so it shows the same in an ``<img>``, inline under a strict Content-Security-Policy, and in a
README. Nothing here needs graphviz.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from keystone.dag import Graph


def escape(text: str) -> str:
    """Text for XML content and double-quoted attributes (xml.sax.saxutils would pull in
    urllib.request: a few hundred KB in a resident agent for five replacements)."""
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


FORMATS = ("dot", "mermaid", "svg")
"""What ``render`` draws."""

EDGE_TYPES = ("hard", "soft", "ordering")

# fill, stroke of a node per state or change mark; anything else is drawn white.
PALETTE: Mapping[str, tuple[str, str]] = {
    "healthy": ("#e3f4e4", "#2e7d32"),
    "running": ("#e3f4e4", "#2e7d32"),
    "starting": ("#fff4d6", "#b07800"),
    "installing": ("#fff4d6", "#b07800"),
    "pending": ("#f1f1f1", "#777777"),
    "stopping": ("#f1f1f1", "#777777"),
    "stopped": ("#e4e4e4", "#555555"),
    "none": ("#f1f1f1", "#777777"),
    "unhealthy": ("#fde3e1", "#c62828"),
    "backoff": ("#fde3e1", "#c62828"),
    "failed": ("#f9c9c5", "#b71c1c"),
    "added": ("#e3f4e4", "#2e7d32"),
    "changed": ("#fff4d6", "#b07800"),
    "restarted": ("#e1ecfb", "#1f5fbf"),
    "removed": ("#eeeeee", "#888888"),
    "unchanged": ("#ffffff", "#555555"),
}
_PLAIN = ("#ffffff", "#555555")

# (stroke, dash array) per dependency type.
_EDGE_STYLE: Mapping[str, tuple[str, str]] = {
    "hard": ("#333333", ""),
    "soft": ("#555555", "7 4"),
    "ordering": ("#8a8a8a", "2 3"),
}
_DOT_STYLE = {"hard": "solid", "soft": "dashed", "ordering": "dotted"}

NODE_H = 46
GAP_X = 70
GAP_Y = 22
MARGIN = 20
CHAR_W = 7.6  # average width of a 13px sans-serif character; wide enough for DejaVu Sans


@dataclass(frozen=True)
class Picture:
    """What is drawn: nodes, edges ``(component, dependency, type)``, start layers, states."""

    nodes: tuple[str, ...]
    edges: tuple[tuple[str, str, str], ...]
    layers: tuple[tuple[str, ...], ...]
    states: Mapping[str, str]
    removed: frozenset[str] = frozenset()


GraphLike = Graph | Mapping[str, Any]


def picture(graph: GraphLike, states: Mapping[str, str] | None = None) -> Picture:
    """Normalize a ``Graph`` or its JSON into a ``Picture``; states are optional."""
    if isinstance(graph, Graph):
        nodes = list(graph.nodes)
        edges = [(e.component, e.dependency, e.type.value) for e in graph.edges]
        layers = [list(layer) for layer in graph.layers]
    else:
        nodes, edges, layers = _from_json(graph)
    placed = {n for layer in layers for n in layer}
    stray = [n for n in nodes if n not in placed]
    if stray:  # a hand-written JSON without order: put what is missing in a last layer
        layers.append(stray)
    known = set(nodes) | placed
    return Picture(
        nodes=tuple(sorted(known)),
        edges=tuple(e for e in edges if e[0] in known and e[1] in known),
        layers=tuple(tuple(layer) for layer in layers if layer),
        states=dict(states or {}),
    )


def _from_json(
    graph: Mapping[str, Any],
) -> tuple[list[str], list[tuple[str, str, str]], list[list[str]]]:
    """Nodes, typed edges and layers of a ``/v1/plan/graph`` answer: ours (``typedEdges``,
    ``layers``), the Go agent's (``edges`` dependency -> dependents, a flat ``order``: layers
    follow from the edges), or an older agent's (``edges`` a list, ``order`` layers)."""
    nodes = [str(n) for n in graph.get("nodes") or []]
    raw = graph.get("typedEdges")
    if raw is None:
        raw = graph.get("edges") or []
    if isinstance(raw, Mapping):
        edges = [(str(c), str(dep), "hard") for dep, comps in raw.items() for c in comps or []]
    else:
        edges = [(str(e["from"]), str(e["to"]), str(e.get("type") or "hard")) for e in raw]
    order = graph.get("layers")
    if order is None:
        order = graph.get("order") or []
    if order and all(isinstance(n, str) for n in order):
        level: dict[str, int] = {}
        needs: dict[str, list[str]] = {}
        for comp, dep, _ in edges:
            needs.setdefault(comp, []).append(dep)
        for n in order:  # a start order: every dependency comes before its dependents
            level[n] = 1 + max((level.get(d, -1) for d in needs.get(n, ())), default=-1)
        layers: list[list[str]] = [[] for _ in range(1 + max(level.values(), default=-1))]
        for n in order:
            layers[level[n]].append(n)
        return nodes, edges, layers
    return nodes, edges, [[str(n) for n in layer] for layer in order]


def states_of(components: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``{name: phase}`` from a ``GET /v1/components`` answer (the supervisor's finer phase;
    an answer without one, from the Go agent, gives its ``state``)."""
    return {
        str(c["name"]): str(c.get("phase") or c.get("state") or "")
        for c in components
        if "name" in c
    }


def diff_picture(
    current: GraphLike, desired: GraphLike, changes: Mapping[str, Sequence[str]]
) -> Picture:
    """What a change does to the plan: the desired graph, its nodes marked ``added``,
    ``changed``, ``restarted`` or ``unchanged``, and removed components (with the edges they
    had) drawn greyed in the layer they held.

    ``changes`` is ``ChangeSet.to_json()`` (or the ``changes`` of ``keystone plan diff --json``).
    """
    old, new = picture(current), picture(desired)
    marks = {n: "unchanged" for n in new.nodes}
    for key in ("added", "changed", "restarted"):
        for n in changes.get(key) or ():
            if n in marks:
                marks[n] = key
    removed = [n for n in old.nodes if n not in marks]
    layers = [list(layer) for layer in new.layers]
    old_layer = {n: i for i, layer in enumerate(old.layers) for n in layer}
    for n in removed:
        i = old_layer.get(n, 0)
        while len(layers) <= i:
            layers.append([])
        layers[i].append(n)
        marks[n] = "removed"
    gone = set(removed)
    edges = list(new.edges) + [e for e in old.edges if e[0] in gone or e[1] in gone]
    return Picture(
        nodes=tuple(sorted(marks)),
        edges=tuple(edges),
        layers=tuple(tuple(layer) for layer in layers if layer),
        states=marks,
        removed=frozenset(gone),
    )


def render(pic: Picture, fmt: str) -> str:
    """The picture in ``fmt`` (one of ``FORMATS``). Raises ValueError for another format."""
    if fmt == "dot":
        return to_dot(pic)
    if fmt == "mermaid":
        return to_mermaid(pic)
    if fmt == "svg":
        return to_svg(pic)
    raise ValueError(f"unknown graph format {fmt!r}: expected one of {', '.join(FORMATS)}")


def graph_command(
    data: Mapping[str, Any], fmt: str, components: Sequence[Mapping[str, Any]] | None = None
) -> str:
    """The body of ``keystone graph --format dot|svg|mermaid``: the applied plan's graph
    (``GET /v1/plan/graph``), coloured by the states of ``GET /v1/components`` when given."""
    return render(picture(data, states_of(components or [])), fmt)


def plan_diff_command(
    current: GraphLike, desired: GraphLike, changes: Mapping[str, Sequence[str]], fmt: str
) -> str:
    """The body of ``keystone plan diff A B --format dot|svg|mermaid``: the picture of what
    moving from ``current`` to ``desired`` changes."""
    return render(diff_picture(current, desired, changes), fmt)


# --- DOT ------------------------------------------------------------------------------------


def _dot_id(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(pic: Picture) -> str:
    """Graphviz DOT: left to right, one rank per layer, dependency -> dependent."""
    lines = [
        "digraph keystone {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="sans-serif"];',
    ]
    for layer in pic.layers:
        lines.append("  { rank=same; " + " ".join(_dot_id(n) + ";" for n in layer) + " }")
    for n in pic.nodes:
        state = pic.states.get(n)
        if state:
            fill, stroke = PALETTE.get(state, _PLAIN)
            label = _dot_id(f"{n}\\n{state}").replace("\\\\n", "\\n")
            extra = ', style="rounded,filled,dashed"' if n in pic.removed else ""
            lines.append(
                f'  {_dot_id(n)} [label={label}, fillcolor="{fill}", color="{stroke}"{extra}];'
            )
        else:
            lines.append(f"  {_dot_id(n)};")
    for comp, dep, kind in pic.edges:
        lines.append(
            f"  {_dot_id(dep)} -> {_dot_id(comp)} "
            f'[style={_DOT_STYLE.get(kind, "solid")}, label="{kind}"];'
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- Mermaid --------------------------------------------------------------------------------

_MERMAID_ARROW = {"hard": "-->", "soft": "-. soft .->", "ordering": "-- ordering --o"}


def _mermaid_label(text: str) -> str:
    return '"' + text.replace('"', "#quot;") + '"'


def to_mermaid(pic: Picture) -> str:
    """A Mermaid flowchart, left to right: ``-->`` hard, ``-. soft .->``, ``-- ordering --o``."""
    ids = {n: f"n{i}" for i, n in enumerate(pic.nodes)}
    lines = ["flowchart LR"]
    for n in pic.nodes:
        state = pic.states.get(n)
        label = f"{n}<br/>{state}" if state else n
        lines.append(f"  {ids[n]}[{_mermaid_label(label)}]")
    for comp, dep, kind in pic.edges:
        lines.append(f"  {ids[dep]} {_MERMAID_ARROW.get(kind, '-->')} {ids[comp]}")
    used = sorted({s for s in pic.states.values() if s})
    for state in used:
        fill, stroke = PALETTE.get(state, _PLAIN)
        cls = _css_class(state)
        lines.append(f"  classDef {cls} fill:{fill},stroke:{stroke}")
        members = ",".join(ids[n] for n in pic.nodes if pic.states.get(n) == state)
        lines.append(f"  class {members} {cls}")
    return "\n".join(lines) + "\n"


def _css_class(state: str) -> str:
    return "s_" + "".join(c if c.isalnum() else "_" for c in state)


# --- SVG ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """Where a node is drawn."""

    x: float
    y: float
    w: float
    h: float


@dataclass(frozen=True)
class Layout:
    """Boxes of every node, the columns (x, width) they stand in, and the drawing's size."""

    boxes: Mapping[str, Box]
    columns: tuple[tuple[float, float], ...]
    column_of: Mapping[str, int]
    width: float
    height: float


def layout(pic: Picture) -> Layout:
    """Boxes for every node: one column per layer, left to right.

    Within a column, nodes are ordered by the mean row of their dependencies in earlier
    columns (one barycenter sweep: fewer crossings; ties by name, so the result is stable),
    and each column is centred vertically.
    """
    deps: dict[str, list[str]] = {}
    for comp, dep, _ in pic.edges:
        deps.setdefault(comp, []).append(dep)
    row: dict[str, float] = {}
    ordered_columns: list[list[str]] = []
    for layer in pic.layers:

        def key(n: str) -> float:
            placed = [row[d] for d in deps.get(n, ()) if d in row]
            return sum(placed) / len(placed) if placed else float("inf")

        ordered = sorted(layer, key=lambda n: (key(n), n))
        for i, n in enumerate(ordered):
            row[n] = i
        ordered_columns.append(ordered)
    tallest = max((len(c) for c in ordered_columns), default=0)
    boxes: dict[str, Box] = {}
    columns: list[tuple[float, float]] = []
    column_of: dict[str, int] = {}
    x = float(MARGIN)
    for c, col in enumerate(ordered_columns):
        width = max((_node_width(n, pic.states.get(n)) for n in col), default=120.0)
        offset = (tallest - len(col)) * (NODE_H + GAP_Y) / 2
        for i, n in enumerate(col):
            boxes[n] = Box(x, MARGIN + offset + i * (NODE_H + GAP_Y), width, NODE_H)
            column_of[n] = c
        columns.append((x, width))
        x += width + GAP_X
    return Layout(
        boxes=boxes,
        columns=tuple(columns),
        column_of=column_of,
        width=max(x - GAP_X + MARGIN, 2.0 * MARGIN + 120),
        height=MARGIN * 2 + max(tallest * (NODE_H + GAP_Y) - GAP_Y, NODE_H),
    )


def _node_width(name: str, state: str | None) -> float:
    longest = max(len(name), len(state or "") * 0.85)
    return max(120.0, round(longest * CHAR_W + 28))


def _num(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def to_svg(pic: Picture, *, title: str = "Keystone plan") -> str:
    """A standalone SVG document: boxes in layers, curved arrows, a legend underneath."""
    lay = layout(pic)
    width = max(lay.width, _legend_width(pic))
    legend_h = 34
    total_h = lay.height + legend_h
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(width)}" '
        f'height="{_num(total_h)}" viewBox="0 0 {_num(width)} {_num(total_h)}" '
        'font-family="DejaVu Sans, Verdana, sans-serif" font-size="13">',
        f"<title>{escape(title)}</title>",
        "<defs>",
    ]
    for kind, (stroke, _) in _EDGE_STYLE.items():
        out.append(
            f'<marker id="arrow-{kind}" viewBox="0 0 10 10" refX="9" refY="5" '
            'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
            f'<path d="M0,0 L10,5 L0,10 z" fill="{stroke}"/></marker>'
        )
    out.append("</defs>")
    out.append(f'<rect x="0" y="0" width="{_num(width)}" height="{_num(total_h)}" fill="#ffffff"/>')
    out.append('<g class="edges">')
    ports = _ports(pic, lay)
    for i, (comp, dep, kind) in enumerate(pic.edges):
        if dep in lay.boxes and comp in lay.boxes:
            out.append(_edge(lay, ports[i], kind, dep, comp))
    out.append("</g>")
    out.append('<g class="nodes">')
    for n in pic.nodes:
        box = lay.boxes.get(n)
        if box is not None:
            out.append(_node(n, box, pic.states.get(n), removed=n in pic.removed))
    out.append("</g>")
    out.append(_legend(pic, lay.height))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _ports(pic: Picture, lay: Layout) -> list[tuple[float, float]]:
    """For each edge, the y where it leaves its dependency and where it enters its dependent:
    the edges at one side of a box are spread over that side, in the order of their other end,
    so that arrows into one node do not pile up on one point."""
    out_of: dict[str, list[int]] = {}
    into: dict[str, list[int]] = {}
    for i, (comp, dep, _) in enumerate(pic.edges):
        if dep in lay.boxes and comp in lay.boxes:
            out_of.setdefault(dep, []).append(i)
            into.setdefault(comp, []).append(i)

    def centre(n: str) -> float:
        b = lay.boxes[n]
        return b.y + b.h / 2

    ys: list[list[float]] = [[0.0, 0.0] for _ in pic.edges]
    for side, groups, other in ((0, out_of, 0), (1, into, 1)):
        for n, idx in groups.items():
            box = lay.boxes[n]
            idx.sort(key=lambda i: centre(pic.edges[i][other]))
            for k, i in enumerate(idx):
                ys[i][side] = box.y + box.h * (k + 1) / (len(idx) + 1)
    return [(a, b) for a, b in ys]


def _free_y(lay: Layout, column: int, want: float) -> float:
    """The y nearest to ``want`` where a line can cross ``column`` without touching a box."""
    boxes = sorted(
        (b for n, b in lay.boxes.items() if lay.column_of.get(n) == column), key=lambda b: b.y
    )
    if not boxes:
        return want
    gaps = [boxes[0].y - GAP_Y / 2]
    gaps += [(a.y + a.h + b.y) / 2 for a, b in pairwise(boxes)]
    gaps.append(boxes[-1].y + boxes[-1].h + GAP_Y / 2)
    return min(gaps, key=lambda g: abs(g - want))


def _edge(lay: Layout, port: tuple[float, float], kind: str, dep: str, comp: str) -> str:
    stroke, dash = _EDGE_STYLE.get(kind, _EDGE_STYLE["hard"])
    a, b = lay.boxes[dep], lay.boxes[comp]
    ca, cb = lay.column_of[dep], lay.column_of[comp]
    x1, y1 = a.x + a.w, port[0]
    x2, y2 = b.x - 2, port[1]
    if cb <= ca:  # same column (a hand-made graph): loop around the right side
        x2 = b.x + b.w + 2
        bend = 40
        d = (
            f"M{_num(x1)},{_num(y1)} C{_num(x1 + bend)},{_num(y1)} "
            f"{_num(x2 + bend)},{_num(y2)} {_num(x2)},{_num(y2)}"
        )
    else:
        # Through every column in between along a free lane, with smooth joins in the gaps.
        points = [(x1, y1)]
        for c in range(ca + 1, cb):
            cx, cw = lay.columns[c]
            want = y1 + (y2 - y1) * (c - ca) / (cb - ca)
            lane = _free_y(lay, c, want)
            points += [(cx, lane), (cx + cw, lane)]
        points.append((x2, y2))
        d = f"M{_num(x1)},{_num(y1)}"
        for i in range(1, len(points)):
            (px, py), (qx, qy) = points[i - 1], points[i]
            if i % 2 == 0:  # across a column: straight
                d += f" L{_num(qx)},{_num(qy)}"
            else:
                mid = (px + qx) / 2
                d += f" C{_num(mid)},{_num(py)} {_num(mid)},{_num(qy)} {_num(qx)},{_num(qy)}"
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    width = "2" if kind == "hard" else "1.6"
    marker = kind if kind in _EDGE_STYLE else "hard"
    return (
        f'<path class="edge edge-{escape(kind)}" data-from="{escape(dep)}" '
        f'data-to="{escape(comp)}" d="{d}" fill="none" stroke="{stroke}" '
        f'stroke-width="{width}"{dash_attr} marker-end="url(#arrow-{marker})">'
        f"<title>{escape(comp)} needs {escape(dep)} ({escape(kind)})</title></path>"
    )


def _node(name: str, box: Box, state: str | None, *, removed: bool) -> str:
    fill, stroke = PALETTE.get(state or "", _PLAIN)
    dash = ' stroke-dasharray="5 3"' if removed else ""
    cx = box.x + box.w / 2
    parts = [
        f'<g class="node" data-name="{escape(name)}" data-state="{escape(state or "")}">',
        f"<title>{escape(name)}{' (' + escape(state) + ')' if state else ''}</title>",
        f'<rect x="{_num(box.x)}" y="{_num(box.y)}" width="{_num(box.w)}" height="{_num(box.h)}" '
        f'rx="7" fill="{fill}" stroke="{stroke}" stroke-width="1.6"{dash}/>',
    ]
    if state:
        parts.append(
            f'<text x="{_num(cx)}" y="{_num(box.y + 19)}" text-anchor="middle" '
            f'font-weight="bold" fill="#1b1b1b">{escape(name)}</text>'
        )
        parts.append(
            f'<text x="{_num(cx)}" y="{_num(box.y + 36)}" text-anchor="middle" font-size="11" '
            f'fill="{stroke}">{escape(state)}</text>'
        )
    else:
        parts.append(
            f'<text x="{_num(cx)}" y="{_num(box.y + box.h / 2 + 4.5)}" text-anchor="middle" '
            f'font-weight="bold" fill="#1b1b1b">{escape(name)}</text>'
        )
    parts.append("</g>")
    return "".join(parts)


def _legend_width(pic: Picture) -> float:
    edges = sum(34 + len(k) * 7 + 18 for k in EDGE_TYPES)
    states = sum(16 + len(s) * 7 + 14 for s in {s for s in pic.states.values() if s})
    return 2.0 * MARGIN + edges + states


def _legend(pic: Picture, top: float) -> str:
    y = top + 12
    x = float(MARGIN)
    parts = ['<g class="legend" font-size="11" fill="#333333">']
    for kind in EDGE_TYPES:
        stroke, dash = _EDGE_STYLE[kind]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(
            f'<line x1="{_num(x)}" y1="{_num(y)}" x2="{_num(x + 28)}" y2="{_num(y)}" '
            f'stroke="{stroke}" stroke-width="1.8"{dash_attr} marker-end="url(#arrow-{kind})"/>'
        )
        parts.append(f'<text x="{_num(x + 34)}" y="{_num(y + 4)}">{kind}</text>')
        x += 34 + len(kind) * 7 + 18
    for state in sorted({s for s in pic.states.values() if s}):
        fill, stroke = PALETTE.get(state, _PLAIN)
        parts.append(
            f'<rect x="{_num(x)}" y="{_num(y - 6)}" width="12" height="12" rx="3" '
            f'fill="{fill}" stroke="{stroke}"/>'
        )
        parts.append(f'<text x="{_num(x + 16)}" y="{_num(y + 4)}">{escape(state)}</text>')
        x += 16 + len(state) * 7 + 14
    parts.append("</g>")
    return "".join(parts)

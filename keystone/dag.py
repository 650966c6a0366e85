"""The dependency graph of a plan: validation, start layers, cycles and restart cascades.

Pure functions over recipes. A dependency names another recipe's ``metadata.name`` (the Go
format); the plan's component name is accepted too. ``hard`` and ``ordering`` dependencies must
be in the plan and satisfy their version constraint; an absent or out-of-range ``soft`` one is
skipped with a warning. Edges point from a component to what it depends on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from keystone.errors import GraphError
from keystone.recipe import DependencyType, Recipe


@dataclass(frozen=True)
class Edge:
    """``component`` depends on ``dependency``."""

    component: str
    dependency: str
    type: DependencyType


@dataclass(frozen=True)
class Graph:
    """A validated DAG over plan component names."""

    nodes: tuple[str, ...]
    edges: tuple[Edge, ...]
    layers: tuple[tuple[str, ...], ...]
    warnings: tuple[str, ...] = ()
    _deps: Mapping[str, tuple[Edge, ...]] = field(default_factory=dict, repr=False)

    def layer_of(self, name: str) -> int:
        """Index of the start layer holding ``name``."""
        for i, layer in enumerate(self.layers):
            if name in layer:
                return i
        raise KeyError(name)

    def order(self) -> list[str]:
        """Every node in start order."""
        return [n for layer in self.layers for n in layer]

    def dependencies(self, name: str) -> tuple[Edge, ...]:
        return tuple(self._deps.get(name, ()))

    def dependents(self, names: Iterable[str], *, cascading_only: bool = True) -> set[str]:
        """Everything that (transitively) depends on ``names``, excluding them.

        With ``cascading_only`` only hard and soft edges count: an ``ordering`` dependency
        fixes start order and never restarts its dependents.
        """
        reverse: dict[str, list[str]] = {}
        for e in self.edges:
            if cascading_only and not e.type.cascades:
                continue
            reverse.setdefault(e.dependency, []).append(e.component)
        seen: set[str] = set()
        pending = list(names)
        while pending:
            n = pending.pop()
            for d in reverse.get(n, ()):
                if d not in seen:
                    seen.add(d)
                    pending.append(d)
        return seen - set(names)

    def to_json(self) -> dict[str, object]:
        """``{nodes, edges, order}`` as the Go ``/v1/plan/graph`` returns them, and ours beside.

        ``edges`` maps each dependency to its dependents (every type, in node order) and
        ``order`` is one flat start order, as in Go; ``layers`` are the start layers (a layer
        starts once the one before it is up) and ``typedEdges`` the edges with their type
        (``{"from": component, "to": dependency, "type": ...}``).
        """
        rank = {n: i for i, n in enumerate(self.nodes)}
        dependents: dict[str, list[str]] = {}
        for e in self.edges:
            dependents.setdefault(e.dependency, []).append(e.component)
        return {
            "nodes": list(self.nodes),
            "edges": {
                dep: sorted(set(comps), key=lambda n: rank.get(n, len(rank)))
                for dep, comps in sorted(dependents.items())
            },
            "order": self.order(),
            "layers": [list(layer) for layer in self.layers],
            "typedEdges": [
                {"from": e.component, "to": e.dependency, "type": e.type.value} for e in self.edges
            ],
        }


def build_graph(
    components: Mapping[str, Recipe], *, origin: Mapping[str, str] | None = None
) -> Graph:
    """Validate dependencies and compute start layers.

    ``components`` maps plan component names to recipes; ``origin`` optionally maps them to the
    file that declared them, for messages. Raises ``GraphError`` for a missing hard/ordering
    dependency, a version out of range, two components sharing a recipe name, or a cycle.
    """
    origin = origin or {}
    by_recipe: dict[str, str] = {}
    for comp, recipe in components.items():
        other = by_recipe.get(recipe.name)
        if other is not None:
            raise GraphError(
                f"components {other!r} and {comp!r} both use recipe {recipe.name!r}; a plan may use each recipe once",
                file=origin.get(comp),
            )
        by_recipe[recipe.name] = comp

    edges: list[Edge] = []
    warnings: list[str] = []
    deps: dict[str, list[Edge]] = {c: [] for c in components}
    for comp, recipe in components.items():
        for dep in recipe.dependencies:
            target = by_recipe.get(dep.name) or (dep.name if dep.name in components else None)
            where = f"{recipe.source}:{dep.line}" if dep.line else recipe.source
            if target is None:
                if dep.type is DependencyType.SOFT:
                    warnings.append(
                        f"{comp}: soft dependency {dep.name} is not in the plan; skipped"
                    )
                    continue
                raise GraphError(
                    f"component {comp!r} has a {dep.type.value} dependency on {dep.name!r}, which is not in the plan",
                    file=where or origin.get(comp),
                    field="dependencies",
                )
            have = components[target].version
            if not dep.allows(have):
                msg = f"component {comp!r} needs {dep.name} {dep.version}, the plan has {have}"
                if dep.type is DependencyType.SOFT:
                    warnings.append(msg + "; soft dependency skipped")
                    continue
                raise GraphError(msg, file=where or origin.get(comp), field="dependencies.version")
            if target == comp:
                raise GraphError(f"dependency cycle: {comp} -> {comp}", file=where)
            edge = Edge(comp, target, dep.type)
            edges.append(edge)
            deps[comp].append(edge)

    layers = _layers(list(components), deps)
    return Graph(
        nodes=tuple(sorted(components)),
        edges=tuple(edges),
        layers=layers,
        warnings=tuple(warnings),
        _deps={k: tuple(v) for k, v in deps.items()},
    )


def _layers(nodes: list[str], deps: Mapping[str, list[Edge]]) -> tuple[tuple[str, ...], ...]:
    """Kahn's algorithm by frontier: each layer is the sorted set of nodes whose dependencies
    are all in earlier layers (linear in nodes and edges)."""
    needs = {n: {e.dependency for e in deps.get(n, ())} for n in nodes}
    waiting = {n: len(d) for n, d in needs.items()}
    needed_by: dict[str, list[str]] = {}
    for n, d in needs.items():
        for dep in d:
            needed_by.setdefault(dep, []).append(n)
    layers: list[tuple[str, ...]] = []
    ready = sorted(n for n, count in waiting.items() if not count)
    while ready:
        layers.append(tuple(ready))
        unblocked: list[str] = []
        for n in ready:
            for m in needed_by.get(n, ()):
                waiting[m] -= 1
                if not waiting[m]:
                    unblocked.append(m)
        ready = sorted(unblocked)
    placed = sum(len(layer) for layer in layers)
    if placed < len(needs):
        done = {n for layer in layers for n in layer}
        remaining = {n: d - done for n, d in needs.items() if n not in done}
        raise GraphError("dependency cycle: " + " -> ".join(_find_cycle(remaining)))
    return tuple(layers)


def _find_cycle(remaining: Mapping[str, set[str]]) -> list[str]:
    """One cycle among nodes that never became ready, as a closed path ``a, b, c, a``."""
    start = sorted(remaining)[0]
    path: list[str] = []
    index: dict[str, int] = {}
    node = start
    while node not in index:
        index[node] = len(path)
        path.append(node)
        node = sorted(remaining[node])[0]
    cycle = path[index[node] :]
    # Rotate so the output is stable: begin at the smallest name.
    k = cycle.index(min(cycle))
    cycle = cycle[k:] + cycle[:k]
    return [*cycle, cycle[0]]

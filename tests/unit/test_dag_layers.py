"""Start layers by Kahn's algorithm against the layer-by-layer reference it replaced."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keystone.dag import Edge, GraphError, _find_cycle, _layers
from keystone.recipe import DependencyType


def reference(nodes: list[str], deps: Mapping[str, list[Edge]]) -> tuple[tuple[str, ...], ...]:
    remaining = {n: {e.dependency for e in deps.get(n, ())} for n in nodes}
    layers: list[tuple[str, ...]] = []
    while remaining:
        ready = sorted(n for n, d in remaining.items() if not d)
        if not ready:
            raise GraphError("dependency cycle: " + " -> ".join(_find_cycle(remaining)))
        layers.append(tuple(ready))
        for n in ready:
            del remaining[n]
        for d in remaining.values():
            d.difference_update(ready)
    return tuple(layers)


Layers = Callable[[list[str], Mapping[str, list[Edge]]], tuple[tuple[str, ...], ...]]


def outcome(layers: Layers, nodes: list[str], deps: Mapping[str, list[Edge]]) -> object:
    try:
        return layers(nodes, deps)
    except GraphError as exc:
        return str(exc)


NAMES = [f"c{i}" for i in range(12)]


@st.composite
def graphs(draw: st.DrawFn) -> tuple[list[str], dict[str, list[Edge]]]:
    nodes = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=12, unique=True))
    deps: dict[str, list[Edge]] = {n: [] for n in nodes}
    for n in nodes:
        for d in draw(st.lists(st.sampled_from(nodes), max_size=4)):
            if d != n:  # a self-edge is refused before the layers are made
                deps[n].append(Edge(n, d, DependencyType.HARD))
    return nodes, deps


@settings(max_examples=800, deadline=None)
@given(graphs())
def test_layers_and_cycles_are_the_reference(
    graph: tuple[list[str], dict[str, list[Edge]]],
) -> None:
    """The same layers for every acyclic graph, the same cycle named for every cyclic one."""
    nodes, deps = graph
    assert outcome(_layers, nodes, deps) == outcome(reference, nodes, deps)


def test_a_long_chain_is_one_layer_a_node() -> None:
    nodes = [f"n{i:04d}" for i in range(2000)]
    deps = {
        n: [Edge(n, nodes[i - 1], DependencyType.ORDERING)] if i else []
        for i, n in enumerate(nodes)
    }
    assert _layers(nodes, deps) == tuple((n,) for n in nodes)


def test_a_cycle_is_named() -> None:
    deps = {"a": [Edge("a", "b", DependencyType.HARD)], "b": [Edge("b", "a", DependencyType.HARD)]}
    with pytest.raises(GraphError, match=r"dependency cycle: a -> b -> a"):
        _layers(["a", "b"], deps)

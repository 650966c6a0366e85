"""The value checks after a parse (depth, 64-bit integers) against a reference walk, and the
guard that skips them where the text rules a refusal out.

``_check_values`` keeps no paths while it walks and finds the offending path afterwards; the
reference below builds every path as it goes. Both must refuse the same documents with the
same message, line and field.
"""

from __future__ import annotations

import tomllib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from keystone.errors import ValidationError
from keystone.limits import Limits
from keystone.tomlsrc import _check_depth, _check_values, _Lines, _may_be_out_of_bounds, dotted
from tests.fuzz.strategies import toml_values

LOW, HIGH = -(1 << 63), (1 << 63) - 1


def reference(root: dict[str, Any], file: str, lines: _Lines, lim: Limits) -> None:
    stack: list[tuple[tuple[Any, ...], Any, int]] = [((), root, 0)]
    while stack:
        path, node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > lim.max_toml_depth:
                idx = lines.get()
                _check_depth(idx, file, lim)
                raise lim.refuse(
                    "max_toml_depth",
                    f"more than {lim.max_toml_depth} levels at {dotted(path)}",
                    what="the nesting",
                    file=file,
                    line=idx.line(path),
                )
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                stack.append(((*path, k), v, depth + 1))
        elif isinstance(node, int) and not isinstance(node, bool) and not LOW <= node <= HIGH:
            raise ValidationError(
                "integer out of range (TOML integers are 64-bit)",
                file=file,
                line=lines.get().line(path),
                field=dotted(path),
            )


def outcome(check: Any, data: dict[str, Any], depth: int) -> tuple[str, int | None, str] | None:
    try:
        check(data, "r.toml", _Lines("a = 1\n"), Limits(max_toml_depth=depth))
    except ValidationError as exc:
        return (str(exc), exc.line, exc.field or "")
    return None


SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=LOW - 2, max_value=HIGH + 2),
    st.sampled_from([1 << 70, -(1 << 64), 0, 7]),
    st.text(max_size=3),
)
KEYS = st.sampled_from(["a", "b", "c.d", "e"])
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=4), st.integers(min_value=0, max_value=4))
def test_refuses_as_the_reference_walk(data: dict[str, Any], depth: int) -> None:
    """Out-of-range integers and tables or arrays past the depth: the same first refusal."""
    assert outcome(_check_values, data, depth) == outcome(reference, data, depth)


def test_a_deep_value_names_its_path() -> None:
    """A document deeper than the bound names where (the line scan did not see it)."""
    got = outcome(_check_values, {"a": {"b": [{"c": 1}]}}, 2)
    assert got is not None and "more than 2 levels at a.b[0]" in got[0]


def test_a_huge_integer_names_its_field() -> None:
    got = outcome(_check_values, {"a": [1, {"b": 1 << 64}]}, 32)
    assert got is not None and got[2] == "a[1].b" and "64-bit" in got[0]


HEADERS = st.lists(st.sampled_from(["a", "b", '"c.d"', "e"]), min_size=1, max_size=3).map(".".join)
LINES = st.one_of(
    st.tuples(HEADERS, toml_values()).map(lambda kv: f"{kv[0]} = {kv[1]}"),
    HEADERS.map(lambda h: f"[{h}]"),
    HEADERS.map(lambda h: f"[[{h}]]"),
    st.integers(min_value=1, max_value=6).map(lambda n: "z = " + "[" * n + "]" * n),
    st.integers(min_value=1, max_value=4).map(lambda n: "y = " + "{ q = " * n + "1" + " }" * n),
)


@settings(max_examples=800, deadline=None)
@given(st.lists(LINES, max_size=6).map("\n".join), st.integers(min_value=0, max_value=8))
def test_documents_skipped_by_the_guard_pass_the_check(text: str, depth: int) -> None:
    """Where the text rules out a refusal (few brackets, braces and dots; no long digit run),
    the walk would have found nothing."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    lim = Limits(max_toml_depth=depth)
    if not _may_be_out_of_bounds(text, lim):
        assert outcome(_check_values, data, depth) is None

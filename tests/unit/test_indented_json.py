"""``indented_json`` against ``json.dumps(indent=2, sort_keys=True, default=str)``: the text
every ``--json`` command prints must not change with the faster layout."""

from __future__ import annotations

import enum
import json
from pathlib import PurePosixPath
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keystone.cli.fastviews import indented_json


class Colour(enum.StrEnum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


def reference(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.sampled_from([Colour.RED, Level.HIGH, PurePosixPath("/etc/x"), b"bytes", 1j]),
)
KEYS = st.one_of(st.text(max_size=8), st.sampled_from(["a", "b", "é", "\u2028", '"', "\\"]))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(KEYS, inner, max_size=4),
    ),
    max_leaves=30,
)


@settings(max_examples=1500, deadline=None)
@given(VALUES)
def test_the_same_text_as_json_dumps(value: Any) -> None:
    assert indented_json(value) == reference(value)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.one_of(
            st.integers(-5, 5), st.floats(allow_nan=False), st.sampled_from([True, False, None])
        ),
        VALUES,
        max_size=1,  # one key: nothing to sort, so any key type
    )
)
def test_keys_that_are_not_strings(value: dict[Any, Any]) -> None:
    assert indented_json(value) == reference(value)


@pytest.mark.parametrize(
    "value", [{1: "a", "b": 2}, {PurePosixPath("/x"): 1}, {(1, 2): 3}, {None: 1, "a": 2}]
)
def test_what_json_dumps_refuses_is_refused(value: dict[Any, Any]) -> None:
    with pytest.raises(TypeError) as want:
        reference(value)
    with pytest.raises(TypeError) as got:
        indented_json(value)
    assert str(got.value) == str(want.value)

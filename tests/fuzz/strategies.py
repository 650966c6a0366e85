"""Structured mutations of valid TOML documents, as hypothesis strategies.

Each mutation keeps most of a valid recipe, plan or agent config and breaks one thing the way
a hostile or damaged input would: a key or table written twice, a value of another type, a
huge value, deep nesting, a unicode or control character inserted, the file cut short.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from hypothesis import strategies as st

Draw = Callable[..., object]

_KEY_LINE = re.compile(r"^\s*[A-Za-z0-9_\"'.-]+\s*=")
_HEADER_LINE = re.compile(r"^\s*\[")

SPECIAL_CHARS = [
    "\x00", "\x01", "\x08", "\x1b", "\x7f", "\r", "\t", "\n", "\x85", "\u00e9", "\u0663",
    "\u200b", "\u2028", "\u202e", "\ufeff", "\ufffd", "\U0001f600", "\ud800", '"', "'", "[",
    "]", "{", "}", "=", "#", "\\", ".", ",",
]  # fmt: skip

SCALARS = [
    "0", "-1", "1", "1.5", "-0.0", "nan", "inf", "-inf", "1e400", "true", "false", '""',
    '"s"', "'lit'", "[]", "[1, 2]", '["a", 1]', "{}", "{a = 1}", "1979-05-27T07:32:00Z",
    "07:32:00", "1979-05-27", "9223372036854775807", "9223372036854775808",
    "-9223372036854775809", "0x10", "0o7", "0b1", '"5s"', '"-5s"', '"50%"', '"128M"',
    '"99999999999999999999T"', '"9999999999999999999999h"', '"\\u0663s"', '"1\\u0662M"',
    '"\\u0661.0.0"', '"a\\u0000b"', '"x\\n"', '"NET_ADMIN\\n"', '"a:b"', '"${X"', '"${UNSET}"',
    '"$$"', '"~nosuchuser/x"', '"../../etc/passwd"', '"/"', '""""""', "''''''",
]  # fmt: skip


def _lines(text: str, pattern: re.Pattern[str]) -> list[int]:
    return [i for i, line in enumerate(text.split("\n")) if pattern.match(line)]


def _set_value(line: str, value: str) -> str:
    """``key = value`` with the value replaced (the key and its indentation kept)."""
    return line[: line.index("=")] + "= " + value


def toml_values() -> st.SearchStrategy[str]:
    """TOML value texts of every type, valid or not."""
    return st.one_of(
        st.sampled_from(SCALARS),
        st.integers(min_value=-(2**70), max_value=2**70).map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.text(max_size=40).map(json.dumps),
        st.lists(st.sampled_from(SCALARS), max_size=4).map(lambda v: "[" + ", ".join(v) + "]"),
        st.dictionaries(
            st.from_regex(r"[a-z]{1,6}", fullmatch=True), st.sampled_from(SCALARS), max_size=3
        ).map(lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}"),
    )


@st.composite
def _dup_key(draw: st.DrawFn, text: str) -> str:
    lines = text.split("\n")
    keys = _lines(text, _KEY_LINE)
    if not keys:
        return text
    i = draw(st.sampled_from(keys))
    copy = lines[i] if draw(st.booleans()) else _set_value(lines[i], draw(toml_values()))
    at = draw(st.integers(i + 1, len(lines)))
    return "\n".join([*lines[:at], copy, *lines[at:]])


@st.composite
def _dup_table(draw: st.DrawFn, text: str) -> str:
    lines = text.split("\n")
    heads = _lines(text, _HEADER_LINE)
    if not heads:
        return text + "\n[metadata]\n[metadata]\n"
    n = draw(st.integers(0, len(heads) - 1))
    start, end = heads[n], heads[n + 1] if n + 1 < len(heads) else len(lines)
    header = lines[start].strip()
    body = lines[start:end] if draw(st.booleans()) else [header]
    if draw(st.booleans()):  # the other kind: [x] <-> [[x]]
        body = [header[1:-1] if header.startswith("[[") else f"[{header}]", *body[1:]]
    return text + "\n" + "\n".join(body) + "\n"


@st.composite
def _swap_type(draw: st.DrawFn, text: str) -> str:
    lines = text.split("\n")
    keys = _lines(text, _KEY_LINE)
    if not keys:
        return text
    i = draw(st.sampled_from(keys))
    lines[i] = _set_value(lines[i], draw(toml_values()))
    return "\n".join(lines)


@st.composite
def _header_to_key(draw: st.DrawFn, text: str) -> str:
    lines = text.split("\n")
    heads = _lines(text, _HEADER_LINE)
    if not heads:
        return text
    i = draw(st.sampled_from(heads))
    lines[i] = lines[i].strip().strip("[]") + " = " + draw(toml_values())
    return "\n".join(lines)


@st.composite
def _huge(draw: st.DrawFn, text: str) -> str:
    size = draw(st.sampled_from([1_000, 100_000, 1_100_000]))
    kind = draw(st.sampled_from(["string", "array", "comment", "keys", "tables"]))
    if kind == "string":
        value = '"' + "x" * size + '"'
    elif kind == "array":
        value = "[" + ",".join(["1"] * (size // 2)) + "]"
    elif kind == "comment":
        return text + "\n#" + "x" * size + "\n"
    elif kind == "keys":
        return text + "\n[zz]\n" + "".join(f"k{i} = {i}\n" for i in range(size // 10))
    else:
        return text + "".join(
            f'\n[[components]]\nname = "c{i}"\nrecipe = "r"' for i in range(size // 40)
        )
    keys = _lines(text, _KEY_LINE)
    if not keys:
        return text + "\nzz = " + value + "\n"
    lines = text.split("\n")
    i = draw(st.sampled_from(keys))
    lines[i] = _set_value(lines[i], value)
    return "\n".join(lines)


@st.composite
def _deep(draw: st.DrawFn, text: str) -> str:
    depth = draw(st.one_of(st.integers(1, 40), st.sampled_from([200, 400, 1000, 20_000])))
    kind = draw(st.sampled_from(["array", "inline", "header", "dotted", "mixed"]))
    if kind == "array":
        nest = "[" * depth + "]" * depth
    elif kind == "inline":
        nest = "{a = " * depth + "1" + "}" * depth
    elif kind == "mixed":
        nest = "[{a = " * depth + "1" + "}]" * depth
    elif kind == "header":
        return text + "\n[" + ".".join(["a"] * depth) + "]\n"
    else:
        return text + "\n" + ".".join(["b"] * depth) + " = 1\n"
    return text + "\nzz = " + nest + "\n"


@st.composite
def _insert(draw: st.DrawFn, text: str) -> str:
    pos = draw(st.integers(0, len(text)))
    ch = draw(st.one_of(st.sampled_from(SPECIAL_CHARS), st.characters(codec=None)))
    return text[:pos] + ch * draw(st.sampled_from([1, 1, 3])) + text[pos:]


@st.composite
def _truncate(draw: st.DrawFn, text: str) -> str:
    return text[: draw(st.integers(0, len(text)))]


@st.composite
def _shuffle_line(draw: st.DrawFn, text: str) -> str:
    lines = text.split("\n")
    i = draw(st.integers(0, len(lines) - 1))
    line = lines.pop(i)
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), line)
    return "\n".join(lines)


MUTATIONS = {
    "duplicate key": _dup_key,
    "duplicate table": _dup_table,
    "type swap": _swap_type,
    "header to key": _header_to_key,
    "huge value": _huge,
    "deep nesting": _deep,
    "insert character": _insert,
    "truncate": _truncate,
    "move or delete a line": _shuffle_line,
}


@st.composite
def mutated(draw: st.DrawFn, seeds: list[str]) -> str:
    """One of ``seeds`` with one to three structured mutations applied."""
    text = draw(st.sampled_from(seeds))
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(MUTATIONS)))
        text = draw(MUTATIONS[name](text))
    return text


@st.composite
def mutated_bytes(draw: st.DrawFn, seeds: list[str]) -> bytes:
    """A mutated document as file bytes, possibly cut inside a UTF-8 sequence or spliced
    with bytes that are not UTF-8."""
    data = draw(mutated(seeds)).encode("utf-8", "surrogatepass")
    op = draw(st.sampled_from(["none", "cut", "splice"]))
    if op == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif op == "splice":
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    return data

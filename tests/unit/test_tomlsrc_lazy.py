"""The line index is made only when a line is needed: what it says must not change.

Every case is parsed twice: as written (small, so scanned only on demand) and padded with a
comment of dots past ``SCAN_FIRST`` (scanned before the parser), and the two must agree on
the recipe, the error, its line and the unknown fields.
"""

from __future__ import annotations

import re

import pytest

from keystone.errors import LimitExceeded, ValidationError
from keystone.recipe import Recipe, parse_recipe
from keystone.tomlsrc import SCAN_FIRST, LineIndex

BASE = '[metadata]\nname = "a"\nversion = "1"\n[lifecycle.run.exec]\ncommand = "x"\n'
PAD = "# " + "." * (SCAN_FIRST + 1) + "\n"


def both(text: str) -> tuple[Recipe | ValidationError, Recipe | ValidationError]:
    out: list[Recipe | ValidationError] = []
    for t in (text, PAD + text):
        try:
            out.append(parse_recipe(t, file="r.toml"))
        except ValidationError as exc:
            out.append(exc)
    return out[0], out[1]


def shifted(err: ValidationError) -> tuple[str, int | None, str | None]:
    """An error's kind, line and field, its line moved back over the padding."""
    return type(err).__name__, None if err.line is None else err.line - 1, err.field


DEPS = [
    # headers: the lines are found without the index
    BASE + '[[dependencies]]\nname = "b"\n\n[[dependencies]]\nname = "c"\n',
    # inline form: the index
    BASE + 'dependencies = [\n  { name = "b" },\n  { name = "c" },\n]\n',
    # a header in a string is not an entry
    BASE.replace('version = "1"', 'version = "1"\ndescription = """\n[[dependencies]]\n"""')
    + '[[dependencies]]\nname = "b"\n',
    # a header in a comment, and a dependency table of a table
    BASE + '# [[dependencies]] below\n[[dependencies]]\nname = "b"\n',
]


class TestSameAnswers:
    @pytest.mark.parametrize("text", DEPS)
    def test_dependency_lines_are_the_index_lines(self, text: str) -> None:
        """Each dependency's line is where the index puts it, however it is written."""
        plain, padded = both(text)
        assert isinstance(plain, Recipe) and isinstance(padded, Recipe)
        idx = LineIndex(text)
        want = [idx.line(("dependencies", i)) for i in range(len(plain.dependencies))]
        assert [d.line for d in plain.dependencies] == want
        assert [d.line - 1 for d in padded.dependencies if d.line] == want

    @pytest.mark.parametrize(
        "text",
        [
            BASE + "[" + ".".join(["b"] * 33) + "]\n",  # nesting by headers
            BASE + "zz = " + "[" * 40 + "]" * 40 + "\n",  # nesting by brackets
            BASE + 'zz = { a = { b = { c = "d" } } }\nzz.a.e = 1\n',  # a key defined twice
            BASE + "[metadata]\n",  # a table defined twice
            BASE + "x = [1,\n",  # a syntax error
            BASE + "big = 99999999999999999999\n",  # past 64 bits
            BASE + "[lifecycle.run]\nmax_retries = -1\n",  # a schema error
        ],
    )
    def test_errors_name_the_same_line(self, text: str) -> None:
        """A refusal names the same line whether the index was made first or on demand."""
        plain, padded = both(text)
        assert isinstance(plain, ValidationError) and isinstance(padded, ValidationError)
        assert shifted(padded) == (type(plain).__name__, plain.line, plain.field)
        assert re.sub(r"\d+", "N", str(plain)) == re.sub(r"\d+", "N", str(padded))

    def test_depth_refusal_names_the_bound_and_line(self) -> None:
        """A deep document under the scan threshold is refused after the parse, as before."""
        text = BASE + "zz = " + "[" * 40 + "]" * 40 + "\n"
        with pytest.raises(LimitExceeded, match="max_toml_depth") as exc:
            parse_recipe(text, file="r.toml")
        assert exc.value.line == 6 and "43 levels of tables and arrays" in str(exc.value)

    def test_unknown_fields_keep_their_lines(self) -> None:
        """Unknown keys are reported at their lines (the index is made for them)."""
        plain, padded = both(BASE + "[lifecycle.run]\ncolour = 1\n")
        assert isinstance(plain, Recipe) and isinstance(padded, Recipe)
        assert plain.unknown_fields == ("r.toml:7: unknown field lifecycle.run.colour",)
        assert padded.unknown_fields == ("r.toml:8: unknown field lifecycle.run.colour",)

    def test_recipes_are_equal(self) -> None:
        """The recipe itself does not depend on when the index was made."""
        plain, padded = both(DEPS[0])
        assert isinstance(plain, Recipe) and isinstance(padded, Recipe)
        assert plain.content_hash() == padded.content_hash()

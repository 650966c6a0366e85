"""The line index is made only when a line is needed: what it says must not change.

Every case is parsed twice: as written (scanned only on demand) and padded with a comment line
of dots past ``SCAN_FIRST`` (scanned before the parser), and the two must agree on the
recipe, the error, its line and the unknown fields. A plan's entries find their lines
without the index when that is certain; those lines must be the index's.
"""

from __future__ import annotations

import re

import pytest

from keystone.errors import LimitExceeded, ValidationError
from keystone.limits import Limits
from keystone.plan import PLANS, parse_plan
from keystone.recipe import Recipe, parse_recipe
from keystone.tomlsrc import SCAN_FIRST, LineIndex, Reader

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


ENTRY = '[[components]]\nname = "{n}"\nrecipe = "{n}.recipe.toml"\n'
PLANS_WRITTEN = [
    # headers, a comment naming the key, blank lines, CRLF: found without the index
    "\n".join(ENTRY.format(n=n) for n in "abc"),
    '# recipe = "no.toml"\n' + ENTRY.format(n="a") + '# recipe = "x"\n\n' + ENTRY.format(n="b"),
    "\r\n".join(ENTRY.format(n=n).replace("\n", "\r\n") for n in "ab"),
    ENTRY.format(n="a") + "enabled = true\n" + ENTRY.format(n="b").replace("name", "  name"),
    # the index: a quoted key, a multi-line string, a table after the entries, inline form
    ENTRY.format(n="a") + '[[components]]\nname = "b"\n"recipe" = "b.toml"\n',
    ENTRY.format(n="a").replace('name = "a"', 'name = "a"\nnote = """\nrecipe = 1\n"""'),
    ENTRY.format(n="a") + '[maintenance]\nwindows = ["01:00-02:00"]\n' + ENTRY.format(n="b"),
    'components = [\n  { name = "a", recipe = "a.toml" },\n  { name = "b", recipe = "b.toml" },\n]\n',
    # "components" in a value: the index
    ENTRY.format(n="a") + ENTRY.format(n="b").replace("b.recipe", "components/b.recipe"),
]


class TestPlanLines:
    @pytest.mark.parametrize("text", PLANS_WRITTEN)
    def test_recipe_lines_are_the_index_lines(self, text: str) -> None:
        """Each entry's recipe line is where the index puts it, however the plan is written."""
        PLANS.clear()
        plan = parse_plan(text, file="plan.toml", limits=Limits())
        idx = LineIndex(text)
        want = [idx.line(("components", i, "recipe")) for i in range(len(plan.entries))]
        assert [e.line for e in plan.entries] == want

    def test_plain_plans_need_no_index(self) -> None:
        """The first four plans are located without the index; the others are not (or not
        their recipe keys), so the test above compares both ways with the index."""
        for i, text in enumerate(PLANS_WRITTEN):
            r = Reader.from_text(text, file="plan.toml", size_bound="max_plan_bytes")
            found = r.entry_key_lines("components", "recipe")
            plain = found is not None and all(key is not None for _, key in found)
            assert plain == (i < 4), text
            assert r.lines.made is None

    @pytest.mark.parametrize("text", PLANS_WRITTEN[:4])
    def test_duplicate_names_the_first_entry_line(self, text: str) -> None:
        """The first entry's line in a duplicate's message is the index's."""
        PLANS.clear()
        dup = text + "\n" + ENTRY.format(n="a")
        with pytest.raises(ValidationError, match=r"duplicate component name 'a'") as info:
            parse_plan(dup, file="plan.toml", limits=Limits())
        first = LineIndex(dup).line(("components", 0))
        assert f"(first at line {first})" in str(info.value)


class TestDeepWithoutTheScan:
    @pytest.mark.parametrize(
        ("nest", "line"),
        [
            ("zz = " + "[\n" * 20_000 + "]\n" * 20_000, 20_005),  # over many lines
            ("zz = " + "{a = " * 20_000 + "1" + "}" * 20_000 + "\n", 6),  # inline tables
            ("zz = " + "[{a = " * 5_000 + "1" + "}]" * 5_000 + "\n", 6),
            ("zz = " + "[" * 200_000 + "\n", 6),  # never closed
        ],
    )
    def test_refused_with_the_bound_and_line(self, nest: str, line: int) -> None:
        """Brackets alone do not make the scan run first: the parser runs out of recursion or
        the value check finds the depth, and the refusal is the scan's, at its line."""
        with pytest.raises(LimitExceeded, match="max_toml_depth") as exc:
            parse_recipe(BASE + nest, file="r.toml")
        assert exc.value.line == line and "levels of tables and arrays" in str(exc.value)

"""TOML documents, strictly parsed, with the line of every key for error messages.

Documents are parsed with the standard library's ``tomllib`` (TOML 1.0, as the Go Keystone's
go-toml reads them). Parsed values carry no line numbers, so ``LineIndex`` scans the source
(in linear time, strings and comments skipped) and maps each dotted key path (array-of-table
entries by index: ``("artifacts", 1, "uri")``) to the line where it is written; the same scan
measures bracket nesting and explains a duplicate key or table with both of its lines.

The scan costs about what the parser does, and most documents never need a line: it runs only
when one is asked for (an error, an unknown key), except for a document with a line of more
than ``SCAN_FIRST`` dots, which is scanned before the parser runs: a dotted key costs the
parser the square of its parts, and a key is written on one line. Nesting costs the parser
only its depth: a document deeper than the bound is refused after the parse (or when the
parser runs out of recursion) with the same message and line the scan gives. ``Reader``
walks a parsed document against a declared schema, converting values strictly (a float where
a string is expected is an error) and collecting unknown keys.

No exception but Keystone's own (``ValidationError`` and its subclasses) leaves this module.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from keystone.errors import DuplicateKeyError, ValidationError
from keystone.limits import Limits, byte_length

Path_ = tuple[str | int, ...]

_INT64 = (-(1 << 63), (1 << 63) - 1)
_BARE = re.compile(r"[A-Za-z0-9_-]+")
_WS = re.compile(r"[ \t]*")
_VALUE_STOP = re.compile(r"""["'\[\]{}#\n,]""")
_BASIC_STOP = re.compile(r'[\\"\n]')
_ML_BASIC_STOP = re.compile(r'\\.|"""', re.DOTALL)
_AT = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\s*$")
_TRIPLE_LITERAL = "'" * 3
SCAN_FIRST = 256
"""A document with a line of more dots than this is scanned before it is parsed."""


@dataclass(frozen=True)
class _Def:
    kind: str  # "key", "table", "array" (an [[array]] entry), "dotted" (implied by a dotted key)
    path: Path_
    line: int
    table: Path_ = ()  # for a key: the header path in force where it is written


@dataclass(frozen=True)
class Parsed:
    """One document as parsed and indexed, before validation: what a cache of parsed documents
    keeps (``Reader.from_parsed`` applies the bounds in force to it again)."""

    data: dict[str, Any]
    lines: dict[Path_, int]  # LineIndex: the first line of each key path
    max_depth: int
    depth_line: int | None


class LineIndex:
    """Maps key paths of a TOML source to 1-based line numbers; measures bracket nesting.

    The scan never raises and always advances, whatever the text: it runs before the parser,
    on documents that may not be TOML at all.
    """

    def __init__(self, text: str) -> None:
        self._lines: dict[Path_, int] = {}
        # (kind, path, line, table) of every definition, as _Def fields: plain tuples, as
        # only a refused document (first_conflict) reads them.
        self._defs: list[tuple[str, Path_, int, Path_]] = []
        self.max_depth = 0
        self.depth_line: int | None = None
        self._text = text
        self._pos = 0
        self._line = 1
        self._arrays: dict[Path_, int] = {}
        self._prefix: Path_ = ()
        self._scan()

    @classmethod
    def restored(cls, parsed: Parsed) -> LineIndex:
        """The index of a document parsed before (``Reader.parsed``), without a scan.

        Only a document that parsed has one, so what only a refused document needs (its
        definitions, for ``first_conflict``) is empty.
        """
        idx = cls("")
        idx._lines = parsed.lines
        idx.max_depth = parsed.max_depth
        idx.depth_line = parsed.depth_line
        return idx

    # -- scanning ---------------------------------------------------------------------------

    def _scan(self) -> None:
        t, n = self._text, len(self._text)
        while True:
            self._skip_blank()
            if self._pos >= n:
                return
            start_line = self._line
            if t[self._pos] == "[":
                array = t.startswith("[[", self._pos)
                self._pos += 2 if array else 1
                names = self._key()
                if names is not None:
                    self._header(names, array, start_line)
                self._skip_line()
                continue
            before = self._pos
            names = self._key()
            self._skip_ws()
            if names is None or self._pos >= n or t[self._pos] != "=":
                if self._pos == before:
                    self._pos += 1  # always advance
                self._skip_line()
                continue
            self._pos += 1
            path = self._prefix + tuple(names)
            self._lines.setdefault(path, start_line)
            self._defs.append(("key", path, start_line, self._prefix))
            self._deeper(len(path) - 1, start_line)
            self._value(len(path) - 1)

    def _header(self, names: list[str], array: bool, line: int) -> None:
        if len(names) > 256:  # far over any depth bound: refused, so skip the index work
            self._deeper(len(names), line)
            self._prefix = tuple(names)
            return
        out: list[str | int] = []
        for i, name in enumerate(names):
            out.append(name)
            key = tuple(out)
            last = i == len(names) - 1
            if last and array:
                self._arrays[key] = self._arrays.get(key, -1) + 1
            if key in self._arrays and (array or not last):
                out.append(self._arrays[key])
        self._prefix = tuple(out)
        self._deeper(len(self._prefix), line)
        self._lines.setdefault(self._prefix, line)
        self._defs.append(("array" if array else "table", self._prefix, line, ()))

    def _deeper(self, depth: int, line: int) -> None:
        """Record nesting ``depth`` (tables and arrays around a value) seen at ``line``."""
        if depth > self.max_depth:
            self.max_depth = depth
            self.depth_line = line

    def _skip_ws(self) -> None:
        t, pos = self._text, self._pos
        if pos < len(t) and t[pos] in " \t":  # most keys and values have no run to skip
            m = _WS.match(t, pos)
            if m:
                self._pos = m.end()

    def _skip_blank(self) -> None:
        t, n = self._text, len(self._text)
        while self._pos < n:
            c = t[self._pos]
            if c in " \t\r":
                self._pos += 1
            elif c == "\n":
                self._pos += 1
                self._line += 1
            elif c == "#":
                self._skip_line()
            else:
                return

    def _skip_line(self) -> None:
        """To the next newline (not past it), ignoring what is in between."""
        end = self._text.find("\n", self._pos)
        self._pos = len(self._text) if end < 0 else end

    def _key(self) -> list[str] | None:
        """A dotted key at the position (bare or quoted parts), or None if there is none."""
        t, n = self._text, len(self._text)
        parts: list[str] = []
        while True:
            self._skip_ws()
            if self._pos >= n:
                return None
            c = t[self._pos]
            part: str | None
            if c == '"':
                part = self._basic_string()
            elif c == "'":
                part = self._literal_string()
            else:
                m = _BARE.match(t, self._pos)
                part = m.group(0) if m else None
                if m:
                    self._pos = m.end()
            if part is None:
                return None
            parts.append(part)
            self._skip_ws()
            if self._pos < n and t[self._pos] == ".":
                self._pos += 1
                continue
            if self._pos < n and t[self._pos] == "]":  # a header's end: "]" or "]]"
                self._pos += 2 if t.startswith("]]", self._pos) else 1
            return parts

    def _basic_string(self) -> str | None:
        """A one-line basic string starting at the position (its raw text), or None."""
        t = self._text
        i = self._pos + 1
        while True:
            m = _BASIC_STOP.search(t, i)
            if m is None or m.group(0) == "\n":
                self._pos = len(t) if m is None else m.start()
                return None
            if m.group(0) == "\\":
                i = m.end() + 1
                continue
            raw = t[self._pos + 1 : m.start()]
            self._pos = m.end()
            return raw

    def _literal_string(self) -> str | None:
        t = self._text
        end = t.find("'", self._pos + 1)
        nl = t.find("\n", self._pos + 1)
        if end < 0 or (0 <= nl < end):
            self._pos = len(t) if nl < 0 else nl
            return None
        raw = t[self._pos + 1 : end]
        self._pos = end + 1
        return raw

    def _multiline(self, quote: str) -> None:
        """Skip a multi-line string whose opening ``quote`` (three characters) is here."""
        t = self._text
        begin = self._pos
        end = len(t)
        if quote == '"""':
            i = begin + 3
            while True:
                m = _ML_BASIC_STOP.search(t, i)
                if m is None:
                    break
                if m.group(0) == '"""':
                    end = m.end()
                    break
                i = m.end()
        else:
            found = t.find(_TRIPLE_LITERAL, begin + 3)
            if found >= 0:
                end = found + 3
        extra = 0
        while end < len(t) and t[end] == quote[0] and extra < 2:  # up to two more quotes
            end += 1
            extra += 1
        self._line += t.count("\n", begin, end)
        self._pos = end

    def _value(self, base: int) -> None:
        """Skip one value (arrays may span lines), tracking its nesting below ``base``.

        Keys inside inline tables count too: a dotted key of thousands of parts is as deep
        as thousands of brackets (and the parser's cost grows with its square).
        """
        t, n = self._text, len(self._text)
        stack: list[str] = []
        while self._pos < n:
            m = _VALUE_STOP.search(t, self._pos)
            if m is None:
                self._pos = n
                return
            c = m.group(0)
            self._pos = m.start()
            if c == "\n":
                if not stack:
                    return
                self._pos += 1
                self._line += 1
            elif c == "#":
                self._skip_line()
            elif c in "[{":
                stack.append(c)
                self._deeper(base + len(stack), self._line)
                self._pos += 1
                if c == "{":
                    self._inline_key(base + len(stack))
            elif c in "]}":
                if stack:
                    stack.pop()
                self._pos += 1
            elif c == ",":
                self._pos += 1
                if stack and stack[-1] == "{":
                    self._inline_key(base + len(stack))
            elif t.startswith(c * 3, self._pos):
                self._multiline(c * 3)
            else:
                at = self._pos
                if c == '"':
                    self._basic_string()
                else:
                    self._literal_string()
                if self._pos == at:
                    self._pos += 1

    def _inline_key(self, table_depth: int) -> None:
        """Measure the key of an inline table's entry at the position, if there is one."""
        at, line = self._pos, self._line
        names = self._key()
        self._skip_ws()
        if names is not None and self._pos < len(self._text) and self._text[self._pos] == "=":
            self._deeper(table_depth + len(names) - 1, line)
            self._pos += 1
        else:
            self._pos = at

    # -- queries ----------------------------------------------------------------------------

    @property
    def defs(self) -> list[_Def]:
        """Every key, table and array-of-tables entry, in the order written."""
        return [_Def(*d) for d in self._defs]

    def line(self, path: Path_) -> int | None:
        """The line of ``path``, or of its nearest written ancestor."""
        p = tuple(path)
        while p:
            if p in self._lines:
                return self._lines[p]
            p = p[:-1]
        return None

    def first_conflict(self) -> tuple[_Def, _Def] | None:
        """The first definition that repeats or contradicts an earlier one, with that one.

        Only consulted once the parser has refused a document for a duplicate, to say where
        both definitions are; TOML's own rules stay the parser's.
        """
        seen: dict[Path_, _Def] = {}
        for d in self.defs:
            path = d.path[:-1] if d.kind == "array" else d.path
            for cut in range(1, len(path)):
                q = path[:cut]
                earlier = seen.get(q)
                if earlier is not None and earlier.kind == "key":
                    return earlier, d
                if d.kind == "key" and cut > len(d.table):
                    # a dotted key's inner tables: they may not reopen a [table]
                    if earlier is not None and earlier.kind in ("table", "array"):
                        return earlier, _Def("dotted", q, d.line)
                    if earlier is None:
                        seen[q] = _Def("dotted", q, d.line)
            earlier = seen.get(path)
            if d.kind == "array":
                if earlier is not None and earlier.kind != "array":
                    return earlier, _Def("array", path, d.line)
                seen.setdefault(path, _Def("array", path, d.line))
                continue
            if earlier is not None:
                return earlier, d
            seen[path] = d
        return None


def dotted(path: Path_) -> str:
    """Render ``("artifacts", 0, "uri")`` as ``artifacts[0].uri``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


_KIND = {
    "key": "a key",
    "dotted": "a dotted key",
    "table": "a table",
    "array": "an array of tables",
}


def parse_toml(
    text: str,
    *,
    file: str,
    limits: Limits | None = None,
    size_bound: str = "max_recipe_bytes",
) -> dict[str, Any]:
    """Parse TOML into plain Python values, refusing what is over ``limits``.

    The size (``size_bound``, a field of ``Limits``) is checked before anything else; the
    nesting before the parser runs when the document could be deep (see the module's
    docstring), after it otherwise. Syntax errors name file and line; a duplicate key or table
    names both lines.

    Raises:
        ValidationError: malformed TOML (``DuplicateKeyError`` for a duplicate,
            ``LimitExceeded`` for a document over a bound).
    """
    lim = limits or Limits.from_env()
    size = byte_length(text)
    if size > int(getattr(lim, size_bound)):
        raise lim.refuse(size_bound, size, what="the file", file=file)
    return _parse(text, file, lim, _Lines(text))


class _Lines:
    """The ``LineIndex`` of a text, made on first use."""

    __slots__ = ("made", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.made: LineIndex | None = None

    def get(self) -> LineIndex:
        if self.made is None:
            self.made = LineIndex(self.text)
        return self.made


def _parse(text: str, file: str, lim: Limits, lines: _Lines) -> dict[str, Any]:
    if _long_line_of_dots(text):
        _check_depth(lines.get(), file, lim)
    try:
        value = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _decode_error(exc, text, file, lines.get()) from None
    except RecursionError:  # deeper than the parser recurses: the scan says where
        _check_depth(lines.get(), file, lim)
        raise lim.refuse(
            "max_toml_depth", "too deep to parse", what="the nesting", file=file
        ) from None
    if _may_be_out_of_bounds(text, lim):
        _check_values(value, file, lines, lim)
    return value


_LONG_RUN = re.compile(r"[0-9A-Fa-f_]{16,}")


def _may_be_out_of_bounds(text: str, lim: Limits) -> bool:
    """False when no value of ``text`` can fail :func:`_check_values`: every level of nesting
    is written with a bracket, a brace or a dot (a header, an array, an inline table, a dotted
    key), and an integer past 64 bits needs 16 digits in a row (19 decimal, 16 hex, 22 octal
    or 64 binary, underscores between them)."""
    nesting = text.count("[") + text.count("{") + text.count(".")
    return nesting > lim.max_toml_depth or _LONG_RUN.search(text) is not None


def _long_line_of_dots(text: str) -> bool:
    """True when a line holds more than ``SCAN_FIRST`` dots: the only way to a dotted key or
    header long enough to cost the parser much (keys never span lines)."""
    if text.count(".") <= SCAN_FIRST:
        return False
    return any(line.count(".") > SCAN_FIRST for line in text.split("\n"))


def _check_depth(idx: LineIndex, file: str, lim: Limits) -> None:
    """The nesting the scan measured, over the bound: refused naming the deepest line."""
    if idx.max_depth > lim.max_toml_depth:
        raise lim.refuse(
            "max_toml_depth",
            f"{idx.max_depth} levels of tables and arrays",
            what="the nesting",
            file=file,
            line=idx.depth_line,
        )


def _decode_error(exc: Exception, text: str, file: str, idx: LineIndex) -> ValidationError:
    message = str(exc)
    m = _AT.search(message)
    reason = message[: m.start()] if m else message
    line: int | None = None
    column = ""
    if m and m.group(1):
        line = int(m.group(1))
        column = f" (column {m.group(2)})"
    elif m:
        line = (text.count("\n") + (0 if text.endswith("\n") else 1)) or None
    if reason.startswith(("Cannot overwrite a value", "Cannot declare", "Cannot mutate")):
        pair = idx.first_conflict()
        if pair is not None:
            first, again = pair
            what = "table" if again.kind in ("table", "array") else "key"
            detail = "" if first.kind == again.kind else f" (earlier {_KIND[first.kind]})"
            return DuplicateKeyError(
                f"duplicate {what} {dotted(again.path)!r}{detail}",
                file=file,
                line=again.line,
                field=dotted(again.path),
                first_line=first.line,
            )
        return ValidationError(
            f"malformed TOML: a key or table defined twice ({reason})", file=file, line=line
        )
    return ValidationError(f"malformed TOML: {reason}{column}", file=file, line=line)


def _check_values(root: dict[str, Any], file: str, lines: _Lines, lim: Limits) -> None:
    """Depth of tables and arrays, and integers TOML can represent (64-bit), iteratively.

    The walk keeps no paths (most documents pass): the first offending value's path is found
    by :func:`_find_value` when there is one.
    """
    low, high = _INT64
    deepest = lim.max_toml_depth
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > deepest:
                idx = lines.get()
                _check_depth(idx, file, lim)  # the scan's message, when it sees the depth too
                path = _find_value(root, lambda v, d: d > deepest and isinstance(v, dict | list))
                raise lim.refuse(
                    "max_toml_depth",
                    f"more than {lim.max_toml_depth} levels at {dotted(path)}",
                    what="the nesting",
                    file=file,
                    line=idx.line(path),
                )
            for v in node.values() if isinstance(node, dict) else node:
                stack.append((v, depth + 1))
        elif isinstance(node, int) and not isinstance(node, bool) and not low <= node <= high:
            path = _find_value(
                root,
                lambda v, d: (
                    isinstance(v, int) and not isinstance(v, bool) and not low <= v <= high
                ),
            )
            raise ValidationError(
                "integer out of range (TOML integers are 64-bit)",
                file=file,
                line=lines.get().line(path),
                field=dotted(path),
            )


def _find_value(root: dict[str, Any], bad: Callable[[Any, int], bool]) -> Path_:
    """The path of the first value, in :func:`_check_values`' order, that is ``bad`` (given
    the value and its depth)."""
    stack: list[tuple[Path_, Any, int]] = [((), root, 0)]
    while stack:
        path, node, depth = stack.pop()
        if bad(node, depth):
            return path
        if isinstance(node, dict | list):
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                stack.append(((*path, k), v, depth + 1))
    return ()


@dataclass
class Reader:
    """Strict, located access to one parsed TOML document."""

    data: dict[str, Any]
    file: str
    lines: _Lines
    unknown: list[tuple[int | None, str]] = field(default_factory=list)
    # The tables ``table`` has returned, by path: a field is read from its table, not walked
    # to from the root again (a recipe reads some thirty fields). The data is never changed.
    _tables: dict[Path_, dict[str, Any]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_text(
        cls,
        text: str,
        *,
        file: str,
        limits: Limits | None = None,
        size_bound: str = "max_recipe_bytes",
    ) -> Reader:
        """Parse ``text`` (bounded by ``limits``; ``size_bound`` names its size bound); its
        lines are indexed when one is first asked for."""
        lim = limits or Limits.from_env()
        size = byte_length(text)
        if size > int(getattr(lim, size_bound)):  # before the line scan, not after
            raise lim.refuse(size_bound, size, what="the file", file=file)
        lines = _Lines(text)
        return cls(_parse(text, file, lim, lines), file, lines)

    @property
    def index(self) -> LineIndex:
        """The document's line index (scanned on first use)."""
        return self.lines.get()

    def header_lines(self, name: str) -> list[int] | None:
        """The lines of the top-level ``[[name]]`` entries, in order, found without the index.

        Only when every mention of ``name`` in the document is such a header, one per entry
        (nothing in a string, a comment or an inline form could be mistaken for one); else
        None, and the caller asks the index.
        """
        found = self._headers(name)
        return None if found is None else [line for _, line in found]

    def entry_key_lines(self, name: str, key: str) -> list[tuple[int, int | None]] | None:
        """For each top-level ``[[name]]`` entry, its header's line and the line of its plain
        ``key = ...`` line (None when it has none), found without the index.

        Only where :meth:`header_lines` would find every entry, and no entry's text holds a
        multi-line string or a line starting with ``[``: then a line that starts with
        ``key =`` can only be that entry's own key (TOML has no other multi-line form that
        could hold one). Else None, and the caller asks the index.
        """
        headers = self._headers(name)
        if headers is None:
            return None
        text = self.lines.text
        key_re = _key_re(key)
        out: list[tuple[int, int | None]] = []
        for i, (at, line) in enumerate(headers):
            end = headers[i + 1][0] if i + 1 < len(headers) else len(text)
            body = text.find("\n", at, end) + 1 or end
            if (
                text.find('"""', body, end) >= 0
                or text.find("'''", body, end) >= 0
                or _ANY_HEADER.search(text, body, end)
            ):
                return None
            found = key_re.search(text, body, end)
            key_line: int | None = None
            if found is not None:
                if key_re.search(text, found.end(), end):
                    return None
                key_line = line + text.count("\n", at, found.start())
            out.append((line, key_line))
        return out

    def _headers(self, name: str) -> list[tuple[int, int]] | None:
        """Where the top-level ``[[name]]`` headers start and their lines, when every mention
        of ``name`` is such a header, one per entry, and the index is not made yet; else None."""
        text = self.lines.text
        entries = self.data.get(name)
        if self.lines.made is not None or not isinstance(entries, list):
            return None
        found = [m.start() for m in _header_re(name).finditer(text)]
        if not len(found) == len(entries) == text.count(name):
            return None
        out: list[tuple[int, int]] = []
        line, counted = 1, 0
        for at in found:
            line += text.count("\n", counted, at)
            counted = at
            out.append((at, line))
        return out

    @classmethod
    def from_parsed(
        cls,
        text: str,
        parsed: Parsed,
        *,
        file: str,
        limits: Limits | None = None,
        size_bound: str = "max_recipe_bytes",
    ) -> Reader:
        """``from_text`` for a document parsed before (``parsed``, from a cache): the same
        bounds are checked, in the same order, so it is refused exactly as ``text`` would be.

        ``parsed.data`` is used, not copied: it must be the caller's own.
        """
        lim = limits or Limits.from_env()
        size = byte_length(text)
        if size > int(getattr(lim, size_bound)):
            raise lim.refuse(size_bound, size, what="the file", file=file)
        lines = _Lines(text)
        lines.made = LineIndex.restored(parsed)
        _check_depth(lines.made, file, lim)
        _check_values(parsed.data, file, lines, lim)
        return cls(parsed.data, file, lines)

    def parsed(self) -> Parsed:
        """The document as parsed and indexed (for a cache; before anything reads it)."""
        idx = self.index
        return Parsed(self.data, idx._lines, idx.max_depth, idx.depth_line)

    def error(self, path: Path_, message: str) -> ValidationError:
        """A ValidationError located at ``path``."""
        return ValidationError(
            message, file=self.file, line=self.index.line(path), field=dotted(path)
        )

    def get(self, path: Path_) -> Any:
        """The value at ``path``, or None where the path does not lead (TOML has no null)."""
        if len(path) > 1:
            parent = self._tables.get(path[:-1])
            if parent is not None:
                last = path[-1]
                return parent.get(last) if isinstance(last, str) else None
        node: Any = self.data
        for part in path:
            if isinstance(node, dict):
                node = node.get(part)  # an int part is no key: None
                if node is None:
                    return None
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            else:
                return None
        return node

    def table(
        self, path: Path_, allowed: set[str], *, required: bool = False
    ) -> dict[str, Any] | None:
        """The table at ``path`` (or None), recording keys outside ``allowed`` as unknown."""
        value = self.get(path)
        if value is None:
            if required:
                raise self.error(path, "required table is missing")
            return None
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table, got {_kind(value)}")
        if not value.keys() <= allowed:
            for key in value:
                if key not in allowed:
                    sub = (*path, key)
                    self.unknown.append((self.index.line(sub), dotted(sub)))
        self._tables[path] = value
        return value

    def tables(self, path: Path_, allowed: set[str]) -> Iterator[tuple[Path_, dict[str, Any]]]:
        """Entries of an array of tables (``[[name]]``) at ``path``."""
        value = self.get(path)
        if value is None:
            return
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(
                path, f"expected an array of tables ([[{dotted(path)}]]), got {_kind(value)}"
            )
        for i in range(len(value)):
            sub = (*path, i)
            tbl = self.table(sub, allowed)
            assert tbl is not None
            yield sub, tbl

    def text(
        self, path: Path_, *, required: bool = False, default: str | None = None
    ) -> str | None:
        value = self.get(path)
        if value is None and not required:
            return default
        if not isinstance(value, str):
            self._typed(path, (str,), "a string", required, default)  # raises
        assert isinstance(value, str)
        self._no_nul(path, value)
        return value

    def _no_nul(self, path: Path_, value: str) -> None:
        # A NUL cannot reach a command line, an environment or a path: refuse it here
        # rather than fail at spawn time.
        if "\0" in value:
            raise self.error(path, "expected a string without NUL characters (\\u0000)")

    def flag(self, path: Path_, *, default: bool = False) -> bool:
        value = self._typed(path, (bool,), "true or false", False, default)
        assert isinstance(value, bool)
        return value

    def integer(
        self, path: Path_, *, default: int | None = None, minimum: int | None = None
    ) -> int | None:
        value = self.get(path)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(path, f"expected an integer, got {_kind(value)}")
        if minimum is not None and value < minimum:
            raise self.error(path, f"expected an integer >= {minimum}, got {value}")
        return value

    def str_list(self, path: Path_) -> tuple[str, ...] | None:
        value = self.get(path)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(path, f"expected an array of strings, got {_kind(value)}")
        for i, item in enumerate(value):
            self._no_nul((*path, i), item)
        return tuple(value)

    def str_table(self, path: Path_) -> dict[str, str]:
        value = self.get(path)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table of strings, got {_kind(value)}")
        out: dict[str, str] = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                raise self.error((*path, k), f"expected a string, got {_kind(v)}")
            if not isinstance(v, str):
                raise self.error((*path, k), f'expected a string, got {_kind(v)} (quote it: "{v}")')
            self._no_nul((*path, k), k)
            self._no_nul((*path, k), v)
            out[k] = v
        return out

    def converted(
        self, path: Path_, convert: Callable[[str], Any], expected: str, *, default: Any = None
    ) -> Any:
        """A string converted by ``convert``; its ValueError becomes a located error."""
        raw = self.text(path)
        if raw is None:
            return default
        try:
            return convert(raw)
        except ValueError as exc:
            raise self.error(path, f"expected {expected}, got {raw!r} ({exc})") from None

    def _typed(
        self, path: Path_, types: tuple[type, ...], expected: str, required: bool, default: Any
    ) -> Any:
        value = self.get(path)
        if value is None:
            if required:
                raise self.error(path, f"required field is missing (expected {expected})")
            return default
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise self.error(path, f"expected {expected}, got {_kind(value)}")
        return value

    def unknown_messages(self) -> list[str]:
        """``file:line: unknown field x.y`` for every unknown key, sorted by line."""
        return [
            f"{self.file}:{line}: unknown field {name}"
            if line
            else f"{self.file}: unknown field {name}"
            for line, name in sorted(self.unknown, key=lambda u: (u[0] or 0, u[1]))
        ]


@functools.cache  # a few names: the entry tables a schema reads by header
def _header_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"^[ \t]*\[\[[ \t]*{re.escape(name)}[ \t]*\]\]", re.MULTILINE)


@functools.cache  # a few keys: the ones a schema locates in entries
def _key_re(key: str) -> re.Pattern[str]:
    return re.compile(rf"^[ \t]*{re.escape(key)}[ \t]*=", re.MULTILINE)


_ANY_HEADER = re.compile(r"^[ \t]*\[", re.MULTILINE)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__

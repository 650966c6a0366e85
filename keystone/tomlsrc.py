"""TOML documents read with tomlkit, with the line of every key for error messages.

tomlkit keeps no line numbers on parsed items, so ``LineIndex`` scans the source once and maps
each dotted key path (array-of-table entries by index: ``("artifacts", 1, "uri")``) to the line
where it is written. ``Reader`` walks a parsed document against a declared schema, converting
values strictly (a float where a string is expected is an error) and collecting unknown keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from keystone.errors import ValidationError

Path_ = tuple[str | int, ...]

_HEADER = re.compile(r"^\s*(\[\[|\[)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)
_KEY_PART = re.compile(r"""[A-Za-z0-9_-]+|"([^"]*)"|'([^']*)'""")


def _split_key(text: str) -> list[str]:
    parts = []
    for m in _KEY_PART.finditer(text):
        parts.append(
            m.group(1)
            if m.group(1) is not None
            else m.group(2)
            if m.group(2) is not None
            else m.group(0)
        )
    return parts


class LineIndex:
    """Maps key paths of a TOML source to 1-based line numbers."""

    def __init__(self, text: str) -> None:
        self._lines: dict[Path_, int] = {}
        arrays: dict[tuple[str, ...], int] = {}
        prefix: Path_ = ()
        in_multiline: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_multiline:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            header = _HEADER.match(line)
            if header:
                names = _split_key(header.group(2))
                if header.group(1) == "[[":
                    key = tuple(names)
                    arrays[key] = arrays.get(key, -1) + 1
                prefix = self._with_indexes(names, arrays)
                self._lines.setdefault(prefix, number)
                continue
            m = _KEY.match(line)
            if m:
                path = prefix + tuple(_split_key(m.group(1)))
                self._lines.setdefault(path, number)
                rest = line[m.end() :]
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2 == 1:
                        in_multiline = quote

    @staticmethod
    def _with_indexes(names: list[str], arrays: dict[tuple[str, ...], int]) -> Path_:
        out: list[str | int] = []
        for i in range(len(names)):
            out.append(names[i])
            key = tuple(names[: i + 1])
            if key in arrays:
                out.append(arrays[key])
        return tuple(out)

    def line(self, path: Path_) -> int | None:
        """The line of ``path``, or of its nearest written ancestor."""
        p = tuple(path)
        while p:
            if p in self._lines:
                return self._lines[p]
            p = p[:-1]
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


def parse_toml(text: str, *, file: str) -> dict[str, Any]:
    """Parse TOML with tomlkit into plain Python values; syntax errors name file and line."""
    import tomlkit
    from tomlkit.exceptions import ParseError

    try:
        doc = tomlkit.parse(text)
    except ParseError as exc:
        raise ValidationError(
            f"malformed TOML: {exc}", file=file, line=getattr(exc, "line", None)
        ) from None
    value = doc.unwrap()
    assert isinstance(value, dict)
    return value


@dataclass
class Reader:
    """Strict, located access to one parsed TOML document."""

    data: dict[str, Any]
    file: str
    index: LineIndex
    unknown: list[tuple[int | None, str]] = field(default_factory=list)

    @classmethod
    def from_text(cls, text: str, *, file: str) -> Reader:
        """Parse ``text`` and index its lines."""
        return cls(parse_toml(text, file=file), file, LineIndex(text))

    def error(self, path: Path_, message: str) -> ValidationError:
        """A ValidationError located at ``path``."""
        return ValidationError(
            message, file=self.file, line=self.index.line(path), field=dotted(path)
        )

    def get(self, path: Path_) -> Any:
        node: Any = self.data
        for part in path:
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    return None
                node = node[part]
            else:
                if not isinstance(node, dict) or part not in node:
                    return None
                node = node[part]
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
        for key in value:
            if key not in allowed:
                sub = (*path, key)
                self.unknown.append((self.index.line(sub), dotted(sub)))
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
        value = self._typed(path, (str,), "a string", required, default)
        assert value is None or isinstance(value, str)
        return value

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

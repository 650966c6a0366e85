"""Semantic versions and the constraint syntax of recipe dependencies.

Constraints follow the Masterminds/semver syntax the Go Keystone uses: comparisons
(``=``, ``!=``, ``>``, ``>=``, ``<``, ``<=``), tilde (``~1.2`` = ``>=1.2.0 <1.3.0``), caret
(``^1.2`` = ``>=1.2.0 <2.0.0``), wildcards (``1.x``, ``1.2.*``), hyphen ranges
(``1.2 - 1.4``), ``,`` or space for AND and ``||`` for OR. An empty constraint matches anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_VERSION = re.compile(
    r"v?([0-9]+)(?:\.([0-9]+))?(?:\.([0-9]+))?(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?"
)


@dataclass(frozen=True, order=True)
class Version:
    """A parsed version; missing minor/patch parts are zero."""

    major: int
    minor: int
    patch: int
    pre: tuple[tuple[int, int | str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse ``1``, ``1.2``, ``v1.2.3``, ``1.2.3-rc.1+build``; raise ``ValueError`` otherwise."""
        m = _VERSION.fullmatch(text.strip())
        if not m:
            raise ValueError(f"not a semantic version: {text!r}")
        pre: tuple[tuple[int, int | str], ...] = ()
        if m.group(4):
            pre = tuple((0, int(p)) if p.isdigit() else (1, p) for p in m.group(4).split("."))
        return cls(int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0), pre)

    def key(self) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
        """Sort key where a pre-release sorts before its release."""
        return (self.major, self.minor, self.patch, 0 if self.pre else 1, self.pre)


_CMP = re.compile(r"(=|==|!=|>=|<=|>|<|~>|~|\^)?\s*(v?[0-9xX*][0-9A-Za-z.+*-]*)")


def _cmp(a: Version, b: Version) -> int:
    ka, kb = a.key(), b.key()
    return (ka > kb) - (ka < kb)


def _parts(text: str) -> tuple[list[int | None], Version]:
    core = re.split(r"[-+]", text.lstrip("v"), maxsplit=1)[0]
    parts: list[int | None] = []
    for p in core.split("."):
        parts.append(None if p in ("x", "X", "*") else int(p))
    while len(parts) < 3:
        parts.append(None)
    if any(p is None for p in parts):
        filled = [p or 0 for p in parts]
        return parts, Version(filled[0], filled[1], filled[2])
    return parts, Version.parse(text)


def _term(op: str, text: str) -> list[tuple[str, Version]]:
    """Expand one comparison into primitive ``(op, version)`` checks."""
    parts, v = _parts(text)
    major, minor, patch = parts
    wild = major is None or minor is None or patch is None
    if op in ("", "=", "=="):
        if not wild:
            return [("=", v)]
        if major is None:
            return []
        if minor is None:
            return [(">=", Version(major, 0, 0)), ("<", Version(major + 1, 0, 0))]
        return [(">=", Version(major, minor, 0)), ("<", Version(major, minor + 1, 0))]
    if op in ("~", "~>"):
        if minor is None:
            return [(">=", v), ("<", Version(v.major + 1, 0, 0))]
        return [(">=", v), ("<", Version(v.major, v.minor + 1, 0))]
    if op == "^":
        if v.major > 0 or minor is None:
            return [(">=", v), ("<", Version(v.major + 1, 0, 0))]
        if v.minor > 0 or patch is None:
            return [(">=", v), ("<", Version(0, v.minor + 1, 0))]
        return [(">=", v), ("<", Version(0, 0, v.patch + 1))]
    if op == ">" and wild:
        if major is None:
            return [("<", Version(0, 0, 0))]
        if minor is None:
            return [(">=", Version(major + 1, 0, 0))]
        return [(">=", Version(major, minor + 1, 0))]
    if op == "<=" and wild:
        if major is None:
            return []
        if minor is None:
            return [("<", Version(major + 1, 0, 0))]
        return [("<", Version(major, minor + 1, 0))]
    return [(op, v)]


@dataclass(frozen=True)
class Constraint:
    """A parsed constraint: OR of AND-groups of primitive checks."""

    text: str
    groups: tuple[tuple[tuple[str, Version], ...], ...]

    @classmethod
    def parse(cls, text: str) -> Constraint:
        """Parse a constraint string; raise ``ValueError`` naming the bad part."""
        src = text.strip()
        if src in ("", "*", "x", "X"):
            return cls(text, ((),))
        groups: list[tuple[tuple[str, Version], ...]] = []
        for alt in src.split("||"):
            alt = alt.strip()
            checks: list[tuple[str, Version]] = []
            hyphen = re.fullmatch(r"(\S+)\s+-\s+(\S+)", alt)
            if hyphen:
                checks += _term(">=", hyphen.group(1))
                checks += _term("<=", hyphen.group(2))
            else:
                tokens = re.findall(r"(?:=|==|!=|>=|<=|>|<|~>|~|\^)?\s*[^\s,]+", alt)
                if not tokens:
                    raise ValueError(f"empty alternative in version constraint {text!r}")
                for tok in tokens:
                    m = _CMP.fullmatch(tok.strip())
                    if not m:
                        raise ValueError(f"invalid version constraint {tok.strip()!r} in {text!r}")
                    try:
                        checks += _term(m.group(1) or "", m.group(2))
                    except ValueError as exc:
                        raise ValueError(f"invalid version in constraint {text!r}: {exc}") from None
            groups.append(tuple(checks))
        return cls(text, tuple(groups))

    def allows(self, version: str | Version) -> bool:
        """True if ``version`` satisfies the constraint."""
        v = Version.parse(version) if isinstance(version, str) else version
        return any(all(_check(op, v, ref) for op, ref in group) for group in self.groups)


def _check(op: str, v: Version, ref: Version) -> bool:
    c = _cmp(v, ref)
    return {
        "=": c == 0,
        "==": c == 0,
        "!=": c != 0,
        ">": c > 0,
        ">=": c >= 0,
        "<": c < 0,
        "<=": c <= 0,
    }[op]

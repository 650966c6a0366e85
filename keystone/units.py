"""Go-style durations (``500ms``, ``1m30s``) and byte sizes (``128M``, ``2GiB``)."""

from __future__ import annotations

import functools
import math
import re

_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")
# Go's time.Duration is int64 nanoseconds: about 292 years.
MAX_DURATION = (2**63 - 1) / 1e9
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


@functools.lru_cache(maxsize=256)  # recipes repeat a few durations ("2s", "30s") many times
def parse_duration(text: str) -> float:
    """Parse a Go duration string into seconds.

    Accepts what Go's ``time.ParseDuration`` accepts (``300ms``, ``1.5h``, ``2h45m``, ``0``),
    plus a bare number of seconds for convenience. Raises ``ValueError`` with the text.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if _SECONDS.fullmatch(s):
        return sign * _in_range(float(s), text)
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m:
            raise ValueError(f"invalid duration {text!r} (expected e.g. 500ms, 30s, 5m, 1h)")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    return sign * _in_range(total, text)


def _in_range(seconds: float, text: str) -> float:
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ValueError(f"duration {text[:40]!r} is out of range (at most about 292 years)")
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds the way Go prints short durations (``1m30s``, ``250ms``)."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    whole = int(seconds)
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    out = ""
    if h:
        out += f"{h}h"
    if m:
        out += f"{m}m"
    if s or not out:
        out += f"{s}s"
    return out


def go_duration(seconds: float) -> str:
    """Seconds as Go's ``time.Duration.String`` prints them: ``1h2m3.5s``, ``1m0s``, ``1.5ms``.

    The value is first rounded to whole nanoseconds (Go's duration is an int64 of them); at or
    above one second the fraction of the seconds keeps up to nine digits without trailing
    zeros, hours are the largest unit (``100h0m0s``), and below a second the unit is ``ms``,
    ``µs`` or ``ns``.
    """
    ns = round(seconds * 1e9)
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u == 0:
        return "0s"
    if u < 1_000_000_000:
        if u < 1_000:
            return f"{sign}{u}ns"
        unit, prec = ("µs", 3) if u < 1_000_000 else ("ms", 6)
        return f"{sign}{_go_frac(u, prec)}{unit}"
    whole, frac = divmod(u, 1_000_000_000)
    secs = f"{whole % 60}" + (f".{frac:09d}".rstrip("0") if frac else "") + "s"
    minutes = whole // 60
    if not minutes:
        return sign + secs
    hours = minutes // 60
    if not hours:
        return f"{sign}{minutes}m{secs}"
    return f"{sign}{hours}h{minutes % 60}m{secs}"


def _go_frac(u: int, prec: int) -> str:
    whole, frac = divmod(u, 10**prec)
    return f"{whole}" + (f".{frac:0{prec}d}".rstrip("0") if frac else "")


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*$", re.ASCII)
MAX_SIZE = 2**63 - 1
_SIZE_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str | int) -> int:
    """Parse a byte size: an int, or ``512``, ``64K``, ``128M``, ``2G``, ``1GiB``.

    Single-letter suffixes are binary (as ``docker`` and cgroups read them), so ``128M`` is
    128 MiB; ``MB`` with the ``B`` is decimal.
    """
    if isinstance(text, int):
        if text < 0:
            raise ValueError("size must not be negative")
        if text > MAX_SIZE:
            raise ValueError("size is out of range (at most 2^63-1 bytes)")
        return text
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"invalid size {text!r} (expected e.g. 512K, 128M, 2G)")
    number, unit, binary = m.group(1), m.group(2).lower(), m.group(3)
    decimal = text.strip().endswith(("B", "b")) and not binary and unit != ""
    base = 1000 if decimal else 1024
    value = float(number) * base ** _SIZE_POWER[unit]
    if not math.isfinite(value) or value > MAX_SIZE:
        raise ValueError(f"size {text[:40]!r} is out of range (at most 2^63-1 bytes)")
    return int(value)

"""Maintenance windows: when a device may deploy a new revision (pure, wall time in, time out).

A window is a daily range in local time, optionally on some weekdays only, or a cron
expression with a duration::

    "02:00-04:00"                       every day, 02:00 to 04:00
    "mon-fri 22:00-02:00"               Monday to Friday evenings, past midnight
    "sat,sun 00:00-24:00"               the whole weekend
    { cron = "0 3 * * sun", duration = "90m" }

A list of windows is their union: a device may deploy while any is open. The agent's own
windows (``[maintenance]`` in agent.toml) and the fleet's (``[maintenance]`` in the fleet
repository's ``rollout.toml``), and those of the plan files a device merges (``[maintenance]``
in a plan), must all be open: :func:`next_open` finds the first instant all allow.
Times are local to ``timezone`` (an IANA name), else to the device's local time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from keystone.tomlsrc import Path_, Reader
from keystone.units import parse_duration

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RANGE = re.compile(r"^(?:(?P<days>[a-z,\-]+)\s+)?(?P<start>\d{1,2}:\d{2})-(?P<end>\d{1,2}:\d{2})$")
MAX_WINDOWS = 64
_SEARCH_STEPS = 512  # alternations between two window sets before "they never overlap"


class WindowError(ValueError):
    """A window that does not parse (the message says what was expected)."""


@dataclass(frozen=True)
class Window:
    """One maintenance window: a daily range on some weekdays, or a cron start and duration.

    Attributes:
        text: as written (for status and errors).
        days: the weekdays (0 = Monday) a range starts on.
        start: minutes after midnight the range opens.
        end: minutes after midnight it closes (at or before ``start``: the next day).
        cron: a five-field cron expression of the window's starts.
        duration: seconds a cron window stays open.
    """

    text: str
    days: frozenset[int] = frozenset(range(7))
    start: int = 0
    end: int = 0
    cron: str | None = None
    duration: float = 0.0

    def next_open(self, t: float, zone: tzinfo | None) -> tuple[float, float]:
        """The first ``(opens, closes)`` interval of this window that ends after ``t``.

        ``opens <= t`` when the window is open at ``t``.
        """
        if self.cron is not None:
            return self._next_cron(t, zone)
        here = _local(t, zone).date()
        for offset in range(-1, 9):
            day = here + timedelta(days=offset)
            if day.weekday() not in self.days:
                continue
            opens = _at(day, self.start, zone)
            end_day = day if self.end > self.start else day + timedelta(days=1)
            closes = _at(end_day, self.end, zone)
            if closes > t:
                return opens, closes
        raise AssertionError("a weekly window opens within eight days")

    def _next_cron(self, t: float, zone: tzinfo | None) -> tuple[float, float]:
        # apscheduler is already the poll scheduler's; loaded only for a cron window.
        from apscheduler.triggers.cron import CronTrigger

        tz = zone if zone is not None else _local_zone()
        trigger = CronTrigger.from_crontab(str(self.cron), timezone=tz)
        since = datetime.fromtimestamp(t - self.duration, tz)
        fire = trigger.get_next_fire_time(None, since)
        if fire is None:
            raise WindowError(f"{self.text}: the cron expression never fires again")
        opens = fire.timestamp()
        if opens + self.duration <= t:  # opened exactly duration ago: closed now
            fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
            if fire is None:
                raise WindowError(f"{self.text}: the cron expression never fires again")
            opens = fire.timestamp()
        return opens, opens + self.duration


def _local_zone() -> tzinfo:
    # tzlocal comes with apscheduler: the device's zone with its DST rules.
    from tzlocal import get_localzone

    zone: tzinfo = get_localzone()
    return zone


def _local(t: float, zone: tzinfo | None) -> datetime:
    return datetime.fromtimestamp(t, zone) if zone is not None else datetime.fromtimestamp(t)


def _at(day: date, minutes: int, zone: tzinfo | None) -> float:
    base = datetime(day.year, day.month, day.day, tzinfo=zone)
    if minutes >= 24 * 60:
        return (base + timedelta(days=1)).timestamp()
    return base.replace(hour=minutes // 60, minute=minutes % 60).timestamp()


def _minutes(text: str, *, end: bool) -> int:
    h, _, m = text.partition(":")
    hours, mins = int(h), int(m)
    if mins > 59 or hours > 24 or (hours == 24 and (mins or not end)):
        raise WindowError(f"{text} is not a time of day (00:00 to 23:59, or 24:00 as an end)")
    return hours * 60 + mins


def _days(text: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.partition("-")
        if first not in DAYS or (dash and last not in DAYS):
            raise WindowError(f"{part!r} is not a weekday or a range of them (mon, tue-fri, ...)")
        a = DAYS.index(first)
        b = DAYS.index(last) if dash else a
        out.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return frozenset(out)


def parse_window(raw: str) -> Window:
    """A daily range such as ``"mon-fri 02:00-04:00"``.

    Raises:
        WindowError: what was expected.
    """
    text = " ".join(raw.strip().lower().split())
    m = _RANGE.match(text)
    if not m:
        raise WindowError(
            'expected "HH:MM-HH:MM", optionally after weekdays ("mon-fri 02:00-04:00")'
        )
    start = _minutes(m.group("start"), end=False)
    end = _minutes(m.group("end"), end=True)
    if start == end:
        raise WindowError("the window opens and closes at the same time")
    days = _days(m.group("days")) if m.group("days") else frozenset(range(7))
    return Window(raw, days, start, end)


def cron_window(expr: str, duration: float) -> Window:
    """A window opening at each fire time of the five-field cron ``expr``, ``duration`` long.

    Raises:
        WindowError: the expression does not parse, or the duration is not positive.
    """
    from apscheduler.triggers.cron import CronTrigger

    if duration <= 0:
        raise WindowError("a cron window needs a duration above zero")
    try:
        trigger = CronTrigger.from_crontab(expr, timezone=_utc())
    except ValueError as exc:
        raise WindowError(f"cron expression {expr!r}: {exc}") from None
    if trigger.get_next_fire_time(None, datetime.now(_utc())) is None:
        raise WindowError(f"cron expression {expr!r} never fires")
    return Window(f"cron {expr} for {duration:g}s", cron=expr, duration=duration)


def open_until(windows: Sequence[Window], t: float, zone: tzinfo | None) -> tuple[float, float]:
    """The union's first open interval ending after ``t``: ``(opens, closes)``."""
    spans = [w.next_open(t, zone) for w in windows]
    opens = min(s[0] for s in spans)
    opens = t if opens <= t else opens
    # The union may continue past the first span's end through an overlapping one.
    closes = max(c for o, c in spans if o <= opens)
    return opens, closes


def next_open(sets: Sequence[tuple[Sequence[Window], tzinfo | None]], t: float) -> float | None:
    """The first instant at or after ``t`` when every non-empty set of windows is open.

    ``None`` when the sets never overlap (within a bounded search). A set with no windows
    always allows.
    """
    active = [(ws, z) for ws, z in sets if ws]
    if not active:
        return t
    at = t
    for _ in range(_SEARCH_STEPS):
        latest = at
        for ws, zone in active:
            try:
                opens, _closes = open_until(ws, at, zone)
            except WindowError:  # a cron window that fires no more
                return None
            latest = max(latest, opens)
        if latest == at:
            return at
        at = latest
    return None


@dataclass(frozen=True)
class Maintenance:
    """A set of windows and the zone they are written in."""

    windows: tuple[Window, ...] = ()
    timezone: str | None = None

    def zone(self) -> tzinfo | None:
        """The zone (None: the device's local time)."""
        if not self.timezone:
            return None
        from zoneinfo import ZoneInfo

        return ZoneInfo(self.timezone)

    def to_json(self) -> dict[str, Any]:
        return {"windows": [w.text for w in self.windows], "timezone": self.timezone}


def read_maintenance(r: Reader, path: Path_) -> Maintenance | None:
    """The ``windows`` and ``timezone`` of the table at ``path`` of ``r`` (None: no table).

    Raises:
        ValidationError: naming file, line and field of what does not parse.
    """
    if r.table(path, {"windows", "timezone"}) is None:
        return None
    zone = r.text((*path, "timezone"))
    if zone:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise r.error((*path, "timezone"), f"unknown time zone {zone!r}") from None
    wpath: Path_ = (*path, "windows")
    raw = r.get(wpath)
    if raw is None:
        # A misspelt ``windows`` is the likely cause: name what the table has instead.
        table = r.get(path)
        others = sorted(str(k) for k in table if k not in ("windows", "timezone"))
        found = f"; it has {', '.join(others)} instead" if others else ""
        raise r.error(wpath, f"required field is missing (a list of windows){found}")
    if not isinstance(raw, list):
        raise r.error(wpath, 'expected a list of windows such as ["mon-fri 02:00-04:00"]')
    if len(raw) > MAX_WINDOWS:
        raise r.error(wpath, f"at most {MAX_WINDOWS} windows, got {len(raw)}")
    out: list[Window] = []
    for i, item in enumerate(raw):
        ipath: Path_ = (*wpath, i)
        try:
            if isinstance(item, str):
                out.append(parse_window(item))
            elif isinstance(item, dict):
                r.table(ipath, {"cron", "duration"})
                expr = r.text((*ipath, "cron"), required=True) or ""
                dur = r.text((*ipath, "duration"), required=True) or ""
                try:
                    seconds = parse_duration(dur)
                except ValueError as exc:
                    raise r.error((*ipath, "duration"), str(exc)) from None
                out.append(cron_window(expr, seconds))
            else:
                raise r.error(ipath, 'expected "HH:MM-HH:MM" or { cron = "...", duration = "..." }')
        except WindowError as exc:
            raise r.error(ipath, f"window {item!r}: {exc}") from None
    if not out:
        raise r.error(wpath, "expected at least one window (remove [maintenance] for none)")
    return Maintenance(tuple(out), zone or None)


def window_to_json(w: Window) -> str | dict[str, Any]:
    """A window as a snapshot keeps it: its text, or its cron expression and seconds."""
    if w.cron is not None:
        return {"cron": w.cron, "duration": w.duration}
    return w.text


def window_from_json(item: object) -> Window:
    """The window :func:`window_to_json` wrote.

    Raises:
        WindowError: ``item`` is not one.
    """
    if isinstance(item, str):
        return parse_window(item)
    if isinstance(item, dict):
        expr, seconds = item.get("cron"), item.get("duration")
        if isinstance(expr, str) and isinstance(seconds, int | float):
            return cron_window(expr, float(seconds))
    raise WindowError('expected "HH:MM-HH:MM" or {"cron": ..., "duration": seconds}')


def closed_at(m: Maintenance, t: float) -> bool:
    """Whether every window of ``m`` is closed at ``t``."""
    try:
        opens, _closes = open_until(m.windows, t, m.zone())
    except WindowError:  # a cron window that fires no more
        return True
    return opens > t


def describe(t: float) -> str:
    """``2026-12-02T02:00:00Z``: a wall time as status shows it."""
    return datetime.fromtimestamp(t, tz=_utc()).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc() -> tzinfo:
    from datetime import UTC

    return UTC

"""A clock for certificate expiry that never runs backwards.

A device with a dead RTC battery boots in 1970 (or at its firmware date); judged by that clock, a
certificate that expired years ago looks valid. So expiry is judged by the latest of three times:

* the system time,
* the build time (when this copy of Keystone was written to disk: the device cannot be older),
* a high-water mark persisted in the state directory each time a later time was seen.

Two policies (``KEYSTONE_CLOCK_POLICY``):

* ``high-water`` (default): judge with that latest time, whatever the system clock says;
* ``strict``: refuse to judge at all while the system clock is behind the mark or the build time.

``ClockReading.trusted`` feeds the ``keystone_clock_trusted`` metric: it is false while the system
clock is behind what the device has already seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from loguru import logger

import keystone
from keystone.errors import UsageError, VerificationError
from keystone.state import write_json
from keystone.statefile import StateDamage, number, obj, read_state

HIGH_WATER = "high-water"
STRICT = "strict"
CLOCK_POLICIES = (HIGH_WATER, STRICT)

MARK_FILE = "trust-clock.json"

# NTP steps a skewed clock back by seconds to minutes; a system clock this little behind the mark
# is still "trusted" (the judged time is the mark anyway).
BEHIND_TOLERANCE_S = 300.0

MARK_WRITE_INTERVAL_S = 60.0

WallClock = Callable[[], float]


def _mark_schema(doc: object) -> float:
    """``{"high_water": <seconds>, "utc": "..."}``: a positive number of seconds."""
    value = number(obj(doc, MARK_FILE).get("high_water"), "high_water")
    if value <= 0:
        raise StateDamage(f"high_water: expected a positive time, got {value}")
    return value


class ClockBehind(VerificationError):
    """The system clock is behind the trusted floor and the policy is ``strict``."""


def build_time() -> float:
    """Return when this copy of Keystone was written to disk (a lower bound for "now").

    The newest modification time of the package's own files that a release ships: installing or
    building Keystone writes them, so the real time cannot be earlier than that.
    """
    candidates = [Path(keystone.__file__), Path(__file__)]
    times = []
    for path in candidates:
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            continue
    return max(times, default=0.0)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ClockReading:
    """One reading of the trusted clock.

    Attributes:
        system: the system (wall) time.
        build: the build time floor.
        mark: the persisted high-water mark (0 when none).
        now: the time certificates are judged at: ``max(system, build, mark)``.
    """

    system: float
    build: float
    mark: float

    @property
    def floor(self) -> float:
        """The latest time the device knows it has already passed."""
        return max(self.build, self.mark)

    @property
    def now(self) -> float:
        """The time to judge certificate validity at."""
        return max(self.system, self.floor)

    @property
    def trusted(self) -> bool:
        """True unless the system clock is behind the floor (beyond NTP-step tolerance)."""
        return self.system >= self.floor - BEHIND_TOLERANCE_S

    @property
    def source(self) -> str:
        """Which of the three times ``now`` came from: system, build-time or high-water."""
        if self.system >= self.floor:
            return "system"
        return "high-water" if self.mark >= self.build else "build-time"

    def describe(self) -> str:
        """One line for messages: the judged time and where it came from."""
        if self.source == "system":
            return _iso(self.now)
        return (
            f"{_iso(self.now)}, from the {self.source}; the system clock says {_iso(self.system)}"
        )


class TrustedClock:
    """Read and advance the monotonic trust clock kept under ``state_dir``.

    Args:
        state_dir: where ``trust-clock.json`` persists; ``None`` keeps no mark (build time and
            system time only).
        policy: ``high-water`` or ``strict``.
        wall: the system clock (a seam for tests; ``time.time`` by default).
        build: the build time floor (default: :func:`build_time`).
    """

    def __init__(
        self,
        state_dir: Path | None,
        policy: str = HIGH_WATER,
        *,
        wall: WallClock = time.time,
        build: float | None = None,
    ) -> None:
        if policy not in CLOCK_POLICIES:
            raise UsageError(
                f"KEYSTONE_CLOCK_POLICY={policy!r} is not a clock policy: use 'high-water' or 'strict'"
            )
        self.state_dir = state_dir
        self.policy = policy
        self._wall = wall
        self._build = build_time() if build is None else build

    @property
    def mark_path(self) -> Path | None:
        """The file that holds the high-water mark, if any."""
        return None if self.state_dir is None else self.state_dir / MARK_FILE

    def mark(self) -> float:
        """Return the persisted high-water mark, 0 when there is none.

        A damaged mark file is set aside and reported (:mod:`keystone.statefile`); the floor is
        then the build time until the next verification writes a new mark.
        """
        path = self.mark_path
        if path is None:
            return 0.0
        value = read_state(path, _mark_schema, max_bytes=4096)
        return value if value is not None and value > 0 else 0.0

    def read(self) -> ClockReading:
        """Take a reading without changing anything."""
        return ClockReading(system=self._wall(), build=self._build, mark=self.mark())

    def observe(self, when: float) -> None:
        """Advance the persisted mark to ``when`` if that is later (never moves it back).

        Feed it times the device has good reason to believe have passed: the system time when it
        is ahead of the mark, or the commit time of a verified revision.
        """
        path = self.mark_path
        if path is None or when <= self.mark():
            return
        write_json(path, {"high_water": when, "utc": _iso(when)})

    def verification_time(self) -> ClockReading:
        """Return the reading to judge certificates by, advancing the mark first.

        Raises:
            ClockBehind: under ``strict`` when the system clock is behind the floor.
        """
        reading = self.read()
        # Persist only when the mark lags by a minute or more: a verification burst costs one write.
        if reading.system > reading.mark + MARK_WRITE_INTERVAL_S:
            try:
                self.observe(reading.system)
            except OSError as exc:
                # Judging still works from the reading; only the protection for later is lost.
                logger.warning("cannot persist the trust clock mark in {}: {}", self.state_dir, exc)
            reading = ClockReading(system=reading.system, build=reading.build, mark=reading.system)
        if self.policy == STRICT and not reading.trusted:
            raise ClockBehind(
                f"the system clock ({_iso(reading.system)}) is behind the time this device has "
                f"already seen ({_iso(reading.floor)}, from its "
                f"{'high-water mark' if reading.mark >= reading.build else 'build time'}); "
                "certificates are not judged under KEYSTONE_CLOCK_POLICY=strict: fix the clock "
                "(NTP, RTC battery) or set KEYSTONE_CLOCK_POLICY=high-water"
            )
        return reading

"""OpenSSH's pattern lists (``match_pattern_list``) and its time formats (``valid-after``)."""

from __future__ import annotations

import calendar
import re
import time


def match_pattern(s: str, pattern: str) -> bool:
    """OpenSSH ``match_pattern()``: ``*`` matches any run, ``?`` one byte, the rest itself.

    Like OpenSSH it works on bytes (UTF-8), so ``?`` matches one byte, not one character.
    """
    return _match_bytes(
        s.encode(errors="surrogateescape"), pattern.encode(errors="surrogateescape")
    )


def _match_bytes(s: bytes, pattern: bytes) -> bool:
    # Iterative wildcard matching: the same language as OpenSSH's recursive version.
    si = pi = 0
    star_p = star_s = -1
    while si < len(s):
        if pi < len(pattern) and pattern[pi] in (0x3F, s[si]):  # "?" or the same byte
            si += 1
            pi += 1
        elif pi < len(pattern) and pattern[pi] == 0x2A:  # "*"
            star_p, star_s = pi, si
            pi += 1
        elif star_p >= 0:
            star_s += 1
            si, pi = star_s, star_p + 1
        else:
            return False
    while pi < len(pattern) and pattern[pi] == 0x2A:
        pi += 1
    return pi == len(pattern)


def match_pattern_list(s: str, patterns: str) -> int:
    """OpenSSH ``match_pattern_list()`` (case-sensitive).

    Returns:
        ``1`` when a positive pattern of the comma-separated list matches, ``-1`` when a
        negated one (``!pattern``) matches (negation wins), ``0`` when none does.
    """
    got_positive = 0
    target = s.encode(errors="surrogateescape")
    for sub in patterns.encode(errors="surrogateescape").split(b","):
        negated = sub.startswith(b"!")
        if negated:
            sub = sub[1:]
        if len(sub) >= 1023:
            return 0  # OpenSSH's subpattern buffer: an overlong pattern matches nothing
        if _match_bytes(target, sub):
            if negated:
                return -1
            got_positive = 1
    return got_positive


_TIME_RE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})(?:([0-9]{2})([0-9]{2})([0-9]{2})?)?")


def parse_absolute_time(text: str) -> int:
    """Parse an OpenSSH absolute time as ssh-keygen does: ``YYYYMMDD[HHMM[SS]]`` [``Z``|``UTC``].

    Without ``Z``/``UTC`` the time is local, with ``tm_isdst = 0`` as OpenSSH's
    ``parse_absolute_time()`` passes it to ``mktime()``.

    Raises:
        ValueError: the text is not such a time, or it is not after 1970-01-01 00:00:00 UTC.
    """
    s = text
    utc = False
    if len(s) > 1 and s[-1] in "Zz":
        utc, s = True, s[:-1]
    elif len(s) > 3 and s[-3:].upper() == "UTC":
        utc, s = True, s[:-3]
    m = _TIME_RE.fullmatch(s) if len(s) in (8, 12, 14) else None
    if m is None:
        raise ValueError(f"{text!r} is not YYYYMMDD, YYYYMMDDHHMM or YYYYMMDDHHMMSS (optional Z)")
    year, month, day = int(m[1]), int(m[2]), int(m[3])
    hour, minute, second = int(m[4] or 0), int(m[5] or 0), int(m[6] or 0)
    # strptime's ranges (glibc): %m 1-12, %d 1-31, %H 0-23, %M 0-59, %S 0-61.
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59 and second <= 61):
        raise ValueError(f"{text!r} has a field out of range")
    fields = (year, month, day, hour, minute, second)
    try:
        value = int(calendar.timegm((*fields, 0, 0, 0)) if utc else time.mktime((*fields, 0, 0, 0)))
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"{text!r} is out of range") from exc
    if value <= 0:
        raise ValueError(f"{text!r} is not after 1970-01-01")
    return value


def _ssh_verify_time(commit_time: int) -> int | None:
    """The verify time ssh-keygen ends up with when git passes it a commit's time.

    git formats the committer timestamp as local ``%Y%m%d%H%M%S`` (``-Overify-time=``) and
    ssh-keygen parses that back with ``mktime(tm_isdst = 0)``; in zones without daylight saving
    the result is the timestamp itself, during summer time it is one hour later. Emulated so
    that a verdict near a ``valid-before``/``valid-after`` edge is git's.
    """
    try:
        return parse_absolute_time(time.strftime("%Y%m%d%H%M%S", time.localtime(commit_time)))
    except (OverflowError, ValueError, OSError):
        return None


def _fmt_time(epoch: int) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
    except (OverflowError, ValueError, OSError):
        return str(epoch)

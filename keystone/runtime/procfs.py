"""Readers of ``/proc``: a process's start time, liveness and process-group members.

Nothing here keeps state or starts anything; each function reads ``/proc`` once and returns
None (or an empty list) when the process is gone. ``pid`` plus its start time (field 22 of
``/proc/PID/stat``, in clock ticks since boot) identify a process across agent restarts, because a
recycled pid has a later start time.
"""

from __future__ import annotations

import os


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/PID/stat`` (after the parenthesised command name), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    end = data.rfind(b")")
    if end < 0:
        return None
    return data[end + 2 :].decode("ascii", "replace").split()


def read_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of ``/proc/PID/stat``).

    Returns None when the process does not exist. Together with the pid it identifies a process
    across agent restarts: a recycled pid has a different start time.
    """
    fields = stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])


def is_live(fields: list[str] | None) -> bool:
    """True for the stat fields of a process that runs (not a zombie, not dead)."""
    return fields is not None and fields[0] not in ("Z", "X", "x")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    return is_live(stat_fields(pid))


def group_exists(pgid: int) -> bool:
    """True while process group ``pgid`` has a member (a zombie one counts).

    One ``kill(-pgid, 0)``: the kernel walks the group only, so this costs the same with ten
    processes on the device or ten thousand (``pgid_members`` reads every ``/proc`` entry). It is
    the check on every exit and stop; ``pgid_members`` is read only when a group outlives it.
    """
    if pgid <= 1:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process now leads it, but it exists
    return True


def pgid_members(pgid: int) -> list[int]:
    """Pids of the live processes (zombies excluded) whose process group is ``pgid``.

    Scans ``/proc``; a dead member whose parent has not reaped it yet is not counted.
    """
    members: list[int] = []
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            fields = stat_fields(int(entry.name))
            if is_live(fields) and fields is not None and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return sorted(members)

"""Who a component runs as: user and groups, capabilities, ``no_new_privs`` and rlimits.

:func:`limit_steps` turns a :class:`~keystone.runtime.spawn.SpawnSpec` into the steps run in the
child between ``fork`` and ``exec``. Every step is prepared in the parent (names resolved to
numbers, ``prctl``/``capset`` bound through ctypes), so the child does no imports and no name
lookups, which keeps it safe even when the agent has other threads. Impossible requests (an
unknown user, capabilities without root, ``open_files`` above the hard limit) are refused here, in
the parent, with a message naming the component.
"""

from __future__ import annotations

import grp
import os
import pwd
import resource
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from keystone.errors import ProcessError
from keystone.runtime.spawn import SpawnSpec, Step

# prctl(2) and capability constants (linux/prctl.h, linux/capability.h).
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

#: Linux capability numbers by name (linux/capability.h, up to 6.x).
CAPABILITIES: Mapping[str, int] = {
    name: number
    for number, name in enumerate(
        (
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_DAC_READ_SEARCH",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_KILL",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETPCAP",
            "CAP_LINUX_IMMUTABLE",
            "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST",
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_IPC_LOCK",
            "CAP_IPC_OWNER",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_CHROOT",
            "CAP_SYS_PTRACE",
            "CAP_SYS_PACCT",
            "CAP_SYS_ADMIN",
            "CAP_SYS_BOOT",
            "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE",
            "CAP_SYS_TIME",
            "CAP_SYS_TTY_CONFIG",
            "CAP_MKNOD",
            "CAP_LEASE",
            "CAP_AUDIT_WRITE",
            "CAP_AUDIT_CONTROL",
            "CAP_SETFCAP",
            "CAP_MAC_OVERRIDE",
            "CAP_MAC_ADMIN",
            "CAP_SYSLOG",
            "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND",
            "CAP_AUDIT_READ",
            "CAP_PERFMON",
            "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE",
        )
    )
}


@dataclass(frozen=True)
class _Identity:
    uid: int
    gid: int
    groups: tuple[int, ...]


def _resolve_user(spec: str) -> _Identity:
    """``user``, ``uid``, ``user:group`` or ``uid:gid`` to numbers (raises ValueError)."""
    user, _, group = spec.partition(":")
    if not user:
        raise ValueError("expected user, uid, user:group or uid:gid")
    name: str | None = None
    if user.isdigit():
        uid = int(user)
        try:
            entry = pwd.getpwuid(uid)
            name, gid = entry.pw_name, entry.pw_gid
        except KeyError:
            gid = uid
    else:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ValueError(f"no such user {user!r}") from None
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ValueError(f"no such group {group!r}") from None
    groups = tuple(os.getgrouplist(name, gid)) if name is not None else (gid,)
    return _Identity(uid, gid, groups)


def user_ids(spec: str) -> tuple[int, int]:
    """The uid and gid ``security.user`` names (``user``, ``uid``, ``user:group``...).

    Raises:
        ValueError: no such user or group.
    """
    ident = _resolve_user(spec)
    return ident.uid, ident.gid


def capability_number(name: str) -> int | None:
    """``CAP_NET_BIND_SERVICE`` (or ``net_bind_service``) to its number; None if unknown."""
    key = name.strip().upper()
    if not key.startswith("CAP_"):
        key = "CAP_" + key
    return CAPABILITIES.get(key)


def _cap_name(number: int) -> str:
    for cap_name, cap_number in CAPABILITIES.items():
        if cap_number == number:
            return cap_name
    return f"capability {number}"


def _cap_last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return max(CAPABILITIES.values())


class _Libc:
    """prctl(2) and capset(2) through ctypes, bound once in the parent (never in a child)."""

    _instance: _Libc | None = None

    def __init__(self) -> None:
        import ctypes  # lazy: ctypes costs memory, and only caps or no_new_privs need it

        self.ctypes = ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        self.prctl = libc.prctl
        self.prctl.argtypes = [
            ctypes.c_int,
            ctypes.c_ulong,
            ctypes.c_ulong,
            ctypes.c_ulong,
            ctypes.c_ulong,
        ]
        self.prctl.restype = ctypes.c_int
        self.capset = libc.capset
        self.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.capset.restype = ctypes.c_int

    @classmethod
    def get(cls) -> _Libc:
        if cls._instance is None:
            cls._instance = _Libc()
        return cls._instance

    def prctl_call(self, option: int, arg2: int = 0, arg3: int = 0) -> Callable[[], None]:
        """A ready-to-call ``prctl(option, arg2, arg3, 0, 0)`` that raises OSError on failure."""
        prctl, get_errno = self.prctl, self.ctypes.get_errno

        def call() -> None:
            if prctl(option, arg2, arg3, 0, 0) != 0:
                err = get_errno()
                raise OSError(err, os.strerror(err))

        return call

    def capset_call(self, caps: frozenset[int]) -> Callable[[], None]:
        """A ready-to-call capset(2) making ``caps`` the effective, permitted and inheritable sets."""
        ctypes = self.ctypes
        header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)()
        for cap in caps:
            word = 3 * (cap // 32)
            bit = 1 << (cap % 32)
            for i in range(3):  # effective, permitted, inheritable
                data[word + i] |= bit
        capset, get_errno = self.capset, ctypes.get_errno

        def call() -> None:
            if capset(ctypes.addressof(header), ctypes.addressof(data)) != 0:
                err = get_errno()
                raise OSError(err, os.strerror(err))

        return call


def limit_steps(spec: SpawnSpec) -> list[Step]:
    """The in-child steps for rlimit, capabilities, user and no_new_privs, in that order.

    The order matters: raising RLIMIT_NOFILE and dropping the bounding set need
    privileges that switching to another user takes away.
    """
    name = spec.name
    steps: list[Step] = []
    root = os.geteuid() == 0
    if spec.open_files is not None:
        n = spec.open_files
        if n < 1:
            raise ProcessError(f"{name}: open_files must be at least 1, got {n}")
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if not root and hard != resource.RLIM_INFINITY and n > hard:
            raise ProcessError(
                f"{name}: open_files = {n} exceeds the agent's hard limit {hard}; "
                "lower it or run the agent as root"
            )
        steps.append(
            (
                f"setting RLIMIT_NOFILE to {n}",
                lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)),
            )
        )
    ident: _Identity | None = None
    if spec.user:
        try:
            ident = _resolve_user(spec.user)
        except ValueError as exc:
            raise ProcessError(f"{name}: security.user = {spec.user!r}: {exc}") from None
        if not root:
            if ident.uid != os.geteuid() or ident.gid != os.getegid():
                raise ProcessError(
                    f"{name}: security.user = {spec.user!r} needs the agent to run as root "
                    f"(it runs as uid {os.geteuid()}); remove it or run the agent as root"
                )
            ident = None  # already that user
    caps: frozenset[int] | None = None
    if spec.capabilities is not None:
        numbers: dict[str, int] = {}
        for cap_name in spec.capabilities:
            number = capability_number(cap_name)
            if number is None:
                raise ProcessError(
                    f"{name}: unknown capability {cap_name!r} (expected e.g. CAP_NET_BIND_SERVICE)"
                )
            numbers[cap_name] = number
        caps = frozenset(numbers.values())
        last = _cap_last_cap()
        if any(c > last for c in caps):
            raise ProcessError(
                f"{name}: capabilities {sorted(numbers)}: this kernel knows none above {last}"
            )
        if not root and caps:
            raise ProcessError(
                f"{name}: capabilities {sorted(numbers)} need the agent to run as root; "
                "remove them or run the agent as root"
            )
    libc = _Libc.get() if caps is not None or spec.no_new_privileges else None
    if caps is not None and libc is not None and root:
        for number in range(_cap_last_cap() + 1):
            if number not in caps:
                steps.append(
                    (
                        f"dropping {_cap_name(number)} from the bounding set",
                        libc.prctl_call(PR_CAPBSET_DROP, number),
                    )
                )
        if ident is not None and caps:
            steps.append(
                (
                    "keeping capabilities across the user switch",
                    libc.prctl_call(PR_SET_KEEPCAPS, 1),
                )
            )
    if ident is not None:
        uid, gid, groups = ident.uid, ident.gid, list(ident.groups)
        steps.append((f"setting supplementary groups {groups}", lambda: os.setgroups(groups)))
        steps.append((f"switching to gid {gid}", lambda: os.setresgid(gid, gid, gid)))
        steps.append((f"switching to uid {uid}", lambda: os.setresuid(uid, uid, uid)))
    if caps is not None and libc is not None:
        steps.append(("setting capabilities", libc.capset_call(caps)))
        steps.append(
            (
                "clearing ambient capabilities",
                libc.prctl_call(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL),
            )
        )
        for number in sorted(caps):
            # Ambient capabilities are what survives exec for a non-root user.
            steps.append(
                (
                    f"raising ambient {_cap_name(number)}",
                    libc.prctl_call(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, number),
                )
            )
    if spec.no_new_privileges and libc is not None:
        steps.append(("setting no_new_privs", libc.prctl_call(PR_SET_NO_NEW_PRIVS, 1)))
    return steps


# --- observe and signal -----------------------------------------------------------------

"""Pure helpers of the process runner: capability names, /proc identity, spawn-failure messages."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from keystone.runtime.cgroups import _systemd_unit, detect_cgroup_root
from keystone.runtime.privileges import CAPABILITIES, capability_number
from keystone.runtime.procfs import pgid_members, read_start_ticks
from keystone.runtime.spawn import spawn_failure


class TestCapabilityNames:
    @pytest.mark.parametrize(
        ("name", "number"),
        [
            ("CAP_CHOWN", 0),
            ("CAP_NET_BIND_SERVICE", 10),
            ("net_bind_service", 10),
            ("NET_ADMIN", 12),
            (" cap_sys_admin ", 21),
            ("CAP_CHECKPOINT_RESTORE", 40),
            ("CAP_FLY", None),
            ("", None),
        ],
    )
    def test_number(self, name: str, number: int | None) -> None:
        """Names with or without CAP_, in any case, map to the kernel's numbers."""
        assert capability_number(name) == number

    def test_table_is_dense(self) -> None:
        """The table holds every capability from 0 to the highest, once."""
        assert sorted(CAPABILITIES.values()) == list(range(len(CAPABILITIES)))


class TestProcIdentity:
    def test_start_ticks_of_self(self) -> None:
        """Our own start time is readable and stable; a pid that does not exist gives None."""
        ticks = read_start_ticks(os.getpid())
        assert isinstance(ticks, int) and ticks > 0
        assert read_start_ticks(os.getpid()) == ticks
        assert read_start_ticks(2**22 + 1) is None

    def test_start_ticks_with_odd_command_name(self, tmp_path: Path) -> None:
        """A command name with spaces and parentheses does not shift the fields."""
        odd = tmp_path / "a b) (c"
        odd.symlink_to("/bin/sleep")
        proc = subprocess.Popen([str(odd), "30"])
        try:
            ticks, own = read_start_ticks(proc.pid), read_start_ticks(os.getpid())
            assert ticks is not None and own is not None and ticks >= own
        finally:
            proc.kill()
            proc.wait()

    def test_pgid_members_includes_self(self) -> None:
        """Our own process group lists us."""
        assert os.getpid() in pgid_members(os.getpgrp())


class TestCgroupRootDetection:
    @pytest.mark.parametrize(
        ("path", "systemd"),
        [
            ("/system.slice/keystone.service", True),
            ("/user.slice/user-1000.slice/session-2.scope", True),
            ("/", False),
            ("/docker/0123abcd", False),
            ("/keystone", False),
        ],
    )
    def test_systemd_units_are_recognised(self, path: str, systemd: bool) -> None:
        """Cgroups of systemd units are only used when delegated; others when writable."""
        assert _systemd_unit(path) is systemd

    def test_explicit_root_must_be_a_cgroup(self, tmp_path: Path) -> None:
        """KEYSTONE_CGROUP_ROOT naming a plain directory yields no cgroup root."""
        assert detect_cgroup_root({"KEYSTONE_CGROUP_ROOT": str(tmp_path)}) is None


class TestSpawnFailureMessages:
    CWD = Path("/srv/api")
    ENV = {"PATH": "/usr/bin:/bin"}

    @pytest.mark.parametrize(
        ("command", "exc", "expected"),
        [
            (
                "./api",
                FileNotFoundError(errno.ENOENT, "No such file", "./api"),
                "api: command not found: ./api (in /srv/api)",
            ),
            (
                "api",
                FileNotFoundError(errno.ENOENT, "No such file", "api"),
                "api: command not found: api (searched PATH=/usr/bin:/bin)",
            ),
            (
                "./api",
                FileNotFoundError(errno.ENOENT, "No such file", CWD),
                "api: working directory does not exist: /srv/api",
            ),
            (
                "./api",
                PermissionError(errno.EACCES, "Permission denied", "./api"),
                "api: permission denied executing ./api (in /srv/api)",
            ),
            (
                "./api",
                OSError(errno.ENOEXEC, "Exec format error", "./api"),
                "api: ./api (in /srv/api) is not an executable format",
            ),
            (
                "./api",
                OSError(errno.E2BIG, "Argument list too long", "./api"),
                "api: cannot start ./api (in /srv/api): Argument list too long",
            ),
            (
                "./api",
                ValueError("illegal environment variable name"),
                "api: cannot start ./api: invalid command or environment",
            ),
            (
                "./api",
                subprocess.SubprocessError("Exception occurred in preexec_fn."),
                "api: could not prepare the process",
            ),
        ],
    )
    def test_message(self, command: str, exc: BaseException, expected: str) -> None:
        """Each way a spawn fails names the component, the command and where it looked."""
        assert spawn_failure("api", command, self.CWD, self.ENV, exc, "").startswith(expected)

    def test_preexec_detail_is_kept(self) -> None:
        """The step that failed in the child is in the message."""
        exc = subprocess.SubprocessError("Exception occurred in preexec_fn.")
        msg = spawn_failure(
            "api",
            "./api",
            self.CWD,
            self.ENV,
            exc,
            "setting RLIMIT_NOFILE to 9: [Errno 1] Operation not permitted",
        )
        assert (
            msg
            == "api: could not prepare the process before starting ./api: setting RLIMIT_NOFILE to 9: [Errno 1] Operation not permitted"
        )

"""security.user, capabilities and their refusals, checked in /proc/PID/status of real children."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
from pathlib import Path

import pytest

from keystone.errors import ProcessError
from keystone.runtime.process import CAPABILITIES, ProcessRunner

from .conftest import Bench, run

pytestmark = pytest.mark.integration

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not ROOT, reason="switching users and granting capabilities needs the agent to run as root"
)
needs_user = pytest.mark.skipif(
    ROOT, reason="the refusal only applies when the agent does not run as root"
)
NET_BIND = 1 << CAPABILITIES["CAP_NET_BIND_SERVICE"]


def status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


def caps(st: dict[str, str]) -> dict[str, int]:
    return {k: int(st[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}


def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("this system has no user 'nobody'")


def free_privileged_port() -> int:
    """A port below 1024 that nothing listens on (found while we are root)."""
    for port in range(1023, 900, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


@needs_root
class TestAsRoot:
    def test_user_by_name(self, bench: Bench) -> None:
        """user = "nobody" runs the child with nobody's uid, gid and groups, and no capabilities."""
        pw = nobody()

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.spec("sleep", "30", user="nobody"))
            st = status(handle.pid)
            assert st["Uid"].split() == [str(pw.pw_uid)] * 4
            assert st["Gid"].split() == [str(pw.pw_gid)] * 4
            assert sorted(map(int, st["Groups"].split())) == sorted(
                set(os.getgrouplist("nobody", pw.pw_gid))
            )
            assert caps(st)["CapEff"] == 0 and caps(st)["CapPrm"] == 0
            await runner.stop(handle, timeout=5)

        run(body())

    def test_user_and_group_by_number(self, bench: Bench) -> None:
        """user = "uid:gid" with numbers works even for ids that have no passwd entry."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.spec("sleep", "30", user="54321:54322"))
            st = status(handle.pid)
            assert st["Uid"].split()[0] == "54321"
            assert st["Gid"].split()[0] == "54322"
            assert st["Groups"] == "54322"
            await runner.stop(handle, timeout=5)

        run(body())

    def test_user_and_group_by_name(self, bench: Bench) -> None:
        """user = "user:group" with names resolves both."""
        pw = nobody()
        group = grp.getgrgid(pw.pw_gid).gr_name

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.spec("sleep", "30", user=f"nobody:{group}"))
            st = status(handle.pid)
            assert st["Gid"].split()[0] == str(pw.pw_gid)
            await runner.stop(handle, timeout=5)

        run(body())

    def test_drop_all_capabilities(self, bench: Bench) -> None:
        """capabilities = [] leaves a root child with empty bounding, permitted and effective sets."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.spec("sleep", "30", capabilities=()))
            st = status(handle.pid)
            assert st["Uid"].split()[0] == "0"
            assert caps(st) == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0}
            await runner.stop(handle, timeout=5)

        run(body())

    def test_keep_one_capability_as_root(self, bench: Bench) -> None:
        """capabilities = ["net_bind_service"] for a root child: exactly that one is left."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(
                runner, bench.spec("sleep", "30", capabilities=("net_bind_service",))
            )
            c = caps(status(handle.pid))
            assert (c["CapEff"], c["CapPrm"], c["CapBnd"]) == (NET_BIND, NET_BIND, NET_BIND)
            await runner.stop(handle, timeout=5)

        run(body())

    def test_capability_survives_the_user_switch(self, bench: Bench) -> None:
        """A non-root user keeps CAP_NET_BIND_SERVICE (as an ambient capability) across exec."""
        nobody()

        async def body() -> None:
            runner = ProcessRunner()
            spec = bench.spec(
                "sleep",
                "30",
                user="nobody",
                capabilities=("CAP_NET_BIND_SERVICE",),
                no_new_privileges=True,
            )
            handle = await bench.spawn(runner, spec)
            st = status(handle.pid)
            assert st["Uid"].split()[0] == str(nobody().pw_uid)
            assert caps(st) == {
                "CapInh": NET_BIND,
                "CapPrm": NET_BIND,
                "CapEff": NET_BIND,
                "CapBnd": NET_BIND,
                "CapAmb": NET_BIND,
            }
            assert st["NoNewPrivs"] == "1"
            await runner.stop(handle, timeout=5)

        run(body())

    def test_capability_really_works(self, bench: Bench) -> None:
        """nobody binds a port below 1024 only when given CAP_NET_BIND_SERVICE."""
        nobody()
        python = shutil.which("python3", path="/usr/bin:/bin")
        if python is None:
            pytest.skip("no system python3 that user nobody may run")
        port = free_privileged_port()
        unprivileged_start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
        code = f"import socket; socket.socket().bind(('127.0.0.1', {port}))"

        async def body() -> None:
            runner = ProcessRunner()
            with_cap = await bench.spawn(
                runner,
                bench.spec(
                    python, "-c", code, user="nobody", capabilities=("CAP_NET_BIND_SERVICE",)
                ),
            )
            assert await runner.exited(with_cap) == 0
            if port >= unprivileged_start:
                return  # this kernel lets anyone bind there: nothing to contrast
            without = await bench.spawn(runner, bench.spec(python, "-c", code, user="nobody"))
            assert await runner.exited(without) == 1
            assert "PermissionError" in (bench.logs / "stderr.log").read_text()

        run(body())

    def test_unknown_user_and_capability(self, bench: Bench) -> None:
        """An unknown user or capability name is a ProcessError naming it, and nothing starts."""

        async def body() -> None:
            runner = ProcessRunner()
            with pytest.raises(
                ProcessError, match=r"security\.user = 'no-such-user-x': no such user"
            ):
                await runner.spawn(bench.spec("sleep", "30", user="no-such-user-x"))
            with pytest.raises(ProcessError, match="no such group"):
                await runner.spawn(bench.spec("sleep", "30", user="nobody:no-such-group-x"))
            with pytest.raises(ProcessError, match="unknown capability 'CAP_FLY'"):
                await runner.spawn(bench.spec("sleep", "30", capabilities=("CAP_FLY",)))
            assert not (bench.logs / "stdout.log").exists()

        run(body())


@needs_user
class TestAsUser:
    def test_other_user_is_refused(self, bench: Bench) -> None:
        """Without root, a different security.user is a ProcessError that says root is needed."""

        async def body() -> None:
            with pytest.raises(ProcessError, match="needs the agent to run as root"):
                await ProcessRunner().spawn(bench.spec("sleep", "30", user="0"))

        run(body())

    def test_same_user_is_accepted(self, bench: Bench) -> None:
        """Without root, naming the current user is fine (nothing to switch)."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(
                runner, bench.spec("sleep", "30", user=f"{os.getuid()}:{os.getgid()}")
            )
            assert status(handle.pid)["Uid"].split()[0] == str(os.getuid())
            await runner.stop(handle, timeout=5)

        run(body())

    def test_granting_capabilities_is_refused(self, bench: Bench) -> None:
        """Without root, asking for a capability is a ProcessError; dropping all is allowed."""

        async def body() -> None:
            runner = ProcessRunner()
            with pytest.raises(ProcessError, match="need the agent to run as root"):
                await runner.spawn(
                    bench.spec("sleep", "30", capabilities=("CAP_NET_BIND_SERVICE",))
                )
            handle = await bench.spawn(runner, bench.spec("sleep", "30", capabilities=()))
            assert caps(status(handle.pid))["CapEff"] == 0
            await runner.stop(handle, timeout=5)

        run(body())

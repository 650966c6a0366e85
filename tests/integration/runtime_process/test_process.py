"""ProcessRunner with real processes: spawn, exit status, environment, limits, stop, adopt, run."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from keystone.errors import ProcessError
from keystone.runtime.process import (
    ProcessRunner,
    cgroup_members,
    detect_cgroup_root,
    pgid_members,
    read_start_ticks,
)
from tests.conftest import wait_until

from .conftest import Bench, run, until

pytestmark = pytest.mark.integration

# A Python child that prints "ready" once its USR1 handler is installed and exits 7 on USR1.
USR1_CHILD = (
    "import signal, sys\n"
    "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(7))\n"
    "print('ready', flush=True)\n"
    "while True: signal.pause()\n"
)


class TestSpawn:
    def test_exit_status_is_reported(self, bench: Bench) -> None:
        """A child's exit code resolves exited(), and its stdout lands in stdout.log."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.sh("echo hello; echo oops >&2; exit 3"))
            assert await runner.exited(handle) == 3
            assert not runner.alive(handle)
            assert bench.stdout() == "hello\n"
            assert (bench.logs / "stderr.log").read_text() == "oops\n"

        run(body())

    def test_killed_by_signal_is_negative(self, bench: Bench) -> None:
        """A child killed by a signal reports minus the signal number, like Popen.returncode."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.sh("kill -USR2 $$; sleep 5"))
            assert await runner.exited(handle) == -signal.SIGUSR2

        run(body())

    def test_handle_identifies_the_process(self, bench: Bench) -> None:
        """The handle carries the child's own session/group and its /proc start time."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.spec("sleep", "30"))
            assert handle.pgid == handle.pid == os.getpgid(handle.pid) == os.getsid(handle.pid)
            assert handle.pgid != os.getpgrp()
            assert handle.start_ticks == read_start_ticks(handle.pid)
            assert runner.alive(handle)
            await runner.stop(handle, timeout=5)

        run(body())

    def test_logs_are_appended_across_spawns(self, bench: Bench) -> None:
        """A restart appends to stdout.log instead of overwriting it."""

        async def body() -> None:
            runner = ProcessRunner()
            for word in ("one", "two"):
                handle = await bench.spawn(runner, bench.sh(f"echo {word}"))
                assert await runner.exited(handle) == 0
            assert bench.stdout() == "one\ntwo\n"

        run(body())

    def test_relative_command_found_in_cwd(self, bench: Bench) -> None:
        """A command containing '/' is resolved against the work dir, not the agent's cwd."""
        script = bench.cwd / "api"
        script.write_text("#!/bin/sh\necho from-cwd\n")
        script.chmod(0o755)

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.spec("./api", name="api"))
            assert await runner.exited(handle) == 0
            assert bench.stdout() == "from-cwd\n"

        run(body())


class TestSpawnFailures:
    def test_command_not_found_names_the_command(self, bench: Bench) -> None:
        """A missing ./api is reported synchronously with the component, command and dir."""

        async def body() -> None:
            with pytest.raises(ProcessError) as info:
                await ProcessRunner().spawn(bench.spec("./api", name="api"))
            assert str(info.value) == f"api: command not found: ./api (in {bench.cwd})"

        run(body())

    def test_command_not_on_path_names_the_path(self, bench: Bench) -> None:
        """A bare command missing from the child's PATH says which PATH was searched."""

        async def body() -> None:
            with pytest.raises(ProcessError) as info:
                await ProcessRunner().spawn(bench.spec("no-such-tool-xyz", name="api"))
            assert (
                str(info.value)
                == f"api: command not found: no-such-tool-xyz (searched PATH={bench.env()['PATH']})"
            )

        run(body())

    def test_not_executable(self, bench: Bench) -> None:
        """A file without the execute bit is reported as such, with a hint."""
        (bench.cwd / "api").write_text("#!/bin/sh\n")
        (bench.cwd / "api").chmod(0o644)

        async def body() -> None:
            with pytest.raises(
                ProcessError, match=r"api: permission denied executing \./api .*chmod \+x"
            ):
                await ProcessRunner().spawn(bench.spec("./api", name="api"))

        run(body())

    def test_bad_interpreter(self, bench: Bench) -> None:
        """A script whose #! interpreter is missing is not reported as a missing command."""
        (bench.cwd / "api").write_text("#!/no/such/interpreter\n")
        (bench.cwd / "api").chmod(0o755)

        async def body() -> None:
            with pytest.raises(
                ProcessError, match=r"api: cannot execute \./api .*interpreter was not found"
            ):
                await ProcessRunner().spawn(bench.spec("./api", name="api"))

        run(body())

    def test_missing_work_dir(self, bench: Bench, tmp_path: Path) -> None:
        """A work dir that does not exist is named in the error."""
        spec = dataclasses.replace(bench.spec("true", name="api"), cwd=tmp_path / "missing")

        async def body() -> None:
            with pytest.raises(ProcessError, match="api: working directory does not exist"):
                await ProcessRunner().spawn(spec)

        run(body())


class TestEnvironmentAndLimits:
    def test_child_sees_only_its_env(self, bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
        """/proc/PID/environ holds exactly spec.env, none of the agent's variables."""
        monkeypatch.setenv("KEYSTONE_API_TOKEN", "secret-of-the-agent")
        env = bench.env(ONLY="1")

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.spec("sleep", "30", env=env))
            raw = Path(f"/proc/{handle.pid}/environ").read_bytes()
            seen = dict(item.split("=", 1) for item in raw.decode().split("\0") if item)
            assert seen == env
            await runner.stop(handle, timeout=5)

        run(body())

    def test_open_files_limit_is_the_childs_only(self, bench: Bench) -> None:
        """RLIMIT_NOFILE is set in the child (soft and hard) and the test process keeps its own."""
        before = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = min(321, before[1])

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.spec("sleep", "30", open_files=wanted))
            limits = Path(f"/proc/{handle.pid}/limits").read_text().splitlines()
            line = next(ln for ln in limits if ln.startswith("Max open files"))
            assert line.split()[3:5] == [str(wanted), str(wanted)]
            await runner.stop(handle, timeout=5)

        run(body())
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == before
        own = Path(f"/proc/{os.getpid()}/limits").read_text()
        assert f"Max open files            {before[0]}" in own

    def test_no_new_privileges(self, bench: Bench) -> None:
        """no_new_privileges shows as NoNewPrivs: 1 in the child's status, 0 without it."""

        async def body() -> None:
            runner = ProcessRunner()
            for flag, expected in ((True, "1"), (False, "0")):
                handle = await bench.spawn(
                    runner, bench.spec("sleep", "30", no_new_privileges=flag)
                )
                status = Path(f"/proc/{handle.pid}/status").read_text()
                assert f"NoNewPrivs:\t{expected}" in status
                await runner.stop(handle, timeout=5)

        run(body())

    def test_no_fd_leaks_into_children(self, bench: Bench) -> None:
        """A child holds only stdin, stdout and stderr: no pidfd, pipe or log fd of the agent."""
        # A Python child that has finished starting up (it opens and closes files meanwhile).
        idle = "import signal; print('ready', flush=True); signal.pause()"

        async def body() -> None:
            runner = ProcessRunner()
            first = await bench.spawn(runner, bench.spec(sys.executable, "-c", idle, name="a"))
            second = await bench.spawn(runner, bench.spec(sys.executable, "-c", idle, name="b"))
            await until(lambda: bench.stdout().count("ready") == 2, what="both children to start")
            for handle in (first, second):
                assert sorted(int(fd) for fd in os.listdir(f"/proc/{handle.pid}/fd")) == [0, 1, 2]
            await runner.stop(first, timeout=5)
            await runner.stop(second, timeout=5)

        run(body())

    def test_limits_without_cgroups_are_reported_unenforced(self, bench: Bench) -> None:
        """Without a cgroup root, memory and CPU limits are reported as not enforced."""

        async def body() -> None:
            runner = ProcessRunner(cgroup_root=None)
            assert not runner.cgroups_enabled
            spec = bench.spec("sleep", "30", memory_limit=64 << 20, cpu_quota=0.5, open_files=100)
            handle = await bench.spawn(runner, spec)
            report = runner.resources(handle)
            assert report is not None
            assert (report.memory_enforced, report.cpu_enforced, report.cgroup) == (
                False,
                False,
                None,
            )
            assert any("memory_limit" in n and "not enforced" in n for n in report.notes)
            assert any("cpu_quota" in n and "not enforced" in n for n in report.notes)
            await runner.stop(handle, timeout=5)

        run(body())


class TestStop:
    def test_sigterm_ignoring_group_is_killed_whole(self, bench: Bench) -> None:
        """A shell that ignores SIGTERM and forked a grandchild is SIGKILLed with its whole group."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(
                runner, bench.sh("trap '' TERM; sleep 300 & sleep 300; wait")
            )
            await until(lambda: len(pgid_members(handle.pgid)) >= 3, what="sh and two sleeps")
            status = await runner.stop(handle, timeout=0.5)
            assert status == -signal.SIGKILL
            assert pgid_members(handle.pgid) == []
            assert not runner.alive(handle)

        run(body())

    def test_polite_process_stops_on_sigterm(self, bench: Bench) -> None:
        """A process that honours SIGTERM exits with -15 and nothing is SIGKILLed."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.spec("sleep", "300"))
            assert await runner.stop(handle, timeout=10) == -signal.SIGTERM
            assert pgid_members(handle.pgid) == []

        run(body())

    def test_stop_of_a_dead_process_is_idempotent(self, bench: Bench) -> None:
        """stop() after the process exited returns its status, as many times as asked."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.sh("exit 4"))
            assert await runner.exited(handle) == 4
            assert await runner.stop(handle, timeout=1) == 4
            assert await runner.stop(handle, timeout=1) == 4

        run(body())

    def test_concurrent_stops_agree(self, bench: Bench) -> None:
        """Two stops at once (operator and deployer) both return the same status."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.spec("sleep", "300"))
            a, b = await asyncio.gather(
                runner.stop(handle, timeout=5), runner.stop(handle, timeout=5)
            )
            assert a == b == -signal.SIGTERM

        run(body())

    def test_exited_waiters_survive_a_cancelled_one(self, bench: Bench) -> None:
        """Cancelling one exited() future (as wait_for does on timeout) leaves other waiters intact."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.spec("sleep", "300"))
            kept = runner.exited(handle)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(runner.exited(handle), 0.05)
            runner.signal(handle, signal.SIGTERM)
            assert await kept == -signal.SIGTERM

        run(body())

    def test_orphans_of_an_exited_component_are_stopped(self, bench: Bench) -> None:
        """When a component's main process exits, what it left in its group is stopped too."""

        async def body() -> None:
            runner = ProcessRunner(orphan_grace=0.5)
            handle = await bench.spawn(runner, bench.sh("sleep 300 & echo started"))
            assert await runner.exited(handle) == 0
            await until(
                lambda: pgid_members(handle.pgid) == [], what="the orphaned sleep to be stopped"
            )

        run(body())

    def test_runner_survives_a_new_event_loop(self, bench: Bench) -> None:
        """A process spawned on one loop can be stopped from the next (the pidfd is re-registered)."""
        runner = ProcessRunner()

        async def start() -> int:
            handle = await bench.spawn(runner, bench.spec("sleep", "300"))
            return handle.pid

        run(start())

        async def stop() -> None:
            assert await runner.stop(bench.handles[0], timeout=5) == -signal.SIGTERM

        run(stop())


class TestSignal:
    def test_signal_to_the_process_alone(self, bench: Bench) -> None:
        """signal(group=False) reaches the main process through its pidfd."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.spec(sys.executable, "-c", USR1_CHILD))
            await until(lambda: "ready" in bench.stdout(), what="the USR1 handler")
            runner.signal(handle, signal.SIGUSR1, group=False)
            assert await runner.exited(handle) == 7

        run(body())

    def test_signal_to_a_dead_process_raises(self, bench: Bench) -> None:
        """Signalling a process that is gone is a ProcessError naming the component."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.sh("exit 0", name="api"))
            await runner.exited(handle)
            for group in (True, False):
                with pytest.raises(ProcessError, match="api: not running"):
                    runner.signal(handle, signal.SIGHUP, group=group)

        run(body())

    def test_kill_group_refuses_our_own_group(self) -> None:
        """kill_group never kills init's group or the agent's own."""
        runner = ProcessRunner()
        for pgid in (0, 1, os.getpgrp()):
            with pytest.raises(ProcessError, match="refusing"):
                runner.kill_group(pgid)

    def test_kill_group_kills_a_stale_group(self, bench: Bench) -> None:
        """kill_group SIGKILLs every member of a group left by an earlier agent."""
        proc = subprocess.Popen(
            ["/bin/sh", "-c", "sleep 300 & sleep 300"],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
        )
        bench.pgids.append(proc.pid)
        try:
            wait_until(lambda: len(pgid_members(proc.pid)) == 3, what="the stale group")
            ProcessRunner().kill_group(proc.pid)
            assert proc.wait(timeout=10) == -signal.SIGKILL
            wait_until(lambda: pgid_members(proc.pid) == [], what="the group to die")
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()


OLD_AGENT = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from keystone.runtime.process import ProcessRunner, SpawnSpec

    async def main():
        runner = ProcessRunner()
        spec = SpawnSpec(name="svc", argv=("/bin/sh", "-c", sys.argv[1]), cwd=Path(sys.argv[2]),
                         env={"PATH": "/usr/bin:/bin"}, log_dir=Path(sys.argv[3]))
        h = await runner.spawn(spec)
        print(json.dumps({"pid": h.pid, "pgid": h.pgid, "start_ticks": h.start_ticks}))

    asyncio.run(main())
    """
)


class TestAdopt:
    def old_agent(self, bench: Bench, script: str) -> dict[str, int]:
        """Spawn a component from a separate agent process that then exits (an agent restart)."""
        out = subprocess.run(
            [sys.executable, "-c", OLD_AGENT, script, str(bench.cwd), str(bench.logs)],
            capture_output=True,
            check=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])},
        )
        rec: dict[str, int] = json.loads(out.stdout.decode().splitlines()[-1])
        bench.pgids.append(rec["pgid"])
        return rec

    def test_adopted_process_reports_its_exit(self, bench: Bench) -> None:
        """A component left by a dead agent is adopted; stop() kills it and exited() resolves (None)."""
        rec = self.old_agent(bench, "trap '' TERM; sleep 300 & sleep 300; wait")

        async def body() -> None:
            runner = ProcessRunner()
            handle = runner.adopt("svc", rec["pid"], rec["pgid"], rec["start_ticks"], None)
            assert handle is not None and runner.alive(handle)
            await until(lambda: len(pgid_members(handle.pgid)) >= 3, what="the adopted group")
            exited = runner.exited(handle)
            assert await runner.stop(handle, timeout=0.3) is None  # not our child: status unknown
            assert await exited is None
            assert pgid_members(handle.pgid) == []
            assert not runner.alive(handle)

        run(body())

    def test_adopted_process_exiting_on_its_own(self, bench: Bench) -> None:
        """exited() of an adopted process resolves when it exits by itself (seen through the pidfd)."""
        os.mkfifo(bench.cwd / "fifo")  # the child blocks opening it until we write
        rec = self.old_agent(bench, "read line < ./fifo")

        async def body() -> None:
            runner = ProcessRunner()
            handle = runner.adopt("svc", rec["pid"], rec["pgid"], rec["start_ticks"], None)
            assert handle is not None
            exited = runner.exited(handle)
            with open(bench.cwd / "fifo", "w") as fifo:
                fifo.write("go\n")
            assert await exited is None
            assert not runner.alive(handle)

        run(body())

    def test_adopt_of_a_child_of_a_previous_runner(self, bench: Bench) -> None:
        """A second runner in the same process adopts the first one's child and gets its status."""
        first = ProcessRunner()

        async def start() -> None:
            await bench.spawn(first, bench.spec("sleep", "300"))

        run(start())
        first.close()
        old = bench.handles[0]

        async def body() -> None:
            runner = ProcessRunner()
            handle = runner.adopt(old.name, old.pid, old.pgid, old.start_ticks, old.cgroup)
            assert handle == old
            assert await runner.stop(handle, timeout=5) == -signal.SIGTERM

        run(body())

    def test_wrong_start_ticks_is_refused(self, bench: Bench) -> None:
        """adopt() with another start time (a recycled pid) returns None and touches nothing."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.spec("sleep", "300"))
            other = ProcessRunner()
            assert other.adopt("svc", handle.pid, handle.pgid, handle.start_ticks + 1, None) is None
            assert other.adopt("svc", handle.pid, handle.pgid, handle.start_ticks - 1, None) is None
            assert runner.alive(handle)
            await runner.stop(handle, timeout=5)

        run(body())

    def test_dead_pid_is_refused(self, bench: Bench) -> None:
        """adopt() of a pid that no longer exists returns None."""

        async def body() -> None:
            runner = ProcessRunner()
            handle = await bench.spawn(runner, bench.sh("exit 0"))
            await runner.exited(handle)
            assert (
                ProcessRunner().adopt("svc", handle.pid, handle.pgid, handle.start_ticks, None)
                is None
            )

        run(body())


class TestNoThreads:
    def test_twenty_children_no_new_threads(self, bench: Bench) -> None:
        """Twenty running children are watched without a single extra thread."""

        async def body() -> None:
            runner = ProcessRunner()
            before = threading.active_count()
            handles = [
                await bench.spawn(runner, bench.spec("sleep", "300", name=f"c{i}"))
                for i in range(20)
            ]
            waiters = [runner.exited(h) for h in handles]
            assert all(runner.alive(h) for h in handles)
            assert threading.active_count() == before
            result = await runner.run(
                ["/bin/sh", "-c", "echo hi"], cwd=bench.cwd, env=bench.env(), timeout=10
            )
            assert result.stdout == b"hi\n"
            assert threading.active_count() == before
            for h in handles:
                runner.signal(h, signal.SIGTERM)
            for w in waiters:
                assert await w == -signal.SIGTERM
            assert threading.active_count() == before

        run(body())


class TestRun:
    def test_captures_stdout_stderr_and_status(self, bench: Bench) -> None:
        """run() returns the exit status, stdout, the tail of stderr, and feeds stdin."""

        async def body() -> None:
            runner = ProcessRunner()
            data = b"x" * 300_000  # more than a pipe buffer each way
            result = await runner.run(
                ["/bin/sh", "-c", "cat; echo done >&2; exit 5"],
                cwd=bench.cwd,
                env=bench.env(),
                timeout=20,
                input=data,
            )
            assert (result.returncode, result.timed_out, result.truncated) == (5, False, False)
            assert result.stdout == data
            assert result.stderr == b"done\n"
            assert result.duration >= 0

        run(body())

    def test_runs_in_cwd_with_env(self, bench: Bench) -> None:
        """run() uses the given work dir and only the given environment."""

        async def body() -> None:
            result = await ProcessRunner().run(
                ["/bin/sh", "-c", "pwd; env | sort"],
                cwd=bench.cwd,
                env={"PATH": "/usr/bin:/bin", "A": "1"},
                timeout=10,
            )
            lines = result.stdout.decode().splitlines()
            assert lines[0] == str(bench.cwd)
            assert "A=1" in lines and not any(ln.startswith("HOME=") for ln in lines)

        run(body())

    def test_timeout_kills_the_group(self, bench: Bench) -> None:
        """A command that outlives its timeout is SIGKILLed with everything in its group."""
        pidfile = bench.cwd / "pid"

        async def body() -> None:
            result = await ProcessRunner().run(
                ["/bin/sh", "-c", f"echo $$ > {pidfile}; echo partial; sleep 300 & sleep 300"],
                cwd=bench.cwd,
                env=bench.env(),
                timeout=0.5,
            )
            assert result.timed_out
            assert result.returncode == -signal.SIGKILL
            assert result.stdout == b"partial\n"
            assert pgid_members(int(pidfile.read_text())) == []

        run(body())

    def test_leaves_nothing_behind(self, bench: Bench) -> None:
        """Background processes a one-shot command leaves in its group are killed when it exits."""
        pidfile = bench.cwd / "pid"

        async def body() -> None:
            result = await ProcessRunner().run(
                ["/bin/sh", "-c", f"echo $$ > {pidfile}; sleep 300 & echo bg"],
                cwd=bench.cwd,
                env=bench.env(),
                timeout=30,
            )
            assert (result.returncode, result.timed_out, result.stdout) == (0, False, b"bg\n")
            assert pgid_members(int(pidfile.read_text())) == []

        run(body())

    def test_output_is_capped(self, bench: Bench) -> None:
        """stdout beyond max_output is dropped (and flagged) while the command still runs to the end."""

        async def body() -> None:
            result = await ProcessRunner().run(
                ["/bin/sh", "-c", "head -c 3000000 /dev/zero; echo end >&2"],
                cwd=bench.cwd,
                env=bench.env(),
                timeout=30,
                max_output=1000,
            )
            assert (result.returncode, len(result.stdout), result.truncated) == (0, 1000, True)
            assert result.stderr == b"end\n"

        run(body())

    def test_log_file_instead_of_capture(self, bench: Bench) -> None:
        """With log=, stdout and stderr are appended to that file and not captured."""
        log = bench.root / "logs" / "install.log"

        async def body() -> None:
            runner = ProcessRunner()
            for _ in range(2):
                result = await runner.run(
                    ["/bin/sh", "-c", "echo out; echo err >&2"],
                    cwd=bench.cwd,
                    env=bench.env(),
                    timeout=10,
                    log=log,
                )
                assert (result.returncode, result.stdout) == (0, b"")
            assert log.read_text() == "out\nerr\nout\nerr\n"

        run(body())

    def test_missing_command_raises(self, bench: Bench) -> None:
        """run() of a command that does not exist is a ProcessError naming it."""

        async def body() -> None:
            with pytest.raises(ProcessError, match=r"command not found: ./nope \(in "):
                await ProcessRunner().run(["./nope"], cwd=bench.cwd, env=bench.env(), timeout=5)

        run(body())


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


class TestCgroups:
    def test_escaped_grandchild_is_killed_through_the_cgroup(
        self, bench: Bench, cgroup_root: Path
    ) -> None:
        """A grandchild that left the process group (setsid) is still killed by stop() via its cgroup."""

        async def body() -> None:
            runner = ProcessRunner(cgroup_root=cgroup_root)
            assert runner.cgroups_enabled
            handle = await bench.spawn(runner, bench.sh("setsid sleep 300 & sleep 300"))
            assert handle.cgroup is not None and handle.cgroup.parent == cgroup_root
            cgroup = handle.cgroup

            def escaped() -> list[int]:
                return [p for p in cgroup_members(cgroup) if _pgid(p) not in (handle.pgid, None)]

            await until(escaped, what="the grandchild to leave the group with setsid")
            assert len(cgroup_members(cgroup)) == 3
            await runner.stop(handle, timeout=5)
            assert cgroup_members(cgroup) == []
            assert pgid_members(handle.pgid) == []
            assert not cgroup.exists()

        run(body())

    def test_explicit_cgroup_root(self, cgroup_root: Path) -> None:
        """KEYSTONE_CGROUP_ROOT naming a writable cgroup v2 directory is used as is."""
        assert detect_cgroup_root({"KEYSTONE_CGROUP_ROOT": str(cgroup_root)}) == cgroup_root

    def test_memory_and_cpu_limits(self, bench: Bench, cgroup_root: Path) -> None:
        """memory_limit and cpu_quota become memory.max and cpu.max of the component's cgroup."""

        async def body() -> None:
            runner = ProcessRunner(cgroup_root=cgroup_root)
            if "memory" not in runner.controllers:
                available = (cgroup_root / "cgroup.controllers").read_text().split()
                pytest.skip(
                    f"the memory controller is not available in {cgroup_root} (has: {available})"
                )
            spec = bench.spec("sleep", "300", memory_limit=64 << 20, cpu_quota=0.5)
            handle = await bench.spawn(runner, spec)
            assert handle.cgroup is not None
            assert (handle.cgroup / "memory.max").read_text().strip() == str(64 << 20)
            assert str(handle.pid) in (handle.cgroup / "cgroup.procs").read_text().split()
            report = runner.resources(handle)
            assert report is not None and report.memory_enforced
            if "cpu" in runner.controllers:
                assert (handle.cgroup / "cpu.max").read_text().split() == ["50000", "100000"]
                assert report.cpu_enforced
            await runner.stop(handle, timeout=5)

        run(body())

    def test_memory_limit_is_enforced(self, bench: Bench, cgroup_root: Path) -> None:
        """A child that allocates beyond memory.max is OOM-killed."""

        async def body() -> None:
            runner = ProcessRunner(cgroup_root=cgroup_root)
            if "memory" not in runner.controllers:
                pytest.skip(f"the memory controller is not available in {cgroup_root}")
            hog = "b = bytearray(256 << 20); b[::4096] = b'x' * len(b[::4096])"
            handle = await bench.spawn(
                runner, bench.spec(sys.executable, "-c", hog, memory_limit=32 << 20)
            )
            assert await runner.exited(handle) == -signal.SIGKILL

        run(body())

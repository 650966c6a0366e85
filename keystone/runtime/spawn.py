"""Starting processes: the spawn spec, fork/exec with a CLOEXEC error pipe, and pipe I/O.

Processes are started with :class:`subprocess.Popen` (fork/exec with a CLOEXEC error pipe, so a
failed ``exec`` is reported synchronously). asyncio's ``create_subprocess_*`` is not used: on
Python 3.11 its child watcher starts a thread per child. The Popen subclass here never reaps:
the runner reaps every child through its pidfd. Output of one-shot commands is fed and collected
with loop readers and writers (:class:`PipeIO`), never with a thread.

Work done in the child between ``fork`` and ``exec`` (cgroup join, rlimit, capabilities, user,
``no_new_privs``) uses only objects prepared in the parent (no imports, no name lookups), so it is
safe even when the agent has other threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from keystone.errors import ProcessError
from keystone.recipe import Container

#: Bytes of ``stdout`` (and of ``stderr``) that a one-shot command keeps without a log.
OUTPUT_CAP = 1 << 20

#: One step run in the child before ``exec``: what it does (for the error) and the call.
Step = tuple[str, Callable[[], None]]


@dataclass(frozen=True)
class SpawnSpec:
    """Everything needed to start one long-running component process.

    Attributes:
        name: component name, used in every message.
        argv: the command; ``argv[0]`` is resolved against ``cwd`` when it contains ``/``,
            otherwise searched in the ``PATH`` of ``env``.
        cwd: working directory (must exist).
        env: the complete environment of the child; nothing of the agent's leaks in.
        log_dir: stdout goes to ``log_dir/stdout.log`` and stderr to ``log_dir/stderr.log``,
            opened ``O_APPEND`` (created if missing) and handed to the child directly.
        open_files: ``RLIMIT_NOFILE`` (soft and hard) of the child only.
        memory_limit: bytes, cgroup v2 ``memory.max`` when the runner has a cgroup root.
        cpu_quota: cores (0.5 = half a core), cgroup v2 ``cpu.max``.
        user: ``user``, ``uid``, ``user:group`` or ``uid:gid``. Switched to only when the agent
            runs as root; otherwise it must name the current user.
        no_new_privileges: ``prctl(PR_SET_NO_NEW_PRIVS)`` in the child.
        capabilities: None leaves capabilities alone; a tuple (``()`` = none) becomes the
            child's bounding, permitted, effective, inheritable and ambient sets.
        container: what a container runner runs (``[lifecycle.run.container]``); ``argv`` is
            then the command overriding the image's (empty: the image's own).
        version: the component's version (a container's ``keystone.version`` label).
    """

    name: str
    argv: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str]
    log_dir: Path
    open_files: int | None = None
    memory_limit: int | None = None
    cpu_quota: float | None = None
    user: str | None = None
    no_new_privileges: bool = False
    capabilities: tuple[str, ...] | None = None
    container: Container | None = None
    version: str = ""


@dataclass(frozen=True)
class RunSecurity:
    """The identity a one-shot command runs with (an install script: the component's own
    ``[lifecycle.run.security]``); the fields mean what they mean in :class:`SpawnSpec`."""

    user: str | None = None
    no_new_privileges: bool = False
    capabilities: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RunResult:
    """The outcome of a one-shot command.

    Attributes:
        returncode: exit status; negative when killed by a signal (``-9`` after a timeout).
        stdout: captured standard output (the first :data:`OUTPUT_CAP` bytes) when the command
            ran without ``log``; empty otherwise.
        timed_out: the command was killed because it outlived its timeout.
        duration: seconds from start to exit.
        stderr: captured standard error (the *last* :data:`OUTPUT_CAP` bytes, where a
            traceback or error message is) when the command ran without ``log``.
        truncated: stdout was longer than the cap and was cut.
    """

    returncode: int
    stdout: bytes
    timed_out: bool
    duration: float
    stderr: bytes = b""
    truncated: bool = False


def child_setup(steps: Sequence[Step], report_fd: int) -> Callable[[], None]:
    """The ``preexec_fn``: run ``steps`` in order; on failure tell the parent which one and why."""

    def setup() -> None:
        for what, step in steps:
            try:
                step()
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.write(report_fd, f"{what}: {exc}".encode(errors="replace"))
                raise

    return setup


class NoReapPopen(subprocess.Popen[bytes]):
    """Popen that never reaps or warns on its own: the runner reaps through pidfds.

    ``Popen.__del__`` of a running child puts it on ``subprocess._active``, and the next
    ``Popen()`` would then ``waitpid`` it and steal the exit status from the runner.
    """

    def __del__(self) -> None:
        return None


def fork_exec(spec: SpawnSpec, steps: Sequence[Step], cgroup: Path | None) -> int:
    """Start ``spec`` in its own session and process group; return its pid once it exec'd.

    stdout and stderr go to ``stdout.log``/``stderr.log`` in ``spec.log_dir`` (``O_APPEND``,
    handed to the child directly so it outlives the agent). In the child, before ``exec``, it
    joins ``cgroup`` (when given) and then runs ``steps`` in order; a failing step is reported
    back through a CLOEXEC pipe and named in the error.

    Raises:
        ProcessError: the command could not be started; the message says what and where.
    """
    name = spec.name
    all_steps: list[Step] = []
    opened: list[int] = []
    try:
        if cgroup is not None:
            procs = os.open(cgroup / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
            opened.append(procs)
            all_steps.append((f"joining cgroup {cgroup}", lambda: _write_all(procs, b"0")))
        all_steps += steps
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        out = os.open(spec.log_dir / "stdout.log", flags, 0o640)
        opened.append(out)
        err = os.open(spec.log_dir / "stderr.log", flags, 0o640)
        opened.append(err)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        opened += [report_r, report_w]
        preexec = child_setup(all_steps, report_w) if all_steps else None
        try:
            proc = NoReapPopen(
                list(spec.argv),
                cwd=spec.cwd,
                env=dict(spec.env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                close_fds=True,
                start_new_session=True,
                preexec_fn=preexec,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            os.close(report_w)
            opened.remove(report_w)
            detail = os.read(report_r, 4096).decode(errors="replace")
            raise ProcessError(
                spawn_failure(name, spec.argv[0], spec.cwd, spec.env, exc, detail)
            ) from exc
    except OSError as exc:
        raise ProcessError(f"{name}: cannot prepare the process: {exc}") from exc
    finally:
        for fd in opened:
            os.close(fd)
    return proc.pid


def pidfd_or_kill(name: str, pid: int) -> int:
    """A pidfd for a child just started; if none can be had, kill and reap it and raise."""
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise ProcessError(
            f"{name}: cannot watch pid {pid} ({exc.strerror}); it was killed"
        ) from exc


def _write_all(fd: int, data: bytes) -> None:
    os.write(fd, data)


class PipeIO:
    """Feeds stdin and collects stdout/stderr of one command with loop readers and writers.

    Owns the parent's ends of the pipes it creates and closes each one exactly once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, cap: int) -> None:
        self.loop = loop
        self.cap = max(0, cap)
        self.truncated = False
        self._out = bytearray()
        self._err = bytearray()
        self._owned: set[int] = set()
        self._readers: dict[int, Callable[[], None]] = {}
        self._eof: asyncio.Future[None] = loop.create_future()

    @property
    def stdout(self) -> bytes:
        return bytes(self._out)

    @property
    def stderr(self) -> bytes:
        return bytes(self._err[-self.cap :]) if self.cap else b""

    def pipe(self, *, child_end: str) -> tuple[int, int]:
        """A CLOEXEC pipe ``(read, write)``; the end not given to the child is owned here."""
        r, w = os.pipe2(os.O_CLOEXEC)
        self._owned.add(w if child_end == "read" else r)
        return r, w

    def _release(self, fd: int) -> None:
        if fd in self._owned:
            self._owned.discard(fd)
            if not self.loop.is_closed():
                self.loop.remove_reader(fd)
                self.loop.remove_writer(fd)
            os.close(fd)

    def feed(self, fd: int, data: bytes) -> None:
        """Write ``data`` to ``fd`` as the child reads it, then close it (the child sees EOF)."""
        os.set_blocking(fd, False)
        view = memoryview(data)
        offset = 0

        def write() -> None:
            nonlocal offset
            try:
                offset += os.write(fd, view[offset : offset + 65536])
            except BlockingIOError:
                return
            except OSError:  # EPIPE: the command does not read (all of) its input
                offset = len(view)
            if offset >= len(view):
                self._release(fd)

        if not view:
            self._release(fd)
            return
        self.loop.add_writer(fd, write)

    def collect(self, fd: int, *, keep: str) -> None:
        """Read ``fd`` until EOF into stdout (``keep="head"``) or stderr (``keep="tail"``)."""
        os.set_blocking(fd, False)
        buf = self._out if keep == "head" else self._err

        def read() -> None:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    return
                except OSError:
                    chunk = b""
                if not chunk:
                    self._readers.pop(fd, None)
                    self._release(fd)
                    if not self._readers and not self._eof.done():
                        self._eof.set_result(None)
                    return
                if keep == "head":
                    room = self.cap - len(buf)
                    if len(chunk) > room:
                        self.truncated = True
                    buf.extend(chunk[: max(0, room)])
                else:
                    buf.extend(chunk)
                    if len(buf) > 2 * self.cap:
                        del buf[: len(buf) - self.cap]
                if len(chunk) < 65536:
                    return

        self._readers[fd] = read
        self.loop.add_reader(fd, read)

    async def drain(self, timeout: float) -> None:
        """Read until every pipe reports EOF or ``timeout`` passes, then take what is buffered."""
        if self._readers and timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._eof), timeout)
        for read in list(self._readers.values()):
            read()  # non-blocking: whatever a lingering writer already put in the pipe

    def close(self) -> None:
        """Close every pipe end still owned and forget the readers."""
        for fd in list(self._owned):
            self._release(fd)
        self._readers.clear()


def spawn_failure(
    name: str, command: str, cwd: Path, env: Mapping[str, str], exc: BaseException, detail: str
) -> str:
    """A message saying which command could not start, where, and what to check."""
    where = f"(in {cwd})" if "/" in command else f"(searched PATH={env.get('PATH', os.defpath)})"
    if isinstance(exc, OSError):
        if (
            isinstance(exc, FileNotFoundError)
            and exc.filename is not None
            and str(exc.filename) == str(cwd)
        ):
            return f"{name}: working directory does not exist: {cwd}"
        if isinstance(exc, FileNotFoundError):
            target = cwd / command if "/" in command else None
            if target is not None and target.exists():
                return (
                    f"{name}: cannot execute {command} {where}: its interpreter was not found "
                    "(check the #! line)"
                )
            return f"{name}: command not found: {command} {where}"
        if isinstance(exc, PermissionError):
            return (
                f"{name}: permission denied executing {command} {where}: make it executable "
                "(chmod +x) on a filesystem not mounted noexec"
            )
        if exc.errno == errno.ENOEXEC:
            return (
                f"{name}: {command} {where} is not an executable format (a script needs a #! line)"
            )
        return f"{name}: cannot start {command} {where}: {exc.strerror or exc}"
    if isinstance(exc, ValueError):
        return f"{name}: cannot start {command}: invalid command or environment: {exc}"
    return f"{name}: could not prepare the process before starting {command}: {detail or exc}"

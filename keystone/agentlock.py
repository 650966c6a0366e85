"""One serving agent per runtime dir: an exclusive ``flock`` on ``state/agent.lock``.

The agent that serves a runtime dir (API, supervisors, snapshot) holds the lock for as long
as it does; the kernel drops it when the process dies, whatever killed it, so a SIGKILL never
leaves a stale lock. A second agent started on the same dir waits for it (bounded) instead of
adopting the same processes twice. A self-update (:mod:`keystone.selfupdate`) hands the lock
from the old agent to the new one: the new one is started first and waits here, the old one
releases it once it has stopped serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from pathlib import Path
from types import FrameType

from keystone.errors import KeystoneError

DEFAULT_WAIT = 60.0


class LockBusy(KeystoneError):
    """Another agent serves this runtime dir and did not let go in time."""


class AgentLock:
    """The exclusive lock of one runtime dir (``state/agent.lock``, holding the owner's pid)."""

    def __init__(self, runtime: Path) -> None:
        self.path = runtime / "state" / "agent.lock"
        self.fd: int | None = None

    def holder(self) -> str:
        """The pid written by the agent that holds (or last held) the lock, or ``?``."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def acquire(self, wait: float = DEFAULT_WAIT) -> None:
        """Take the lock, waiting up to ``wait`` seconds for another agent to release it.

        Raises:
            LockBusy: naming the lock file and the pid that holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                from loguru import logger  # lazy: only for the rare wait

                logger.warning(
                    "another agent (pid {}) serves {}; waiting up to {:g}s for it to let go",
                    self.holder(),
                    self.path.parent.parent,
                    wait,
                )
                _blocking_flock(fd, wait, self)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        """Let go (closing the descriptor drops the lock; it is CLOEXEC, so an exec does too)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def _blocking_flock(fd: int, wait: float, lock: AgentLock) -> None:
    """A blocking flock bounded by a real-time timer (no polling): SIGALRM interrupts it."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise LockBusy(
            f"another agent (pid {lock.holder()}) still holds {lock.path} after {wait:g}s: "
            "one agent per runtime dir"
        )

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, max(wait, 0.001))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

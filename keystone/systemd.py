"""sd_notify for ``Type=notify`` units: READY=1, STATUS=, STOPPING=1 and watchdog pings.

The protocol is one datagram per message on the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``
(a path, or an abstract socket written ``@name``). Outside systemd the variable is unset and
every call is a cheap no-op. The agent sends READY=1 once the applied plan is up, and, when the
unit sets ``WatchdogSec``, schedules ``ping()`` on its loop every ``watchdog_interval()``
seconds (half the watchdog timeout, as sd_watchdog_enabled(3) recommends).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from loguru import logger


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET``.

    Args:
        environ: where to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``
            (default: the process environment).
        pid: this process's pid, for ``MAINPID=`` and the ``WATCHDOG_PID`` check.
    """

    def __init__(self, environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        self.pid = os.getpid() if pid is None else pid
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._warned = False

    @property
    def enabled(self) -> bool:
        """Whether a notification socket was given."""
        return self.address is not None

    def _target(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):
            # An abstract socket: a leading NUL instead of the '@'.
            return b"\0" + self.address[1:].encode()
        return self.address

    def send(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; False when disabled or when it fails.

        A failure is logged once: systemd may be restarting, and the agent must not stop over a
        notification.
        """
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message, self._target())
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning("sd_notify to {} failed: {}", self.address, exc)
            return False
        return True

    def ready(self, status: str = "applied plan is up") -> bool:
        """``READY=1``: the unit is started (``systemctl start`` returns)."""
        return self.send("READY=1", f"STATUS={_line(status)}", f"MAINPID={self.pid}")

    def status(self, text: str) -> bool:
        """``STATUS=``: a one-line state shown by ``systemctl status``."""
        return self.send(f"STATUS={_line(text)}")

    def stopping(self, status: str = "stopping components") -> bool:
        """``STOPPING=1``: the agent is shutting down on purpose."""
        return self.send("STOPPING=1", f"STATUS={_line(status)}")

    def ping(self) -> bool:
        """``WATCHDOG=1``: still alive (within ``WatchdogSec``)."""
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of ``WatchdogSec``), or None when the watchdog is off or
        meant for another process (``WATCHDOG_PID``)."""
        if self.address is None or not self._watchdog_usec:
            return None
        if self._watchdog_pid and self._watchdog_pid != str(self.pid):
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        return usec / 2_000_000 if usec > 0 else None


def _line(text: str) -> str:
    # One datagram carries several KEY=value lines; a newline inside a value would split it.
    return " ".join(text.split())

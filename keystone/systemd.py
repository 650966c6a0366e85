"""sd_notify for ``Type=notify`` units: READY=1, STATUS=, STOPPING=1 and watchdog pings."""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET`` (a no-op when not run by systemd)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        self.watchdog_usec = env.get("WATCHDOG_USEC")
        self.watchdog_pid = env.get("WATCHDOG_PID")

    def send(self, message: str) -> bool:
        """Send one datagram; False when there is no socket or it fails."""
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(addr)
                s.sendall(message.encode())
            return True
        except OSError:
            return False

    def ready(self, status: str = "applied plan is up") -> bool:
        return self.send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def ping(self) -> bool:
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Half of ``WatchdogSec`` in seconds, or None when the watchdog is off."""
        if not self.watchdog_usec:
            return None
        if self.watchdog_pid and self.watchdog_pid != str(os.getpid()):
            return None
        try:
            usec = int(self.watchdog_usec)
        except ValueError:
            return None
        return usec / 2 / 1_000_000 if usec > 0 else None

"""Shared fixtures: free loopback ports, waiting on conditions with deadlines."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that this test run has not
    handed out before (the kernel may offer the same free port twice in a row: a test's server
    and its agent's API must not both get it)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_until(predicate: Callable[[], T], *, timeout: float = 20.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``.

    The poll interval grows from 10 ms to 200 ms: this waits on a condition with a deadline,
    it does not hope that a fixed sleep was long enough.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    last: T = predicate()
    while not last:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
        last = predicate()
    return last


@pytest.fixture
def port() -> int:
    return free_port()

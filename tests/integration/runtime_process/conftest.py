"""Fixtures for the process runner tests: a clean env, a work dir, teardown that kills leftovers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from keystone.runtime.process import (
    ProcessHandle,
    ProcessRunner,
    SpawnSpec,
    cgroup2_mount,
    cgroup_members,
    own_cgroup,
    pgid_members,
)
from tests.conftest import wait_until

T = TypeVar("T")
PATH = "/usr/local/bin:/usr/bin:/bin"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one test body on a fresh event loop."""
    return asyncio.run(coro)


async def until(predicate: Callable[[], T], *, timeout: float = 20.0, what: str = "condition") -> T:
    """Await ``predicate()`` becoming truthy, failing the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.01
    value = predicate()
    while not value:
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)
        value = predicate()
    return value


@dataclass
class Bench:
    """A work dir, a clean env and every handle a test made (killed and reaped at teardown)."""

    root: Path
    handles: list[ProcessHandle] = field(default_factory=list)
    pgids: list[int] = field(default_factory=list)

    @property
    def cwd(self) -> Path:
        return self.root / "work"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": PATH, "LANG": "C.UTF-8", **extra}

    def spec(self, *argv: str, name: str = "svc", **kw: Any) -> SpawnSpec:
        env = kw.pop("env", None) or self.env()
        return SpawnSpec(name=name, argv=argv, cwd=self.cwd, env=env, log_dir=self.logs, **kw)

    def sh(self, script: str, *, name: str = "svc", **kw: Any) -> SpawnSpec:
        return self.spec("/bin/sh", "-c", script, name=name, **kw)

    async def spawn(self, runner: ProcessRunner, spec: SpawnSpec) -> ProcessHandle:
        handle = await runner.spawn(spec)
        self.handles.append(handle)
        return handle

    def stdout(self) -> str:
        path = self.logs / "stdout.log"
        return path.read_text() if path.exists() else ""

    def cleanup(self) -> None:
        for handle in self.handles:
            for pgid in {handle.pgid, *self.pgids}:
                if pgid_members(pgid):
                    with contextlib.suppress(OSError):
                        os.killpg(pgid, signal.SIGKILL)
            if handle.cgroup is not None:
                for pid in cgroup_members(handle.cgroup):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            # The runner's loop is gone: reap our own children so no zombie outlives the test.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(handle.pid, 0)
        for pgid in self.pgids:
            if pgid_members(pgid):
                with contextlib.suppress(OSError):
                    os.killpg(pgid, signal.SIGKILL)


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    b = Bench(tmp_path)
    b.cwd.mkdir()
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
def cgroup_root() -> Iterator[Path]:
    """A fresh, writable cgroup v2 directory under this process's own cgroup (skip if none)."""
    mount, own = cgroup2_mount(), own_cgroup()
    if mount is None or own is None:
        pytest.skip("no cgroup v2 hierarchy is mounted")
    base = mount / own.lstrip("/")
    if not os.access(base, os.W_OK):
        pytest.skip(f"the cgroup v2 directory {base} is not writable (not root and not delegated)")
    root = base / f"keystone-test-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup under {base}: {exc}")
    try:
        yield root
    finally:
        for child in [p for p in root.iterdir() if p.is_dir()]:
            with contextlib.suppress(OSError):
                (child / "cgroup.kill").write_text("1")
            wait_until(lambda c=child: not cgroup_members(c), what=f"{child} to empty")
            with contextlib.suppress(OSError):
                child.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()

"""A real ``keystone agent`` process for integration tests, and a tiny API client."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, wait_until


@dataclass
class AgentProc:
    """One agent: its runtime dir, address, process and log."""

    cwd: Path
    runtime: Path
    port: int
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> AgentProc:
        self.log = self.cwd / f"agent-{self.port}-{len(list(self.cwd.glob('agent-*.log')))}.log"
        env = {**os.environ, "KEYSTONE_RUNTIME": str(self.runtime), **self.env}
        env.pop("KEYSTONE_API_TOKEN", None) if "KEYSTONE_API_TOKEN" not in self.env else None
        cmd = [
            sys.executable,
            "-m",
            "keystone",
            "agent",
            "--http",
            f"127.0.0.1:{self.port}",
            "--runtime",
            str(self.runtime),
            *self.args,
        ]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.cwd, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        if wait:
            wait_until(
                lambda: self.healthz() is not None or self.exited(),
                timeout=30,
                what="agent /healthz",
            )
            assert not self.exited(), self.output()
        return self

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def healthz(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.addr + "/healthz", timeout=2) as r:
                data: dict[str, Any] = json.loads(r.read())
                return data
        except (OSError, ValueError):
            return None

    def token(self) -> str:
        return (self.runtime / "api.token").read_text().strip()

    def api(
        self, method: str, path: str, body: bytes | None = None, *, timeout: float = 60
    ) -> tuple[int, Any]:
        req = urllib.request.Request(
            self.addr + path,
            data=body,
            method=method,
            headers={"Authorization": f"Bearer {self.token()}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def components(self) -> dict[str, dict[str, Any]]:
        status, body = self.api("GET", "/v1/components")
        assert status == 200, body
        return {c["name"]: c for c in body}

    def wait_states(self, want: dict[str, str], timeout: float = 30) -> dict[str, dict[str, Any]]:
        """Wait until each named component is in the wanted supervisor ``phase`` (``healthy``,
        ``stopped``, ``failed``...; the Go ``state`` is checked by the tests that read it)."""

        def check() -> dict[str, dict[str, Any]] | None:
            comps = self.components()
            return (
                comps if all(comps.get(n, {}).get("phase") == s for n, s in want.items()) else None
            )

        return wait_until(check, timeout=timeout, what=f"components {want}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KEYSTONE_ADDR": self.addr, "KEYSTONE_RUNTIME": str(self.runtime)}
        env.pop("KEYSTONE_API_TOKEN", None)
        return subprocess.run(
            [sys.executable, "-m", "keystone", *args],
            cwd=self.cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Any]:
    """Factory for agents; every agent and its components are stopped at teardown."""
    agents: list[AgentProc] = []

    def make(
        *args: str,
        runtime: Path | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> AgentProc:
        a = AgentProc(
            tmp_path, runtime or tmp_path / "runtime", port or free_port(), list(args), env or {}
        )
        agents.append(a)
        return a

    yield make
    stop_agents(agents)


def stop_agents(agents: list[AgentProc]) -> None:
    """Stop agents and kill every process group they recorded (nothing may outlive a test)."""
    for a in agents:
        if a.proc is not None and a.proc.poll() is None:
            a.proc.send_signal(signal.SIGTERM)
            try:
                a.proc.wait(30)
            except subprocess.TimeoutExpired:
                a.proc.kill()
                a.proc.wait()
    for a in agents:
        snap = a.runtime / "state" / "agent.json"
        if snap.exists():
            for rec in (json.loads(snap.read_text()).get("processes") or {}).values():
                if "pgid" not in rec:
                    continue  # a container: its tests remove containers by label
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(rec["pgid"], signal.SIGKILL)

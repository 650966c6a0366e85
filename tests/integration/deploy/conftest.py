"""Fixtures for deployer tests: recipes of real processes written to a temp fleet dir."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

SVC = Path(__file__).with_name("svc.py")


@dataclass
class Fleet:
    """Writes recipes and plans for test components into ``root``."""

    root: Path
    log: Path
    ports: dict[str, int] = field(default_factory=dict)

    def port(self, name: str) -> int:
        if name not in self.ports:
            self.ports[name] = free_port()
        return self.ports[name]

    def recipe(
        self,
        name: str,
        *,
        version: str = "1.0.0",
        deps: list[tuple[str, str]] | None = None,
        health: bool = True,
        extra_args: list[str] | None = None,
        policy: str = "always",
        max_retries: int = 5,
        start_timeout: str = "10s",
        extra: str = "",
        install: str = "",
    ) -> Path:
        args = [str(SVC), "--name", name, "--log", str(self.log), "--tag", version]
        if health:
            args += ["--port", str(self.port(name))]
        args += extra_args or []
        text = f'[metadata]\nname = "{name}"\nversion = "{version}"\n'
        for dep, kind in deps or []:
            text += f'\n[[dependencies]]\nname = "{dep}"\ntype = "{kind}"\n'
        if install:
            text += f"\n[lifecycle.install]\nscript = {json.dumps(install)}\n"
        text += f'\n[lifecycle.run]\nrestart_policy = "{policy}"\nmax_retries = {max_retries}\nstop_timeout = "2s"\n'
        text += f"\n[lifecycle.run.exec]\ncommand = {json.dumps(sys.executable)}\nargs = {json.dumps(args)}\n"
        if health:
            text += (
                f'\n[lifecycle.run.health]\ncheck = "http://127.0.0.1:{self.port(name)}/healthz"\n'
                f'interval = "200ms"\ntimeout = "1s"\nfailure_threshold = 2\nstart_timeout = "{start_timeout}"\n'
            )
        text += extra
        path = self.root / f"{name}.recipe.toml"
        path.write_text(text)
        return path

    def plan(self, names: list[str], file: str = "plan.toml") -> Path:
        text = "".join(
            f'[[components]]\nname = "{n}"\nrecipe = "{n}.recipe.toml"\n\n' for n in names
        )
        path = self.root / file
        path.write_text(text)
        return path

    def starts(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    root = tmp_path / "fleet"
    root.mkdir()
    return Fleet(root, tmp_path / "starts.jsonl")

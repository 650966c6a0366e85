"""A signed fleet repository served over smart HTTP, and agents that sync from it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.integration.agent.conftest import make_agent  # noqa: F401  (fixture re-export)
from tests.integration.sources.gitserver import git_env, run_git, serve_git

SVC = Path(__file__).resolve().parents[1] / "deploy" / "svc.py"


def keygen(path: Path, kind: str = "ed25519") -> Path:
    args = (
        ["-t", kind] if kind == "ed25519" else ["-t", kind.split("-")[0], "-b", kind.split("-")[1]]
    )
    subprocess.run(
        ["ssh-keygen", "-q", *args, "-N", "", "-C", path.name, "-f", str(path)], check=True
    )
    return path


@dataclass
class SignedFleet:
    """A work tree that commits signed (or not) and pushes to a bare repo served over HTTP."""

    tmp: Path
    url: str
    key: Path
    other_key: Path
    allowed: Path
    starts: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.tmp / "work"

    @property
    def bare(self) -> Path:
        return self.tmp / "srv" / "fleet.git"

    def git(self, *args: str, env: dict[str, str] | None = None) -> str:
        return run_git(
            *args, cwd=self.work, env={**git_env(self.tmp / "home"), **(env or {})}
        ).decode()

    def port(self, name: str) -> int:
        return self.ports.setdefault(name, free_port())

    def recipe(
        self,
        name: str,
        *,
        version: str = "1.0.0",
        deps: list[tuple[str, str]] | None = None,
        args: list[str] | None = None,
        start_timeout: str = "10s",
        tag: str = "",
    ) -> str:
        """Recipe text of a test component that serves /healthz on its own port."""
        argv = [
            str(SVC),
            "--name",
            name,
            "--port",
            str(self.port(name)),
            "--log",
            str(self.starts),
            "--tag",
            tag or version,
            *(args or []),
        ]
        text = f'[metadata]\nname = "{name}"\nversion = "{version}"\n'
        for dep, kind in deps or []:
            text += f'\n[[dependencies]]\nname = "{dep}"\ntype = "{kind}"\n'
        text += '\n[lifecycle.run]\nmax_retries = 2\nstop_timeout = "2s"\n'
        text += f"\n[lifecycle.run.exec]\ncommand = {json.dumps(sys.executable)}\nargs = {json.dumps(argv)}\n"
        text += (
            f'\n[lifecycle.run.health]\ncheck = "http://127.0.0.1:{self.port(name)}/healthz"\n'
            f'interval = "200ms"\ntimeout = "1s"\nfailure_threshold = 2\nstart_timeout = "{start_timeout}"\n'
        )
        return text

    @staticmethod
    def plan(*names: str) -> str:
        return "".join(
            f'[[components]]\nname = "{n}"\nrecipe = "recipes/{n}.recipe.toml"\n\n' for n in names
        )

    def commit(
        self,
        files: dict[str, str | None],
        message: str = "change",
        *,
        sign: str | None = "key",
        date: str | None = None,
        push: bool = True,
    ) -> str:
        """Write/delete files, commit (signed with ``key``/``other_key`` or unsigned), push."""
        for rel, content in files.items():
            path = self.work / rel
            if content is None:
                self.git("rm", "-q", "-r", rel)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            self.git("add", rel)
        env = {"GIT_COMMITTER_DATE": date, "GIT_AUTHOR_DATE": date} if date else {}
        if sign is None:
            self.git("commit", "-q", "--allow-empty", "--no-gpg-sign", "-m", message, env=env)
        else:
            key = self.key if sign == "key" else self.other_key
            self.git(
                "-c",
                "gpg.format=ssh",
                "-c",
                f"user.signingkey={key}",
                "commit",
                "-q",
                "--allow-empty",
                "-S",
                "-m",
                message,
                env=env,
            )
        if push:
            self.push()
        return self.git("rev-parse", "HEAD").strip()

    def push(self, force: bool = False) -> None:
        self.git("push", "-q", *(["--force"] if force else []), str(self.bare), "main:main")

    def reset_hard(self, rev: str) -> None:
        self.git("reset", "-q", "--hard", rev)

    def agent_config(
        self,
        path: Path,
        *,
        soak: str = "1s",
        extra: str = "",
        labels: list[str] | None = None,
        url: str | None = None,
    ) -> Path:
        path.write_text(
            f'[device]\nid = "dev-1"\nlabels = {json.dumps(labels or [])}\n\n'
            f'[source]\ntype = "git"\nurl = "{url or self.url}"\nref = "refs/heads/main"\n'
            f'interval = "1h"\njitter = "0s"\nsoak = "{soak}"\n\n'
            f'[trust]\nallowed_signers = "{self.allowed}"\n{extra}'
        )
        return path

    def started(self) -> list[dict[str, Any]]:
        if not self.starts.exists():
            return []
        return [json.loads(x) for x in self.starts.read_text().splitlines() if x.strip()]


@pytest.fixture
def signed_fleet(tmp_path: Path) -> Iterator[SignedFleet]:
    (tmp_path / "home").mkdir()
    (tmp_path / "srv").mkdir()
    key = keygen(tmp_path / "ops_key")
    other = keygen(tmp_path / "stranger_key")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(
        f'ops@example.com namespaces="git" {(tmp_path / "ops_key.pub").read_text().split(" ")[0]} '
        f"{(tmp_path / 'ops_key.pub').read_text().split(' ')[1]}\n"
    )
    env = git_env(tmp_path / "home")
    run_git("init", "-q", "--bare", "-b", "main", str(tmp_path / "srv" / "fleet.git"), env=env)
    run_git("init", "-q", "-b", "main", str(tmp_path / "work"), env=env)
    with serve_git(tmp_path / "srv") as base:
        yield SignedFleet(
            tmp_path, f"{base}/fleet.git", key, other, allowed, tmp_path / "starts.jsonl"
        )

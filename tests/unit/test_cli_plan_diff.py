"""``keystone plan diff --format``: the change between two commits of a fleet as a picture."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from keystone import graph
from keystone.cli import fleet as fleet_cli

RECIPE = '[metadata]\nname = "com.example.{name}"\nversion = "{version}"\n{deps}[lifecycle.run.exec]\ncommand = "true"\n'


def _recipe(name: str, version: str = "1.0.0", dep: str = "") -> str:
    deps = f'[[dependencies]]\nname = "com.example.{dep}"\n' if dep else ""
    return RECIPE.format(name=name, version=version, deps=deps)


def _plan(*names: str) -> str:
    return "".join(
        f'[[components]]\nname = "{n}"\nrecipe = "recipes/{n}.recipe.toml"\n\n' for n in names
    )


def _git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


def _commit(repo: Path, files: dict[str, str | None]) -> str:
    for rel, text in files.items():
        path = repo / rel
        if text is None:
            path.unlink()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "change")
    return _git(repo, "rev-parse", "HEAD")


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[Path, str, str]:
    """A fleet whose second commit adds ``cache``, changes ``api`` and removes ``old``."""
    repo = tmp_path / "fleet"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    a = _commit(
        repo,
        {
            "plans/default.toml": _plan("db", "api", "old"),
            "recipes/db.recipe.toml": _recipe("db"),
            "recipes/api.recipe.toml": _recipe("api", dep="db"),
            "recipes/old.recipe.toml": _recipe("old"),
        },
    )
    b = _commit(
        repo,
        {
            "plans/default.toml": _plan("db", "cache", "api"),
            "recipes/cache.recipe.toml": _recipe("cache", dep="db"),
            "recipes/api.recipe.toml": _recipe("api", version="1.1.0", dep="db"),
            "recipes/old.recipe.toml": None,
        },
    )
    return repo, a, b


@pytest.fixture
def app() -> typer.Typer:
    a = typer.Typer()
    assert fleet_cli.register(a)
    return a


def _run(app: typer.Typer, *args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout


class TestPlanDiffPicture:
    def test_text_stays_the_default(self, app: typer.Typer, fleet: tuple[Path, str, str]) -> None:
        """Without --format, plan diff prints the changes and the actions as before."""
        repo, a, b = fleet
        code, out = _run(app, "plan", "diff", a, b, "--repo", str(repo))
        assert code == 0, out
        assert "added      cache" in out and "removed    old" in out

    @pytest.mark.parametrize("fmt", ["dot", "svg", "mermaid"])
    def test_the_change_drawn(
        self, app: typer.Typer, fleet: tuple[Path, str, str], fmt: str
    ) -> None:
        """Each picture marks added, changed and removed components in their colours."""
        repo, a, b = fleet
        code, out = _run(app, "plan", "diff", a, b, "--repo", str(repo), "--format", fmt)
        assert code == 0, out
        for mark in ("added", "changed", "removed"):
            assert graph.PALETTE[mark][0] in out or mark in out
        assert "cache" in out and "old" in out
        if fmt == "dot":
            assert out.startswith("digraph") and '"db" -> "cache"' in out
        if fmt == "svg":
            assert out.startswith("<?xml") and "<svg" in out and graph.PALETTE["added"][0] in out

    def test_json_carries_both_graphs(self, app: typer.Typer, fleet: tuple[Path, str, str]) -> None:
        """--json with a picture format gives the data the picture is drawn from."""
        import json

        repo, a, b = fleet
        code, out = _run(
            app, "plan", "diff", a, b, "--repo", str(repo), "--format", "svg", "--json"
        )
        assert code == 0, out
        data = json.loads(out)
        assert "old" in data["graphs"]["from"]["nodes"]
        assert "cache" in data["graphs"]["to"]["nodes"]
        assert data["changes"]["added"] == ["cache"]

    def test_unknown_format_is_misuse(self, app: typer.Typer, fleet: tuple[Path, str, str]) -> None:
        """--format png exits 2."""
        repo, a, b = fleet
        code, _ = _run(app, "plan", "diff", a, b, "--repo", str(repo), "--format", "png")
        assert code == 2

"""Fixtures for the repository transport tests: a fleet repo made with the git CLI, servers.

The helpers live in ``gitserver.py`` beside this file so that other test folders can reuse them
(see its docstring for the import recipe); this conftest only wraps them in fixtures.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[3]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from keystone.sources.git import GitMirror  # noqa: E402
from tests.integration.sources.gitserver import (  # noqa: E402
    FleetRepo,
    GitDaemonUnavailable,
    serve_git,
    serve_git_daemon,
)


@pytest.fixture
def fleet(tmp_path: Path) -> FleetRepo:
    """An empty remote (bare, HEAD -> main) and its work tree."""
    return FleetRepo(tmp_path)


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[GitMirror]:
    """A fresh device mirror (runtime/repo)."""
    with GitMirror(tmp_path / "runtime" / "repo") as m:
        yield m


@pytest.fixture
def http_log() -> list[str]:
    """Requests seen by the HTTP git server, as ``"METHOD /path?query"``."""
    return []


@pytest.fixture
def http_base(fleet: FleetRepo, http_log: list[str]) -> Iterator[str]:
    """``git http-backend`` serving the fleet remote; the base URL."""
    with serve_git(fleet.root, log=http_log) as base:
        yield base


@pytest.fixture
def daemon_base(fleet: FleetRepo) -> Iterator[str]:
    """``git daemon`` serving the fleet remote; the base git:// URL (skipped if not installed)."""
    try:
        with serve_git_daemon(fleet.root) as base:
            yield base
    except GitDaemonUnavailable as exc:
        pytest.skip(f"git daemon is not available: {exc}")

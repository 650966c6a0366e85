"""The typer-free fast path for the hot read-only commands, and the reads they share with typer.

Importing typer costs tens of milliseconds, an eternity for ``keystone status`` in a monitoring
loop. ``fast_main`` serves ``status [--revision]``, ``components``, ``health`` and ``sync`` with the
connection options, and declines (returns None) anything else, including ``--help``, so typer
handles it. The typer commands of ``keystone.cli.control`` run the same ``read_*`` bodies and
print through the same views, so both paths print exactly the same thing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from keystone.cli import views
from keystone.cli.session import Session, exit_for
from keystone.client import Client
from keystone.env import load_dotenv
from keystone.errors import KeystoneError

Read = Callable[..., tuple[Any, views.Human]]


def read_status(client: Client, revision: bool) -> tuple[Any, views.Human]:
    """``status``: health + plan status (one JSON object, the Go ``/v1/plan/status`` keys plus
    ``health``), or with ``revision`` the GitOps state."""
    if revision:
        return client.get("/v1/revision"), views.revision_text
    health = client.get("/healthz")
    plan = client.get("/v1/plan/status")
    data = dict(plan) if isinstance(plan, dict) else {"components": plan}
    data["health"] = health
    return data, views.status_text


def read_components(client: Client) -> tuple[Any, views.Human]:
    """``components``: the agent's components table."""
    return client.get("/v1/components"), views.components_text


def read_health(client: Client) -> tuple[Any, views.Human]:
    """``health``: whether the agent is alive (no token needed)."""
    return client.get("/healthz", timeout=10), views.health_text


def read_sync(client: Client, flags: set[str]) -> tuple[Any, views.Human]:
    """``sync [--once] [--dry-run] [--allow-rollback] [--retry]``: one sync of the running
    agent, following a newer request that superseded it (what ``keystone.cli.gitops`` runs)."""
    params = {
        "dry": str(bool(flags & {"--dry-run", "--dry"})).lower(),
        "allow_rollback": str("--allow-rollback" in flags).lower(),
        "retry": str("--retry" in flags).lower(),
    }
    data = client.request("POST", "/v1/sync", params=params)
    if isinstance(data, dict) and data.get("result") == "superseded" and data.get("superseded_by"):
        # A newer request replaced this one in the agent's queue: its outcome is the answer.
        data = client.follow_operation(str(data["superseded_by"]), 600.0)
    return data, views.sync_text


_FAST: dict[str, tuple[Read, frozenset[str]]] = {
    "status": (read_status, frozenset({"--revision"})),
    "components": (read_components, frozenset()),
    "health": (read_health, frozenset()),
    "sync": (read_sync, frozenset({"--once", "--dry-run", "--dry", "--allow-rollback", "--retry"})),
}
_VALUED = ("--addr", "--token", "--ssh", "--runtime")


def parse_fast(argv: Sequence[str]) -> tuple[str, dict[str, str], set[str]] | None:
    """``(command, options, flags)`` when ``argv`` is a fast-path command; None otherwise.

    The connection options may also come before the command, as the Go keystonectl's global
    flags do (``keystonectl --addr URL status``).
    """
    options: dict[str, str] = {}
    flags: set[str] = set()
    command: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in _VALUED:
            if not eq:
                if i + 1 >= len(argv):
                    return None
                i += 1
                value = argv[i]
            options[name[2:]] = value
        elif command is None:
            if arg not in _FAST:
                return None
            command = arg
        elif arg in _FAST[command][1] | {"--json"}:
            flags.add(arg)
        else:
            return None  # --help, typos, arguments: typer's job
        i += 1
    if command is None:
        return None
    return command, options, flags


def fast_main(argv: Sequence[str]) -> int | None:
    """Run ``status``, ``components`` or ``health`` without typer; return the exit code, or
    None when ``argv`` is anything else (the caller then runs the full CLI)."""
    parsed = parse_fast(argv)
    if parsed is None:
        return None
    command, options, flags = parsed
    load_dotenv()
    session = Session(
        as_json="--json" in flags,
        addr=options.get("addr"),
        token=options.get("token"),
        ssh=options.get("ssh"),
        runtime=Path(options["runtime"]) if options.get("runtime") else None,
    )
    run = _FAST[command][0]
    if command == "sync":
        # As the typer command: an error goes to stderr only (its JSON carries results), and
        # the exit code is the outcome's.
        try:
            with session.client() as client:
                data, human = read_sync(client, flags)
        except KeystoneError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return int(exc.exit_code)
        session.emit(data, human)
        return int(exit_for(data.get("result") if isinstance(data, dict) else None))
    try:
        with session.client() as client:
            data, human = run(client, "--revision" in flags) if command == "status" else run(client)
    except KeystoneError as exc:
        return session.report(exc)
    session.emit(data, human)
    return 0

"""GitOps commands on the running agent: sync, history, rollback, suspend, resume.

``status --revision`` (the GitOps state) is a keystonectl command (``keystone.cli.control``);
the bundle commands are fleet tools (``keystone.cli.fleet``).
"""

from __future__ import annotations

from typing import Annotated

import typer

from keystone.cli import views
from keystone.cli.common import Command, add_commands, command, fail
from keystone.cli.session import Session, exit_for


@command(connect=True, json_errors=False)
def sync_cmd(
    session: Session,
    once: Annotated[
        bool, typer.Option("--once", help="one sync now (the agent keeps polling on its own)")
    ] = True,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "--dry", help="fetch, verify and diff; deploy nothing")
    ] = False,
    allow_rollback: Annotated[
        bool,
        typer.Option(
            "--allow-rollback",
            help="accept a tip that does not descend from the applied revision, this once",
        ),
    ] = False,
    retry: Annotated[
        bool, typer.Option("--retry", help="try a revision that failed before again")
    ] = False,
) -> None:
    """Sync the running agent now: fetch, verify, diff and deploy. Prints revision, signer, changes."""
    params = {
        "dry": str(dry_run).lower(),
        "allow_rollback": str(allow_rollback).lower(),
        "retry": str(retry).lower(),
    }
    data = session.request("POST", "/v1/sync", params=params)
    if data.get("result") == "superseded" and data.get("superseded_by"):
        # A newer request replaced this one in the agent's queue: its outcome is the answer.
        with session.client() as client:
            data = client.follow_operation(str(data["superseded_by"]), 600.0)
    session.emit(data, views.sync_text)
    fail(exit_for(data.get("result")))


@command(connect=True, json_errors=False)
def history_cmd(
    session: Session, limit: Annotated[int, typer.Option("--limit", "-n")] = 20
) -> None:
    """Syncs, deployments, rollbacks and imports, newest first."""
    data = session.request("GET", "/v1/history", params={"limit": str(limit)})
    session.emit(data, views.history_text)


@command(connect=True, json_errors=False)
def rollback_cmd(
    session: Session,
    to: Annotated[
        str | None, typer.Option("--to", help="revision to go back to (default: last known-good)")
    ] = None,
) -> None:
    """Deploy the last known-good revision (or --to REV) again; it is verified like any other."""
    data = session.request("POST", "/v1/rollback", params={"to": to} if to else None)
    session.emit(data, views.sync_text)
    fail(exit_for(data.get("result")))


@command(connect=True, json_errors=False)
def suspend_cmd(session: Session) -> None:
    """Stop polling the source; running components are untouched."""
    session.emit(session.request("POST", "/v1/suspend"), lambda d: "polling suspended")


@command(connect=True, json_errors=False)
def resume_cmd(session: Session) -> None:
    """Start polling again."""
    session.emit(session.request("POST", "/v1/resume"), lambda d: "polling resumed")


COMMANDS: tuple[tuple[str, Command], ...] = (
    ("sync", sync_cmd),
    ("history", history_cmd),
    ("rollback", rollback_cmd),
    ("suspend", suspend_cmd),
    ("resume", resume_cmd),
)


def register(app: typer.Typer, only: str | None = None) -> bool:
    """Add the GitOps commands to ``app`` (just ``only`` when given); True if any matched."""
    return add_commands(app, only, COMMANDS)

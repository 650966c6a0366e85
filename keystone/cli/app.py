"""The typer app, assembled from the command groups standing side by side.

Exit codes (DESIGN section 8): 0 success, 1 agent or network failure, 2 misuse, 3 refused by
verification or validation, 4 deployment failed and rolled back (``session.ExitCode``).
"""

from __future__ import annotations

import importlib
import sys

import typer

from keystone.cli import agent
from keystone.env import load_dotenv
from keystone.errors import KeystoneError

app = typer.Typer(
    name="keystone",
    help="Keystone: a declarative GitOps pull agent for edge devices.\n\n"
    "Run the agent with `keystone agent`, or with the Go agent's command line: "
    "`keystone --http 127.0.0.1:8080 [--demo] [--api-token T] ...` (docs/go-compat.md).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Keystone: a declarative GitOps pull agent for edge devices."""
    load_dotenv()


def register(only: str | None) -> bool:
    """Add the command ``only`` (every command when None) to the app; True if one matched."""
    if agent.register(app, only) and only is not None:
        return True
    found = only is None
    # In the order --help lists them, after the agent's; imported one by one and only until the
    # one holding ``only``: each loads its own libraries (the API client, signing, the bundle
    # and fleet tools), which a command of another group must not pay for.
    for name in ("control", "manifests", "gitops", "fleet"):
        group = importlib.import_module(f"keystone.cli.{name}")
        if group.register(app, only) and only is not None:
            return True
    return found


def run() -> None:
    """Run the command in ``sys.argv``; a ``KeystoneError`` becomes its exit code."""
    # Building every command costs ~40 ms of typer introspection; register only the one asked
    # for (every command for --help, no arguments, or an unknown name).
    first = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if first is None or not register(first):
        register(None)
    try:
        app()
    except KeystoneError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)

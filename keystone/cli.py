"""The ``keystone`` / ``keystonectl`` command line: one typer app.

Agent-side commands (``agent``, ``serve-artifacts``, ``plan``, ``bundle``) live here; the
commands that talk to a running agent over its API are registered from ``keystone.ctl`` and
``keystone.cli_sync``. Exit codes (DESIGN section 8): 0 success, 1 agent or network failure,
2 misuse, 3 refused by verification or validation, 4 deployment failed and rolled back.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from keystone.errors import KeystoneError

app = typer.Typer(
    name="keystone",
    help="Keystone: a declarative GitOps pull agent for edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Keystone: a declarative GitOps pull agent for edge devices."""
    from keystone.env import load_dotenv

    load_dotenv()


@app.command("agent")
def agent_cmd(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="agent.toml")] = None,
    http: Annotated[
        str | None, typer.Option("--http", help="API listen address (default 127.0.0.1:8080)")
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="run the built-in db -> cache -> api stack")
    ] = False,
    apply: Annotated[
        Path | None, typer.Option("--apply", help="apply this plan file at start")
    ] = None,
    runtime: Annotated[
        Path | None, typer.Option("--runtime", envvar="KEYSTONE_RUNTIME", help="runtime dir")
    ] = None,
    labels: Annotated[
        str | None, typer.Option("--labels", help="device labels, comma separated")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="device id (default: hostname)")
    ] = None,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="JSON log lines for journald/collectors")
    ] = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
) -> None:
    """Run the agent in the foreground until SIGTERM/SIGINT."""
    import asyncio
    from dataclasses import replace

    from keystone import log
    from keystone.config import load_config

    log.setup(level=log_level.upper(), json=log_json)
    cfg = load_config(config)
    if runtime is not None:
        cfg = replace(cfg, runtime=runtime)
    if labels is not None:
        cfg = replace(cfg, labels=tuple(x.strip() for x in labels.split(",") if x.strip()))
    if device is not None:
        cfg = replace(cfg, device_id=device)
    if demo and apply:
        raise typer.BadParameter("--demo and --apply are exclusive")

    from keystone.agent import Agent

    agent = Agent(cfg, http=http)
    initial = None
    source = ""
    if demo or apply:
        from keystone.demo import DEMO_DIR, DEMO_PLAN

        plan_path = DEMO_PLAN if demo else apply
        assert plan_path is not None
        # A plan that does not validate stops us here, before anything is started.
        initial = agent.load_plan_file(plan_path, root=DEMO_DIR if demo else None)
        source = "demo" if demo else str(plan_path)
        for line in initial.unknown_fields:
            typer.echo(f"warning: {line}", err=True)
    raise typer.Exit(asyncio.run(agent.run(initial=initial, initial_source=source)))


@app.command("serve-artifacts")
def serve_artifacts_cmd(
    root: Annotated[Path, typer.Option("--root", help="directory to serve")] = Path("artifacts"),
    addr: Annotated[
        str, typer.Option("--addr", help="listen address; ':9000' means all interfaces")
    ] = ":9000",
) -> None:
    """Serve artifact files over HTTP with Range, ETag and /healthz (the Go keystoneserver)."""
    from keystone.runtime.artifacts import serve_artifacts

    if not root.is_dir():
        raise typer.BadParameter(f"{root} is not a directory", param_hint="--root")
    serve_artifacts(root, addr)


def emit(data: Any, as_json: bool, human: Any = None) -> None:
    """Print ``data`` as JSON for machines or with ``human(data)`` for people."""
    import json

    if as_json or human is None:
        typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        typer.echo(human(data))


def main() -> None:
    """Entry point of the ``keystone`` and ``keystonectl`` scripts."""
    # Building every command costs ~40 ms of typer introspection; register only the one asked
    # for (every command for --help, no arguments, or an unknown name).
    first = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if first is None or not _register(first):
        _register(None)
    try:
        app()
    except KeystoneError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


LOCAL = {"agent", "serve-artifacts"}


def _register(only: str | None) -> bool:
    from keystone.cli_sync import register as register_sync
    from keystone.ctl import register as register_ctl

    if only in LOCAL:
        return True
    found_ctl = register_ctl(app, only)
    found_sync = register_sync(app, only)
    return found_ctl or found_sync

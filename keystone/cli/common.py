"""The typer face every command group stands on: shared options, once, and registration.

A command's first parameter is the invocation: a ``Session`` for a command that talks to the
agent, an ``Output`` for a local tool. ``command`` hides that parameter from typer and puts the
shared options in its place, so ``--addr``, ``--token``, ``--ssh``, ``--runtime`` (with their
environment variables) and ``--json`` are declared here only, and resolved once per invocation::

    @command(connect=True)
    def stop_cmd(session: Session, component: ComponentArg) -> None:
        session.request("POST", component_path(component, "stop"))
        session.emit(...)

A ``KeystoneError`` escaping the command is printed as ``error: ...`` (and, with ``--json``, as
a JSON object on stdout) and becomes its exit code.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from keystone.cli.session import Output, Session
from keystone.errors import KeystoneError

Command = Callable[..., None]


def _connection(flag: str, envvar: str, help: str) -> Any:
    return typer.Option(flag, envvar=envvar, help=help, show_default=False)


AddrOpt = Annotated[
    str | None,
    _connection(
        "--addr",
        "KEYSTONE_ADDR",
        "agent API URL [default: http://127.0.0.1:8080]; with --ssh, as seen from that host",
    ),
]
TokenOpt = Annotated[
    str | None,
    _connection(
        "--token", "KEYSTONE_API_TOKEN", "API token [default: the agent's runtime/api.token]"
    ),
]
SshOpt = Annotated[
    str | None,
    _connection("--ssh", "KEYSTONE_SSH", "reach the agent through `ssh -W`: [user@]host[:port]"),
]
RuntimeOpt = Annotated[
    Path | None,
    _connection(
        "--runtime",
        "KEYSTONE_RUNTIME",
        "the agent's runtime dir, where its api.token is [default: ./runtime, /var/lib/keystone]",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable JSON output")]


def _option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


OUTPUT_OPTIONS = (_option("as_json", JsonOpt, False),)
"""What every command takes: ``--json``."""

CONNECTION_OPTIONS = (
    _option("addr", AddrOpt, None),
    _option("token", TokenOpt, None),
    _option("ssh", SshOpt, None),
    _option("runtime", RuntimeOpt, None),
    *OUTPUT_OPTIONS,
)
"""What every command that talks to the agent takes, in the order ``--help`` lists them."""


def command(*, connect: bool, json_errors: bool = True) -> Callable[[Command], Command]:
    """Give a command the shared options and the shared error handling.

    ``connect``: the command talks to the agent; it receives a ``Session`` built from
    ``--addr/--token/--ssh/--runtime/--json``, else an ``Output`` built from ``--json``. Either
    way the shared options come after the command's own in ``--help``.

    ``json_errors``: with ``--json`` an error is also printed as JSON on stdout (the
    keystonectl commands); False leaves the error to the app's handler, which prints it on
    stderr only (the GitOps and fleet commands, whose JSON has only ever carried results).
    """
    shared = CONNECTION_OPTIONS if connect else OUTPUT_OPTIONS
    invocation: Callable[..., Output] = Session if connect else Output

    def decorate(fn: Command) -> Command:
        signature = inspect.signature(fn, eval_str=True)
        own = list(signature.parameters.values())[1:]  # the first is the invocation
        params = [*own, *shared]

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> None:
            face = invocation(**{p.name: kwargs.pop(p.name, p.default) for p in shared})
            try:
                fn(face, *args, **kwargs)
            except KeystoneError as exc:
                if not json_errors:
                    raise
                raise typer.Exit(face.report(exc)) from None

        # typer reads the parameters from the signature and the types from the annotations.
        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


def fail(code: int) -> None:
    """End the command with exit ``code`` (nothing when it is 0)."""
    if code:
        raise typer.Exit(code)


def add_commands(
    app: typer.Typer,
    only: str | None,
    commands: Sequence[tuple[str, Command]],
    groups: Sequence[tuple[str, typer.Typer]] = (),
) -> bool:
    """Add ``commands`` and sub-``groups`` to ``app`` (only the one named ``only``, when given,
    since typer's introspection of every command costs tens of milliseconds); True if any
    matched."""
    found = False
    for name, sub in groups:
        if only in (None, name):
            app.add_typer(sub, name=name)
            found = True
    for name, fn in commands:
        if only in (None, name):
            # A command may take flags typer does not declare (the agent's broker flags).
            app.command(name, context_settings=getattr(fn, "context_settings", None))(fn)
            found = True
    return found

"""The typer-free fast path for the hot read-only commands, and the reads they share with typer.

Importing typer costs tens of milliseconds, an eternity for ``keystone status`` in a monitoring
loop. ``fast_main`` serves ``status [--revision]``, ``components``, ``health`` and ``sync`` with the
connection options, and ``apply PLAN --dry`` when no agent answers (planned offline, as the
typer command does), and declines (returns None) anything else, including ``--help``, so typer
handles it. The typer commands of ``keystone.cli.control`` run the same ``read_*`` bodies and
print through the same views, so both paths print exactly the same thing.

An ``http://`` agent is asked through :class:`keystone.wire.WireClient` (no ``http.client``);
https, ``--ssh`` and any answer the wire does not read go to ``keystone.client.Client``.
"""

from __future__ import annotations

import sys

from keystone.cli import fastviews as views

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    from keystone.cli.fastviews import Human
    from keystone.client import Client
    from keystone.wire import Requests

    Read = Callable[..., tuple[Any, Human]]


def read_status(client: Requests, revision: bool) -> tuple[Any, Human]:
    """``status``: health + plan status (one JSON object, the Go ``/v1/plan/status`` keys plus
    ``health``), or with ``revision`` the GitOps state."""
    if revision:
        return client.get("/v1/revision"), views.revision_text
    health = client.get("/healthz")
    plan = client.get("/v1/plan/status")
    data = dict(plan) if isinstance(plan, dict) else {"components": plan}
    data["health"] = health
    return data, views.status_text


def read_components(client: Requests) -> tuple[Any, Human]:
    """``components``: the agent's components table."""
    return client.get("/v1/components"), views.components_text


def read_health(client: Requests) -> tuple[Any, Human]:
    """``health``: whether the agent is alive (no token needed)."""
    return client.get("/healthz", timeout=10), views.health_text


def read_sync(client: Requests, flags: set[str]) -> tuple[Any, Human]:
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


def split_options(
    argv: Sequence[str], valued: Sequence[str]
) -> tuple[dict[str, str], list[str]] | None:
    """The ``valued`` options (``--addr URL`` or ``--addr=URL``) wherever they are, by name
    without the dashes, and the other arguments in order; None when one lacks its value."""
    options: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in valued:
            if not eq:
                if i + 1 >= len(argv):
                    return None
                i += 1
                value = argv[i]
            options[name[2:]] = value
        else:
            rest.append(arg)
        i += 1
    return options, rest


def parse_fast(argv: Sequence[str]) -> tuple[str, dict[str, str], set[str]] | None:
    """``(command, options, flags)`` when ``argv`` is a fast-path command; None otherwise.

    The connection options may also come before the command, as the Go keystonectl's global
    flags do (``keystonectl --addr URL status``).
    """
    split = split_options(argv, _VALUED)
    if split is None:
        return None
    options, rest = split
    flags: set[str] = set()
    command: str | None = None
    for arg in rest:
        if command is None:
            if arg not in _FAST:
                return None
            command = arg
        elif arg in _FAST[command][1] | {"--json"}:
            flags.add(arg)
        else:
            return None  # --help, typos, arguments: typer's job
    if command is None:
        return None
    return command, options, flags


def _read(command: str, options: dict[str, str], flags: set[str]) -> tuple[Any, Human]:
    """Run ``command`` on the wire (plain HTTP), or on ``Client`` for https, ``--ssh`` and an
    answer the wire does not read (asked again there, so the user sees ``Client``'s answer)."""
    from keystone.wire import Unusual, WireClient

    runtime = options.get("runtime") or None
    args = (options.get("addr"), options.get("token"), options.get("ssh"))

    def client() -> Client:
        from pathlib import Path

        from keystone.client import Client

        return Client(*args, runtime=Path(runtime) if runtime else None)

    wire = WireClient.from_options(options, long_polls=client)
    if wire.plain:
        try:
            with wire:
                return _run(wire, command, flags)
        except Unusual:
            pass
    with client() as full:
        return _run(full, command, flags)


def _run(client: Requests, command: str, flags: set[str]) -> tuple[Any, Human]:
    if command == "sync":
        return read_sync(client, flags)
    if command == "status":
        return read_status(client, "--revision" in flags)
    read: Read = _FAST[command][0]
    return read(client)


def offline_dry(plan: str) -> tuple[Any, Human, int]:
    """``apply --dry`` when no agent answers: the plan and its recipes checked here, planned
    against the plan the local agent last applied (``keystone.offline``). The data, how a
    person reads it, and the exit code (usage when the plan has unknown fields)."""
    from pathlib import Path

    from keystone import offline
    from keystone.cli.views import actions_text
    from keystone.errors import ValidationError

    data = offline.dry_run(Path(plan))
    data["offline"] = True

    def human(d: Any) -> str:
        head = "no agent answered: planned offline against the last applied local plan\n"
        return head + actions_text(d)

    return data, human, int(ValidationError.exit_code) if data.get("unknown_fields") else 0


_DRY_FLAGS = frozenset({"--dry", "--dry-run", "--json", "--wait", "--no-wait"})


def parse_apply_dry(argv: Sequence[str]) -> tuple[str, dict[str, str], set[str]] | None:
    """``(plan, options, flags)`` for ``apply PLAN --dry`` with the connection options and
    nothing else, the plan a readable file (else typer says what is wrong); None otherwise."""
    import os

    split = split_options(argv, _VALUED)
    if split is None:
        return None
    options, rest = split
    flags: set[str] = set()
    words: list[str] = []
    for arg in rest:
        if arg in _DRY_FLAGS and (words or arg == "--json"):
            flags.add(arg)  # before the command, typer takes only the global options
        elif arg.startswith("-"):
            return None  # --help, --timeout, typos: typer's job
        else:
            words.append(arg)
    if len(words) != 2 or words[0] != "apply" or not flags & {"--dry", "--dry-run"}:
        return None
    plan = words[1]
    if not os.path.isfile(plan) or not os.access(plan, os.R_OK):
        return None
    return plan, options, flags


def fast_apply_dry(argv: Sequence[str]) -> int | None:
    """``apply PLAN --dry`` without typer when no agent answers on plain HTTP: what the typer
    command prints and exits with. None (the typer command runs) for anything else: an agent
    that answers (the plan goes to it), https, ``--ssh``, an answer the wire does not read."""
    parsed = parse_apply_dry(argv)
    if parsed is None:
        return None
    plan, options, flags = parsed
    from keystone.env import load_dotenv
    from keystone.errors import AgentUnreachable, KeystoneError
    from keystone.wire import Unusual, WireClient

    load_dotenv()
    try:
        wire = WireClient.from_options(options)
        if not wire.plain:
            return None
        with wire:
            wire.get("/healthz", timeout=10)
    except AgentUnreachable:
        pass
    except (Unusual, KeystoneError):
        return None
    else:
        return None
    as_json = "--json" in flags
    import gc

    # Checking a whole plan makes many objects that live to the end, and next to no cycles: a
    # collection while it parses would only walk them again (about 5% of a 2,000-component
    # check).
    collecting = gc.isenabled()
    gc.disable()
    try:
        data, human, code = offline_dry(plan)
        views.emit(data, as_json, human)
    except KeystoneError as exc:
        return views.report_error(exc, as_json)
    finally:
        if collecting:
            gc.enable()
    return code


def fast_main(argv: Sequence[str]) -> int | None:
    """Run ``status``, ``components``, ``health`` or ``sync`` without typer, and ``apply --dry``
    with no agent answering; return the exit code, or None when ``argv`` is anything else (the
    caller then runs the full CLI)."""
    if "apply" in argv:
        code = fast_apply_dry(argv)
        if code is not None:
            return code
    parsed = parse_fast(argv)
    if parsed is None:
        return None
    command, options, flags = parsed
    from keystone.env import load_dotenv
    from keystone.errors import KeystoneError

    load_dotenv()
    as_json = "--json" in flags
    if command == "sync":
        # As the typer command: an error goes to stderr only (its JSON carries results), and
        # the exit code is the outcome's.
        try:
            data, human = _read(command, options, flags)
        except KeystoneError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return int(exc.exit_code)
        views.emit(data, as_json, human)
        from keystone.cli.session import exit_for

        return int(exit_for(data.get("result") if isinstance(data, dict) else None))
    try:
        data, human = _read(command, options, flags)
    except KeystoneError as exc:
        return views.report_error(exc, as_json)
    views.emit(data, as_json, human)
    return 0

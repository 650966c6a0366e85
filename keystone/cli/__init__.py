"""The ``keystone`` / ``keystonectl`` command line.

``main`` is the entry point of both scripts. Invoked as ``keystonectl`` it is the Go
keystonectl (``keystone.cli.goctl``, ``keystone.cli.ctl``: the agent's JSON, Go's exit codes);
invoked as ``keystone`` with the Go agent's flags first (``keystone --http 127.0.0.1:8080``,
``keystone -http :8080 -demo``) it runs the agent (``keystone.cli.goagent``). The hot commands
(``status``, ``components``, ``health``, ``sync``, and ``apply --dry`` with no agent answering)
run without importing typer (``keystone.cli.fast``), which keeps ``keystone status`` quick;
everything else goes to the typer app of ``keystone.cli.app``. This module imports nothing
heavy, so that the fast path stays fast.

The command groups stand side by side on one face and never import each other:

- ``common``: the typer face: connection options and ``--json`` declared once, the command
  decorator that resolves them into a ``Session``, registration;
- ``session``, ``views``, ``fast``: typer-free: the invocation (client, emit, exit codes), what
  is printed, the fast path;
- ``agent`` (agent, serve-artifacts), ``control`` (the keystonectl command set), ``gitops``
  (sync, history, rollback, suspend, resume), ``fleet`` (plan render/diff, bundle
  create/inspect/import): the groups, assembled by ``app``.
"""

from __future__ import annotations

import gc
import sys

GLOBAL_VALUED = ("--addr", "--token", "--ssh")
GLOBAL_FLAGS = ("--json",)


def hoist_globals(argv: list[str]) -> list[str]:
    """Move global options written before the command to just after it.

    The Go keystonectl's global flags may come before the command (``keystonectl --addr URL
    apply plan.toml``); typer wants them after it.
    """
    moved: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.partition("=")[0]
        if name in GLOBAL_VALUED:
            if "=" in arg:
                moved.append(arg)
            elif i + 1 < len(argv):
                moved += [arg, argv[i + 1]]
                i += 1
            else:
                return argv
            i += 1
            continue
        if arg in GLOBAL_FLAGS:
            moved.append(arg)
            i += 1
            continue
        break
    if not moved or i >= len(argv):
        return argv
    rest = argv[i:]
    # Group commands (plan, bundle) take their options after the subcommand.
    cut = 2 if rest[0] in ("plan", "bundle") and len(rest) > 1 else 1
    return rest[:cut] + moved + rest[cut:]


def delegate(argv: list[str]) -> int:
    """Run ``argv`` in the keystone app for keystonectl; its exit code folded into Go's."""
    sys.argv[1:] = hoist_globals(argv)
    from keystone.cli import goctl
    from keystone.cli.app import run

    try:
        run()
    except SystemExit as exc:
        code = exc.code
        return goctl.fold_exit(code) if isinstance(code, int) else (0 if code is None else 1)
    return 0


def ctl_main(argv: list[str]) -> int:
    """Run the keystonectl command line ``argv``; Go's exit code."""
    from keystone.cli import goctl

    code = goctl.ctl_fast(argv)
    if code is not None:
        return code
    first = goctl.first_command(argv)
    if first is not None and (first in goctl.DELEGATED or first not in goctl.GO_COMMANDS):
        # The keystone app runs what Go's keystonectl lacks; what talks to the agent prints JSON.
        if first in goctl.AS_JSON and not {"--json", "--help"} & set(argv):
            argv = [*argv, "--json"]
        return delegate(argv)
    from keystone.cli import ctl  # lazy: click, only past the fast path

    return ctl.run(argv)


def main() -> None:
    """Run one command."""
    # goctl and goagent load only when they may be needed: the keystonectl name is in argv[0],
    # and the Go agent's command line starts with a flag.
    if "keystonectl" in sys.argv[0]:
        from keystone.cli import goctl

        if goctl.invoked_as_ctl(sys.argv[0]):
            sys.exit(ctl_main(sys.argv[1:]))
    if sys.argv[1:2] and sys.argv[1].startswith("-"):
        from keystone.cli import goagent

        if goagent.is_go_agent(sys.argv[1:]):
            sys.argv[1:] = goagent.agent_argv(sys.argv[1:])
    if sys.argv[1:2] == ["agent"]:
        # OpenSSL stays out of the agent until it speaks TLS or hashes a file (keystone.openssl)
        from keystone.openssl import asyncio_without_ssl

        asyncio_without_ssl()
        # lazy: the agent's own typer-free path (the resident process keeps what it imports)
        from keystone.cli.agentrun import fast_agent

        code = fast_agent(sys.argv[2:])
        if code is not None:
            sys.exit(code)
    # lazy: the fast path's client is not the agent's to keep
    from keystone.cli.fast import fast_main

    code = fast_main(sys.argv[1:])
    if code is not None:
        # What the command made lives until the process ends: the collection at exit would
        # only walk it (20 ms after checking a plan of 2,000 components).
        gc.freeze()
        sys.exit(code)
    sys.argv[1:] = hoist_globals(sys.argv[1:])
    # lazy: typer and the command groups, which the fast path above must not pay for
    from keystone.cli.app import run

    run()

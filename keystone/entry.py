"""The ``keystone`` / ``keystonectl`` entry point.

The hot read-only commands (``status``, ``components``, ``health``) run without importing typer
(``keystone.ctl_views.fast_main``), which keeps ``keystone status`` quick. Everything else goes to
the typer app in ``keystone.cli``. The Go keystonectl's global flags may come before the command
(``keystonectl --addr URL apply plan.toml``): they are moved after it for typer.
"""

from __future__ import annotations

import sys

GLOBAL_VALUED = ("--addr", "--token", "--ssh")
GLOBAL_FLAGS = ("--json",)


def hoist_globals(argv: list[str]) -> list[str]:
    """Move global options written before the command to just after it."""
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


def main() -> None:
    """Run one command."""
    from keystone.ctl_views import fast_main

    code = fast_main(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    sys.argv[1:] = hoist_globals(sys.argv[1:])
    from keystone.cli import main as cli_main

    cli_main()

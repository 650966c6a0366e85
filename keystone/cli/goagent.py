"""The Go agent's command line: ``keystone --http 127.0.0.1:8080``, ``keystone -http :8080 -demo``.

The Go ``keystone`` binary is the agent, and its flags are Go's ``flag`` package's: one dash or
two, ``-flag=value`` or ``-flag value`` (a boolean takes ``-flag`` or ``-flag=false``, never a
separate value), parsing stops at ``--`` or the first argument that is not a flag. When the
first argument of ``keystone`` is one of the Go agent's flags, :func:`to_agent_argv` rewrites
the line into ``keystone agent --flag value ...``, so that Go's systemd unit and scripts start
this agent with the same meaning. Click never sees a single-dash long flag (it would read
``-http`` as ``-h -t -t -p``).

Errors are Go's: an undefined flag, a flag without its value, a bad boolean are usage errors
(exit 2) naming the flag as it was written.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

GO_BOOLS = frozenset({"demo", "insecure-skip-verify", "version"})
GO_VALUED = frozenset(
    {"http", "api-token", "clock-policy", "reconcile-interval", "reconcile-jitter"}
)
"""The Go agent's own flags (the broker flags are every ``mqtt-*`` and ``nats-*``)."""

BROKER_BOOLS = frozenset({"tls-verify", "jetstream", "accept-local-plans"})
"""The broker flags that are booleans (after the ``mqtt-`` / ``nats-`` prefix)."""

OUR_BOOLS = frozenset({"log-json"})
OUR_VALUED = frozenset({"apply", "config", "runtime", "labels", "device", "log-level"})
"""Our agent's flags, accepted in the Go form too (``--apply`` was the Go agent's once)."""

FIRST = GO_BOOLS | GO_VALUED | {"apply"}
"""A first argument that makes ``keystone`` the agent."""

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


class GoFlagError(Exception):
    """A command line Go's flag package would refuse (exit 2)."""


def _name(arg: str) -> str | None:
    """The flag name of ``arg`` (``-http=x`` -> ``http``), or None if it is not a flag."""
    if len(arg) < 2 or not arg.startswith("-") or arg == "--":
        return None
    body = arg[2:] if arg.startswith("--") else arg[1:]
    return body.partition("=")[0]


def _is_broker(name: str) -> bool:
    prefix, _, rest = name.partition("-")
    return prefix in ("mqtt", "nats") and bool(rest)


def is_go_agent(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (without the program name) is the Go agent's command line."""
    if not argv:
        return False
    name = _name(argv[0])
    if name is None:
        return False
    if name in FIRST or _is_broker(name):
        return True
    # One dash is Go's too: click would read ``-help`` or ``-dry-run`` as a cluster of short
    # options (``-h -e -l -p``) and name the wrong one, so a single-dash word, and ``-h``, are
    # the agent's line, where Go's help and Go's refusals answer.
    return not argv[0].startswith("--") and (len(name) > 1 or name == "h")


def _bool(name: str, value: str, written: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise GoFlagError(f'invalid boolean value "{value}" for {written}: parse error')


def to_agent_argv(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``keystone agent ...`` for the Go agent line ``argv``, and whether ``-version`` was asked.

    Raises:
        GoFlagError: what Go's flag package would refuse, worded as it words it.
    """
    out = ["agent"]
    version = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        name = _name(arg)
        if name is None:
            break
        body = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or body.startswith("-") or body.startswith("="):
            raise GoFlagError(f"bad flag syntax: {arg}")
        _, eq, value = body.partition("=")
        written = "-" + name
        if name in ("h", "help"):
            return ["agent", "--help"], False
        broker_bool = _is_broker(name) and name.partition("-")[2] in BROKER_BOOLS
        if name in GO_BOOLS or name in OUR_BOOLS or broker_bool:
            on = _bool(name, value, written) if eq else True
            if name == "version":
                version = on
            elif broker_bool:
                out.append(f"--{name}={'true' if on else 'false'}")
            elif on:
                out.append(f"--{name}")
        elif name in GO_VALUED or name in OUR_VALUED or _is_broker(name):
            if not eq:
                if i + 1 >= len(argv):
                    raise GoFlagError(f"flag needs an argument: {written}")
                i += 1
                value = argv[i]
            out.append(f"--{name}={value}")
        elif name == "dry-run":
            raise GoFlagError(
                f"flag provided but not defined: {written} (use `keystone apply-dry plan.toml`)"
            )
        else:
            raise GoFlagError(f"flag provided but not defined: {written}")
        i += 1
    if i < len(argv):
        raise GoFlagError(
            f"unexpected argument {argv[i]!r}: the agent's flags take no positional arguments"
        )
    return out, version


def agent_argv(argv: Sequence[str]) -> list[str]:
    """The ``keystone agent`` line for the Go agent line ``argv``; ``-version`` prints the
    version and exits 0, a refused line prints Go's message and exits 2."""
    try:
        out, version = to_agent_argv(argv)
    except GoFlagError as exc:
        sys.stderr.write(f"keystone: {exc}\nRun 'keystone agent --help' for the agent's flags.\n")
        sys.exit(2)
    if version:
        from keystone import __version__

        sys.stdout.write(f"keystone {__version__} (python {sys.version.split()[0]})\n")
        sys.exit(0)
    return out

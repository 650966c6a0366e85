"""The Go keystonectl's face, typer-free and click-free: its JSON, its errors, its exit codes.

Invoked as ``keystonectl`` (the basename of ``argv[0]``), the program behaves as the Go
keystonectl: every command prints the agent's own answer, pretty-printed exactly as Go's
``json.MarshalIndent(v, "", "  ")`` prints a decoded document (keys sorted, two spaces, ``<``
``>`` ``&`` escaped, numbers as Go's float64 prints them), ``OK`` for an empty answer and the
text of a non-JSON one; errors are ``Error: ...`` on stderr; the exit code is 0 (success), 1
(the agent, the network or a verification failed) or 2 (the command line was wrong).

``ctl_fast`` serves the hot read-only commands (``components``, ``status``, ``health``,
``graph``, ``recipes``) without importing click, so a monitoring loop piping ``keystonectl
components`` into ``jq`` stays cheap; everything else goes to :mod:`keystone.cli.ctl`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keystone.errors import KeystoneError, UsageError

CTL_NAME = "keystonectl"

OK, FAILED, MISUSE = 0, 1, 2
"""The Go keystonectl's exit codes."""

CONNECTION_VALUED = ("--addr", "--token", "--ssh", "--runtime")
"""The connection options, which may come before or after the command, as Go's persistent flags
do (``--runtime`` is ours: where a local agent's ``api.token`` is)."""

READS: dict[str, str] = {
    "components": "/v1/components",
    "status": "/v1/plan/status",
    "health": "/healthz",
    "graph": "/v1/plan/graph",
    "recipes": "/v1/recipes",
}
"""The commands that are one GET with no argument, and their endpoints."""

GO_COMMANDS = frozenset(
    {
        *("apply", "apply-dry", "graph", "reconcile", "status", "stop-plan"),
        *("components", "restart", "restart-dry", "stop"),
        *("delete-recipe", "recipes", "upload-recipe", "health", "version"),
        *("completion", "help", "manifest", "sha256", "sign", "verify"),
    }
)
"""Every command of the Go keystonectl."""

DELEGATED = frozenset({"sign", "verify", "manifest"})
"""Go keystonectl commands that the ``keystone`` app runs (their output is text, as in Go)."""

AS_JSON = frozenset({"sync", "history", "rollback", "suspend", "resume"})
"""Our commands that talk to the agent: under the keystonectl name they print JSON too."""


def invoked_as_ctl(argv0: str) -> bool:
    """Whether the program was started under the name ``keystonectl``."""
    name = os.path.basename(argv0)
    return name.split(".", 1)[0] == CTL_NAME


def fold_exit(code: int) -> int:
    """Our exit codes folded into Go's: refused (3) and rolled back (4) are failures (1)."""
    return FAILED if code in (3, 4) else code


# --- Go's JSON ------------------------------------------------------------------------------

_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def _go_string(text: str) -> str:
    out = json.dumps(text, ensure_ascii=False)
    for ch, esc in _GO_ESCAPES.items():
        out = out.replace(ch, esc)
    return out


def _go_number(value: int | float) -> str:
    """A number as Go prints the float64 that ``json.Unmarshal`` made of it."""
    if isinstance(value, int) and abs(value) < 2**53:
        return str(value)
    f = float(value)
    if f == 0:
        return "-0" if str(f).startswith("-") else "0"
    if abs(f) < 1e-6 or abs(f) >= 1e21:
        mantissa, _, exp = repr(f).partition("e")
        # Go's 'e' format with its clean-up: e-07 becomes e-7, e+21 stays.
        if exp.startswith("-0"):
            exp = "-" + exp[2:]
        return f"{mantissa}e{exp}"
    if f.is_integer():
        return str(int(f))
    from decimal import Decimal  # lazy: only a fraction needs it

    return format(Decimal(repr(f)), "f")


def go_json(data: Any, indent: str = "") -> str:
    """``data`` as Go's ``json.MarshalIndent(v, "", "  ")`` prints a decoded document."""
    inner = indent + "  "
    if data is None:
        return "null"
    if data is True:
        return "true"
    if data is False:
        return "false"
    if isinstance(data, int | float):
        return _go_number(data)
    if isinstance(data, str):
        return _go_string(data)
    if isinstance(data, dict):
        if not data:
            return "{}"
        items = [
            f"{inner}{_go_string(str(k))}: {go_json(data[k], inner)}"
            for k in sorted(data, key=lambda k: str(k).encode())
        ]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(data, list | tuple):
        if not data:
            return "[]"
        return "[\n" + ",\n".join(inner + go_json(v, inner) for v in data) + "\n" + indent + "]"
    return _go_string(str(data))


def go_body(data: Any) -> str:
    """What the Go keystonectl prints for an answer: ``OK`` when empty, text as it came,
    JSON pretty-printed."""
    if data is None or (isinstance(data, str) and not data.strip()):
        return "OK"
    if isinstance(data, str | bytes):
        text = data.decode(errors="replace") if isinstance(data, bytes) else data
        return text.strip()
    return go_json(data)


def print_body(data: Any) -> None:
    sys.stdout.write(go_body(data) + "\n")
    sys.stdout.flush()


def print_error(exc: BaseException | str) -> None:
    """``Error: ...`` on stderr, as cobra prints a command's error; an API error leads with
    its HTTP status, as the Go client does."""
    status = getattr(exc, "status", None)
    text = str(exc)
    if isinstance(status, int):
        from http import HTTPStatus  # lazy: only an error answer needs it

        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        text = f"{status} {phrase}: {text}".replace("  ", " ")
    sys.stderr.write(f"Error: {text}\n")
    sys.stderr.flush()


def connect(options: dict[str, str | None]) -> Any:
    """The client for ``options`` (addr, token, ssh, runtime); a bad destination is misuse."""
    from keystone.client import Client  # lazy: only for the commands that talk to the agent

    runtime = options.get("runtime")
    return Client(
        options.get("addr"),
        options.get("token"),
        options.get("ssh"),
        runtime=Path(runtime) if runtime else None,
    )


def get(options: dict[str, str | None], path: str, params: dict[str, str] | None = None) -> int:
    """One GET, printed the Go way; the exit code. An ``http://`` agent is asked through
    ``keystone.wire`` (no ``http.client``); anything else, or an answer the wire does not
    read, through ``Client``."""
    from keystone.wire import Unusual, WireClient

    try:
        wire = WireClient.from_options(options)
        client = None if wire.plain else connect(options)
    except UsageError as exc:
        print_error(exc)
        return MISUSE
    timeout = 10 if path == "/healthz" else None
    try:
        if client is None:
            try:
                with wire:
                    data = wire.request("GET", path, params=params, timeout=timeout)
            except Unusual:
                client = connect(options)
        if client is not None:
            with client:
                data = client.request("GET", path, params=params, timeout=timeout)
    except KeystoneError as exc:
        print_error(exc)
        return FAILED
    print_body(data)
    return OK


# --- the fast path --------------------------------------------------------------------------


def split_connection(argv: Sequence[str]) -> tuple[dict[str, str], list[str]] | None:
    """The connection options wherever they are, and the rest; None when one lacks its value."""
    from keystone.cli.fast import split_options

    return split_options(argv, CONNECTION_VALUED)


def first_command(argv: Sequence[str]) -> str | None:
    """The command word of a keystonectl command line (after any connection options)."""
    split = split_connection(argv)
    if split is None:
        return None
    return next((a for a in split[1] if not a.startswith("-")), None)


def ctl_fast(argv: Sequence[str]) -> int | None:
    """Run a one-GET read command without click; None when ``argv`` is anything else."""
    split = split_connection(argv)
    if split is None:
        return None
    options, rest = split
    # --json is accepted and changes nothing: keystonectl always prints JSON.
    words = [a for a in rest if a != "--json"]
    if len(words) != 1 or words[0] not in READS:
        return None
    from keystone.env import load_dotenv  # the agent's .env, as every command reads it

    load_dotenv()
    return get(dict(options), READS[words[0]])

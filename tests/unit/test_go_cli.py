"""The Go faces of the command line as data: keystonectl's JSON printed as Go prints it, and the
Go agent's flags rewritten into ``keystone agent`` (and Go's refusals)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from keystone.cli import ctl, goagent, goctl

# (decoded answer, what Go's json.MarshalIndent(v, "", "  ") prints for it)
GO_JSON: list[tuple[Any, str]] = [
    # Go's own keystonectl test case (internal/cli/main_test.go, TestFormatBody).
    ({"startOrder": ["db"]}, '{\n  "startOrder": [\n    "db"\n  ]\n}'),
    # Keys sorted, nested indentation, empty containers inline.
    (
        {"b": {}, "a": [], "c": {"y": 1, "x": [True, None]}},
        '{\n  "a": [],\n  "b": {},\n  "c": {\n    "x": [\n      true,\n      null\n    ],\n'
        '    "y": 1\n  }\n}',
    ),
    ([], "[]"),
    ({}, "{}"),
    # Go's HTML-safe escaping; UTF-8 kept as is.
    ("<a&b> ñ", '"\\u003ca\\u0026b\\u003e ñ"'),
    ("line\nbreak\t\u2028", '"line\\nbreak\\t\\u2028"'),
    # Numbers pass through float64 in Go.
    (3, "3"),
    (3.0, "3"),
    (1.5, "1.5"),
    (1796189997.2628314, "1796189997.2628314"),
    (0.000001, "0.000001"),
    (1e-7, "1e-7"),
    (1e21, "1e+21"),
    (123456789012345678, "123456789012345680"),
    (-2.5e-10, "-2.5e-10"),
]


@pytest.mark.parametrize(("data", "want"), GO_JSON)
def test_go_json_matches_go(data: Any, want: str) -> None:
    """What keystonectl prints for an answer is byte for byte what the Go keystonectl prints."""
    got = goctl.go_json(data)
    assert got == want
    assert json.loads(got) == json.loads(want)


def test_go_body_empty_and_text() -> None:
    """An empty answer (204) prints OK, text prints as it came, as Go's formatBody does."""
    assert goctl.go_body(None) == "OK"
    assert goctl.go_body("  \n") == "OK"
    assert goctl.go_body("not json at all\n") == "not json at all"


def test_invoked_as_ctl() -> None:
    assert goctl.invoked_as_ctl("/usr/local/bin/keystonectl")
    assert goctl.invoked_as_ctl("keystonectl")
    assert not goctl.invoked_as_ctl("/usr/local/bin/keystone")
    assert not goctl.invoked_as_ctl("/x/keystone/__main__.py")


def test_exit_codes_fold_into_gos() -> None:
    """Refused (3) and rolled back (4) are Go's failure (1); misuse stays 2."""
    assert [goctl.fold_exit(c) for c in (0, 1, 2, 3, 4)] == [0, 1, 2, 1, 1]


def test_every_go_command_is_listed_and_served() -> None:
    """keystonectl's help lists exactly Go's command set, and each one is a click command or
    runs in the keystone app."""
    listed = {name for _, rows in ctl.GROUPS for name, _ in rows}
    assert listed == goctl.GO_COMMANDS
    served = set(ctl.root.commands) | goctl.DELEGATED
    assert served == goctl.GO_COMMANDS


def test_connection_options_go_anywhere() -> None:
    assert goctl.split_connection(["--addr", "http://h:1", "components", "--token=t"]) == (
        {"addr": "http://h:1", "token": "t"},
        ["components"],
    )
    assert goctl.split_connection(["components", "--addr"]) is None
    assert goctl.first_command(["--ssh", "ops@edge", "restart", "api"]) == "restart"
    assert goctl.first_command(["--help"]) is None


# --- the Go agent's command line ------------------------------------------------------------

AGENT_LINES: list[tuple[list[str], list[str]]] = [
    # configs/systemd/keystone.service
    (["--http", "0.0.0.0:8080"], ["agent", "--http=0.0.0.0:8080"]),
    # demo/scripts/run-agent.sh, docs/adapters.md
    (["--http", ":8080"], ["agent", "--http=:8080"]),
    # CLAUDE.md, single dash, a boolean alone
    (["-http", ":8080", "-demo"], ["agent", "--http=:8080", "--demo"]),
    # Taskfile demo
    (
        ["--demo", "--http", "127.0.0.1:8080", "--insecure-skip-verify"],
        ["agent", "--demo", "--http=127.0.0.1:8080", "--insecure-skip-verify"],
    ),
    # -flag=value, -bool=false, the reconcile and token flags
    (
        ["-http=127.0.0.1:9", "-demo=false", "-api-token=s", "-reconcile-interval", "5m"],
        ["agent", "--http=127.0.0.1:9", "--api-token=s", "--reconcile-interval=5m"],
    ),
    # README: NATS only, no HTTP API
    (
        ["--http", "", "--nats-url", "nats://server:4222", "--nats-device-id", "edge-001"],
        ["agent", "--http=", "--nats-url=nats://server:4222", "--nats-device-id=edge-001"],
    ),
    # broker booleans keep their value for the broker parser
    (
        ["-mqtt-broker", "tcp://b:1883", "-mqtt-tls-verify=false", "-nats-jetstream"],
        ["agent", "--mqtt-broker=tcp://b:1883", "--mqtt-tls-verify=false", "--nats-jetstream=true"],
    ),
    # Go's flag takes the next argument as a value even when it starts with a dash
    (["-api-token", "-x-"], ["agent", "--api-token=-x-"]),
    # our own agent flags in the Go form, and -- ends the flags
    (
        ["-http", "127.0.0.1:1", "-config", "agent.toml", "--"],
        ["agent", "--http=127.0.0.1:1", "--config=agent.toml"],
    ),
    (["--apply", "plan.toml"], ["agent", "--apply=plan.toml"]),
    (["-http", "x", "-h"], ["agent", "--help"]),
    # the agent's help as the first argument, as Go's -h and -help
    (["-h"], ["agent", "--help"]),
    (["-help"], ["agent", "--help"]),
]


@pytest.mark.parametrize(("argv", "want"), AGENT_LINES)
def test_go_agent_lines(argv: list[str], want: list[str]) -> None:
    """Go's agent command lines are the agent's, flag for flag."""
    assert goagent.is_go_agent(argv)
    assert goagent.to_agent_argv(argv) == (want, False)


def test_version_flag() -> None:
    assert goagent.to_agent_argv(["-version"]) == (["agent"], True)
    assert goagent.to_agent_argv(["--http", "x", "--version=true"])[1] is True
    assert goagent.to_agent_argv(["--version=false", "--http", "x"])[1] is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-http"], "flag needs an argument: -http"),
        (["-http", "x", "-nope"], "flag provided but not defined: -nope"),
        (["-http", "x", "-c", "agent.toml"], "flag provided but not defined: -c"),
        (["-demo=maybe"], 'invalid boolean value "maybe" for -demo'),
        (["-http", "x", "---demo"], "bad flag syntax: ---demo"),
        (["-http", "x", "-=1"], "bad flag syntax: -=1"),
        (["-http", "x", "status"], "unexpected argument 'status'"),
        # a single-dash word first is Go's line too, not a cluster of click's short options
        (["-foo"], "flag provided but not defined: -foo"),
        (["-dry-run", "plan.toml"], "flag provided but not defined: -dry-run .*apply-dry"),
    ],
)
def test_go_agent_refusals(argv: list[str], message: str) -> None:
    """What Go's flag package refuses is refused, named as it names it."""
    assert goagent.is_go_agent(argv)
    with pytest.raises(goagent.GoFlagError, match=message.replace("(", r"\(")):
        goagent.to_agent_argv(argv)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["agent", "--http", "127.0.0.1:1"],
        ["--addr", "http://127.0.0.1:1", "status"],
        ["--runtime", "rt", "components"],
        ["--json", "status"],
        ["--help"],
        ["-c", "agent.toml"],
        ["status"],
    ],
)
def test_not_the_agent(argv: list[str]) -> None:
    """Subcommands, keystonectl's global options and help stay the CLI's."""
    assert not goagent.is_go_agent(argv)

"""``keystone agent`` read without typer: the same options, and typer for anything unsure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from keystone.cli.agentrun import AgentOptions, broker_flags, parse_agent_args
from keystone.errors import UsageError


class TestParse:
    def test_every_option_in_both_spellings(self) -> None:
        argv = [
            "--config", "a.toml", "--http=127.0.0.1:9", "--runtime", "/rt", "--labels", "x,y",
            "--device=d1", "--log-json", "--log-level", "debug", "--insecure-skip-verify",
            "--apply", "p.toml",
        ]  # fmt: skip
        assert parse_agent_args(argv, {}) == AgentOptions(
            config=Path("a.toml"),
            http="127.0.0.1:9",
            apply=Path("p.toml"),
            runtime=Path("/rt"),
            labels="x,y",
            device="d1",
            log_json=True,
            log_level="debug",
            insecure_skip_verify=True,
        )
        assert parse_agent_args(["-c", "b.toml", "--demo"], {}) == AgentOptions(
            config=Path("b.toml"), demo=True
        )
        assert parse_agent_args([], {}) == AgentOptions()

    def test_environment_defaults_as_typer_reads_them(self) -> None:
        env = {"KEYSTONE_RUNTIME": "/env-rt", "KEYSTONE_INSECURE_SKIP_VERIFY": "yes"}
        opts = parse_agent_args([], env)
        assert opts is not None and opts.runtime == Path("/env-rt") and opts.insecure_skip_verify
        opts = parse_agent_args(["--runtime", "/arg"], env)
        assert opts is not None and opts.runtime == Path("/arg")
        opts = parse_agent_args([], {"KEYSTONE_INSECURE_SKIP_VERIFY": "0"})
        assert opts is not None and not opts.insecure_skip_verify

    def test_broker_flags(self) -> None:
        opts = parse_agent_args(
            ["--mqtt-broker", "tcp://127.0.0.1:1883", "--nats-jetstream", "--http", "h"], {}
        )
        assert opts is not None and opts.http == "h"
        assert opts.flags == {"mqtt-broker": "tcp://127.0.0.1:1883", "nats-jetstream": "true"}

    @pytest.mark.parametrize(
        "argv",
        [
            ["--help"],
            ["--config"],
            ["--bogus"],
            ["stray"],
            ["--mqtt-nope", "x"],
            ["--mqtt-broker"],
            ["--demo", "--apply", "p.toml"],
            ["--no-demo"],
            ["-c=x"],
            ["--", "--config", "x"],
        ],
    )
    def test_anything_unsure_is_left_to_typer(self, argv: list[str]) -> None:
        """typer then prints the usage error exactly as before."""
        assert parse_agent_args(argv, {}) is None

    def test_a_bad_boolean_in_the_environment_is_left_to_typer(self) -> None:
        assert parse_agent_args([], {"KEYSTONE_INSECURE_SKIP_VERIFY": "maybe"}) is None

    def test_broker_flag_errors_name_the_flag(self) -> None:
        with pytest.raises(UsageError, match="--mqtt-nope"):
            broker_flags(["--mqtt-nope", "1"])
        with pytest.raises(UsageError, match="--mqtt-broker needs a value"):
            broker_flags(["--mqtt-broker"])


def test_the_agent_runs_without_typer_or_the_cli_client() -> None:
    """What the resident agent imports to read its command line: neither typer nor the API
    client of the CLI (run_agent is replaced at the boundary to look)."""
    code = (
        "import sys\n"
        "from keystone.cli import agentrun\n"
        "def look(opts, warn):\n"
        "    print(sorted(m for m in ('typer', 'click', 'keystone.client', 'keystone.cli.fast')"
        " if m in sys.modules), opts.http)\n"
        "    return 7\n"
        "agentrun.run_agent = look\n"
        "sys.argv = ['keystone', 'agent', '--http', '127.0.0.1:1']\n"
        "from keystone.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.strip() == "[] 127.0.0.1:1"


def test_agent_help_is_still_typer() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "keystone", "agent", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and "--config" in proc.stdout and "--http" in proc.stdout


def test_a_usage_error_is_typer_s() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "keystone", "agent", "--demo", "--apply", "x.toml"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "--demo and --apply are exclusive" in proc.stderr

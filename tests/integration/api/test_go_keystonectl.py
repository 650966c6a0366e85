"""The real ``keystonectl`` script against real agents, as a Go Keystone user's scripts run it:
its output parsed as JSON (and piped into jq as Go's README does), Go's exit codes (0, 1, 2),
help, completion and version; ``keystone`` under its own name keeps its tables and exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.integration.api.conftest import AgentProc, make_ca, make_leaf, pids

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
KEYSTONECTL = BIN / "keystonectl"
KEYSTONE = BIN / "keystone"


def run(
    program: Path, *args: str, agent: AgentProc | None, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed script, with the agent's address and runtime (for its token) in the
    environment, as an operator on the device has them."""
    assert program.exists(), f"{program} is not installed (pip install -e .)"
    base = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTONE_")}
    if agent is not None:
        base |= {"KEYSTONE_ADDR": agent.addr, "KEYSTONE_RUNTIME": str(agent.runtime)}
    return subprocess.run(
        [str(program), *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def ctl(
    *args: str, agent: AgentProc | None, cwd: Path, **kw: Any
) -> subprocess.CompletedProcess[str]:
    return run(KEYSTONECTL, *args, agent=agent, cwd=cwd, **kw)


def parsed(r: subprocess.CompletedProcess[str]) -> Any:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return json.loads(r.stdout)


class TestReads:
    def test_every_read_prints_the_agents_json(self, demo_agent: AgentProc) -> None:
        """components, status, health, graph, recipes, restart-dry: JSON, 2-space indented as
        Go prints it, equal to what the API answers."""
        d = demo_agent.cwd
        rows = parsed(ctl("components", agent=demo_agent, cwd=d))
        assert {c["name"]: c["pid"] for c in rows} == pids(demo_agent)
        status = parsed(ctl("status", agent=demo_agent, cwd=d))
        assert status == demo_agent.api("GET", "/v1/plan/status")[1] | {
            "components": status["components"]
        }
        assert parsed(ctl("health", agent=demo_agent, cwd=d))["status"] == "ok"
        graph = parsed(ctl("graph", agent=demo_agent, cwd=d))
        assert graph == demo_agent.api("GET", "/v1/plan/graph")[1]
        assert (
            parsed(ctl("recipes", agent=demo_agent, cwd=d))
            == demo_agent.api("GET", "/v1/recipes")[1]
        )
        dry = parsed(ctl("restart-dry", "cache", agent=demo_agent, cwd=d))
        assert dry == parsed(ctl("restart", "cache", "--dry", agent=demo_agent, cwd=d))
        assert "startOrder" in dry and "stopOrder" in dry
        out = ctl("components", agent=demo_agent, cwd=d).stdout
        assert out.startswith("[\n  {\n    ") and out.endswith("\n]\n")

    def test_our_own_commands_print_json_too(self, demo_agent: AgentProc) -> None:
        """history (a keystone command Go's keystonectl lacks) prints JSON under this name."""
        rows = parsed(ctl("history", agent=demo_agent, cwd=demo_agent.cwd))
        assert isinstance(rows, list) and rows
        r = ctl("history", "--help", agent=demo_agent, cwd=demo_agent.cwd)
        assert r.returncode == 0 and "history" in r.stdout

    def test_go_readme_jq_pipeline(self, demo_agent: AgentProc) -> None:
        """`keystonectl components | jq '.[] | select(.name=="db") | .pid'` prints db's pid."""
        want = pids(demo_agent)["db"]
        if shutil.which("jq"):
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("KEYSTONE_")},
                "KEYSTONE_ADDR": demo_agent.addr,
                "KEYSTONE_RUNTIME": str(demo_agent.runtime),
            }
            r = subprocess.run(
                ["bash", "-o", "pipefail", "-c",
                 f"{KEYSTONECTL} components | jq '.[] | select(.name==\"db\") | .pid'"],
                env=env, capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip
            assert int(r.stdout) == want
        rows = parsed(ctl("components", agent=demo_agent, cwd=demo_agent.cwd))
        assert [c["pid"] for c in rows if c["name"] == "db"] == [want]

    def test_global_flags_before_or_after_the_command(
        self, demo_agent: AgentProc, tmp_path: Path
    ) -> None:
        """--addr and --token go before or after the command, as Go's persistent flags."""
        token = demo_agent.token()
        for args in (
            ("--addr", demo_agent.addr, "--token", token, "components"),
            ("components", "--addr", demo_agent.addr, "--token", token),
            ("--addr", demo_agent.addr, "components", f"--token={token}"),
        ):
            rows = parsed(ctl(*args, agent=None, cwd=tmp_path))
            assert sorted(c["name"] for c in rows) == ["api", "cache", "db"]

    def test_keystone_keeps_its_tables_and_exit_codes(self, demo_agent: AgentProc) -> None:
        """Under its own name the program prints tables (--json for JSON) and our exit codes."""
        d = demo_agent.cwd
        r = run(KEYSTONE, "components", agent=demo_agent, cwd=d)
        assert r.returncode == 0 and "COMPONENT" in r.stdout
        assert {
            c["name"]
            for c in parsed(run(KEYSTONE, "components", "--json", agent=demo_agent, cwd=d))
        } == {"api", "cache", "db"}
        assert run(KEYSTONE, "stop", "no-such", agent=demo_agent, cwd=d).returncode == 2
        assert ctl("stop", "no-such", agent=demo_agent, cwd=d).returncode == 1


class TestExitCodes:
    @pytest.mark.parametrize(
        "args",
        [
            ("restart",),
            ("delete-recipe", "com.acme.api"),
            ("status", "extra"),
            ("components", "--no-such-flag"),
            ("no-such-command",),
            ("completion", "tcsh"),
        ],
    )
    def test_usage_is_2(self, demo_agent: AgentProc, args: tuple[str, ...]) -> None:
        """A wrong command line is 2, before any request."""
        r = ctl(*args, agent=demo_agent, cwd=demo_agent.cwd)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert r.stdout == ""

    def test_agent_errors_are_1(self, demo_agent: AgentProc, tmp_path: Path) -> None:
        """An error answer (404, 401) and no agent at all are 1, with `Error: ...` on stderr."""
        r = ctl("stop", "no-such", agent=demo_agent, cwd=tmp_path)
        assert r.returncode == 1 and r.stderr.startswith("Error: 404 Not Found: ")
        assert "no-such" in r.stderr and r.stdout == ""
        r = ctl("components", "--token", "wrong", agent=demo_agent, cwd=tmp_path)
        assert r.returncode == 1 and r.stderr.startswith("Error: 401 Unauthorized")
        down = f"http://127.0.0.1:{free_port()}"
        for args in (("components",), ("status",), ("restart", "api"), ("stop-plan",)):
            r = ctl(*args, "--addr", down, agent=None, cwd=tmp_path)
            assert r.returncode == 1, (args, r.stderr)
            assert r.stderr.startswith("Error: ") and "no agent answers" in r.stderr
        r = ctl("apply", "missing.toml", agent=demo_agent, cwd=tmp_path)
        assert r.returncode == 1 and "missing.toml" in r.stderr

    def test_verification_failure_is_1(self, tmp_path: Path) -> None:
        """sign then verify, with real keys: 0 against its CA, 1 against another CA."""
        make_ca(tmp_path, "ca")
        make_ca(tmp_path, "other")
        make_leaf(
            tmp_path,
            "signer",
            "ca",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n",
        )
        target = tmp_path / "app.recipe.toml"
        target.write_text('[metadata]\nname = "app"\nversion = "1.0.0"\n')
        r = ctl(
            "sign",
            str(target),
            "--key",
            "signer.key",
            "--cert",
            "signer.pem",
            agent=None,
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "app.recipe.toml.sig").is_file()
        ok = ctl(
            "verify",
            str(target),
            "--cert",
            "signer.pem",
            "--trust-bundle",
            "ca.pem",
            agent=None,
            cwd=tmp_path,
        )
        assert ok.returncode == 0, ok.stderr
        bad = ctl(
            "verify",
            str(target),
            "--cert",
            "signer.pem",
            "--trust-bundle",
            "other.pem",
            agent=None,
            cwd=tmp_path,
        )
        assert bad.returncode == 1, (bad.stdout, bad.stderr)
        target.write_text('[metadata]\nname = "app"\nversion = "6.6.6"\n')
        tampered = ctl(
            "verify",
            str(target),
            "--cert",
            "signer.pem",
            "--trust-bundle",
            "ca.pem",
            agent=None,
            cwd=tmp_path,
        )
        assert tampered.returncode == 1
        r = ctl("sha256", str(target), agent=None, cwd=tmp_path)
        assert r.returncode == 0 and len(r.stdout.strip()) == 64


class TestSelfDocumenting:
    def test_help_version_and_completion(self, tmp_path: Path) -> None:
        """help lists Go's groups; help <cmd> names the endpoint; version; completion scripts
        for bash, zsh and fish, and bash really completes from the one it printed."""
        out = ctl("help", agent=None, cwd=tmp_path)
        assert out.returncode == 0
        for group in (
            "Plan:",
            "Components:",
            "Recipes:",
            "Agent:",
            "Local tools:",
            "KEYSTONE_ADDR",
        ):
            assert group in out.stdout
        assert ctl(agent=None, cwd=tmp_path).stdout == out.stdout  # no command: the same help
        one = ctl("help", "restart", agent=None, cwd=tmp_path)
        assert one.returncode == 0 and "Calls POST /v1/components/{name}:restart." in one.stdout
        assert one.stdout == ctl("restart", "--help", agent=None, cwd=tmp_path).stdout
        for args in (("version",), ("--version",)):
            r = ctl(*args, agent=None, cwd=tmp_path)
            assert r.returncode == 0 and r.stdout.startswith("keystonectl version ")
        assert ctl("completion", "zsh", agent=None, cwd=tmp_path).stdout.startswith(
            "#compdef keystonectl"
        )
        assert (
            "complete --no-files --command keystonectl"
            in ctl("completion", "fish", agent=None, cwd=tmp_path).stdout
        )
        script = ctl("completion", "bash", agent=None, cwd=tmp_path)
        assert script.returncode == 0
        (tmp_path / "completion.bash").write_text(script.stdout)
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        r = subprocess.run(
            ["bash", "-c",
             "source completion.bash; COMP_WORDS=(keystonectl rest); COMP_CWORD=1; "
             "_keystonectl_completion keystonectl; echo \"${COMPREPLY[@]}\""],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert r.stdout.split() == ["restart", "restart-dry"]


def write_producer_plan(root: Path) -> Path:
    """Go's README example: a component named producer, from a recipe file beside the plan."""
    (root / "producer.recipe.toml").write_text(
        '[metadata]\nname = "com.demo.producer"\nversion = "1.0.0"\n'
        '[lifecycle.run]\nrestart_policy = "always"\n'
        '[lifecycle.run.exec]\ncommand = "sleep"\nargs = ["3600"]\n'
    )
    plan = root / "plan.toml"
    plan.write_text('[[components]]\nname = "producer"\nrecipe = "producer.recipe.toml"\n')
    return plan


class TestChanges:
    def test_apply_stop_and_stop_plan(self, make_agent: Any, tmp_path: Path) -> None:
        """apply waits for the deployment and prints the agent's answer; the producer's pid is
        then where Go's README looks for it; stop and stop-plan print OK (204); a plan the agent
        refuses is 1."""
        agent = make_agent().start()
        plan = write_producer_plan(tmp_path)
        applied = parsed(ctl("apply", str(plan), agent=agent, cwd=tmp_path))
        assert applied["result"] == "ok"
        assert applied["uploaded"] == ["com.demo.producer:1.0.0"]
        rows = parsed(ctl("components", agent=agent, cwd=tmp_path))
        pid = [c["pid"] for c in rows if c["name"] == "producer"]
        assert pid == [agent.components()["producer"]["pid"]] and pid[0] > 0
        dry = parsed(ctl("apply-dry", str(plan), agent=agent, cwd=tmp_path))
        assert "result" not in dry  # a dry run deploys nothing, so nothing is waited for
        assert agent.components()["producer"]["pid"] == pid[0]
        r = ctl("stop", "producer", agent=agent, cwd=tmp_path)
        assert (r.returncode, r.stdout) == (0, "OK\n")
        r = ctl("stop-plan", agent=agent, cwd=tmp_path)
        assert (r.returncode, r.stdout) == (0, "OK\n")
        bad = tmp_path / "bad.toml"
        bad.write_text('[[components]]\nname = "x"\nrecipe = 3\n')
        r = ctl("apply", str(bad), agent=agent, cwd=tmp_path)
        assert r.returncode == 1 and "bad.toml:3" in r.stderr and r.stdout == ""

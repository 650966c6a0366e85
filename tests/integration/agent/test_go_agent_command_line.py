"""The Go agent's command lines start this agent: its systemd unit's ExecStart, its README's and
Taskfile's and demo scripts' lines, written here as they are written there (Go's binary path
replaced by ours, and, since tests bind loopback only, every address by 127.0.0.1:<free port>).
The agent answers /healthz where the line says, with the meaning the flags have in Go."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, wait_until
from tests.integration.agent.conftest import AgentProc, stop_agents

pytestmark = pytest.mark.integration

KEYSTONE = Path(sys.executable).parent / "keystone"
DEMO = ("db", "cache", "api")


class GoLine:
    """Starts Go command lines in ``tmp_path`` (the agent's working directory, so its runtime is
    ``./runtime`` as Go's is); every agent and its components are stopped at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.agents: list[AgentProc] = []

    def start(
        self, line: str, *, env: dict[str, str] | None = None, wait: bool = True
    ) -> AgentProc:
        port = free_port()
        argv = shlex.split(line.format(port=port))
        assert argv[0].endswith("keystone"), argv
        argv[0] = str(KEYSTONE)
        cwd = self.root / f"agent-{len(self.agents)}"
        cwd.mkdir(exist_ok=True)
        agent = AgentProc(cwd, cwd / "runtime", port, argv[1:], env or {})
        agent.log = cwd / "agent.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTONE_")}
        demo = {f"DEMO_{n.upper()}_PORT": str(free_port()) for n in DEMO}
        with agent.log.open("wb") as out:
            agent.proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env={**base, **demo, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.agents.append(agent)
        if wait:
            wait_until(
                lambda: agent.healthz() is not None or agent.exited(), timeout=30, what="/healthz"
            )
            assert not agent.exited(), agent.output()
        return agent


@pytest.fixture
def go_line(tmp_path: Path) -> Iterator[GoLine]:
    lines = GoLine(tmp_path)
    yield lines
    stop_agents(lines.agents)


def get(agent: AgentProc, path: str, token: str | None) -> tuple[int, Any]:
    req = urllib.request.Request(
        agent.addr + path, headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


def wait_healthy(agent: AgentProc, token: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        status, rows = get(agent, "/v1/components", token)
        by = {c["name"]: c for c in rows or []} if status == 200 else {}
        return by if all(by.get(n, {}).get("last_health") == "healthy" for n in DEMO) else None

    return wait_until(check, timeout=60, what="demo components healthy")


def test_systemd_unit_exec_start(go_line: GoLine) -> None:
    """configs/systemd/keystone.service: ExecStart=/opt/keystone/bin/keystone --http 0.0.0.0:8080
    with KEYSTONE_API_TOKEN from its EnvironmentFile."""
    line = "/opt/keystone/bin/keystone --http 0.0.0.0:8080".replace(
        "0.0.0.0:8080", "127.0.0.1:{port}"
    )
    agent = go_line.start(line, env={"KEYSTONE_API_TOKEN": "from-the-env-file"})
    assert agent.healthz()["status"] == "ok"  # type: ignore[index]
    assert get(agent, "/v1/components", None)[0] == 401
    assert get(agent, "/v1/components", "from-the-env-file") == (200, [])


def test_readme_line_keeps_our_generated_token(go_line: GoLine) -> None:
    """README: ./keystone --http 127.0.0.1:8080. Without a token, Go's API is open on loopback;
    ours generates one (runtime/api.token, 0600) that the local CLI reads."""
    agent = go_line.start("./keystone --http 127.0.0.1:{port}")
    assert get(agent, "/v1/components", None)[0] == 401
    token = agent.token()
    assert (agent.runtime / "api.token").stat().st_mode & 0o077 == 0
    assert get(agent, "/v1/components", token) == (200, [])


@pytest.mark.parametrize(
    "line",
    [
        # Taskfile.yml, task demo
        "go run ./cmd/keystone --demo --http 127.0.0.1:{port} --insecure-skip-verify",
        # CLAUDE.md's single-dash form (there with -http :8080)
        "./keystone -http 127.0.0.1:{port} -demo",
    ],
)
def test_demo_lines(go_line: GoLine, line: str) -> None:
    """The demo lines, with two dashes or one: the built-in stack runs and is healthy."""
    agent = go_line.start(line.replace("go run ./cmd/keystone", "keystone"))
    wait_healthy(agent, agent.token())
    if "insecure" in line:
        assert "verification is DISABLED" in agent.output()


def test_go_flag_forms_and_the_token_flag(go_line: GoLine) -> None:
    """-flag=value, -api-token (which wins over KEYSTONE_API_TOKEN), the reconcile and clock
    flags."""
    agent = go_line.start(
        "keystone -http=127.0.0.1:{port} -demo=true -api-token=s3cret "
        "-reconcile-interval=1m -reconcile-jitter 0s -clock-policy=high-water",
        env={"KEYSTONE_API_TOKEN": "loses-to-the-flag"},
    )
    wait_healthy(agent, "s3cret")
    assert get(agent, "/v1/components", "loses-to-the-flag")[0] == 401
    assert not (agent.runtime / "api.token").exists()


def test_http_empty_runs_without_the_api(go_line: GoLine) -> None:
    """README: ./keystone --http "" ...: no HTTP API; the agent runs and stops on SIGTERM."""
    agent = go_line.start('keystone --http "" --demo', wait=False)
    wait_until(lambda: "agent ready" in agent.output() or agent.exited(), timeout=60, what="ready")
    assert not agent.exited(), agent.output()
    assert "HTTP API disabled" in agent.output() and agent.healthz() is None
    assert agent.stop(signal.SIGTERM) == 0


def test_all_interfaces_without_a_token_is_refused(go_line: GoLine) -> None:
    """demo/scripts/run-agent.sh: keystone --http :8080. Go refuses that without a token, and so
    does this agent, naming how to give one; nothing is started."""
    agent = go_line.start("keystone --http :{port}", wait=False)
    assert agent.proc is not None
    assert agent.proc.wait(30) == 2
    out = agent.output()
    assert "KEYSTONE_API_TOKEN" in out and "--api-token" in out
    assert not (agent.runtime / "state" / "agent.json").exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("keystone -http", "flag needs an argument: -http"),
        ("keystone -http 127.0.0.1:{port} -no-such", "flag provided but not defined: -no-such"),
        ("keystone -demo=maybe", 'invalid boolean value "maybe" for -demo'),
        ("keystone -no-such", "flag provided but not defined: -no-such"),
        ("keystone -dry-run", "flag provided but not defined: -dry-run"),
        ("keystone --http 127.0.0.1:{port} --clock-policy sometimes", "high-water or strict"),
        ("keystone --http 127.0.0.1:{port} --reconcile-interval soon", "invalid duration"),
    ],
)
def test_bad_lines_are_usage_errors(go_line: GoLine, line: str, message: str) -> None:
    """What Go's flag package refuses is refused with exit 2, naming the flag."""
    agent = go_line.start(line, wait=False)
    assert agent.proc is not None
    assert agent.proc.wait(30) == 2
    assert message in agent.output()


def test_help_flags_print_the_agents_help(tmp_path: Path) -> None:
    """Go's -h and -help, first on the line, print the agent's flags and start nothing."""
    for flag in ("-h", "-help"):
        r = subprocess.run(
            [str(KEYSTONE), flag], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert r.returncode == 0, r.stderr
        assert "keystone agent" in r.stdout and "--http" in r.stdout
    assert not (tmp_path / "runtime").exists()


def test_version(tmp_path: Path) -> None:
    """README: keystone --version prints the version and exits 0."""
    for flag in ("--version", "-version"):
        r = subprocess.run(
            [str(KEYSTONE), flag], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert r.returncode == 0 and r.stdout.startswith("keystone ")


UNSIGNED = '[metadata]\nname = "app"\nversion = "1.0.0"\n[lifecycle.run.exec]\ncommand = "sleep"\nargs = ["3600"]\n'


@pytest.mark.parametrize(
    ("line", "env"),
    [
        ("keystone --http 127.0.0.1:{port} --apply plan.toml --insecure-skip-verify", {}),
        (
            "keystone -http 127.0.0.1:{port} -apply plan.toml",
            {"KEYSTONE_INSECURE_SKIP_VERIFY": "true"},
        ),
    ],
)
def test_insecure_skip_verify_means_what_it_means_in_go(
    go_line: GoLine, tmp_path: Path, line: str, env: dict[str, str]
) -> None:
    """With a trust bundle, an unsigned recipe file is refused; --insecure-skip-verify (or
    KEYSTONE_INSECURE_SKIP_VERIFY=true) lets it run, loudly."""
    from tests.integration.api.conftest import make_ca

    make_ca(tmp_path, "ca")
    trust = {"KEYSTONE_TRUST_BUNDLE": str(tmp_path / "ca.pem")}

    def prepare(agent_dir: Path) -> None:
        agent_dir.mkdir(exist_ok=True)
        (agent_dir / "app.recipe.toml").write_text(UNSIGNED)
        (agent_dir / "plan.toml").write_text(
            '[[components]]\nname = "app"\nrecipe = "app.recipe.toml"\n'
        )

    prepare(go_line.root / f"agent-{len(go_line.agents)}")
    refused = go_line.start(
        "keystone --http 127.0.0.1:{port} --apply plan.toml", env=trust, wait=False
    )
    assert refused.proc is not None and refused.proc.wait(60) != 0
    assert "app.recipe.toml" in refused.output()

    prepare(go_line.root / f"agent-{len(go_line.agents)}")
    agent = go_line.start(line, env={**trust, **env})
    assert "verification is DISABLED" in agent.output()
    wait_until(
        lambda: any(
            c["name"] == "app" and c.get("pid")
            for c in get(agent, "/v1/components", agent.token())[1] or []
        ),
        timeout=30,
        what="app running",
    )
    assert "signature NOT verified" in agent.output()

"""Every keystonectl command against a running agent, its tables, --json and exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, wait_until
from tests.integration.api.conftest import DEMO, AgentProc, demo_env, pids, write_sleep_plan

pytestmark = pytest.mark.integration


def keystone(
    *args: str, cwd: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, with exactly ``env`` on top of a clean environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTONE_")}
    return subprocess.run(
        [sys.executable, "-m", "keystone", *args],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def as_json(r: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(r))


class TestReadCommands:
    def test_status_table_and_json(self, demo_agent: AgentProc) -> None:
        """status prints health, plan and a components table; --json the same as one object."""
        out = ok(demo_agent.cli("status"))
        assert "agent ok" in out and "COMPONENT" in out and "STATE" in out
        for name in DEMO:
            assert any(
                line.split()[:3] == [name, "running", "healthy"] for line in out.splitlines()
            )
        data = as_json(demo_agent.cli("status", "--json"))
        assert data["health"]["status"] == "ok"
        assert sorted(c["name"] for c in data["components"]) == sorted(DEMO)

    def test_components_and_health(self, demo_agent: AgentProc) -> None:
        """components lists pids the agent reports; health needs no token."""
        rows = as_json(demo_agent.cli("components", "--json"))
        assert {c["name"]: c["pid"] for c in rows} == pids(demo_agent)
        assert "COMPONENT" in ok(demo_agent.cli("components"))
        env = {"KEYSTONE_ADDR": demo_agent.addr, "KEYSTONE_RUNTIME": str(demo_agent.cwd / "none")}
        r = keystone("health", "--json", cwd=demo_agent.cwd, env=env)
        assert as_json(r)["status"] == "ok"
        assert "agent ok" in ok(keystone("health", cwd=demo_agent.cwd, env=env))

    def test_graph_text_and_dot(self, demo_agent: AgentProc) -> None:
        """graph prints the start layers; --format dot a Graphviz digraph with the edges."""
        out = ok(demo_agent.cli("graph"))
        assert "layer 0: db" in out and "layer 1: cache" in out and "layer 2: api" in out
        dot = ok(demo_agent.cli("graph", "--format", "dot"))
        assert dot.startswith("digraph") and dot.rstrip().endswith("}")
        assert '"db" -> "cache"' in dot and '"cache" -> "api"' in dot
        assert as_json(demo_agent.cli("graph", "--json"))["order"] == ["db", "cache", "api"]
        assert demo_agent.cli("graph", "--format", "png").returncode == 2

    def test_restart_dry_changes_nothing(self, demo_agent: AgentProc) -> None:
        """restart --dry and restart-dry print the orders and restart nothing."""
        before = pids(demo_agent)
        for args in (("restart", "cache", "--dry"), ("restart", "cache", "--dry-run")):
            out = ok(demo_agent.cli(*args))
            assert "stop:  api\n" in out and "start: cache -> api" in out
        data = as_json(demo_agent.cli("restart-dry", "cache", "--json"))
        assert data == {"stopOrder": ["api"], "startOrder": ["cache", "api"]}
        assert pids(demo_agent) == before

    def test_version_and_recipes(self, demo_agent: AgentProc) -> None:
        """version prints the CLI version; recipes the (empty) store."""
        from keystone import __version__

        assert __version__ in ok(demo_agent.cli("version"))
        assert as_json(demo_agent.cli("recipes", "--json")) == []
        assert "no recipes" in ok(demo_agent.cli("recipes"))


class TestConnectionOptions:
    def test_addr_token_flags_beat_the_environment(self, demo_agent: AgentProc) -> None:
        """--addr and --token beat KEYSTONE_ADDR and KEYSTONE_API_TOKEN."""
        wrong = {
            "KEYSTONE_ADDR": f"http://127.0.0.1:{free_port()}",
            "KEYSTONE_API_TOKEN": "wrong",
        }
        args = ("--addr", demo_agent.addr, "--token", demo_agent.token(), "--json")
        r = keystone("components", *args, cwd=demo_agent.cwd, env=wrong)
        assert len(as_json(r)) == len(DEMO)

    def test_environment_and_token_file(self, demo_agent: AgentProc) -> None:
        """KEYSTONE_ADDR with the token from KEYSTONE_RUNTIME/api.token, or KEYSTONE_API_TOKEN."""
        env = {"KEYSTONE_ADDR": demo_agent.addr, "KEYSTONE_RUNTIME": str(demo_agent.runtime)}
        assert len(as_json(keystone("components", "--json", cwd=demo_agent.cwd, env=env))) == 3
        env = {"KEYSTONE_ADDR": demo_agent.addr, "KEYSTONE_API_TOKEN": demo_agent.token()}
        assert len(as_json(keystone("components", "--json", cwd=demo_agent.cwd, env=env))) == 3

    def test_wrong_token_is_refused_with_advice(self, demo_agent: AgentProc) -> None:
        """A wrong token exits 2 (misuse) and says how to pass the right one."""
        r = keystone(
            "components",
            cwd=demo_agent.cwd,
            env={"KEYSTONE_ADDR": demo_agent.addr, "KEYSTONE_API_TOKEN": "wrong"},
        )
        assert r.returncode == 2, r.stderr
        assert "token" in r.stderr

    def test_no_agent_says_how_to_start_one(self, tmp_path: Path) -> None:
        """With no agent answering, the CLI exits 1 and says how to start one."""
        env = {"KEYSTONE_ADDR": f"http://127.0.0.1:{free_port()}"}
        for cmd in ("status", "components", "reconcile", "stop-plan"):
            r = keystone(cmd, cwd=tmp_path, env=env)
            assert r.returncode == 1, (cmd, r.stderr)
            assert "no agent answers" in r.stderr and "keystone agent" in r.stderr

    def test_ssh_that_cannot_connect_is_unreachable(self, tmp_path: Path) -> None:
        """--ssh (and KEYSTONE_SSH) go through the real ssh client; a dead host exits 1."""
        dead = f"127.0.0.1:{free_port()}"
        r = keystone("status", "--ssh", dead, cwd=tmp_path, env={"HOME": str(tmp_path)})
        assert r.returncode == 1, r.stderr
        assert "ssh" in r.stderr
        r = keystone("status", cwd=tmp_path, env={"HOME": str(tmp_path), "KEYSTONE_SSH": dead})
        assert r.returncode == 1 and "ssh" in r.stderr

    def test_unknown_component_is_misuse(self, demo_agent: AgentProc) -> None:
        """stop and restart of a component that is not in the plan exit 2 and change nothing."""
        before = pids(demo_agent)
        for cmd in ("stop", "restart"):
            r = demo_agent.cli(cmd, "ghost")
            assert r.returncode == 2, r.stderr
            assert "ghost" in r.stderr
        r = demo_agent.cli("stop", "ghost", "--json")
        assert json.loads(r.stdout)["status"] == 404
        assert pids(demo_agent) == before


class TestChangingCommands:
    def test_stop_restart_apply_recipes_reconcile_stop_plan(
        self, make_agent: Any, tmp_path: Path
    ) -> None:
        """stop, restart --wait/--timeout, upload-recipe, delete-recipe, apply-dry, apply,
        reconcile and stop-plan each do what they say and exit 0."""
        agent = make_agent("--demo", env=demo_env()).start()
        agent.wait_states(dict.fromkeys(DEMO, "healthy"))
        before = pids(agent)

        assert "stopped api" in ok(agent.cli("stop", "api"))
        assert agent.components()["api"]["state"] == "stopped"
        data = as_json(agent.cli("restart", "api", "--wait", "pid", "--timeout", "30s", "--json"))
        assert data["component"] == "api" and data["pid"] not in (0, before["api"])
        out = ok(agent.cli("restart", "cache", "--wait", "health", "--timeout", "60s"))
        assert "restarted cache" in out and "api" in out
        agent.wait_states(dict.fromkeys(DEMO, "healthy"))
        assert pids(agent)["db"] == before["db"] and pids(agent)["cache"] != before["cache"]
        assert agent.cli("restart", "db", "--wait", "forever").returncode == 2

        write_sleep_plan(tmp_path, 2, prefix="w")
        recipe = tmp_path / "w00.recipe.toml"
        assert "stored w00:1.0.0" in ok(agent.cli("upload-recipe", str(recipe)))
        r = agent.cli("upload-recipe", str(recipe))
        assert r.returncode == 2 and "w00" in r.stderr  # 409: stored already
        ok(agent.cli("upload-recipe", str(recipe), "--force"))
        listed = as_json(agent.cli("recipes", "--json"))
        assert [(x["name"], x["sha256"]) for x in listed] == [
            ("w00", hashlib.sha256(recipe.read_bytes()).hexdigest())
        ]
        assert "deleted w00:1.0.0" in ok(agent.cli("delete-recipe", "w00", "1.0.0"))
        assert agent.cli("delete-recipe", "w00", "1.0.0").returncode == 2

        dry = as_json(agent.cli("apply-dry", "plan.toml", "--json"))
        assert dry["layers"] == [["w00", "w01"]]
        assert {(a["action"], a["component"]) for a in dry["actions"]} >= {
            ("start", "w00"),
            ("stop", "db"),
        }
        assert "ACTION" in ok(agent.cli("apply", "plan.toml", "--dry"))
        assert pids(agent)["db"] == before["db"]

        out = ok(agent.cli("apply", "plan.toml"))
        assert "result: ok" in out
        comps = agent.wait_states({"w00": "healthy", "w01": "healthy"})
        assert set(comps) == {"w00", "w01"}

        assert "repaired" in ok(agent.cli("reconcile"))
        assert "plan stopped" in ok(agent.cli("stop-plan"))
        assert {c["state"] for c in agent.components().values()} == {"stopped"}
        assert as_json(agent.cli("status", "--json"))["status"] == "stopped"


class TestExitCodes:
    def test_invalid_plan_exits_3(self, demo_agent: AgentProc, tmp_path: Path) -> None:
        """A plan with a dependency cycle is refused by validation: exit 3, nothing changes."""
        for name, dep in (("a", "b"), ("b", "a")):
            (tmp_path / f"{name}.recipe.toml").write_text(
                f'[metadata]\nname = "{name}"\nversion = "1"\n[[dependencies]]\nname = "{dep}"\n'
                '[lifecycle.run.exec]\ncommand = "sleep"\nargs = ["300"]\n'
            )
        (tmp_path / "cycle.toml").write_text(
            '[[components]]\nname = "a"\nrecipe = "a.recipe.toml"\n'
            '[[components]]\nname = "b"\nrecipe = "b.recipe.toml"\n'
        )
        before = pids(demo_agent)
        env = {"KEYSTONE_ADDR": demo_agent.addr, "KEYSTONE_RUNTIME": str(demo_agent.runtime)}
        r = keystone("apply", str(tmp_path / "cycle.toml"), cwd=tmp_path, env=env)
        assert r.returncode == 3, r.stderr
        assert "cycle" in r.stderr
        assert pids(demo_agent) == before

    def test_failed_deployment_exits_4(self, make_agent: Any, tmp_path: Path) -> None:
        """A plan whose component cannot start is rolled back: apply exits 4, the old one runs."""
        write_sleep_plan(tmp_path, 1, prefix="ok")
        agent = make_agent("--apply", str(tmp_path / "plan.toml")).start()
        old = agent.wait_states({"ok00": "healthy"})["ok00"]["pid"]
        (tmp_path / "bad.recipe.toml").write_text(
            '[metadata]\nname = "bad"\nversion = "1.0.0"\n'
            '[lifecycle.run]\nrestart_policy = "never"\n'
            '[lifecycle.run.exec]\ncommand = "false"\n'
            '[lifecycle.run.health]\ncheck = "cmd:false"\ninterval = "100ms"\n'
        )
        (tmp_path / "bad.toml").write_text(
            '[[components]]\nname = "ok00"\nrecipe = "ok00.recipe.toml"\n'
            '[[components]]\nname = "bad"\nrecipe = "bad.recipe.toml"\n'
        )
        r = agent.cli("apply", "bad.toml", "--timeout", "60s")
        assert r.returncode == 4, (r.stdout, r.stderr)
        assert "rolled-back" in r.stdout
        wait_until(lambda: "bad" not in agent.components(), timeout=30, what="rollback")
        assert agent.components()["ok00"]["pid"] == old


class TestLocalTools:
    def test_sha256_sign_verify(self, tmp_path: Path) -> None:
        """sha256 matches hashlib; sign writes a signature that verify accepts against the
        certificate and its CA, and a changed file is refused with exit 3."""
        env: dict[str, str] = {}
        data = tmp_path / "artifact.bin"
        data.write_bytes(os.urandom(4096))
        r = keystone("sha256", str(data), cwd=tmp_path, env=env)
        assert ok(r).strip() == hashlib.sha256(data.read_bytes()).hexdigest()

        def run(*args: str) -> None:
            subprocess.run(args, cwd=tmp_path, check=True, capture_output=True, timeout=60)

        run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
        run(
            "openssl", "req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=CA", "-days", "2",
            "-out", "ca.pem", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "leaf.key")
        run("openssl", "req", "-new", "-key", "leaf.key", "-subj", "/CN=signer", "-out", "leaf.csr")
        (tmp_path / "leaf.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=codeSigning\n"
        )
        run(
            "openssl", "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", "leaf.pem", "-extfile", "leaf.ext",
        )  # fmt: skip

        r = keystone(
            "sign", str(data), "--key", "leaf.key", "--cert", "leaf.pem", cwd=tmp_path, env=env
        )
        ok(r)
        sig = tmp_path / "artifact.bin.sig"
        assert sig.is_file()
        # openssl agrees that it is a signature over the file's SHA-256.
        run("openssl", "x509", "-in", "leaf.pem", "-pubkey", "-noout", "-out", "leaf.pub")
        run("openssl", "dgst", "-sha256", "-verify", "leaf.pub", "-signature", str(sig), str(data))

        args = ("verify", str(data), "--cert", "leaf.pem", "--trust-bundle", "ca.pem")
        assert "signer" in ok(keystone(*args, cwd=tmp_path, env=env))
        assert as_json(keystone(*args, "--json", cwd=tmp_path, env=env))["ok"] is True
        data.write_bytes(data.read_bytes() + b"x")
        r = keystone(*args, cwd=tmp_path, env=env)
        assert r.returncode == 3, (r.stdout, r.stderr)

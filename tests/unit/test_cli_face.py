"""The CLI's shared face (keystone.cli.common, keystone.cli.session): the options every command
takes, declared once and resolved into one Session; the error and exit-code mapping; and the
layering of the package (groups side by side, nothing below the CLI importing it, a fast path
without typer)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

import keystone
from keystone.cli import views
from keystone.cli.common import add_commands, command
from keystone.cli.session import ExitCode, Output, Session, exit_for
from keystone.errors import (
    AgentUnreachable,
    DeploymentFailed,
    KeystoneError,
    Refused,
    UsageError,
    ValidationError,
)
from tests.conftest import free_port

PACKAGE = Path(keystone.__file__).parent
GROUPS = ("agent", "control", "gitops", "fleet")
CLEAN_ENV: dict[str, str | None] = {
    "KEYSTONE_ADDR": None,
    "KEYSTONE_API_TOKEN": None,
    "KEYSTONE_SSH": None,
    "KEYSTONE_RUNTIME": None,
}


class Recorder:
    """Commands that remember the invocation they were given, or fail as told."""

    def __init__(self) -> None:
        self.seen: list[tuple[Output, str]] = []
        self.app = typer.Typer()

        @command(connect=True)
        def remote(
            session: Session,
            name: Annotated[str, typer.Argument(help="a name")],
            loud: Annotated[bool, typer.Option("--loud")] = False,
        ) -> None:
            """A command that talks to the agent."""
            self.seen.append((session, name + ("!" if loud else "")))
            session.emit({"name": name}, lambda d: f"hello {d['name']}")

        @command(connect=False)
        def local(output: Output) -> None:
            """A local tool."""
            self.seen.append((output, ""))

        @command(connect=False)
        def refuse(output: Output) -> None:
            """Fails as a validation error does."""
            raise ValidationError("no good", file="plan.toml")

        @command(connect=True, json_errors=False)
        def unreachable(session: Session) -> None:
            """Fails as a missing agent does, leaving the report to the app."""
            raise AgentUnreachable("nobody home")

        add_commands(
            self.app,
            None,
            (
                ("remote", remote),
                ("local", local),
                ("refuse", refuse),
                ("unreachable", unreachable),
            ),
        )

    def invoke(self, *args: str, env: dict[str, str] | None = None) -> typer.testing.Result:
        return CliRunner().invoke(self.app, list(args), env={**CLEAN_ENV, **(env or {})})


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


class TestSharedOptions:
    def test_resolved_once_into_a_session(self, rec: Recorder) -> None:
        """The connection options and --json arrive as one Session; the command's own
        arguments and options arrive as before."""
        r = rec.invoke(
            "remote", "x", "--loud", "--addr", "http://h:1", "--token", "t", "--ssh", "edge",
            "--runtime", "/r", "--json",
        )  # fmt: skip
        assert r.exit_code == 0, (r.stdout, r.stderr)
        assert rec.seen == [
            (
                Session(as_json=True, addr="http://h:1", token="t", ssh="edge", runtime=Path("/r")),
                "x!",
            )
        ]
        assert json.loads(r.stdout) == {"name": "x"}

    def test_environment_and_defaults(self, rec: Recorder) -> None:
        """The options read their environment variables; unset, they are None and tables."""
        env = {"KEYSTONE_ADDR": "http://e:2", "KEYSTONE_API_TOKEN": "tok", "KEYSTONE_SSH": "gw"}
        r = rec.invoke("remote", "y", env={**env, "KEYSTONE_RUNTIME": "/rt"})
        assert r.stdout == "hello y\n"
        assert rec.seen[-1][0] == Session(
            addr="http://e:2", token="tok", ssh="gw", runtime=Path("/rt")
        )
        rec.invoke("remote", "z")
        assert rec.seen[-1][0] == Session()

    def test_help_lists_own_options_first(self, rec: Recorder) -> None:
        """--help keeps the command's docstring and lists the shared options after its own."""
        out = rec.invoke("remote", "--help", env={"COLUMNS": "200"}).stdout
        assert "A command that talks to the agent." in out
        listed = [line.strip("│ ").split()[0] for line in out.splitlines() if "│ --" in line]
        assert listed == ["--loud", "--addr", "--token", "--ssh", "--runtime", "--json", "--help"]
        for var in ("KEYSTONE_ADDR", "KEYSTONE_API_TOKEN", "KEYSTONE_SSH", "KEYSTONE_RUNTIME"):
            assert var in out

    def test_local_tools_take_only_json(self, rec: Recorder) -> None:
        """A local tool gets an Output (--json) and no connection options."""
        out = rec.invoke("local", "--help", env={"COLUMNS": "200"}).stdout
        assert "--json" in out and "--addr" not in out
        assert rec.invoke("local", "--json").exit_code == 0
        assert rec.seen == [(Output(as_json=True), "")]
        assert rec.invoke("local", "--addr", "x").exit_code == 2


class TestErrors:
    def test_reported_with_their_exit_code(self, rec: Recorder) -> None:
        """An error is `error: ...` on stderr and its exit code; with --json also JSON."""
        r = rec.invoke("refuse")
        assert r.exit_code == 3 and r.stdout == ""
        assert r.stderr.startswith("error: ") and "no good" in r.stderr
        r = rec.invoke("refuse", "--json")
        assert r.exit_code == 3
        assert json.loads(r.stdout) | {"error": ""} == {
            "error": "",
            "kind": "refused",
            "status": None,
            "exit_code": 3,
        }

    def test_left_to_the_app_when_asked(self, rec: Recorder) -> None:
        """json_errors=False lets the error reach the app's handler untouched."""
        r = rec.invoke("unreachable", "--json")
        assert isinstance(r.exception, AgentUnreachable) and r.stdout == ""


class TestExitCodes:
    @pytest.mark.parametrize(
        ("error", "code"),
        [
            (KeystoneError, ExitCode.FAILED),
            (AgentUnreachable, ExitCode.FAILED),
            (UsageError, ExitCode.MISUSE),
            (Refused, ExitCode.REFUSED),
            (ValidationError, ExitCode.REFUSED),
            (DeploymentFailed, ExitCode.ROLLED_BACK),
        ],
    )
    def test_errors_agree(self, error: type[KeystoneError], code: ExitCode) -> None:
        """The error tree's exit codes are the CLI's."""
        assert error.exit_code == code

    @pytest.mark.parametrize(
        ("result", "code"),
        [
            ("ok", 0), ("applied", 0), ("up-to-date", 0), ("dry-run", 0),
            ("rolled-back", 4), ("refused", 3), ("known-bad", 3),
            ("unreachable", 1), ("error", 1), ("something new", 1), (None, 1),
        ],
    )  # fmt: skip
    def test_outcomes(self, result: object, code: int) -> None:
        """An outcome the agent reports maps to one exit code; an unknown one is a failure."""
        assert exit_for(result) == code


class TestViews:
    def test_sync_text(self) -> None:
        """A sync: result, revision, signer, changes (none when nothing moved), time taken."""
        d = {
            "result": "applied",
            "revision": "b" * 40,
            "previous": "a" * 40,
            "signer": "ops@example.com",
            "fingerprint": "SHA256:x",
            "changes": {"added": ["api"], "changed": [], "restarted": [], "removed": ["old"]},
            "duration": 1.5,
        }
        assert views.sync_text(d).splitlines() == [
            "result:    applied",
            f"revision:  {'b' * 40}",
            f"previous:  {'a' * 40}",
            "signer:    ops@example.com SHA256:x",
            "added:     api",
            "removed:   old",
            "took:      1.50s",
        ]
        quiet = views.sync_text({"result": "up-to-date", "changes": {"added": []}})
        assert "changes:   none" in quiet and "revision:  -" in quiet

    def test_history_and_bundle_texts(self) -> None:
        """History rows name the changes when there is no error; an empty history says so."""
        assert views.history_text([]) == "no history yet"
        rows = [{"time": 0, "kind": "sync", "result": "applied", "revision": "c" * 40,
                 "changes": {"added": ["db"], "unchanged": ["x"]}}]  # fmt: skip
        last = views.history_text(rows).splitlines()[-1].split()
        assert last[2:] == ["sync", "applied", "c" * 12, "added", "db"]
        update = [{"time": 0, "kind": "self-update", "result": "ok", "revision": None,
                   "from": "0.1.0", "to": "0.2.0"}]  # fmt: skip
        last = views.history_text(update).splitlines()[-1].split()
        assert last[2:] == ["self-update", "ok", "-", "0.1.0", "->", "0.2.0"]
        failed = [{**update[0], "result": "failed", "reason": "did not answer /healthz"}]
        assert (
            views.history_text(failed)
            .splitlines()[-1]
            .endswith("0.1.0 -> 0.2.0: did not answer /healthz")
        )
        made = {"bundle": "f.ksb", "revision": "d" * 40, "artifacts": [{}], "size": 9}
        assert views.bundle_created_text({**made, "prerequisites": []}) == (
            f"wrote f.ksb: {'d' * 12}, 1 artifact(s), 9 bytes"
        )
        assert views.bundle_created_text({**made, "prerequisites": ["e" * 40]}).endswith(
            f", needs {'e' * 12}"
        )


def _imports(path: Path) -> set[str]:
    """The keystone modules a file imports (``from keystone import x`` counts as keystone.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("keystone")}


class TestLayers:
    @pytest.mark.parametrize("group", GROUPS)
    def test_groups_stand_side_by_side(self, group: str) -> None:
        """A command group imports the shared face and lower layers, never another group."""
        others = {f"keystone.cli.{g}" for g in GROUPS if g != group} | {"keystone.cli.app"}
        assert not _imports(PACKAGE / "cli" / f"{group}.py") & others

    def test_nothing_below_imports_the_cli(self) -> None:
        """Outside the package only ``python -m keystone`` imports the CLI."""
        for path in PACKAGE.rglob("*.py"):
            if "cli" in path.relative_to(PACKAGE).parts or path.name == "__main__.py":
                continue
            bad = {
                m for m in _imports(path) if m == "keystone.cli" or m.startswith("keystone.cli.")
            }
            assert not bad, (path, bad)

    def test_typer_free_modules(self) -> None:
        """The entry point, fast path, session and views never import typer."""
        for name in ("__init__", "fast", "session", "views"):
            tree = ast.parse((PACKAGE / "cli" / f"{name}.py").read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    assert not [n for n in names if n.split(".")[0] in ("typer", "click")], name

    def test_status_loads_nothing_heavy(self) -> None:
        """`keystone status` with no agent: exit 1 and its message, without typer or any heavy
        dependency loaded."""
        addr = f"http://127.0.0.1:{free_port()}"
        code = (
            "import sys\n"
            "from keystone.cli import main\n"
            f"sys.argv = ['keystone', 'status', '--addr', {addr!r}]\n"
            "try:\n"
            "    main()\n"
            "except SystemExit as exc:\n"
            "    heavy = ('typer', 'click', 'dulwich', 'cryptography', 'httpx', 'tomlkit')\n"
            "    print(exc.code, [m for m in heavy if m in sys.modules])\n"
        )
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        assert r.stdout.split(None, 1) == ["1", "[]\n"], r.stderr
        assert f"no agent answers at {addr}; start one with `keystone agent`" in r.stderr

    def test_agent_start_registers_its_group_only(self) -> None:
        """`keystone agent` builds only its own command: the other groups stay out of the
        resident agent."""
        code = (
            "import sys\n"
            "from keystone.cli import app\n"
            "assert app.register('agent')\n"
            "print(sorted(c.name for c in app.app.registered_commands),\n"
            "      [m for m in ('keystone.cli.control', 'keystone.cli.gitops', 'keystone.cli.fleet')\n"
            "       if m in sys.modules])\n"
        )
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        assert r.stdout == "['agent'] []\n", r.stderr

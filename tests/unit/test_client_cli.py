"""The keystonectl commands (keystone.cli.control) on their own typer app, against a real ApiServer:
tables for people, --json for scripts, exit codes, apply's recipe upload, the local tools."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner, Result

from keystone.api import ApiServer
from keystone.cli import control as ctl
from keystone.cli.fast import fast_main, parse_apply_dry, parse_fast
from tests.conftest import free_port
from tests.unit.test_client import TOKEN, Control, make_ca, make_leaf, openssl

CLEAN_ENV: dict[str, str | None] = {
    "KEYSTONE_ADDR": None,
    "KEYSTONE_API_TOKEN": None,
    "KEYSTONE_SSH": None,
    "KEYSTONE_RUNTIME": None,
    "KEYSTONE_LEAF_CERT": None,
    "KEYSTONE_TRUST_BUNDLE": None,
}

DB = '[metadata]\nname = "com.example.db"\nversion = "1.0.0"\n[lifecycle.run.exec]\ncommand = "true"\n'
API = (
    '[metadata]\nname = "com.example.api"\nversion = "1.2.0"\n'
    '[[dependencies]]\nname = "com.example.db"\n'
    '[lifecycle.run.exec]\ncommand = "${API_BIN_NOT_SET_HERE}"\n'
)
PLAN = """# the stack
[[components]]
name = "db"
recipe = "recipes/db.recipe.toml"   # a file next to the plan

[[components]]
name = "api"
recipe = "recipes/api.recipe.toml"
colour = "blue"

[[components]]
name = "cache"
recipe = "com.example.cache:2.0.0"

[[components]]
name = "old"
recipe = "recipes/missing.recipe.toml"
enabled = false
"""


@pytest.fixture
def app() -> typer.Typer:
    a = typer.Typer()
    assert ctl.register(a)
    return a


@pytest.fixture
def control() -> Control:
    return Control()


@pytest.fixture
def server(control: Control, tmp_path: Path) -> Iterator[ApiServer]:
    s = ApiServer(control, listen="127.0.0.1:0", token=TOKEN, token_file=tmp_path / "api.token")
    s.start()
    try:
        yield s
    finally:
        s.stop()


class Cli:
    """Invokes the app with the server's address and token."""

    def __init__(self, app: typer.Typer, server: ApiServer) -> None:
        self.app = app
        self.server = server
        self.runner = CliRunner()

    def __call__(self, *args: str, conn: bool = True, env: dict[str, str] | None = None) -> Result:
        extra = ["--addr", self.server.address, "--token", TOKEN] if conn else []
        return self.runner.invoke(self.app, [*args, *extra], env={**CLEAN_ENV, **(env or {})})

    def json(self, *args: str) -> Any:
        r = self(*args, "--json")
        assert r.exit_code == 0, (r.stdout, r.stderr)
        return json.loads(r.stdout)


@pytest.fixture
def cli(app: typer.Typer, server: ApiServer) -> Cli:
    return Cli(app, server)


@pytest.fixture
def plan_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "fleet"
    (d / "recipes").mkdir(parents=True)
    (d / "recipes" / "db.recipe.toml").write_text(DB)
    (d / "recipes" / "api.recipe.toml").write_text(API)
    (d / "plan.toml").write_text(PLAN)
    monkeypatch.chdir(d)
    return d


class TestRegister:
    def test_every_go_command_is_there(self, app: typer.Typer) -> None:
        """Every keystonectl command of GO-COMPAT.md is registered, with --json."""
        names = {name for name, _ in ctl.COMMANDS}
        assert names == {
            "status", "components", "stop", "restart", "restart-dry", "stop-plan", "graph",
            "apply", "apply-dry", "reconcile", "recipes", "upload-recipe", "delete-recipe",
            "health", "version", "sha256", "sign", "verify",
        }  # fmt: skip
        runner = CliRunner()
        for name in names:
            r = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
            assert r.exit_code == 0, (name, r.stdout)
            assert "--json" in r.stdout

    def test_only_one(self) -> None:
        """register(app, name) adds just that command, and says whether it knew it."""
        a = typer.Typer()
        assert ctl.register(a, "graph") and not ctl.register(a, "agent")
        assert [c.name for c in a.registered_commands] == ["graph"]

    @pytest.mark.parametrize("name", ["status", "components", "health", "apply", "verify"])
    def test_connection_options_everywhere(self, app: typer.Typer, name: str) -> None:
        """--addr, --token, --ssh and --runtime are on every agent command, with their env."""
        if name == "verify":
            return  # local tool
        r = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        for opt in ("--addr", "--token", "--ssh", "--runtime"):
            assert opt in r.stdout
        for var in ("KEYSTONE_ADDR", "KEYSTONE_API_TOKEN", "KEYSTONE_SSH"):
            assert var in r.stdout


class TestReads:
    def test_status_for_people(self, cli: Cli) -> None:
        """status: agent health and revision, plan state, and a table of components."""
        r = cli("status")
        assert r.exit_code == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == (
            "agent ok (components degraded), up 1h02m, keystone 0.1.0, device gw-1, "
            "revision 0123456789ab"
        )
        assert lines[1] == "plan running (api)"
        assert lines[3].split() == [
            "COMPONENT", "STATE", "PHASE", "VERSION", "PID", "RESTARTS", "FOR", "HEALTH"
        ]  # fmt: skip
        assert lines[4].split()[:6] == ["api", "running", "healthy", "1.2.0", "12", "1"]
        assert "healthy: HTTP 200" in lines[4]
        assert lines[5].split()[:6] == ["db", "failed", "failed", "1.0.0", "-", "5"]
        assert "exited 1" in lines[5]

    def test_status_json_keeps_the_go_keys(self, cli: Cli) -> None:
        """status --json: the Go /v1/plan/status object, plus the agent's health."""
        data = cli.json("status")
        assert data["status"] == "running" and data["planPath"] == "api"
        assert [c["name"] for c in data["components"]] == ["api", "db"]
        assert data["health"]["revision"] == "0123456789abcdef0123"

    def test_status_revision(self, cli: Cli) -> None:
        """status --revision: applied, last known-good, source, signer, when, last sync."""
        r = cli("status", "--revision")
        assert r.exit_code == 0
        for label in ("applied:", "last known-good:", "source:", "signer:", "applied at:"):
            assert label in r.stdout
        assert "ops@example.com" in r.stdout and "up-to-date" in r.stdout
        assert cli.json("status", "--revision")["applied"] == "a" * 40

    def test_components_health_recipes(self, cli: Cli, control: Control) -> None:
        """components, health and recipes: JSON as the agent answers it, tables otherwise."""
        assert [c["name"] for c in cli.json("components")] == ["api", "db"]
        assert cli.json("health")["status"] == "ok"
        assert cli("health").stdout.startswith("agent ok (components degraded), up 1h02m")
        assert cli("recipes").stdout.startswith("no recipes stored")
        control.store[("x", "1")] = "t"
        assert cli("recipes").stdout.splitlines()[0].split() == ["NAME", "VERSION", "SHA256"]

    def test_graph_text_dot_json(self, cli: Cli) -> None:
        """graph: start layers, Graphviz dot (dependency -> dependent), or the JSON."""
        text = cli("graph").stdout
        assert text.startswith("layer 0: db\nlayer 1: api\n")
        dot = cli("graph", "--format", "dot").stdout
        assert dot.startswith("digraph keystone {") and '"db" -> "api"' in dot
        assert cli.json("graph")["order"] == [["db"], ["api"]]
        assert cli("graph", "--format", "png").exit_code == 2

    def test_graph_pictures_coloured_by_state(self, cli: Cli) -> None:
        """graph --format svg|mermaid: the picture, each node filled by its component's state
        (api healthy, db failed in the fake)."""
        from keystone import graph

        svg = cli("graph", "--format", "svg").stdout
        assert "<svg" in svg[:100] and svg.rstrip().endswith("</svg>")
        assert graph.PALETTE["healthy"][0] in svg and graph.PALETTE["failed"][0] in svg
        mermaid = cli("graph", "--format", "mermaid").stdout
        assert mermaid.startswith(("flowchart LR", "graph LR")) and "db" in mermaid
        dot = cli("graph", "--format", "dot").stdout
        assert graph.PALETTE["failed"][0] in dot
        assert cli.json("graph", "--format", "svg")["order"] == [["db"], ["api"]]


class TestActions:
    def test_stop_restart_reconcile_stop_plan(self, cli: Cli, control: Control) -> None:
        """Each command calls its route once with its parameters."""
        assert cli("stop", "api").stdout == "stopped api\n"
        r = cli("restart", "db", "--wait", "health", "--timeout", "90s")
        assert r.stdout == "restarted db (pid 77); dependents: api\n"
        dry = cli("restart", "db", "--dry-run")
        assert dry.stdout == "stop:  api -> db\nstart: db -> api\n"
        assert cli("restart-dry", "db").stdout == dry.stdout
        assert cli.json("restart-dry", "db") == {
            "stopOrder": ["api", "db"],
            "startOrder": ["db", "api"],
        }
        assert cli("reconcile").stdout == "repaired: db\n"
        assert cli("stop-plan").stdout == "plan stopped\n"
        assert [
            c for c in control.calls if c[0] in ("stop", "restart", "reconcile", "stop_plan")
        ] == [
            ("stop", "api"),
            ("restart", ("db", "health", 90.0, False)),
            ("restart", ("db", None, 60.0, True)),
            ("restart", ("db", None, 60.0, True)),
            ("restart", ("db", None, 60.0, True)),
            ("reconcile", None),
            ("stop_plan", None),
        ]

    @pytest.mark.parametrize(
        ("args", "code"),
        [
            (("stop", "ghost"), 2),
            (("restart", "ghost"), 2),
            (("restart", "db", "--wait", "forever"), 2),
            (("restart", "db", "--timeout", "soon"), 2),
            (("delete-recipe", "no", "1"), 2),
        ],
    )
    def test_misuse_exits_2(
        self, cli: Cli, control: Control, args: tuple[str, ...], code: int
    ) -> None:
        """An unknown component or recipe, or a bad flag, is misuse: exit 2, nothing changed."""
        r = cli(*args)
        assert r.exit_code == code, (r.stdout, r.stderr)
        assert not [c for c in control.calls if c[0] == "restart" and c[1][0] == "db"]

    def test_errors_as_json(self, cli: Cli) -> None:
        """With --json an error is also a JSON object on stdout; the message is on stderr."""
        r = cli("stop", "ghost", "--json")
        assert r.exit_code == 2
        err = json.loads(r.stdout)
        assert err["status"] == 404 and err["exit_code"] == 2 and "ghost" in err["error"]
        assert r.stderr.startswith("error: POST /v1/components/ghost:stop")

    def test_no_agent_exit_1_and_how_to_start_one(self, app: typer.Typer) -> None:
        """No agent: exit 1, and the message says where and how to start one."""
        addr = f"http://127.0.0.1:{free_port()}"
        r = CliRunner().invoke(app, ["components", "--addr", addr, "--token", "t"], env=CLEAN_ENV)
        assert r.exit_code == 1
        assert f"no agent answers at {addr}; start one with `keystone agent`" in r.stderr

    def test_wrong_token_exit_2(self, app: typer.Typer, server: ApiServer) -> None:
        """A wrong token is misuse (exit 2) and the message says where tokens come from."""
        r = CliRunner().invoke(
            app, ["components", "--addr", server.address, "--token", "nope"], env=CLEAN_ENV
        )
        assert r.exit_code == 2 and "KEYSTONE_API_TOKEN" in r.stderr

    def test_token_from_the_runtime_dir(
        self, app: typer.Typer, server: ApiServer, tmp_path: Path
    ) -> None:
        """Without --token the CLI reads the agent's token file (--runtime / KEYSTONE_RUNTIME)."""
        rt = tmp_path / "rt"
        rt.mkdir()
        (rt / "api.token").write_text(TOKEN + "\n")
        runner = CliRunner()
        r = runner.invoke(app, ["components", "--addr", server.address, "--runtime", str(rt)])
        assert r.exit_code == 0, r.stderr
        env = {**CLEAN_ENV, "KEYSTONE_RUNTIME": str(rt), "KEYSTONE_ADDR": server.address}
        assert runner.invoke(app, ["components", "--json"], env=env).exit_code == 0


class TestApply:
    def test_uploads_recipes_and_posts_references(
        self, cli: Cli, control: Control, plan_dir: Path
    ) -> None:
        """apply reads the plan and its recipe files, stores the recipes and posts the plan with
        name:version references; comments, store references and unknown fields stay as written."""
        data = cli.json("apply", "plan.toml")
        assert data["uploaded"] == ["com.example.db:1.0.0", "com.example.api:1.2.0"]
        assert data["result"] == "ok" and data["status"] == "applying"
        assert control.store[("com.example.db", "1.0.0")] == DB
        assert control.store[("com.example.api", "1.2.0")] == API  # ${...} left to the agent
        text, dry = control.plans[-1]
        assert not dry
        assert 'recipe = "com.example.db:1.0.0"   # a file next to the plan' in text
        assert 'recipe = "com.example.api:1.2.0"' in text
        assert 'recipe = "com.example.cache:2.0.0"' in text
        assert 'colour = "blue"' in text and text.startswith("# the stack\n")
        assert 'recipe = "recipes/missing.recipe.toml"' in text  # disabled: not read
        assert text.count("\n") == PLAN.count("\n")  # line numbers in the agent's messages hold

    def test_unchanged_recipes_are_not_sent_again(
        self, cli: Cli, control: Control, plan_dir: Path
    ) -> None:
        """A second apply sends only the recipes whose bytes changed (with force)."""
        cli.json("apply", "plan.toml")
        (plan_dir / "recipes" / "db.recipe.toml").write_text(DB + "# tweak\n")
        data = cli.json("apply", "plan.toml")
        assert data["uploaded"] == ["com.example.db:1.0.0"]
        assert [a for n, a in control.calls if n == "upload"] == [True, True, True]

    def test_dry(self, cli: Cli, control: Control, plan_dir: Path) -> None:
        """apply --dry and apply-dry post ?dry=true and print the layers and actions."""
        r = cli("apply", "plan.toml", "--dry")
        assert r.exit_code == 0, r.stderr
        assert "status: dry-run" in r.stdout and "layers: db | api" in r.stdout
        assert r.stdout.splitlines()[3].split() == [
            "ACTION",
            "COMPONENT",
            "VERSION",
            "LAYER",
            "WHY",
        ]
        assert cli("apply-dry", "plan.toml").exit_code == 0
        assert [dry for _, dry in control.plans] == [True, True]
        assert not [e for e in control.history_entries if e["kind"] == "apply"]

    def test_refused_plan_exit_3(self, cli: Cli, control: Control, plan_dir: Path) -> None:
        """A plan the agent refuses is exit 3 with the agent's reason."""
        (plan_dir / "plan.toml").write_text(PLAN + "# refuse-me\n")
        r = cli("apply", "plan.toml")
        assert r.exit_code == 3 and "unknown field x" in r.stderr

    def test_rolled_back_exit_4(
        self, cli: Cli, control: Control, plan_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """apply waits for the deployment; one that was rolled back is exit 4."""
        real = control.apply_plan

        def rolled_back(text: str, *, dry: bool) -> dict[str, Any]:
            body = real(text, dry=dry)
            control.history_entries[0]["result"] = "rolled-back"
            control.history_entries[0]["error"] = "api: unhealthy (rolled back)"
            return body

        monkeypatch.setattr(control, "apply_plan", rolled_back)
        r = cli("apply", "plan.toml")
        assert r.exit_code == 4, r.stderr
        assert "result: rolled-back: api: unhealthy (rolled back)" in r.stdout
        assert cli("apply", "plan.toml", "--no-wait").exit_code == 0

    @pytest.mark.parametrize(
        ("plan", "needle"),
        [
            ('[[components]]\nname = "x"\nrecipe = "nope.recipe.toml"\n', "nope.recipe.toml"),
            ("[[components]\n", "plan.toml"),
            ('[[components]]\nname = "x"\nrecipe = "bad.recipe.toml"\n', "bad.recipe.toml"),
        ],
    )
    def test_local_problems_exit_3_and_send_nothing(
        self, cli: Cli, control: Control, plan_dir: Path, plan: str, needle: str
    ) -> None:
        """A missing or invalid recipe file, or a broken plan, is refused before any upload."""
        (plan_dir / "bad.recipe.toml").write_text('[metadata]\nname = "../x"\nversion = "1"\n')
        (plan_dir / "plan.toml").write_text(plan)
        r = cli("apply", "plan.toml")
        assert r.exit_code == 3, (r.stdout, r.stderr)
        assert needle in r.stderr
        assert control.store == {} and control.plans == []

    def test_missing_plan_file_is_misuse(self, cli: Cli, plan_dir: Path) -> None:
        """A plan file that does not exist is exit 2."""
        assert cli("apply", "nope.toml").exit_code == 2

    def test_dry_offline_when_no_agent(self, app: typer.Typer, plan_dir: Path) -> None:
        """apply --dry with no agent answering plans offline and says so."""
        (plan_dir / "recipes" / "api.recipe.toml").write_text(
            API.replace("${API_BIN_NOT_SET_HERE}", "true")
        )
        # Offline there is no agent store: only file references.
        (plan_dir / "plan.toml").write_text(
            '[[components]]\nname = "db"\nrecipe = "recipes/db.recipe.toml"\n'
            '[[components]]\nname = "api"\nrecipe = "recipes/api.recipe.toml"\n'
        )
        addr = f"http://127.0.0.1:{free_port()}"
        env = {**CLEAN_ENV, "KEYSTONE_RUNTIME": str(plan_dir / "rt")}
        r = CliRunner().invoke(app, ["apply", "plan.toml", "--dry", "--addr", addr], env=env)
        assert r.exit_code == 0, (r.stdout, r.stderr)
        assert r.stdout.startswith("no agent answered: planned offline")
        r = CliRunner().invoke(app, ["apply-dry", "plan.toml", "--addr", addr, "--json"], env=env)
        data = json.loads(r.stdout)
        assert data["offline"] is True and data["layers"] == [["db"], ["api"]]
        r = CliRunner().invoke(app, ["apply", "plan.toml", "--addr", addr], env=env)
        assert r.exit_code == 1 and "no agent answers" in r.stderr


class TestRecipeCommands:
    def test_upload_and_delete(self, cli: Cli, control: Control, plan_dir: Path) -> None:
        """upload-recipe stores (409 without --force is misuse), delete-recipe removes."""
        r = cli("upload-recipe", "recipes/db.recipe.toml")
        assert r.stdout == "stored com.example.db:1.0.0\n"
        again = cli("upload-recipe", "recipes/db.recipe.toml")
        assert again.exit_code == 2 and "already stored" in again.stderr
        assert cli("upload-recipe", "recipes/db.recipe.toml", "--force").stdout.endswith(
            "(replaced)\n"
        )
        assert cli.json("delete-recipe", "com.example.db", "1.0.0") == {
            "deleted": "com.example.db:1.0.0"
        }
        assert control.store == {}


class TestLocalTools:
    def test_version_and_sha256(self, app: typer.Typer, tmp_path: Path) -> None:
        """version needs no agent; sha256 prints the hex digest a recipe pins."""
        from keystone import __version__

        runner = CliRunner()
        assert runner.invoke(app, ["version"]).stdout.startswith(f"keystone {__version__}")
        f = tmp_path / "a.bin"
        f.write_bytes(b"hello\n" * 1000)
        r = runner.invoke(app, ["sha256", str(f)])
        assert r.stdout == hashlib.sha256(f.read_bytes()).hexdigest() + "\n"
        assert json.loads(runner.invoke(app, ["sha256", str(f), "--json"]).stdout)["path"] == str(f)

    def test_sign_then_verify_like_the_agent(self, app: typer.Typer, tmp_path: Path) -> None:
        """sign writes FILE.sig (checked against --cert first); verify accepts it against the
        trust bundle, refuses a changed file (exit 3), and needs a certificate (exit 2)."""
        d = tmp_path
        make_ca(d, "ca")
        make_leaf(
            d,
            "signer",
            "ca",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=codeSigning\n",
        )
        make_leaf(
            d,
            "other",
            "ca",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=codeSigning\n",
        )
        art = d / "api.tar.gz"
        art.write_bytes(os.urandom(4096))
        runner = CliRunner()
        env = dict(CLEAN_ENV)
        r = runner.invoke(
            app, ["sign", str(art), "--key", str(d / "signer.key"), "--cert", str(d / "signer.pem")],
            env=env,
        )  # fmt: skip
        assert r.exit_code == 0, r.stderr
        assert r.stdout.startswith(f"signed {art} -> {art}.sig (")
        # The same signature openssl checks.
        subprocess.run(
            ["openssl", "x509", "-in", "signer.pem", "-pubkey", "-noout", "-out", "signer.pub"],
            cwd=d, check=True,
        )  # fmt: skip
        openssl(d, "dgst", "-sha256", "-verify", "signer.pub", "-signature", f"{art}.sig", str(art))
        args = ["verify", str(art), "--cert", str(d / "signer.pem")]
        ok = runner.invoke(app, [*args, "--trust-bundle", str(d / "ca.pem")], env=env)
        assert ok.exit_code == 0, ok.stderr
        assert ok.stdout.startswith(f"OK: {art} signed by CN=signer")
        no_chain = runner.invoke(app, args, env=env)
        assert no_chain.exit_code == 0 and "chain NOT checked" in no_chain.stdout
        wrong_cert = runner.invoke(
            app, ["verify", str(art), "--cert", str(d / "other.pem")], env=env
        )
        assert wrong_cert.exit_code == 3
        art.write_bytes(art.read_bytes() + b"x")
        bad = runner.invoke(app, [*args, "--trust-bundle", str(d / "ca.pem"), "--json"], env=env)
        assert bad.exit_code == 3 and json.loads(bad.stdout)["exit_code"] == 3
        no_cert = runner.invoke(app, ["verify", str(art)], env=env)
        assert no_cert.exit_code == 2 and "KEYSTONE_LEAF_CERT" in no_cert.stderr
        mismatch = runner.invoke(
            app, ["sign", str(art), "--key", str(d / "signer.key"), "--cert", str(d / "other.pem"),
                  "--out", str(d / "x.sig")], env=env,
        )  # fmt: skip
        assert mismatch.exit_code == 3 and not (d / "x.sig").exists()

    def test_verify_rev_checks_a_fleet_commit(self, app: typer.Typer, tmp_path: Path) -> None:
        """verify --rev (or no FILE) verifies a commit of a fleet checkout: unsigned is exit 3."""
        repo = tmp_path / "fleet"
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
        subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
        (repo / "README").write_text("fleet\n")
        subprocess.run([*git, "-C", str(repo), "add", "README"], check=True)
        subprocess.run(
            [*git, "-C", str(repo), "commit", "-q", "--no-gpg-sign", "-m", "x"], check=True
        )
        signers = tmp_path / "allowed_signers"
        signers.write_text("")
        base = ["verify", "--repo", str(repo), "--allowed-signers", str(signers)]
        runner = CliRunner()
        for args in ([*base, "--rev", "HEAD"], base):
            r = runner.invoke(app, [*args, "--json"], env=CLEAN_ENV)
            assert r.exit_code == 3, (r.stdout, r.stderr)
            assert json.loads(r.stdout)["ok"] is False


OFFLINE_PLAN = (
    '[[components]]\nname = "db"\nrecipe = "recipes/db.recipe.toml"\n'
    '[[components]]\nname = "api"\nrecipe = "recipes/api.recipe.toml"\n'
)
DRY_CASES = {
    "ok": OFFLINE_PLAN,
    "unknown field": OFFLINE_PLAN + 'colour = "blue"\n',
    "bad recipe": OFFLINE_PLAN.replace("recipes/api.recipe.toml", "recipes/bad.recipe.toml"),
    "missing recipe": OFFLINE_PLAN.replace("recipes/api.recipe.toml", "recipes/gone.recipe.toml"),
    "escaping recipe": OFFLINE_PLAN.replace("recipes/api.recipe.toml", "../outside.toml"),
    "bad plan": OFFLINE_PLAN + "[[components]\n",
}


class TestFastApplyDry:
    """``apply PLAN --dry`` with no agent answering runs without typer and must print and
    exit exactly as the typer command does; with an agent, or anything unusual, typer runs."""

    def _offline(self, plan_dir: Path, text: str) -> None:
        (plan_dir / "recipes" / "api.recipe.toml").write_text(
            API.replace("${API_BIN_NOT_SET_HERE}", "true")
        )
        (plan_dir / "recipes" / "bad.recipe.toml").write_text(
            '[metadata]\nname = "api"\nversion = "1"\n[lifecycle.run]\nmax_retries = -1\n'
        )
        (plan_dir.parent / "outside.toml").write_text(DB)
        (plan_dir / "plan.toml").write_text(text)

    @pytest.mark.parametrize("as_json", [[], ["--json"]])
    @pytest.mark.parametrize("case", list(DRY_CASES))
    def test_same_output_and_exit_code_as_typer(
        self,
        app: typer.Typer,
        plan_dir: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
        case: str,
        as_json: list[str],
    ) -> None:
        self._offline(plan_dir, DRY_CASES[case])
        args = ["apply", "plan.toml", "--dry", "--addr", f"http://127.0.0.1:{free_port()}"]
        env = {**CLEAN_ENV, "KEYSTONE_RUNTIME": str(plan_dir / "rt")}
        typed = CliRunner().invoke(app, [*args, *as_json], env=env)
        for var in CLEAN_ENV:
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("KEYSTONE_RUNTIME", str(plan_dir / "rt"))
        code = fast_main([*args, *as_json])
        out = capsys.readouterr()
        assert (code, out.out, out.err) == (typed.exit_code, typed.stdout, typed.stderr)
        assert code == (0 if case == "ok" else 3), out  # a plan with unknown fields too

    def test_an_agent_that_answers_gets_the_plan_through_typer(
        self, server: ApiServer, plan_dir: Path
    ) -> None:
        """The fast path only asked /healthz: the typer command uploads and asks the agent."""
        self._offline(plan_dir, OFFLINE_PLAN)
        argv = ["apply", "plan.toml", "--dry", "--addr", server.address, "--token", TOKEN]
        assert fast_main(argv) is None
        assert fast_main([*argv[:4], "https://127.0.0.1:1"]) is None

    def test_a_real_process_plans_offline_without_typer(self, plan_dir: Path) -> None:
        import sys

        self._offline(plan_dir, OFFLINE_PLAN)
        env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
        env["KEYSTONE_RUNTIME"] = str(plan_dir / "rt")
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "keystone", "apply", "plan.toml", "--dry",
             "--addr", f"http://127.0.0.1:{free_port()}"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("no agent answered: planned offline")
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
        assert "keystone.offline" in imported
        assert not imported & {"typer", "http.client", "loguru", "asyncio"}

    @pytest.mark.parametrize(
        ("argv", "want"),
        [
            (["apply", "plan.toml", "--dry"], ("plan.toml", {}, {"--dry"})),
            (["--addr", "http://h:1", "--json", "apply", "plan.toml", "--dry-run", "--no-wait"],
             ("plan.toml", {"addr": "http://h:1"}, {"--json", "--dry-run", "--no-wait"})),
            (["apply", "--token=t", "plan.toml", "--dry"], ("plan.toml", {"token": "t"}, {"--dry"})),
            (["--dry", "apply", "plan.toml"], None),
            (["apply", "plan.toml"], None),
            (["apply", "plan.toml", "--dry", "--help"], None),
            (["apply", "plan.toml", "--dry", "--timeout", "5m"], None),
            (["apply", "plan.toml", "--dry", "--addr"], None),
            (["apply", "nope.toml", "--dry"], None),
            (["apply", "recipes", "--dry"], None),
            (["apply", "plan.toml", "plan.toml", "--dry"], None),
            (["apply-dry", "plan.toml"], None),
            (["status", "plan.toml", "--dry"], None),
        ],
    )  # fmt: skip
    def test_parse(self, plan_dir: Path, argv: list[str], want: Any) -> None:
        """Only a dry apply of one readable plan file with known options is taken."""
        assert parse_apply_dry(argv) == want


class TestFastPath:
    @pytest.mark.parametrize(
        ("argv", "want"),
        [
            (["status"], ("status", {}, set())),
            (["status", "--revision", "--json"], ("status", {}, {"--revision", "--json"})),
            (["components", "--addr", "http://h:1", "--token=t"],
             ("components", {"addr": "http://h:1", "token": "t"}, set())),
            (["health", "--ssh", "edge", "--runtime", "/r"],
             ("health", {"ssh": "edge", "runtime": "/r"}, set())),
            (["--addr", "http://h:1", "status", "--json"],
             ("status", {"addr": "http://h:1"}, {"--json"})),
            (["--json", "status"], None),
            (["--addr"], None),
            (["status", "--help"], None),
            (["components", "--revision"], None),
            (["components", "--addr"], None),
            (["apply", "plan.toml"], None),
            (["status", "extra"], None),
            (["sync", "--once", "--dry", "--retry", "--json"],
             ("sync", {}, {"--once", "--dry", "--retry", "--json"})),
            (["sync", "--allow-rollback", "--dry-run"],
             ("sync", {}, {"--allow-rollback", "--dry-run"})),
            (["sync", "--revision"], None),
            (["sync", "--help"], None),
            ([], None),
        ],
    )  # fmt: skip
    def test_parse(self, argv: list[str], want: Any) -> None:
        """Only status, components and health with known options take the fast path."""
        assert parse_fast(argv) == want

    @pytest.mark.parametrize(
        "args",
        [["status"], ["status", "--json"], ["status", "--revision"], ["components"],
         ["components", "--json"], ["health"]],
    )  # fmt: skip
    def test_same_output_as_typer(
        self, cli: Cli, server: ApiServer, args: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The fast path prints exactly what the typer command prints."""
        typer_out = cli(*args).stdout
        code = fast_main([*args, "--addr", server.address, "--token", TOKEN])
        assert code == 0
        assert capsys.readouterr().out == typer_out

    @pytest.mark.parametrize(
        ("args", "asked"),
        [(["sync", "--once"], (False, False, False)),
         (["sync", "--once", "--json"], (False, False, False)),
         (["sync", "--dry", "--retry"], (True, False, True)),
         (["sync", "--dry-run", "--allow-rollback", "--json"], (True, True, False))],
    )  # fmt: skip
    def test_sync_same_output_and_request_as_typer(
        self,
        server: ApiServer,
        control: Control,
        args: list[str],
        asked: tuple[bool, bool, bool],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """``sync`` on the fast path asks the agent the same and prints the same."""
        from keystone.cli import gitops

        app = typer.Typer()
        assert gitops.register(app)
        typer_out = Cli(app, server)(*args)
        assert typer_out.exit_code == 0, typer_out.stderr
        typer_calls = [c for c in control.calls if c[0] == "sync"]
        code = fast_main([*args, "--addr", server.address, "--token", TOKEN])
        assert code == 0
        assert capsys.readouterr().out == typer_out.stdout
        fast_calls = [c for c in control.calls if c[0] == "sync"][len(typer_calls) :]
        assert typer_calls == fast_calls == [("sync", asked)]

    def test_sync_errors_go_to_stderr_with_their_exit_code(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for var in CLEAN_ENV:
            monkeypatch.delenv(var, raising=False)
        addr = f"http://127.0.0.1:{free_port()}"
        assert fast_main(["sync", "--once", "--json", "--addr", addr, "--token", "t"]) == 1
        out = capsys.readouterr()
        assert out.out == "" and "error: " in out.err and "no agent answers" in out.err

    def test_errors_and_exit_codes(
        self, server: ApiServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """No agent is exit 1, a wrong token exit 2, as in the typer path."""
        for var in CLEAN_ENV:
            monkeypatch.delenv(var, raising=False)
        addr = f"http://127.0.0.1:{free_port()}"
        assert fast_main(["components", "--addr", addr, "--token", "t"]) == 1
        assert "no agent answers" in capsys.readouterr().err
        assert fast_main(["components", "--addr", server.address, "--token", "x", "--json"]) == 2
        assert json.loads(capsys.readouterr().out)["status"] == 401

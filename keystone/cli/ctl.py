"""``keystonectl``: the Go keystonectl's command set, flags, output and exit codes (click).

Every command that talks to the agent makes the request the Go command makes and prints the
agent's answer as Go prints it (:func:`keystone.cli.goctl.go_body`). The connection options
(``--addr``/``KEYSTONE_ADDR``, ``--token``/``KEYSTONE_API_TOKEN``, ``--ssh``/``KEYSTONE_SSH``,
and our ``--runtime``/``KEYSTONE_RUNTIME`` for a local agent's token file) go before or after
the command, as Go's persistent flags do. ``help [command]``, ``completion bash|zsh|fish`` and
``version`` are as in Go; completion is click's own.

``sign``, ``verify``, ``manifest`` and every command the Go keystonectl does not have (``sync``,
``history``, ``plan``, ...) are run by the ``keystone`` app (``keystone.cli.main`` sends them
there), with their exit codes folded into Go's.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from click.shell_completion import get_completion_class

from keystone import __version__
from keystone.cli import goctl
from keystone.errors import KeystoneError, UsageError, ValidationError

ROOT_HELP = """keystonectl controls a Keystone agent through its HTTP API.

Every command is one request to one endpoint and prints the agent's own answer as JSON, so its
output can be piped into jq. Each command's help names the endpoint it calls.

Connecting: --addr is the agent's base URL (default http://127.0.0.1:8080); --ssh reaches an
agent on another machine through your own ssh client, and --addr is then resolved on the far
side. Each falls back to an environment variable: KEYSTONE_ADDR, KEYSTONE_API_TOKEN,
KEYSTONE_SSH. Without a token, the one a local agent generated is read from its runtime
directory (--runtime, KEYSTONE_RUNTIME, ./runtime, /var/lib/keystone).

Exit codes: 0 success, 1 the agent, the network or a verification failed, 2 the command line
was wrong.

Every `keystone` command (sync, history, rollback, plan, bundle, ...) also runs here; see
`keystone --help`."""

GROUPS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "Plan",
        (
            ("apply", "Upload and apply a deployment plan"),
            ("apply-dry", "Apply a plan in dry-run mode and show the reconcile"),
            ("graph", "Show the dependency graph and a valid start order"),
            ("reconcile", "Repair the plan in effect"),
            ("status", "Show the applied plan, its status and its components"),
            ("stop-plan", "Stop every component in the plan"),
        ),
    ),
    (
        "Components",
        (
            ("components", "List components with state, PID and last health result"),
            ("restart", "Restart one component, cascading to its dependents"),
            ("restart-dry", "Show which components a restart would stop and start"),
            ("stop", "Stop one component"),
        ),
    ),
    (
        "Recipes",
        (
            ("delete-recipe", "Remove a recipe from the agent's store"),
            ("recipes", "List the recipes stored in the agent"),
            ("upload-recipe", "Add a recipe to the agent's store"),
        ),
    ),
    (
        "Agent",
        (
            ("health", "Check that the agent is alive, and for how long"),
            ("version", "Show this client's version"),
        ),
    ),
    (
        "Local tools",
        (
            ("completion", "Generate the autocompletion script for a shell"),
            ("help", "Help about any command"),
            ("manifest", "Create, sign and check dataset manifests"),
            ("sha256", "Compute the SHA-256 of a local file"),
            ("sign", "Sign a file, producing a detached <file>.sig"),
            ("verify", "Verify a detached signature the way the agent will"),
        ),
    ),
)

DELEGATED = goctl.DELEGATED


class CtlGroup(click.Group):
    """The root: commands listed in Go's groups."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for title, rows in GROUPS:
            with formatter.section(title):
                formatter.write_dl(list(rows))


GO_COMMANDS = goctl.GO_COMMANDS


# --- the invocation -------------------------------------------------------------------------


def _connection(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The connection options, on the root and on every command (the command's win)."""
    options = (
        click.option("--addr", metavar="URL", help="Agent base URL (or KEYSTONE_ADDR)"),
        click.option("--token", help="Bearer token for the agent API (or KEYSTONE_API_TOKEN)"),
        click.option(
            "--ssh", help="Reach the agent through SSH: [user@]host[:port] (or KEYSTONE_SSH)"
        ),
        click.option(
            "--runtime",
            metavar="DIR",
            help="A local agent's runtime dir, where its api.token is (or KEYSTONE_RUNTIME)",
        ),
        click.option("--json", "as_json", is_flag=True, hidden=True),
    )
    for option in reversed(options):
        fn = option(fn)
    return fn


def _options(ctx: click.Context, own: dict[str, Any]) -> dict[str, str | None]:
    root: dict[str, str | None] = ctx.find_root().params
    return {k: own.get(k) or root.get(k) for k in ("addr", "token", "ssh", "runtime")}


def _call(
    ctx: click.Context,
    own: dict[str, Any],
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float | None = None,
) -> None:
    """One request, printed the Go way; ends the command with Go's exit code."""
    try:
        client = goctl.connect(_options(ctx, own))
    except UsageError as exc:
        goctl.print_error(exc)
        ctx.exit(goctl.MISUSE)
    try:
        with client:
            data = client.request(
                method,
                path,
                params=params,
                body=body,
                content_type="application/toml" if body is not None else "application/json",
                timeout=timeout,
            )
    except KeystoneError as exc:
        goctl.print_error(exc)
        ctx.exit(goctl.FAILED)
    goctl.print_body(data)


def _read(ctx: click.Context, path: Path) -> bytes:
    """A local file the command sends; one that cannot be read is a failure (exit 1), as in Go."""
    try:
        return path.read_bytes()
    except OSError as exc:
        goctl.print_error(f"open {path}: {exc.strerror or exc}")
        ctx.exit(goctl.FAILED)


def _component_path(name: str, action: str) -> str:
    from keystone.client import component_path  # lazy: the client loads with a request

    return component_path(name, action)


# --- the root -------------------------------------------------------------------------------


@click.group(
    cls=CtlGroup,
    name=goctl.CTL_NAME,
    help=ROOT_HELP,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@_connection
@click.version_option(
    __version__,
    "--version",
    "-v",
    message=f"keystonectl version %(version)s (python {sys.version.split()[0]})",
)
@click.pass_context
def root(ctx: click.Context, /, **_: Any) -> None:
    from keystone.env import load_dotenv

    load_dotenv()
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


# --- plan -----------------------------------------------------------------------------------


@root.command(
    "status",
    help="Show the applied plan, its status and its components.\n\nCalls GET /v1/plan/status (GET /v1/revision with --revision).",
)
@click.option(
    "--revision", is_flag=True, help="The GitOps revision state instead (GET /v1/revision)"
)
@_connection
@click.pass_context
def status_cmd(ctx: click.Context, /, revision: bool, **own: Any) -> None:
    _call(ctx, own, "GET", "/v1/revision" if revision else "/v1/plan/status")


@root.command(
    "graph",
    help="Show the plan's nodes, its edges (from a dependency to its dependents) and a start order.\n\nCalls GET /v1/plan/graph.",
)
@click.option(
    "--format", "fmt", help="json (default), dot, svg or mermaid: as the agent renders it"
)
@_connection
@click.pass_context
def graph_cmd(ctx: click.Context, /, fmt: str | None, **own: Any) -> None:
    _call(ctx, own, "GET", "/v1/plan/graph", params={"format": fmt} if fmt else None)


def _apply(ctx: click.Context, own: dict[str, Any], plan: Path, *, dry: bool, timeout: str) -> None:
    """Upload the recipe files the plan names (found here) and the plan; wait for its outcome.

    A plan whose recipe files are not on this machine is sent as it is, as the Go keystonectl
    sends it, for the agent to resolve them on the device.
    """
    # lazy: the plan parser, tomlkit and the apply helpers only for apply
    from keystone import offline
    from keystone.cli.control import _upload_recipes, _wait_applied
    from keystone.cli.session import ExitCode, exit_for
    from keystone.units import parse_duration

    try:
        wait_s = parse_duration(timeout)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--timeout") from None
    text = _read(ctx, plan).decode("utf-8", errors="replace")
    try:
        client = goctl.connect(_options(ctx, own))
    except UsageError as exc:
        goctl.print_error(exc)
        ctx.exit(goctl.MISUSE)
    code = goctl.OK
    try:
        with client:
            try:
                sent, recipes, _unknown = offline.prepare_plan(text, file=str(plan))
            except ValidationError as exc:
                if not exc.reason.startswith("recipe file not found"):
                    raise
                sent, recipes = text, []
            uploaded = _upload_recipes(client, recipes)
            data = client.post(
                "/v1/plan/apply",
                params={"dry": "true"} if dry else None,
                body=sent.encode(),
                content_type="application/toml",
            )
            reply: Any = data
            if isinstance(data, dict):
                reply = {**data, "uploaded": uploaded}
                operation = data.get("operation")
                if not dry and operation:
                    outcome = _wait_applied(client, str(operation), wait_s)
                    reply["result"] = outcome.get("result")
                    reply["error"] = outcome.get("error") or outcome.get("reason")
                    if exit_for(outcome.get("result")) != ExitCode.OK:
                        code = goctl.FAILED
    except KeystoneError as exc:
        goctl.print_error(exc)
        ctx.exit(goctl.FAILED)
    goctl.print_body(reply)
    ctx.exit(code)


_PLAN = click.argument(
    "plan", metavar="<plan.toml>", type=click.Path(path_type=Path, dir_okay=True)
)
_TIMEOUT = click.option(
    "--timeout", default="15m", show_default=True, help="How long to wait for the deployment"
)


@root.command(
    "apply",
    help="Upload a plan and converge the device to it; returns when the deployment is done (exit 1 if it failed and was rolled back).\n\nRecipe files the plan names are uploaded to the agent's recipe store first.\n\nCalls POST /v1/recipes, POST /v1/plan/apply.",
)
@_PLAN
@click.option(
    "--dry",
    "--dry-run",
    "dry",
    is_flag=True,
    help="Validate and report the reconcile, changing nothing",
)
@_TIMEOUT
@_connection
@click.pass_context
def apply_cmd(ctx: click.Context, /, plan: Path, dry: bool, timeout: str, **own: Any) -> None:
    _apply(ctx, own, plan, dry=dry, timeout=timeout)


@root.command(
    "apply-dry",
    help="Exactly `apply --dry`: validate the plan and report what applying it would do.\n\nCalls POST /v1/plan/apply?dry=true.",
)
@_PLAN
@_connection
@click.pass_context
def apply_dry_cmd(ctx: click.Context, /, plan: Path, **own: Any) -> None:
    _apply(ctx, own, plan, dry=True, timeout="15m")


@root.command(
    "reconcile",
    help="Re-apply the plan in effect, so components that died are started again.\n\nCalls POST /v1/plan/reconcile.",
)
@_connection
@click.pass_context
def reconcile_cmd(ctx: click.Context, /, **own: Any) -> None:
    _call(ctx, own, "POST", "/v1/plan/reconcile")


@root.command(
    "stop-plan",
    help="Stop the whole plan, in reverse dependency order, and record it as stopped.\n\nCalls POST /v1/plan/stop.",
)
@_connection
@click.pass_context
def stop_plan_cmd(ctx: click.Context, /, **own: Any) -> None:
    _call(ctx, own, "POST", "/v1/plan/stop")


# --- components -----------------------------------------------------------------------------


@root.command(
    "components", help="List every component the agent knows about.\n\nCalls GET /v1/components."
)
@_connection
@click.pass_context
def components_cmd(ctx: click.Context, /, **own: Any) -> None:
    _call(ctx, own, "GET", "/v1/components")


_COMPONENT = click.argument("component", metavar="<component>")


@root.command(
    "stop",
    help="Stop a single component; its dependents are left running.\n\nCalls POST /v1/components/{name}:stop.",
)
@_COMPONENT
@_connection
@click.pass_context
def stop_cmd(ctx: click.Context, /, component: str, **own: Any) -> None:
    _call(ctx, own, "POST", _component_path(component, "stop"))


def _restart(
    ctx: click.Context,
    own: dict[str, Any],
    name: str,
    dry: bool,
    wait: str | None,
    timeout: str | None,
) -> None:
    from keystone.units import parse_duration

    params: dict[str, str] = {}
    if dry:
        params["dry"] = "true"
    if wait:
        params["wait"] = wait
    wait_s = 60.0
    if timeout:
        params["timeout"] = timeout
        # A malformed timeout is the agent's to refuse (400), as Go's agent does.
        with contextlib.suppress(ValueError):
            wait_s = parse_duration(timeout)
    _call(ctx, own, "POST", _component_path(name, "restart"), params=params, timeout=wait_s + 30)


@root.command(
    "restart",
    help="Restart a component and cascade to its dependents (hard and soft dependencies).\n\nCalls POST /v1/components/{name}:restart.",
)
@_COMPONENT
@click.option(
    "--dry",
    "--dry-run",
    "dry",
    is_flag=True,
    help="Report what would be restarted, changing nothing",
)
@click.option("--wait", help="What to wait for: pid (agent default) or health")
@click.option("--timeout", help="How long to wait, as a Go duration (agent default 60s)")
@_connection
@click.pass_context
def restart_cmd(
    ctx: click.Context,
    /,
    component: str,
    dry: bool,
    wait: str | None,
    timeout: str | None,
    **own: Any,
) -> None:
    _restart(ctx, own, component, dry, wait, timeout)


@root.command(
    "restart-dry",
    help="Exactly `restart --dry`: the planned stop and start order.\n\nCalls POST /v1/components/{name}:restart?dry=true.",
)
@_COMPONENT
@_connection
@click.pass_context
def restart_dry_cmd(ctx: click.Context, /, component: str, **own: Any) -> None:
    _restart(ctx, own, component, True, None, None)


# --- recipes --------------------------------------------------------------------------------


@root.command(
    "recipes", help="List the recipes held in the agent's recipe store.\n\nCalls GET /v1/recipes."
)
@_connection
@click.pass_context
def recipes_cmd(ctx: click.Context, /, **own: Any) -> None:
    _call(ctx, own, "GET", "/v1/recipes")


@root.command(
    "upload-recipe",
    help="Store a recipe so plans can refer to it as name:version.\n\nCalls POST /v1/recipes.",
)
@click.argument("recipe", metavar="<recipe.toml>", type=click.Path(path_type=Path))
@click.option(
    "--force", is_flag=True, help="Overwrite an existing recipe with the same name and version"
)
@_connection
@click.pass_context
def upload_recipe_cmd(ctx: click.Context, /, recipe: Path, force: bool, **own: Any) -> None:
    body = _read(ctx, recipe)
    _call(ctx, own, "POST", "/v1/recipes", params={"force": "true"} if force else None, body=body)


@root.command(
    "delete-recipe",
    help="Remove one recipe from the store, by the name and version in its metadata.\n\nCalls DELETE /v1/recipes/{name}/{version}.",
)
@click.argument("name", metavar="<name>")
@click.argument("version", metavar="<version>")
@_connection
@click.pass_context
def delete_recipe_cmd(ctx: click.Context, /, name: str, version: str, **own: Any) -> None:
    from urllib.parse import quote

    _call(ctx, own, "DELETE", f"/v1/recipes/{quote(name, safe='')}/{quote(version, safe='')}")


# --- agent and local tools ------------------------------------------------------------------


@root.command(
    "health",
    help="Ask the agent whether it is alive and how long it has been up (no token needed).\n\nCalls GET /healthz.",
)
@_connection
@click.pass_context
def health_cmd(ctx: click.Context, /, **own: Any) -> None:
    _call(ctx, own, "GET", "/healthz", timeout=10)


@root.command("version", help="Show the version of keystonectl itself; makes no request.")
def version_cmd() -> None:
    click.echo(f"keystonectl version {__version__} (python {sys.version.split()[0]})")


@root.command(
    "sha256",
    help="Compute a file's SHA-256 digest, as a recipe's artifact entry expects it. Purely local.",
)
@click.argument("file", metavar="<file>", type=click.Path(path_type=Path))
@click.pass_context
def sha256_cmd(ctx: click.Context, /, file: Path) -> None:
    import hashlib

    digest = hashlib.sha256()
    try:
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        goctl.print_error(f"open {file}: {exc.strerror or exc}")
        ctx.exit(goctl.FAILED)
    click.echo(digest.hexdigest())


@root.command("help", help="Help about any command: `keystonectl help <command>`.")
@click.argument("topic", nargs=-1)
@click.pass_context
def help_cmd(ctx: click.Context, /, topic: tuple[str, ...]) -> None:
    parent = ctx.parent
    assert parent is not None
    if not topic:
        click.echo(parent.get_help())
        return
    name = topic[0]
    if name in DELEGATED or name not in GO_COMMANDS:
        # The keystone app knows these; its own --help describes them.
        ctx.exit(_delegate([name, *topic[1:], "--help"]))
    cmd = root.get_command(ctx, name)
    assert cmd is not None
    with click.Context(cmd, info_name=name, parent=parent) as sub:
        click.echo(cmd.get_help(sub))


SHELLS = ("bash", "zsh", "fish")


@root.command(
    "completion",
    help="Generate the autocompletion script for bash, zsh or fish.\n\n  source <(keystonectl completion bash)",
)
@click.argument("shell", type=click.Choice(SHELLS))
def completion_cmd(shell: str) -> None:
    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(root, {}, goctl.CTL_NAME, COMPLETE_VAR).source())


COMPLETE_VAR = "_KEYSTONECTL_COMPLETE"


def _delegate(argv: Sequence[str]) -> int:
    """Run ``argv`` in the keystone app; Go's exit code."""
    from keystone.cli import delegate

    return delegate(list(argv))


def run(argv: Sequence[str]) -> int:
    """Run the keystonectl command line ``argv``; the exit code."""
    try:
        root.main(list(argv), prog_name=goctl.CTL_NAME, complete_var=COMPLETE_VAR)
    except SystemExit as exc:
        return _code(exc.code)
    return goctl.OK


def _code(code: object) -> int:
    if code is None:
        return goctl.OK
    if isinstance(code, int):
        return goctl.fold_exit(code)
    return goctl.FAILED

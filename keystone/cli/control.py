"""The Go keystonectl command set over the agent API, plus the local signing tools.

``register(app)`` adds: ``status``, ``components``, ``stop``, ``restart``, ``restart-dry``,
``stop-plan``, ``graph``, ``apply``, ``apply-dry``, ``reconcile``, ``recipes``,
``upload-recipe``, ``delete-recipe``, ``health``, ``version``, ``sha256``, ``sign``, ``verify``.

Every command that talks to the agent takes the connection options of ``keystone.cli.common``
(``--addr``, ``--token``, ``--ssh``, ``--runtime``) and ``--json``. Exit codes (DESIGN section
8): 0 success, 1 agent or network failure, 2 misuse, 3 refused by verification or validation,
4 deployment failed and rolled back. What each command prints lives in ``keystone.cli.views``.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from keystone import __version__
from keystone.cli import views
from keystone.cli.common import Command, add_commands, command, fail
from keystone.cli.fast import read_components, read_health, read_status
from keystone.cli.session import ExitCode, Output, Session, exit_for
from keystone.client import ApiError, Client, OperationTimeout, component_path, error_for
from keystone.errors import AgentUnreachable, UsageError
from keystone.graph import FORMATS, graph_command
from keystone.runtime.signing import (
    sha256_file,
    verify_file,
)
from keystone.units import parse_duration

ComponentArg = Annotated[str, typer.Argument(help="component name as in the plan")]
PlanArg = Annotated[
    Path, typer.Argument(help="plan TOML file", exists=True, dir_okay=False, readable=True)
]
DryOpt = Annotated[
    bool, typer.Option("--dry", "--dry-run", help="report what would happen; change nothing")
]


def _read_local(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None


def _duration(text: str) -> float:
    """``--timeout`` in seconds; a malformed one is misuse."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--timeout") from None


# --- status and components ------------------------------------------------------------------


@command(connect=True)
def status_cmd(
    session: Session,
    revision: Annotated[
        bool,
        typer.Option(
            "--revision",
            help="applied and last known-good revision, source, signer, when, last sync",
        ),
    ] = False,
) -> None:
    """Agent health, plan state and components (GET /healthz, /v1/plan/status)."""
    with session.client() as client:
        data, human = read_status(client, revision)
    session.emit(data, human)


@command(connect=True)
def components_cmd(session: Session) -> None:
    """Components with state, version, pid, restarts and health (GET /v1/components)."""
    with session.client() as client:
        data, human = read_components(client)
    session.emit(data, human)


@command(connect=True)
def health_cmd(session: Session) -> None:
    """Whether the agent is alive, for how long, and its revision (GET /healthz, no token)."""
    with session.client() as client:
        data, human = read_health(client)
    session.emit(data, human)


@command(connect=True)
def stop_cmd(session: Session, component: ComponentArg) -> None:
    """Stop one component; its dependents keep running (POST /v1/components/{name}:stop)."""
    session.request("POST", component_path(component, "stop"))
    session.emit({"component": component, "stopped": True}, lambda d: f"stopped {component}")


def _restart(
    session: Session, component: str, dry: bool, wait: str | None, timeout: str | None
) -> None:
    params: dict[str, str] = {}
    if dry:
        params["dry"] = "true"
    if wait:
        if wait not in ("pid", "health"):
            raise typer.BadParameter("expected pid or health", param_hint="--wait")
        params["wait"] = wait
    wait_s = 60.0
    if timeout:
        wait_s = _duration(timeout)
        params["timeout"] = timeout
    with session.client() as client:
        data = client.post(component_path(component, "restart"), params=params, timeout=wait_s + 30)
    session.emit(data, views.restart_text)


@command(connect=True)
def restart_cmd(
    session: Session,
    component: ComponentArg,
    dry: DryOpt = False,
    wait: Annotated[
        str | None,
        typer.Option("--wait", help="pid (default): a new pid exists; health: it probes healthy"),
    ] = None,
    timeout: Annotated[
        str | None, typer.Option("--timeout", help="how long to wait, e.g. 120s [default: 60s]")
    ] = None,
) -> None:
    """Restart a component and its hard and soft dependents
    (POST /v1/components/{name}:restart)."""
    _restart(session, component, dry, wait, timeout)


@command(connect=True)
def restart_dry_cmd(session: Session, component: ComponentArg) -> None:
    """What a restart would stop and start, changing nothing (restart --dry)."""
    _restart(session, component, True, None, None)


# --- plan -----------------------------------------------------------------------------------


@command(connect=True)
def stop_plan_cmd(session: Session) -> None:
    """Stop every component in reverse order; the plan stays stopped across agent restarts
    (POST /v1/plan/stop)."""
    session.request("POST", "/v1/plan/stop")
    session.emit({"stopped": True}, lambda d: "plan stopped")


GRAPH_FORMATS = ("text", *FORMATS)


@command(connect=True)
def graph_cmd(
    session: Session,
    fmt: Annotated[
        str, typer.Option("--format", help="text (start layers), dot, svg or mermaid")
    ] = "text",
) -> None:
    """The dependency graph of the applied plan: start layers, or a picture in Graphviz dot,
    SVG or Mermaid, nodes coloured by state (GET /v1/plan/graph, GET /v1/components)."""
    if fmt not in GRAPH_FORMATS:
        raise typer.BadParameter(f"expected {', '.join(GRAPH_FORMATS)}", param_hint="--format")
    data = session.request("GET", "/v1/plan/graph")
    if fmt == "text" or session.as_json:
        session.emit(data, views.graph_text)
        return
    components = session.request("GET", "/v1/components")
    rows = components if isinstance(components, list) else []
    session.emit(data, lambda d: graph_command(d, fmt, rows).rstrip("\n"))


@command(connect=True)
def reconcile_cmd(session: Session) -> None:
    """Start again what the applied plan says should run and does not
    (POST /v1/plan/reconcile)."""
    data = session.request("POST", "/v1/plan/reconcile")
    session.emit(data, views.reconcile_text)


def _upload_recipes(client: Client, recipes: list[tuple[str, str, str, str]]) -> list[str]:
    """Store the recipes the agent does not hold with the same bytes; return what was sent."""
    stored = {
        (r.get("name"), r.get("version")): r.get("sha256")
        for r in client.get("/v1/recipes", params={"detail": "true"})
    }
    sent = []
    for name, version, text, file in recipes:
        data = text.encode()
        if stored.get((name, version)) == hashlib.sha256(data).hexdigest():
            continue
        try:
            client.post(
                "/v1/recipes", params={"force": "true"}, body=data, content_type="application/toml"
            )
        except ApiError as exc:
            # The agent names the upload, not the file: say which local file it was.
            raise error_for(exc.status, f"{file}: {exc}", exc.api_kind) from None
        sent.append(f"{name}:{version}")
    return sent


def _local_names(notes: list[Any], recipes: list[tuple[str, str, str, str]]) -> list[Any]:
    """The agent names an uploaded recipe ``store:NAME:VERSION``: name the local file instead."""
    files = {f"store:{name}:{version}:": f"{file}:" for name, version, _text, file in recipes}
    out = []
    for note in notes:
        for ref, file in files.items():
            if isinstance(note, str) and note.startswith(ref):
                note = file + note[len(ref) :]
                break
        out.append(note)
    return out


def _wait_applied(client: Client, op_id: str, timeout: float) -> dict[str, Any]:
    """The outcome of this apply: the agent holds the request until its operation is done."""
    try:
        return client.follow_operation(op_id, timeout)
    except OperationTimeout:
        raise AgentUnreachable(
            "the plan was accepted but its deployment had not finished when --timeout "
            "passed; follow it with `keystone status`"
        ) from None


def _apply(session: Session, plan: Path, *, dry: bool, wait: bool, timeout: str) -> None:
    # lazy: the plan parser, tomlkit and the deployer (~150 ms) load only for apply
    from keystone import offline

    wait_s = _duration(timeout)
    with session.client() as client:
        if dry:
            try:
                client.get("/healthz", timeout=10)
            except AgentUnreachable:
                _apply_offline(session, plan)
                return
        text = _read_local(plan, "plan").decode("utf-8", errors="replace")
        text, recipes, _unknown = offline.prepare_plan(text, file=str(plan))
        uploaded = _upload_recipes(client, recipes)
        data = client.post(
            "/v1/plan/apply",
            params={"dry": "true"} if dry else None,
            body=text.encode(),
            content_type="application/toml",
        )
        data = dict(data or {})
        data["uploaded"] = uploaded
        if not session.as_json:
            data["unknownFields"] = _local_names(data.get("unknownFields") or [], recipes)
        code = ExitCode.OK
        if wait and not dry:
            outcome = _wait_applied(client, str(data.get("operation") or ""), wait_s)
            data["result"] = outcome.get("result")
            data["error"] = outcome.get("error") or outcome.get("reason")
            code = exit_for(outcome.get("result"))
    session.emit(data, views.actions_text)
    fail(code)


def _apply_offline(output: Output, plan: Path) -> None:
    # The fast path (keystone.cli.fast) runs the same body when it finds no agent itself.
    from keystone.cli.fast import offline_dry

    data, human, code = offline_dry(str(plan))
    output.emit(data, human)
    fail(code)


@command(connect=True)
def apply_cmd(
    session: Session,
    plan: PlanArg,
    dry: DryOpt = False,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait", help="wait for the deployment to finish (exit 4 if rolled back)"
        ),
    ] = True,
    timeout: Annotated[
        str, typer.Option("--timeout", help="how long to wait for the deployment")
    ] = "15m",
) -> None:
    """Apply a local plan: upload the recipe files it names to the agent's store, then apply
    the plan with name:version references (POST /v1/recipes, /v1/plan/apply).

    With --dry and no agent answering, the plan is validated and planned offline against the
    plan the local agent last applied.
    """
    _apply(session, plan, dry=dry, wait=wait, timeout=timeout)


@command(connect=True)
def apply_dry_cmd(session: Session, plan: PlanArg) -> None:
    """Validate a plan and print the layers and actions, changing nothing (apply --dry)."""
    _apply(session, plan, dry=True, wait=False, timeout="15m")


# --- recipes --------------------------------------------------------------------------------


@command(connect=True)
def recipes_cmd(session: Session) -> None:
    """The agent's recipe store (GET /v1/recipes)."""
    session.emit(
        session.request("GET", "/v1/recipes", params={"detail": "true"}), views.recipes_text
    )


@command(connect=True)
def upload_recipe_cmd(
    session: Session,
    recipe: Annotated[
        Path,
        typer.Argument(help="recipe TOML file", exists=True, dir_okay=False, readable=True),
    ],
    force: Annotated[
        bool, typer.Option("--force", help="replace a stored recipe of the same name and version")
    ] = False,
) -> None:
    """Store a recipe so plans can name it as name:version (POST /v1/recipes)."""
    data = session.request(
        "POST",
        "/v1/recipes",
        params={"force": "true"} if force else None,
        body=_read_local(recipe, "recipe"),
        content_type="application/toml",
    )
    session.emit(
        data,
        lambda d: (
            f"stored {d.get('name')}:{d.get('version')}"
            + (" (replaced)" if d.get("replaced") else "")
        ),
    )


@command(connect=True)
def delete_recipe_cmd(
    session: Session,
    name: Annotated[str, typer.Argument(help="recipe metadata.name")],
    version: Annotated[str, typer.Argument(help="recipe metadata.version")],
) -> None:
    """Remove a recipe from the store (DELETE /v1/recipes/{name}/{version})."""
    session.request("DELETE", f"/v1/recipes/{quote(name, safe='')}/{quote(version, safe='')}")
    session.emit({"deleted": f"{name}:{version}"}, lambda d: f"deleted {d['deleted']}")


# --- local tools ----------------------------------------------------------------------------


@command(connect=False)
def version_cmd(output: Output) -> None:
    """This CLI's version (no request is made, as in the Go keystonectl)."""
    output.emit(
        {"version": __version__, "python": platform.python_version()},
        lambda d: f"keystone {d['version']} (python {d['python']})",
    )


@command(connect=False)
def sha256_cmd(
    output: Output, path: Annotated[Path, typer.Argument(help="file", exists=True, dir_okay=False)]
) -> None:
    """The SHA-256 of a local file, as a recipe's artifact sha256 wants it."""
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    output.emit({"path": str(path), "sha256": digest}, lambda d: d["sha256"])


@command(connect=False)
def sign_cmd(
    output: Output,
    path: Annotated[Path, typer.Argument(help="file to sign", exists=True, dir_okay=False)],
    key: Annotated[
        Path,
        typer.Option("--key", help="PEM private key (ECDSA, RSA or Ed25519)", exists=True),
    ],
    cert: Annotated[
        Path | None,
        typer.Option("--cert", help="the key's certificate: check the signature before writing"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="signature file [default: FILE.sig]")
    ] = None,
) -> None:
    """Write a detached signature over the file's SHA-256 (what the agent verifies)."""
    # lazy: cryptography and the key loaders only for this command
    from keystone import sign

    # PKCS#8, PKCS#1 or SEC1 keys; with --cert, checked against it before anything is written.
    signature = sign.sign_file(path, key, cert)
    dest = out or sign.sig_path_for(path)
    try:
        sign.write_signature(dest, signature)
    except OSError as exc:
        raise UsageError(f"{dest}: cannot write the signature: {exc.strerror or exc}") from None
    output.emit(
        {"path": str(path), "signature": str(dest), "bytes": len(signature)},
        lambda d: f"signed {d['path']} -> {d['signature']} ({d['bytes']} bytes)",
    )


@command(connect=True)
def verify_cmd(
    output: Session,
    path: Annotated[
        Path | None, typer.Argument(help="file to verify (omit with --rev)", dir_okay=False)
    ] = None,
    sig: Annotated[
        Path | None, typer.Option("--sig", help="detached signature [default: FILE.sig]")
    ] = None,
    cert: Annotated[
        Path | None,
        typer.Option(
            "--cert",
            help="signer certificate [default: FILE.crt, else KEYSTONE_LEAF_CERT]",
            show_default=False,
        ),
    ] = None,
    trust_bundle: Annotated[
        Path | None,
        typer.Option(
            "--trust-bundle", envvar="KEYSTONE_TRUST_BUNDLE", help="CA bundle to chain to"
        ),
    ] = None,
    rev: Annotated[
        str | None,
        typer.Option("--rev", help="verify this commit of a fleet repository instead of a file"),
    ] = None,
    repo: Annotated[Path, typer.Option("--repo", help="fleet repository (with --rev)")] = Path("."),
    allowed_signers: Annotated[
        Path | None,
        typer.Option("--allowed-signers", help="git allowed-signers file (with --rev)"),
    ] = None,
    gpg_home: Annotated[
        Path | None, typer.Option("--gpg-home", help="gpg home for OpenPGP commits (with --rev)")
    ] = None,
    installed: Annotated[
        bool,
        typer.Option(
            "--installed",
            help="ask the agent to re-hash every component's installed files now "
            "(POST /v1/drift:check); exit 3 if any drifted",
        ),
    ] = False,
) -> None:
    """Verify a file's detached signature the way the agent will; or, with --rev (or no FILE),
    a fleet commit's signature against an allowed-signers file; or, with --installed, the
    installed files of the running components against their install manifests."""
    if installed:
        data = output.request("POST", "/v1/drift:check")
        output.emit(data, views.drift_text)
        fail(ExitCode.REFUSED if data.get("drifted") else ExitCode.OK)
        return
    if rev is not None or path is None:
        # lazy: keystone.fleet pulls in git, the trust policy and the deployer (~100 ms)
        from keystone import fleet

        verdict = fleet.verify(
            repo, rev or "HEAD", allowed_signers=allowed_signers, gpg_home=gpg_home
        )
        output.emit(verdict, views.commit_verdict_text)
        fail(ExitCode.OK if verdict["ok"] else ExitCode.REFUSED)
        return
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    sig_path = sig or path.with_name(path.name + ".sig")
    cert_path = cert
    if cert_path is None:
        sibling = path.with_name(path.name + ".crt")
        env_cert = os.environ.get("KEYSTONE_LEAF_CERT")
        cert_path = sibling if sibling.is_file() else (Path(env_cert) if env_cert else None)
    if cert_path is None:
        raise UsageError(
            f"no certificate: pass --cert, put one at {path}.crt, or set KEYSTONE_LEAF_CERT"
        )
    for p, what in ((sig_path, "signature"), (cert_path, "certificate")):
        if not p.is_file():
            raise UsageError(f"{p}: no such {what} file")
    if trust_bundle is not None and not trust_bundle.is_file():
        raise UsageError(f"{trust_bundle}: no such trust bundle")
    signer = verify_file(path, sig_path, cert_path, trust_bundle)
    output.emit(
        {
            "path": str(path),
            "ok": True,
            "signer": signer,
            "chain_checked": trust_bundle is not None,
        },
        lambda d: (
            f"OK: {d['path']} signed by {d['signer']}"
            + ("" if d["chain_checked"] else " (chain NOT checked: no --trust-bundle)")
        ),
    )


COMMANDS: tuple[tuple[str, Command], ...] = (
    ("status", status_cmd),
    ("components", components_cmd),
    ("stop", stop_cmd),
    ("restart", restart_cmd),
    ("restart-dry", restart_dry_cmd),
    ("stop-plan", stop_plan_cmd),
    ("graph", graph_cmd),
    ("apply", apply_cmd),
    ("apply-dry", apply_dry_cmd),
    ("reconcile", reconcile_cmd),
    ("recipes", recipes_cmd),
    ("upload-recipe", upload_recipe_cmd),
    ("delete-recipe", delete_recipe_cmd),
    ("health", health_cmd),
    ("version", version_cmd),
    ("sha256", sha256_cmd),
    ("sign", sign_cmd),
    ("verify", verify_cmd),
)


def register(app: typer.Typer, only: str | None = None) -> bool:
    """Add the keystonectl commands to ``app`` (only the one named ``only``, when given);
    True if any matched."""
    return add_commands(app, only, COMMANDS)

"""The Go keystonectl command set over the agent API, plus the local signing tools.

``register(app)`` adds: ``status``, ``components``, ``stop``, ``restart``, ``restart-dry``,
``stop-plan``, ``graph``, ``apply``, ``apply-dry``, ``reconcile``, ``recipes``,
``upload-recipe``, ``delete-recipe``, ``health``, ``version``, ``sha256``, ``sign``, ``verify``.

Every command that talks to the agent takes ``--addr`` (``KEYSTONE_ADDR``, default
``http://127.0.0.1:8080``), ``--token`` (``KEYSTONE_API_TOKEN``, else the agent's
``api.token``), ``--ssh [user@]host[:port]`` (``KEYSTONE_SSH``), ``--runtime`` (where to find
the token file) and ``--json``. Exit codes (DESIGN section 8): 0 success, 1 agent or network
failure, 2 misuse, 3 refused by verification or validation, 4 deployment failed and rolled
back. What each command prints lives in ``keystone.ctl_views``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from keystone import ctl_views as views
from keystone.client import Client, component_path
from keystone.errors import AgentUnreachable, KeystoneError, UsageError, ValidationError

F = TypeVar("F", bound=Callable[..., Any])

AddrOpt = Annotated[
    str | None,
    typer.Option(
        "--addr",
        envvar="KEYSTONE_ADDR",
        help="agent API URL [default: http://127.0.0.1:8080]; with --ssh, as seen from that host",
        show_default=False,
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="KEYSTONE_API_TOKEN",
        help="API token [default: the agent's runtime/api.token]",
        show_default=False,
    ),
]
SshOpt = Annotated[
    str | None,
    typer.Option(
        "--ssh",
        envvar="KEYSTONE_SSH",
        help="reach the agent through `ssh -W`: [user@]host[:port]",
        show_default=False,
    ),
]
RuntimeOpt = Annotated[
    Path | None,
    typer.Option(
        "--runtime",
        envvar="KEYSTONE_RUNTIME",
        help="the agent's runtime dir, where its api.token is [default: ./runtime, "
        "/var/lib/keystone]",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable JSON output")]
DryOpt = Annotated[
    bool, typer.Option("--dry", "--dry-run", help="report what would happen; change nothing")
]


def _client(addr: str | None, token: str | None, ssh: str | None, runtime: Path | None) -> Client:
    return Client(addr, token, ssh, runtime=runtime)


def _errors(fn: F) -> F:
    """Print a KeystoneError as ``error: ...`` (and as JSON with --json) and exit with its
    exit code, whether or not the app's entry point would."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeystoneError as exc:
            raise typer.Exit(views.report_error(exc, bool(kwargs.get("as_json")))) from None

    return wrapper  # type: ignore[return-value]


def _read_local(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None


# --- status and components ------------------------------------------------------------------


@_errors
def status_cmd(
    revision: Annotated[
        bool,
        typer.Option(
            "--revision",
            help="applied and last known-good revision, source, signer, when, last sync",
        ),
    ] = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Agent health, plan state and components (GET /healthz, /v1/plan/status)."""
    with _client(addr, token, ssh, runtime) as client:
        data, human = views.run_status(client, revision)
    views.emit(data, as_json, human)


@_errors
def components_cmd(
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Components with state, version, pid, restarts and health (GET /v1/components)."""
    with _client(addr, token, ssh, runtime) as client:
        data, human = views.run_components(client)
    views.emit(data, as_json, human)


@_errors
def health_cmd(
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Whether the agent is alive, for how long, and its revision (GET /healthz, no token)."""
    with _client(addr, token, ssh, runtime) as client:
        data, human = views.run_health(client)
    views.emit(data, as_json, human)


@_errors
def stop_cmd(
    component: Annotated[str, typer.Argument(help="component name as in the plan")],
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop one component; its dependents keep running (POST /v1/components/{name}:stop)."""
    with _client(addr, token, ssh, runtime) as client:
        client.post(component_path(component, "stop"))
    views.emit({"component": component, "stopped": True}, as_json, lambda d: f"stopped {component}")


def _restart(
    component: str,
    dry: bool,
    wait: str | None,
    timeout: str | None,
    addr: str | None,
    token: str | None,
    ssh: str | None,
    runtime: Path | None,
    as_json: bool,
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
        from keystone.units import parse_duration

        try:
            wait_s = parse_duration(timeout)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--timeout") from None
        params["timeout"] = timeout
    with _client(addr, token, ssh, runtime) as client:
        data = client.post(component_path(component, "restart"), params=params, timeout=wait_s + 30)
    views.emit(data, as_json, views.restart_text)


@_errors
def restart_cmd(
    component: Annotated[str, typer.Argument(help="component name as in the plan")],
    dry: DryOpt = False,
    wait: Annotated[
        str | None,
        typer.Option("--wait", help="pid (default): a new pid exists; health: it probes healthy"),
    ] = None,
    timeout: Annotated[
        str | None, typer.Option("--timeout", help="how long to wait, e.g. 120s [default: 60s]")
    ] = None,
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Restart a component and its hard and soft dependents
    (POST /v1/components/{name}:restart)."""
    _restart(component, dry, wait, timeout, addr, token, ssh, runtime, as_json)


@_errors
def restart_dry_cmd(
    component: Annotated[str, typer.Argument(help="component name as in the plan")],
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What a restart would stop and start, changing nothing (restart --dry)."""
    _restart(component, True, None, None, addr, token, ssh, runtime, as_json)


# --- plan -----------------------------------------------------------------------------------


@_errors
def stop_plan_cmd(
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop every component in reverse order; the plan stays stopped across agent restarts
    (POST /v1/plan/stop)."""
    with _client(addr, token, ssh, runtime) as client:
        client.post("/v1/plan/stop")
    views.emit({"stopped": True}, as_json, lambda d: "plan stopped")


@_errors
def graph_cmd(
    fmt: Annotated[str, typer.Option("--format", help="text (start layers) or dot")] = "text",
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The dependency graph of the applied plan: start layers, or Graphviz dot
    (GET /v1/plan/graph)."""
    if fmt not in ("text", "dot"):
        raise typer.BadParameter("expected text or dot", param_hint="--format")
    with _client(addr, token, ssh, runtime) as client:
        data = client.get("/v1/plan/graph")
    views.emit(data, as_json, views.graph_dot if fmt == "dot" else views.graph_text)


@_errors
def reconcile_cmd(
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start again what the applied plan says should run and does not
    (POST /v1/plan/reconcile)."""
    with _client(addr, token, ssh, runtime) as client:
        data = client.post("/v1/plan/reconcile")
    views.emit(
        data, as_json, lambda d: f"repaired: {', '.join(d.get('repaired') or []) or 'nothing'}"
    )


class _RecordingEnv(Mapping[str, str]):
    """The local environment for checking recipes; remembers the ``${VAR}`` it lacks (the agent
    substitutes recipes with its own environment, which may well set them)."""

    def __init__(self, base: Mapping[str, str]) -> None:
        self.base = dict(base)
        self.base.setdefault("KEYSTONE_PYTHON", sys.executable)
        self.missing: set[str] = set()

    def __getitem__(self, key: str) -> str:
        return self.base[key]

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self.base:
            self.missing.add(key)
        return self.base.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def recipe_ref(text: str, file: str) -> tuple[str, str]:
    """``(name, version)`` of a local recipe, validated here as far as this machine can.

    A recipe that names a ``${VAR}`` unset here is checked by the agent instead; its name and
    version are still read (and must be safe path segments).
    """
    import tomllib

    from keystone.recipe import check_segment, parse_recipe

    env = _RecordingEnv(os.environ)
    try:
        recipe = parse_recipe(text, file=file, environ=env)
        return recipe.name, recipe.version
    except ValidationError:
        if not env.missing:
            raise
    try:
        meta = tomllib.loads(text).get("metadata")
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(str(exc), file=file) from None
    out = []
    for key in ("name", "version"):
        value = meta.get(key) if isinstance(meta, dict) else None
        why = check_segment(value) if isinstance(value, str) else "required, a string"
        if why:
            raise ValidationError(why, file=file, field=f"metadata.{key}")
        out.append(str(value))
    return out[0], out[1]


def prepare_plan(plan: Path) -> tuple[str, list[tuple[str, str, str, str]], list[str]]:
    """Read a local plan and the recipe files it names, for upload.

    Returns the plan text with every file reference rewritten to ``name:version`` (comments,
    order, line numbers and unknown fields kept), the recipes to upload as
    ``(name, version, text, file)``, and the plan's own unknown fields.

    Raises:
        ValidationError: the plan or a recipe does not parse or validate (file, line, field).
    """
    import tomlkit

    from keystone.plan import STORE_REF, FileRecipes, parse_plan

    text = _read_local(plan, "plan").decode("utf-8", errors="replace")
    parsed = parse_plan(text, file=str(plan))
    doc = tomlkit.parse(text)
    tables = doc.get("components") or []
    reader = FileRecipes(Path.cwd(), None)
    recipes: list[tuple[str, str, str, str]] = []
    for table, entry in zip(tables, parsed.entries, strict=True):
        if not entry.enabled or (STORE_REF.match(entry.recipe) and "/" not in entry.recipe):
            continue  # removed by enabled = false, or already a reference to the agent's store
        recipe_text, display = reader(entry)
        name, version = recipe_ref(recipe_text, display)
        table["recipe"] = f"{name}:{version}"
        recipes.append((name, version, recipe_text, display))
    return tomlkit.dumps(doc), recipes, list(parsed.unknown_fields)


def _upload_recipes(client: Client, recipes: list[tuple[str, str, str, str]]) -> list[str]:
    """Store the recipes the agent does not hold with the same bytes; return what was sent."""
    from keystone.client import ApiError, error_for

    stored = {(r.get("name"), r.get("version")): r.get("sha256") for r in client.get("/v1/recipes")}
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


def _history_marks(client: Client) -> set[str]:
    return {json_key(e) for e in client.get("/v1/history", params={"limit": "20"})}


def json_key(entry: Any) -> str:
    import json

    return json.dumps(entry, sort_keys=True, default=str)


def _wait_applied(client: Client, before: set[str], deadline: float) -> dict[str, Any]:
    """Poll the history until the agent records the outcome of this apply; return it."""
    delay = 0.1
    while True:
        for entry in client.get("/v1/history", params={"limit": "20"}):
            if entry.get("kind") == "apply" and json_key(entry) not in before:
                return dict(entry)
        if time.monotonic() > deadline:
            raise AgentUnreachable(
                "the plan was accepted but its deployment had not finished when --timeout "
                "passed; follow it with `keystone status`"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


@_errors
def apply_cmd(
    plan: Annotated[
        Path,
        typer.Argument(help="plan TOML file", exists=True, dir_okay=False, readable=True),
    ],
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
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply a local plan: upload the recipe files it names to the agent's store, then apply
    the plan with name:version references (POST /v1/recipes, /v1/plan/apply).

    With --dry and no agent answering, the plan is validated and planned offline against the
    plan the local agent last applied.
    """
    from keystone.units import parse_duration

    try:
        wait_s = parse_duration(timeout)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--timeout") from None
    with _client(addr, token, ssh, runtime) as client:
        if dry:
            try:
                client.get("/healthz", timeout=10)
            except AgentUnreachable:
                _apply_offline(plan, as_json)
                return
        text, recipes, _unknown = prepare_plan(plan)
        uploaded = _upload_recipes(client, recipes)
        before = _history_marks(client) if wait and not dry else set()
        data = client.post(
            "/v1/plan/apply",
            params={"dry": "true"} if dry else None,
            body=text.encode(),
            content_type="application/toml",
        )
        data = dict(data or {})
        data["uploaded"] = uploaded
        code = 0
        if wait and not dry:
            outcome = _wait_applied(client, before, time.monotonic() + wait_s)
            data["result"] = outcome.get("result")
            data["error"] = outcome.get("error") or outcome.get("reason")
            code = {"ok": 0, "rolled-back": 4, "refused": 3}.get(str(outcome.get("result")), 1)
    views.emit(data, as_json, views.actions_text)
    if code:
        raise typer.Exit(code)


def _apply_offline(plan: Path, as_json: bool) -> None:
    from keystone.offline import dry_run

    data = dry_run(plan)
    data["offline"] = True
    views.emit(
        data,
        as_json,
        lambda d: (
            "no agent answered: planned offline against the last applied local plan\n"
            + views.actions_text(d)
        ),
    )
    if data.get("unknown_fields"):
        raise typer.Exit(ValidationError.exit_code)


@_errors
def apply_dry_cmd(
    plan: Annotated[
        Path,
        typer.Argument(help="plan TOML file", exists=True, dir_okay=False, readable=True),
    ],
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate a plan and print the layers and actions, changing nothing (apply --dry)."""
    apply_cmd(
        plan,
        dry=True,
        wait=False,
        timeout="15m",
        addr=addr,
        token=token,
        ssh=ssh,
        runtime=runtime,
        as_json=as_json,
    )


# --- recipes --------------------------------------------------------------------------------


@_errors
def recipes_cmd(
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The agent's recipe store (GET /v1/recipes)."""
    with _client(addr, token, ssh, runtime) as client:
        data = client.get("/v1/recipes")
    views.emit(data, as_json, views.recipes_text)


@_errors
def upload_recipe_cmd(
    recipe: Annotated[
        Path,
        typer.Argument(help="recipe TOML file", exists=True, dir_okay=False, readable=True),
    ],
    force: Annotated[
        bool, typer.Option("--force", help="replace a stored recipe of the same name and version")
    ] = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Store a recipe so plans can name it as name:version (POST /v1/recipes)."""
    with _client(addr, token, ssh, runtime) as client:
        data = client.post(
            "/v1/recipes",
            params={"force": "true"} if force else None,
            body=_read_local(recipe, "recipe"),
            content_type="application/toml",
        )
    views.emit(
        data,
        as_json,
        lambda d: (
            f"stored {d.get('name')}:{d.get('version')}"
            + (" (replaced)" if d.get("replaced") else "")
        ),
    )


@_errors
def delete_recipe_cmd(
    name: Annotated[str, typer.Argument(help="recipe metadata.name")],
    version: Annotated[str, typer.Argument(help="recipe metadata.version")],
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a recipe from the store (DELETE /v1/recipes/{name}/{version})."""
    from urllib.parse import quote

    with _client(addr, token, ssh, runtime) as client:
        client.request("DELETE", f"/v1/recipes/{quote(name, safe='')}/{quote(version, safe='')}")
    views.emit({"deleted": f"{name}:{version}"}, as_json, lambda d: f"deleted {d['deleted']}")


# --- local tools ----------------------------------------------------------------------------


@_errors
def version_cmd(as_json: JsonOpt = False) -> None:
    """This CLI's version (no request is made, as in the Go keystonectl)."""
    import platform

    from keystone import __version__

    views.emit(
        {"version": __version__, "python": platform.python_version()},
        as_json,
        lambda d: f"keystone {d['version']} (python {d['python']})",
    )


@_errors
def sha256_cmd(
    path: Annotated[Path, typer.Argument(help="file", exists=True, dir_okay=False)],
    as_json: JsonOpt = False,
) -> None:
    """The SHA-256 of a local file, as a recipe's artifact sha256 wants it."""
    from keystone.runtime.signing import sha256_file

    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    views.emit({"path": str(path), "sha256": digest}, as_json, lambda d: d["sha256"])


@_errors
def sign_cmd(
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
    as_json: JsonOpt = False,
) -> None:
    """Write a detached signature over the file's SHA-256 (what the agent verifies)."""
    from keystone.runtime.signing import (
        load_certificates,
        sha256_file,
        sign_file,
        verify_digest,
    )

    signature = sign_file(path, key)
    if cert is not None:
        chain = load_certificates(_read_local(cert, "certificate"), what=str(cert))
        verify_digest(bytes.fromhex(sha256_file(path)), signature, chain[0])
    dest = out or path.with_name(path.name + ".sig")
    try:
        dest.write_bytes(signature)
    except OSError as exc:
        raise UsageError(f"{dest}: cannot write the signature: {exc.strerror or exc}") from None
    views.emit(
        {"path": str(path), "signature": str(dest), "bytes": len(signature)},
        as_json,
        lambda d: f"signed {d['path']} -> {d['signature']} ({d['bytes']} bytes)",
    )


@_errors
def verify_cmd(
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
    as_json: JsonOpt = False,
) -> None:
    """Verify a file's detached signature the way the agent will; or, with --rev (or no FILE),
    a fleet commit's signature against an allowed-signers file."""
    if rev is not None or path is None:
        from keystone.offline import verify_revision

        code = verify_revision(repo, rev or "HEAD", allowed_signers, as_json, gpg_home=gpg_home)
        raise typer.Exit(code)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    from keystone.runtime.signing import verify_file

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
    views.emit(
        {
            "path": str(path),
            "ok": True,
            "signer": signer,
            "chain_checked": trust_bundle is not None,
        },
        as_json,
        lambda d: (
            f"OK: {d['path']} signed by {d['signer']}"
            + ("" if d["chain_checked"] else " (chain NOT checked: no --trust-bundle)")
        ),
    )


COMMANDS: tuple[tuple[str, Callable[..., Any]], ...] = (
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
    """Add the keystonectl commands to ``app`` (only the one named ``only``, when given, since
    typer's introspection of every command costs tens of milliseconds); True if any matched."""
    found = False
    for name, fn in COMMANDS:
        if only is None or only == name:
            app.command(name)(fn)
            found = True
    return found

"""The Go keystonectl command set over the agent API, plus local artifact tools.

Every command takes ``--addr`` (``KEYSTONE_ADDR``), ``--token`` (``KEYSTONE_API_TOKEN``, else the
agent's ``runtime/api.token``), ``--ssh`` (``KEYSTONE_SSH``) and ``--json``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from keystone.cli import emit
from keystone.cli_sync import (
    DEFAULT_ADDR,
    AddrOpt,
    JsonOpt,
    SshOpt,
    TokenOpt,
    _call,
    _short,
    _table,
    _when,
)


def _components_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no components"
    table = [
        [
            c["name"],
            c["state"],
            c.get("version") or "",
            str(c.get("pid") or "-"),
            str(c.get("restarts", 0)),
            (c.get("error") or c.get("last_health") or "")[:70],
        ]
        for c in rows
    ]
    return _table(table, ["COMPONENT", "STATE", "VERSION", "PID", "RESTARTS", "HEALTH / ERROR"])


def status_cmd(
    revision: Annotated[
        bool,
        typer.Option("--revision", help="applied and last known-good revision, source, signer"),
    ] = False,
    addr: AddrOpt = DEFAULT_ADDR,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Agent health and components; with --revision the GitOps state."""
    if revision:
        data = _call(addr, token, ssh, "GET", "/v1/revision")

        def human(d: dict[str, Any]) -> str:
            last = d.get("last_sync") or {}
            lines = [
                f"applied:          {d.get('applied') or '-'}",
                f"last known-good:  {d.get('last_known_good') or '-'}{'  (soaking)' if d.get('soaking') else ''}",
                f"source:           {d.get('source') or '-'} {d.get('ref') or ''}".rstrip(),
                f"signer:           {d.get('signer') or '-'} {d.get('fingerprint') or ''}".rstrip(),
                f"applied at:       {_when(d.get('applied_at'))}",
                f"last sync:        {last.get('result', '-')} {_short(last.get('revision'))} at {_when(last.get('time'))}",
            ]
            if last.get("error"):
                lines.append(f"  reason:         {last['error']}")
            if d.get("suspended"):
                lines.append("polling:          SUSPENDED (keystone resume)")
            for rev, info in (d.get("failed") or {}).items():
                lines.append(
                    f"failed:           {_short(rev)} {info.get('kind', '')}: {info.get('reason', '')}"[
                        :160
                    ]
                )
            return "\n".join(lines)

        emit(data, as_json, human)
        return
    health = _call(addr, token, ssh, "GET", "/healthz")
    comps = _call(addr, token, ssh, "GET", "/v1/components")
    data = {"health": health, "components": comps}
    emit(
        data,
        as_json,
        lambda d: (
            f"agent {d['health']['status']}, up {d['health']['uptime']:.0f}s, "
            f"revision {_short(d['health'].get('revision'))}, device {d['health'].get('device')}\n\n"
            + _components_table(d["components"])
        ),
    )


def components_cmd(
    addr: AddrOpt = DEFAULT_ADDR,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List components with state, version, pid, restarts and health."""
    emit(_call(addr, token, ssh, "GET", "/v1/components"), as_json, _components_table)


def stop_cmd(
    component: str,
    addr: AddrOpt = DEFAULT_ADDR,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop one component (it stays stopped until restarted or the plan is applied again)."""
    _call(addr, token, ssh, "POST", f"/v1/components/{component}:stop")
    emit({"component": component, "stopped": True}, as_json, lambda d: f"stopped {component}")


def restart_cmd(
    component: str,
    dry: Annotated[
        bool, typer.Option("--dry", "--dry-run", help="print stop and start order only")
    ] = False,
    wait: Annotated[str | None, typer.Option("--wait", help="pid or health")] = None,
    timeout: Annotated[str, typer.Option("--timeout", help="e.g. 60s")] = "60s",
    addr: AddrOpt = DEFAULT_ADDR,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Restart a component and its hard/soft dependents."""
    params = {"dry": str(dry).lower(), "timeout": timeout}
    if wait:
        params["wait"] = wait
    data = _call(addr, token, ssh, "POST", f"/v1/components/{component}:restart", params=params)
    if dry:
        emit(
            data,
            as_json,
            lambda d: (
                f"stop:  {' -> '.join(d['stopOrder'])}\nstart: {' -> '.join(d['startOrder'])}"
            ),
        )
    else:
        emit(
            data,
            as_json,
            lambda d: (
                f"restarted {d['component']} (pid {d.get('pid')}); dependents: {', '.join(d['dependents']) or '-'}"
            ),
        )


def restart_dry_cmd(
    component: str,
    addr: AddrOpt = DEFAULT_ADDR,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print what a restart of COMPONENT would stop and start."""
    restart_cmd(
        component,
        dry=True,
        wait=None,
        timeout="60s",
        addr=addr,
        token=token,
        ssh=ssh,
        as_json=as_json,
    )


def stop_plan_cmd(
    addr: AddrOpt = DEFAULT_ADDR,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop every component; the plan stays stopped across agent restarts."""
    _call(addr, token, ssh, "POST", "/v1/plan/stop")
    emit({"stopped": True}, as_json, lambda d: "plan stopped")


def graph_cmd(
    fmt: Annotated[str, typer.Option("--format", help="text or dot")] = "text",
    addr: AddrOpt = DEFAULT_ADDR,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The dependency graph: start layers as text, or Graphviz dot."""
    data = _call(addr, token, ssh, "GET", "/v1/plan/graph")
    if fmt == "dot" and not as_json:
        lines = ["digraph keystone {", "  rankdir=LR;"]
        lines += [f'  "{n}";' for n in data["nodes"]]
        style = {"hard": "solid", "soft": "dashed", "ordering": "dotted"}
        lines += [
            f'  "{e["from"]}" -> "{e["to"]}" [style={style.get(e["type"], "solid")}, label="{e["type"]}"];'
            for e in data["edges"]
        ]
        typer.echo("\n".join([*lines, "}"]))
        return
    if fmt not in ("text", "dot"):
        raise typer.BadParameter("expected text or dot", param_hint="--format")
    emit(
        data,
        as_json,
        lambda d: (
            "\n".join(f"layer {i}: {', '.join(layer)}" for i, layer in enumerate(d["order"]))
            or "empty plan"
        ),
    )


def _upload_plan(plan: Path, addr: str, token: str | None, ssh: str | None) -> str:
    """Upload the recipes a local plan names; return the plan rewritten to name:version refs."""
    from keystone.agent import substitution_env
    from keystone.plan import load_desired

    desired = load_desired(plan, environ=substitution_env())
    lines = []
    for comp in desired.components.values():
        _call(
            addr,
            token,
            ssh,
            "POST",
            "/v1/recipes",
            params={"force": "true"},
            body=comp.recipe.text.encode(),
            content_type="application/toml",
        )
        lines.append(
            f'[[components]]\nname = "{comp.name}"\nrecipe = "{comp.recipe.name}:{comp.recipe.version}"\n'
        )
    return "\n".join(lines)


def _actions_human(d: dict[str, Any]) -> str:
    out = [f"layers: {' | '.join(', '.join(layer) for layer in d.get('layers', []))}"]
    rows = [
        [a["action"], a["component"], a["version"], str(a["layer"]), a["reason"]]
        for a in d.get("actions", [])
    ]
    out.append(
        _table(rows, ["ACTION", "COMPONENT", "VERSION", "LAYER", "WHY"]) if rows else "no changes"
    )
    out += [
        f"warning: {w}"
        for w in d.get("warnings", []) + d.get("unknown_fields", d.get("unknownFields", []))
    ]
    return "\n".join(out)


def apply_cmd(
    plan: Annotated[Path, typer.Argument(help="plan TOML file")],
    dry: Annotated[
        bool, typer.Option("--dry", "--dry-run", help="validate and print layers and actions only")
    ] = False,
    addr: AddrOpt = DEFAULT_ADDR,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply a plan: its recipes are uploaded to the agent's store, then the plan is applied.

    With --dry and no agent answering, the plan is validated and planned offline.
    """
    from keystone.errors import AgentUnreachable

    if dry:
        try:
            _call(addr, token, ssh, "GET", "/healthz", timeout=5)
        except AgentUnreachable:
            from keystone.offline import dry_run

            data = dry_run(plan)
            data["offline"] = True
            emit(
                data,
                as_json,
                lambda d: (
                    "(no agent answered: planned offline against the last applied plan)\n"
                    + _actions_human(d)
                ),
            )
            if data["unknown_fields"]:
                raise typer.Exit(3) from None
            return
    text = _upload_plan(plan, addr, token, ssh)
    data = _call(
        addr,
        token,
        ssh,
        "POST",
        "/v1/plan/apply",
        params={"dry": str(dry).lower()},
        body=text.encode(),
        content_type="application/toml",
    )
    emit(data, as_json, _actions_human)


def apply_dry_cmd(
    plan: Path,
    addr: AddrOpt = DEFAULT_ADDR,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Same as apply --dry."""
    apply_cmd(plan, dry=True, addr=addr, token=token, ssh=ssh, as_json=as_json)


def reconcile_cmd(
    addr: AddrOpt = DEFAULT_ADDR,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start again what the applied plan says should run and does not."""
    emit(
        _call(addr, token, ssh, "POST", "/v1/plan/reconcile"),
        as_json,
        lambda d: f"repaired: {', '.join(d['repaired']) or 'nothing'}",
    )


def recipes_cmd(
    addr: AddrOpt = DEFAULT_ADDR,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the recipe store."""
    emit(
        _call(addr, token, ssh, "GET", "/v1/recipes"),
        as_json,
        lambda rows: (
            _table(
                [[r["name"], r["version"], r["sha256"][:16]] for r in rows],
                ["NAME", "VERSION", "SHA256"],
            )
            if rows
            else "no recipes"
        ),
    )


def upload_recipe_cmd(
    recipe: Path,
    force: Annotated[
        bool, typer.Option("--force", help="replace a stored recipe of the same name and version")
    ] = False,
    addr: AddrOpt = DEFAULT_ADDR,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a recipe to the agent's store."""
    data = _call(
        addr,
        token,
        ssh,
        "POST",
        "/v1/recipes",
        params={"force": str(force).lower()},
        body=recipe.read_bytes(),
        content_type="application/toml",
    )
    emit(data, as_json, lambda d: f"stored {d['name']}:{d['version']}")


def delete_recipe_cmd(
    name: str,
    version: str,
    addr: AddrOpt = DEFAULT_ADDR,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a recipe from the store."""
    _call(addr, token, ssh, "DELETE", f"/v1/recipes/{name}/{version}")
    emit({"deleted": f"{name}:{version}"}, as_json, lambda d: f"deleted {d['deleted']}")


def health_cmd(
    addr: AddrOpt = DEFAULT_ADDR,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The agent's /healthz."""
    data = _call(addr, token, ssh, "GET", "/healthz", timeout=10)
    emit(
        data,
        as_json,
        lambda d: (
            f"{d['status']} (up {d['uptime']:.0f}s, version {d.get('version')}, revision {_short(d.get('revision'))})"
        ),
    )


def version_cmd(
    addr: AddrOpt = DEFAULT_ADDR,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the CLI version and, when one answers, the agent's."""
    import sys

    from keystone import __version__
    from keystone.errors import AgentUnreachable

    data: dict[str, Any] = {"cli": __version__, "python": sys.version.split()[0]}
    try:
        data["agent"] = _call(addr, token, ssh, "GET", "/healthz", timeout=3).get("version")
    except AgentUnreachable:
        data["agent"] = None
    emit(data, as_json, lambda d: f"keystone {d['cli']} (agent: {d['agent'] or 'not reachable'})")


def sha256_cmd(path: Path, as_json: JsonOpt = False) -> None:
    """Print the SHA-256 of a file (for recipe pins)."""
    from keystone.runtime.signing import sha256_file

    digest = sha256_file(path)
    emit({"path": str(path), "sha256": digest}, as_json, lambda d: f"{d['sha256']}  {d['path']}")


def sign_cmd(
    path: Path,
    key: Annotated[Path, typer.Option("--key", help="PEM private key (ECDSA, RSA or Ed25519)")],
    out: Annotated[
        Path | None, typer.Option("--out", help="signature file (default PATH.sig)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign a file's SHA-256 as `openssl dgst -sha256 -sign` does (Ed25519 over the digest)."""
    from keystone.runtime.signing import sign_file

    sig = sign_file(path, key)
    dest = out or path.with_name(path.name + ".sig")
    dest.write_bytes(sig)
    emit({"path": str(path), "signature": str(dest)}, as_json, lambda d: f"wrote {d['signature']}")


def verify_cmd(
    path: Annotated[Path | None, typer.Argument(help="file to verify (omit with --rev)")] = None,
    sig: Annotated[Path | None, typer.Option("--sig", help="detached signature")] = None,
    cert: Annotated[
        Path | None, typer.Option("--cert", envvar="KEYSTONE_LEAF_CERT", help="signer certificate")
    ] = None,
    trust_bundle: Annotated[
        Path | None, typer.Option("--trust-bundle", envvar="KEYSTONE_TRUST_BUNDLE")
    ] = None,
    rev: Annotated[
        str | None, typer.Option("--rev", help="verify this commit of a fleet repository instead")
    ] = None,
    repo: Annotated[Path, typer.Option("--repo", help="fleet repository (with --rev)")] = Path("."),
    allowed_signers: Annotated[
        Path | None, typer.Option("--allowed-signers", help="git allowed-signers file (with --rev)")
    ] = None,
    gpg_home: Annotated[
        Path | None, typer.Option("--gpg-home", help="gpg home for OpenPGP commits (with --rev)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify a file's detached signature, or (with --rev) a fleet commit's signature."""
    if rev is not None or path is None:
        from keystone.offline import verify_revision

        raise typer.Exit(
            verify_revision(repo, rev or "HEAD", allowed_signers, as_json, gpg_home=gpg_home)
        )
    if sig is None or cert is None:
        raise typer.BadParameter("verifying a file needs --sig and --cert (or KEYSTONE_LEAF_CERT)")
    from keystone.runtime.signing import verify_file

    try:
        signer = verify_file(path, sig, cert, trust_bundle)
    except Exception as exc:
        emit(
            {"path": str(path), "ok": False, "reason": str(exc)},
            as_json,
            lambda d: f"BAD: {d['reason']}",
        )
        raise typer.Exit(3) from None
    emit(
        {"path": str(path), "ok": True, "signer": signer},
        as_json,
        lambda d: f"good signature by {d['signer']}",
    )


def register(app: typer.Typer, only: str | None = None) -> bool:
    """Add the keystonectl commands to the main app (just ``only`` when given); True if any matched."""
    commands: list[tuple[str, Callable[..., Any]]] = [
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
    ]
    found = False
    for name, fn in commands:
        if only in (None, name):
            app.command(name)(fn)
            found = True
    return found

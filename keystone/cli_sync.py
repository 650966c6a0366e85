"""GitOps commands: sync, status --revision, history, rollback, suspend/resume, plan, bundle.

``plan render``, ``plan diff`` and ``bundle create/inspect`` work offline on a fleet checkout;
the others talk to the running agent through its API.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer

from keystone.cli import emit
from keystone.ctl import AddrOpt, RuntimeOpt, SshOpt, TokenOpt

plan_app = typer.Typer(help="Offline tools on a fleet checkout.", no_args_is_help=True)
bundle_app = typer.Typer(help="Air-gapped bundles: create, inspect, import.", no_args_is_help=True)

RepoOpt = Annotated[Path, typer.Option("--repo", help="fleet repository (checkout or bare)")]
LabelsOpt = Annotated[str, typer.Option("--labels", help="device labels, comma separated")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _labels(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _short(rev: Any) -> str:
    return str(rev)[:12] if rev else "-"


def _when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t))) if t else "-"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


@plan_app.command("render")
def plan_render(
    repo: RepoOpt = Path("."),
    labels: LabelsOpt = "",
    device: Annotated[
        str, typer.Option("--device", help="device id (for devices/<id>/plan.toml)")
    ] = "any-device",
    rev: Annotated[
        str | None, typer.Option("--rev", help="commit or ref (default: the working tree)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the plan a device would run, and the file each component came from."""
    from keystone import fleet

    data = fleet.render(repo, rev, device=device, labels=_labels(labels))

    def human(d: dict[str, Any]) -> str:
        out = [
            f"revision: {d['revision']}   device: {d['device']}   labels: {', '.join(d['labels']) or '-'}",
            f"plan files: {', '.join(d['plan_files']) or 'none'}",
            "",
        ]
        rows = [
            [str(c["layer"]), c["name"], c["recipe"], c["version"], c["recipe_file"], c["from"]]
            for c in d["components"]
        ]
        out.append(
            _table(rows, ["LAYER", "COMPONENT", "RECIPE", "VERSION", "RECIPE FILE", "FROM"])
            if rows
            else "no components"
        )
        out += [f"warning: {w}" for w in d["warnings"] + d["unknown_fields"]]
        return "\n".join(out)

    emit(data, as_json, human)
    if data["unknown_fields"]:
        raise typer.Exit(3)


@plan_app.command("diff")
def plan_diff(
    rev_a: Annotated[str, typer.Argument(help="from this commit")],
    rev_b: Annotated[str, typer.Argument(help="to this commit")],
    repo: RepoOpt = Path("."),
    labels: LabelsOpt = "",
    device: Annotated[str, typer.Option("--device")] = "any-device",
    as_json: JsonOpt = False,
) -> None:
    """What moving a device from REV_A to REV_B changes, in deployment order."""
    from keystone import fleet

    data = fleet.diff(repo, rev_a, rev_b, device=device, labels=_labels(labels))

    def human(d: dict[str, Any]) -> str:
        out = [f"{_short(d['from'])} -> {_short(d['to'])}"]
        ch = d["changes"]
        for key in ("added", "changed", "restarted", "removed", "unchanged"):
            out.append(f"  {key:<10} {', '.join(ch[key]) or '-'}")
        if d["actions"]:
            out.append("")
            out.append(
                _table(
                    [
                        [a["action"], a["component"], a["version"], str(a["layer"]), a["reason"]]
                        for a in d["actions"]
                    ],
                    ["ACTION", "COMPONENT", "VERSION", "LAYER", "WHY"],
                )
            )
        return "\n".join(out)

    emit(data, as_json, human)


@bundle_app.command("create")
def bundle_create(
    out: Annotated[Path, typer.Argument(help="bundle file to write")],
    repo: RepoOpt = Path("."),
    rev: Annotated[str, typer.Option("--rev", help="commit or ref to carry")] = "HEAD",
    since: Annotated[
        str | None, typer.Option("--since", help="incremental: commit the devices already have")
    ] = None,
    labels: Annotated[
        str | None, typer.Option("--labels", help="carry artifacts for these labels")
    ] = None,
    all_labels: Annotated[
        bool, typer.Option("--all-labels", help="carry artifacts for every label")
    ] = False,
    device: Annotated[
        list[str] | None, typer.Option("--device", help="also carry what this device's plan needs")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one file with the fleet repo at REV and every artifact its plans need."""
    import tempfile

    from keystone import fleet
    from keystone.sources.bundle import create_bundle

    mirror = fleet.Checkout(repo).mirror()
    sha = fleet.resolve_rev(mirror, rev)
    base = _labels(labels or "")
    targets: list[tuple[str, list[str]]] = [("any-device", [])]
    if all_labels:
        targets += [("any-device", [label]) for label in fleet.all_labels(repo, sha)]
        targets += [(d, []) for d in fleet.all_devices(repo, sha)]
    elif base:
        targets.append(("any-device", base))
    targets += [(d, base) for d in device or []]
    with tempfile.TemporaryDirectory(prefix="keystone-bundle-") as work:
        arts = fleet.bundle_artifacts(repo, sha, targets=targets, work=Path(work))
        bar = _Progress(enabled=not as_json)
        info = create_bundle(out, repo, sha, since, [(s, p) for s, p, _ in arts], progress=bar)
        bar.done()
    data = {
        "bundle": str(out),
        "revision": info.revision,
        "ref": info.ref,
        "prerequisites": list(info.prerequisites),
        "artifacts": [{"sha256": a.sha256, "size": a.size, "name": a.name} for a in info.artifacts],
        "size": info.size,
    }
    emit(
        data,
        as_json,
        lambda d: (
            f"wrote {d['bundle']}: {_short(d['revision'])}, {len(d['artifacts'])} artifact(s), {d['size']} bytes"
            + (
                f", needs {', '.join(_short(p) for p in d['prerequisites'])}"
                if d["prerequisites"]
                else ""
            )
        ),
    )


class _Progress:
    """A one-line progress bar on stderr for long packing."""

    def __init__(self, *, enabled: bool) -> None:
        import sys

        self.enabled = enabled and sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or (time.monotonic() - self.last < 0.1 and done < total):
            return
        self.last = time.monotonic()
        frac = done / total if total else 1.0
        typer.echo(
            f"\r[{'#' * int(frac * 30):<30}] {frac * 100:5.1f}% {done >> 20}/{total >> 20} MiB",
            err=True,
            nl=False,
        )

    def done(self) -> None:
        if self.enabled:
            typer.echo("", err=True)


@bundle_app.command("inspect")
def bundle_inspect(
    path: Annotated[Path, typer.Argument(help="bundle file")],
    allowed_signers: Annotated[
        Path | None, typer.Option("--allowed-signers", help="check the signature against this file")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Revision, signer, prerequisites, components per label and artifacts of a bundle."""
    from keystone.sync.inspect import inspect

    data = inspect(path, allowed_signers=allowed_signers)

    def human(d: dict[str, Any]) -> str:
        out = [
            f"bundle:        {d['path']} ({d['kind']}, {d['size']} bytes)",
            f"revision:      {d['revision']} ({d['ref']})",
            f"prerequisites: {', '.join(_short(p) for p in d['prerequisites']) or 'none (full bundle)'}",
        ]
        sig = d.get("signature")
        if sig:
            out.append(
                f"signature:     {'good' if sig['ok'] else 'BAD'} ({sig['format']}) {sig.get('signer') or ''} {sig['reason']}"
            )
        for label, comps in d.get("components", {}).items():
            out.append(f"components [{label}]: {', '.join(comps) or '-'}")
        for a in d["artifacts"]:
            out.append(f"artifact:      {a['sha256'][:16]}  {a['size']:>12}  {a['name']}")
        if d.get("error"):
            out.append(f"note:          {d['error']}")
        return "\n".join(out)

    emit(data, as_json, human)
    sig = data.get("signature")
    if sig is not None and not sig["ok"]:
        raise typer.Exit(3)


# --- commands that talk to the running agent ------------------------------------------------


def _call(
    addr: str | None,
    token: str | None,
    ssh: str | None,
    runtime: Path | None,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    body: bytes | BinaryIO | None = None,
    content_type: str = "application/json",
) -> Any:
    """One request to the agent with the connection options every command takes."""
    from keystone.ctl import _client

    with _client(addr, token, ssh, runtime) as client:
        return client.request(method, path, params=params, body=body, content_type=content_type)


SYNC_EXIT = {
    "applied": 0,
    "up-to-date": 0,
    "dry-run": 0,
    "rolled-back": 4,
    "refused": 3,
    "known-bad": 3,
    "unreachable": 1,
    "error": 1,
}


def _sync_human(d: dict[str, Any]) -> str:
    out = [f"result:    {d['result']}", f"revision:  {d.get('revision') or '-'}"]
    if d.get("previous") and d.get("previous") != d.get("revision"):
        out.append(f"previous:  {d['previous']}")
    if d.get("signer"):
        out.append(f"signer:    {d['signer']} {d.get('fingerprint') or ''}".rstrip())
    if d.get("source"):
        out.append(f"source:    {d['source']}")
    ch = d.get("changes")
    if ch:
        for key in ("added", "changed", "restarted", "removed"):
            if ch.get(key):
                out.append(f"{key + ':':<10} {', '.join(ch[key])}")
        if not any(ch.get(k) for k in ("added", "changed", "restarted", "removed")):
            out.append("changes:   none")
    if d.get("error"):
        out.append(f"reason:    {d['error']}")
    out.append(f"took:      {d.get('duration', 0):.2f}s")
    return "\n".join(out)


def sync_cmd(
    once: Annotated[
        bool, typer.Option("--once", help="one sync now (the agent keeps polling on its own)")
    ] = True,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "--dry", help="fetch, verify and diff; deploy nothing")
    ] = False,
    allow_rollback: Annotated[
        bool,
        typer.Option(
            "--allow-rollback",
            help="accept a tip that does not descend from the applied revision, this once",
        ),
    ] = False,
    retry: Annotated[
        bool, typer.Option("--retry", help="try a revision that failed before again")
    ] = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sync the running agent now: fetch, verify, diff and deploy. Prints revision, signer, changes."""
    params = {
        "dry": str(dry_run).lower(),
        "allow_rollback": str(allow_rollback).lower(),
        "retry": str(retry).lower(),
    }
    data = _call(addr, token, ssh, runtime, "POST", "/v1/sync", params=params)
    emit(data, as_json, _sync_human)
    raise typer.Exit(SYNC_EXIT.get(str(data.get("result")), 1))


def history_cmd(
    limit: Annotated[int, typer.Option("--limit", "-n")] = 20,
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Syncs, deployments, rollbacks and imports, newest first."""
    data = _call(addr, token, ssh, runtime, "GET", "/v1/history", params={"limit": str(limit)})

    def human(rows: list[dict[str, Any]]) -> str:
        table = [
            [
                _when(r.get("time")),
                r.get("kind", ""),
                r.get("result", ""),
                _short(r.get("revision")),
                (r.get("error") or (r.get("changes") and _changes_brief(r["changes"])) or "")[:90],
            ]
            for r in rows
        ]
        return (
            _table(table, ["TIME", "KIND", "RESULT", "REVISION", "DETAIL"])
            if rows
            else "no history yet"
        )

    emit(data, as_json, human)


def _changes_brief(ch: dict[str, list[str]]) -> str:
    parts = [f"{k} {','.join(v)}" for k, v in ch.items() if v and k != "unchanged"]
    return "; ".join(parts)


def rollback_cmd(
    to: Annotated[
        str | None, typer.Option("--to", help="revision to go back to (default: last known-good)")
    ] = None,
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Deploy the last known-good revision (or --to REV) again; it is verified like any other."""
    data = _call(
        addr, token, ssh, runtime, "POST", "/v1/rollback", params={"to": to} if to else None
    )
    emit(data, as_json, _sync_human)
    raise typer.Exit(SYNC_EXIT.get(str(data.get("result")), 1))


def suspend_cmd(
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop polling the source; running components are untouched."""
    emit(
        _call(addr, token, ssh, runtime, "POST", "/v1/suspend"),
        as_json,
        lambda d: "polling suspended",
    )


def resume_cmd(
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start polling again."""
    emit(
        _call(addr, token, ssh, runtime, "POST", "/v1/resume"), as_json, lambda d: "polling resumed"
    )


@bundle_app.command("import")
def bundle_import(
    path: Annotated[
        Path, typer.Argument(help="bundle file (keystone bundle create, or git bundle create)")
    ],
    stage: Annotated[
        bool, typer.Option("--stage", help="do not contact the agent: stage for its next start")
    ] = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
    ssh: SshOpt = None,
    runtime: RuntimeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import a bundle into the running agent (verified exactly as a git sync), or stage it."""
    from keystone.errors import AgentUnreachable
    from keystone.sync.imports import stage_bundle

    if not path.is_file():
        raise typer.BadParameter(f"{path}: no such file", param_hint="PATH")
    if not stage:
        try:
            # Streamed from the file: a bundle may be gigabytes, never read it into memory.
            with path.open("rb") as body:
                data = _call(
                    addr,
                    token,
                    ssh,
                    runtime,
                    "POST",
                    "/v1/bundles:import",
                    body=body,
                    content_type="application/octet-stream",
                )
        except AgentUnreachable:
            if runtime is None and not Path("runtime").is_dir():
                raise
            stage = True
        else:
            emit(data, as_json, _sync_human)
            raise typer.Exit(SYNC_EXIT.get(str(data.get("result")), 1))
    from keystone.offline import runtime_dir

    staged = stage_bundle(runtime or runtime_dir(), path)
    emit(
        {"result": "staged", "path": str(staged)},
        as_json,
        lambda d: (
            f"no agent answered; staged {path} as {d['path']}: the agent imports it when it starts"
        ),
    )


def register(app: typer.Typer, only: str | None = None) -> bool:
    """Add the GitOps commands to the main app (just ``only`` when given); True if any matched."""
    groups = {"plan": plan_app, "bundle": bundle_app}
    commands: dict[str, Callable[..., Any]] = {
        "sync": sync_cmd,
        "history": history_cmd,
        "rollback": rollback_cmd,
        "suspend": suspend_cmd,
        "resume": resume_cmd,
    }
    found = False
    for name, sub in groups.items():
        if only in (None, name):
            app.add_typer(sub, name=name)
            found = True
    for name, fn in commands.items():
        if only in (None, name):
            app.command(name)(fn)
            found = True
    return found

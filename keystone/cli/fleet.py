"""Fleet tools: ``plan render/diff`` on a fleet checkout, air-gapped ``bundle``s, and the
``report verify`` of what a device wrote back on the stick.

``plan render``, ``plan diff`` and ``bundle create/inspect`` work offline (the work is done by
``keystone.fleet`` and ``keystone.sync.inspect``); ``bundle import`` hands a bundle to the
running agent, or stages it for its next start when none answers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from keystone.cli import views
from keystone.cli.common import add_commands, command, fail
from keystone.cli.session import ExitCode, Output, Session, exit_for
from keystone.errors import AgentUnreachable
from keystone.graph import FORMATS, plan_diff_command
from keystone.sync.imports import stage_bundle

plan_app = typer.Typer(help="Offline tools on a fleet checkout.", no_args_is_help=True)
bundle_app = typer.Typer(help="Air-gapped bundles: create, inspect, import.", no_args_is_help=True)
report_app = typer.Typer(
    help="Signed device reports written back on the stick.", no_args_is_help=True
)

RepoOpt = Annotated[Path, typer.Option("--repo", help="fleet repository (checkout or bare)")]
LabelsOpt = Annotated[str, typer.Option("--labels", help="device labels, comma separated")]


def _labels(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@plan_app.command("render")
@command(connect=False, json_errors=False)
def plan_render(
    output: Output,
    repo: RepoOpt = Path("."),
    labels: LabelsOpt = "",
    device: Annotated[
        str, typer.Option("--device", help="device id (for devices/<id>/plan.toml)")
    ] = "any-device",
    rev: Annotated[
        str | None, typer.Option("--rev", help="commit or ref (default: the working tree)")
    ] = None,
) -> None:
    """Print the plan a device would run, and the file each component came from."""
    # lazy: keystone.fleet pulls in git, the resolver and the deployer (~100 ms): not for --help
    from keystone import fleet

    data = fleet.render(repo, rev, device=device, labels=_labels(labels))
    output.emit(data, views.render_text)
    fail(ExitCode.REFUSED if data["unknown_fields"] else ExitCode.OK)


@plan_app.command("diff")
@command(connect=False, json_errors=False)
def plan_diff(
    output: Output,
    rev_a: Annotated[str, typer.Argument(help="from this commit")],
    rev_b: Annotated[str, typer.Argument(help="to this commit")],
    repo: RepoOpt = Path("."),
    labels: LabelsOpt = "",
    device: Annotated[str, typer.Option("--device")] = "any-device",
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="text (changes and actions), or a picture: dot, svg or mermaid"
        ),
    ] = "text",
) -> None:
    """What moving a device from REV_A to REV_B changes, in deployment order, or drawn as the
    desired graph with its nodes marked added, changed, restarted, removed or unchanged."""
    if fmt not in ("text", *FORMATS):
        raise typer.BadParameter(f"expected text, {', '.join(FORMATS)}", param_hint="--format")
    # lazy: keystone.fleet pulls in git, the resolver and the deployer (~100 ms): not for --help
    from keystone import fleet

    data = fleet.diff(
        repo, rev_a, rev_b, device=device, labels=_labels(labels), graphs=fmt != "text"
    )
    if fmt == "text" or output.as_json:
        output.emit(data, views.plan_diff_text)
        return
    graphs = data["graphs"]
    output.emit(
        data,
        lambda d: plan_diff_command(graphs["from"], graphs["to"], d["changes"], fmt).rstrip("\n"),
    )


class _Progress:
    """A one-line progress bar on stderr for long packing."""

    def __init__(self, *, enabled: bool) -> None:
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


@bundle_app.command("create")
@command(connect=False, json_errors=False)
def bundle_create(
    output: Output,
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
    datasets: Annotated[
        Path | None,
        typer.Option(
            "--datasets",
            help="carry the signed datasets in DIR/<name>/ (manifest, .sig, .crt, payload)",
        ),
    ] = None,
    image: Annotated[
        list[Path] | None,
        typer.Option(
            "--image",
            help="carry this container image archive (podman save -o FILE IMAGE); repeatable",
        ),
    ] = None,
) -> None:
    """Write one file with the fleet repo at REV and every artifact its plans need."""
    # lazy: keystone.fleet pulls in git, the resolver and the artifact store (~100 ms)
    from keystone import fleet

    bar = _Progress(enabled=not output.as_json)
    data = fleet.build_bundle(
        out,
        repo,
        rev,
        since=since,
        labels=_labels(labels or ""),
        every_label=all_labels,
        devices=device or [],
        progress=bar,
        datasets=datasets,
        images=image or [],
    )
    bar.done()
    output.emit(data, views.bundle_created_text)


@bundle_app.command("inspect")
@command(connect=False, json_errors=False)
def bundle_inspect(
    output: Output,
    path: Annotated[Path, typer.Argument(help="bundle file")],
    allowed_signers: Annotated[
        Path | None, typer.Option("--allowed-signers", help="check the signature against this file")
    ] = None,
) -> None:
    """Revision, signer, prerequisites, components per label and artifacts of a bundle."""
    # lazy: inspecting loads the bundle reader, the trust policy and the plan parser
    from keystone.sync.inspect import inspect

    data = inspect(path, allowed_signers=allowed_signers)
    output.emit(data, views.bundle_text)
    sig = data.get("signature")
    fail(ExitCode.REFUSED if sig is not None and not sig["ok"] else ExitCode.OK)


@bundle_app.command("import")
@command(connect=True, json_errors=False)
def bundle_import(
    session: Session,
    path: Annotated[
        Path, typer.Argument(help="bundle file (keystone bundle create, or git bundle create)")
    ],
    stage: Annotated[
        bool, typer.Option("--stage", help="do not contact the agent: stage for its next start")
    ] = False,
) -> None:
    """Import a bundle into the running agent (verified exactly as a git sync), or stage it."""
    if not path.is_file():
        raise typer.BadParameter(f"{path}: no such file", param_hint="PATH")
    if not stage:
        try:
            # Streamed from the file: a bundle may be gigabytes, never read it into memory.
            with path.open("rb") as body:
                data = session.request(
                    "POST",
                    "/v1/bundles:import",
                    body=body,
                    content_type="application/octet-stream",
                )
        except AgentUnreachable:
            if session.runtime is None and not Path("runtime").is_dir():
                raise
            stage = True
        else:
            session.emit(data, views.sync_text)
            fail(exit_for(data.get("result")))
            return
    # lazy: keystone.offline loads the plan parser and the deployer; only staging needs it
    from keystone.offline import runtime_dir

    staged = stage_bundle(session.runtime or runtime_dir(), path)
    session.emit({"result": "staged", "path": str(staged)}, lambda d: views.staged_text(path, d))


@report_app.command("verify")
@command(connect=False, json_errors=False)
def report_verify(
    output: Output,
    path: Annotated[Path, typer.Argument(help="a keystone-report-<device>-<time>.json")],
    device_key: Annotated[
        str,
        typer.Option(
            "--device-key",
            help="the device's public key file (its device.pub) or fingerprint (sha256:<hex>)",
        ),
    ],
) -> None:
    """Check a device report's signature and that the device key made it: exit 0 when it
    verifies, 3 (with the reason) when it does not."""
    # keystone.report loads cryptography for the check; only this command needs it
    from keystone import report

    try:
        verified = report.verify_file(path, device_key)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device-key") from None
    except OSError as exc:
        raise typer.BadParameter(f"{path}: {exc.strerror or exc}", param_hint="FILE") from None
    except report.ReportRefused as exc:
        output.emit({"ok": False, "file": str(path), "reason": str(exc)}, views.report_verdict_text)
        fail(ExitCode.REFUSED)
        return
    rep = verified.report
    output.emit(
        {
            "ok": True,
            "file": str(path),
            "device": verified.device,
            "fingerprint": verified.fingerprint,
            "created_at": rep.get("created_at"),
            "outcome": rep.get("outcome"),
            "applied": (rep.get("revision") or {}).get("applied"),
            "report": rep,
        },
        views.report_verdict_text,
    )


def register(app: typer.Typer, only: str | None = None) -> bool:
    """Add the ``plan``, ``bundle`` and ``report`` groups to ``app`` (just ``only`` when
    given); True if any matched."""
    return add_commands(
        app, only, (), (("plan", plan_app), ("bundle", bundle_app), ("report", report_app))
    )

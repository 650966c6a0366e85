"""``keystonectl manifest new|sign|verify``: dataset manifests, with the Go keystonectl's flags.

* ``manifest new FILE --name N --uri U [--version V] [--published T] [--delta-server S] [-o OUT]``
  writes ``<name>.manifest.toml`` (the digest and size from the file);
* ``manifest sign MANIFEST --key K [--cert C]`` validates it and writes ``MANIFEST.sig``;
* ``manifest verify MANIFEST [--cert C] [--trust-bundle B] [--since T]`` checks it as an agent
  does: the document, the signature against the bundle (when a certificate and a bundle are
  known), and with ``--since`` the anti-replay rule.

The formats are :mod:`keystone.manifest`'s and :mod:`keystone.sign`'s, so a manifest made or
signed here verifies in the Go agent and the other way round.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from keystone.cli.common import add_commands, command
from keystone.cli.session import Output
from keystone.errors import KeystoneError, UsageError

manifest_app = typer.Typer(
    name="manifest",
    help="Create, sign and check dataset manifests.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _rfc3339(value: str, flag: str) -> datetime:
    # lazy: the manifest module (and, through it, the signature checks) only for these commands
    from keystone import manifest

    try:
        return manifest.parse_time(value, what=flag)
    except (ValueError, KeystoneError) as exc:
        raise UsageError(
            f"{flag} must be RFC3339 (like 2026-08-15T03:00:00Z): {value!r}: {exc}"
        ) from None


def _warn_unknown(m: Any) -> None:
    for field in m.unknown_fields:
        typer.echo(
            f"warning: {m.name} has a field this build does not understand: {field}", err=True
        )


@command(connect=False)
def new_cmd(
    output: Output,
    artifact: Annotated[Path, typer.Argument(help="the dataset file", dir_okay=False)],
    name: Annotated[str, typer.Option("--name", help="dataset name, as the recipe refers to it")],
    uri: Annotated[str, typer.Option("--uri", help="where agents download the dataset from")],
    version: Annotated[
        str | None,
        typer.Option(
            "--version", help="human-readable version label [default: the published date]"
        ),
    ] = None,
    published: Annotated[
        str | None,
        typer.Option(
            "--published",
            help="RFC3339 publication time [default: now]; must increase between publications",
        ),
    ] = None,
    delta_server: Annotated[
        str | None,
        typer.Option(
            "--delta-server", help="base URL of a delta server, when patches are published"
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="where to write the manifest [default: NAME.manifest.toml]"
        ),
    ] = None,
) -> None:
    """Write a manifest for a dataset file."""
    from keystone import manifest  # lazy: as in _rfc3339

    when = _rfc3339(published, "--published") if published else None
    m = manifest.new_manifest(
        artifact,
        name=name,
        uri=uri,
        version=version,
        published=when,
        delta_server=delta_server,
    )
    dest = out or Path(f"{name}.manifest.toml")
    try:
        dest.write_bytes(manifest.render_manifest(m))
        os.chmod(dest, 0o644)
    except OSError as exc:
        raise UsageError(f"{dest}: cannot write the manifest: {exc.strerror or exc}") from None
    output.emit(
        {
            "manifest": str(dest),
            "name": m.name,
            "version": m.version,
            "published": manifest.format_time(m.published),
            "sha256": m.artifact.sha256,
            "size": m.artifact.size,
        },
        lambda d: (
            f"wrote {d['manifest']}\nnow sign it: keystonectl manifest sign --key <key> "
            f"{d['manifest']}"
        ),
    )


@command(connect=False)
def sign_cmd(
    output: Output,
    path: Annotated[Path, typer.Argument(help="the manifest", dir_okay=False)],
    key: Annotated[
        Path, typer.Option("--key", help="PEM private key to sign with (PKCS#8, PKCS#1 or SEC1)")
    ],
    cert: Annotated[
        Path | None,
        typer.Option(
            "--cert",
            help="PEM certificate for the key; when given, the signature is checked against it "
            "before being written",
        ),
    ] = None,
) -> None:
    """Sign a manifest, producing MANIFEST.sig (a broken document gets no signature)."""
    from keystone import manifest  # lazy: as in _rfc3339

    m = manifest.load_manifest(path)
    _warn_unknown(m)
    sig = manifest.sign_manifest(path, key, cert)
    output.emit(
        {
            "manifest": str(path),
            "name": m.name,
            "version": m.version,
            "published": manifest.format_time(m.published),
            "signature": str(sig),
        },
        lambda d: (
            f"signed {d['name']} ({d['version']}, published {d['published']}) -> {d['signature']}"
        ),
    )


@command(connect=False)
def verify_cmd(
    output: Output,
    path: Annotated[Path, typer.Argument(help="the manifest", dir_okay=False)],
    cert: Annotated[
        Path | None,
        typer.Option(
            "--cert",
            help="signing certificate [default: MANIFEST.crt, or KEYSTONE_LEAF_CERT]",
            show_default=False,
        ),
    ] = None,
    trust_bundle: Annotated[
        Path | None,
        typer.Option(
            "--trust-bundle",
            help="CA bundle to chain to [default: KEYSTONE_TRUST_BUNDLE]",
            show_default=False,
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="publication time of the manifest currently deployed; fails if this one is "
            "not newer",
        ),
    ] = None,
) -> None:
    """Check a manifest the way an agent will."""
    from keystone import manifest, sign  # lazy: as in _rfc3339

    m = manifest.load_manifest(path)
    _warn_unknown(m)
    signer_cert = cert or sign.default_cert_for(path)
    bundle = trust_bundle or (
        Path(os.environ["KEYSTONE_TRUST_BUNDLE"])
        if os.environ.get("KEYSTONE_TRUST_BUNDLE")
        else None
    )
    checked = False
    lines: list[str] = []
    if signer_cert is not None and bundle is not None:
        sign.verify_detached(path, trust_bundle=bundle, cert=signer_cert)
        checked = True
        lines.append(f"signature OK against {bundle}")
    else:
        lines.append(
            "document OK; signature NOT checked (no "
            + ("certificate" if signer_cert is None else "trust bundle")
            + ")"
        )
    if since:
        last = _rfc3339(since, "--since")
        if not m.is_newer_than(last):
            raise manifest.ManifestReplayed(
                f"published {manifest.format_time(m.published)} is not newer than {since}: "
                "no agent would accept this manifest"
            )
        lines.append(f"newer than {since}: agents will accept it")
    lines.append(
        f"{m.name} {m.version}, published {manifest.format_time(m.published)}, "
        f"{m.artifact.size} bytes"
    )
    output.emit(
        {
            "manifest": str(path),
            "name": m.name,
            "version": m.version,
            "published": manifest.format_time(m.published),
            "size": m.artifact.size,
            "sha256": m.artifact.sha256,
            "signature_checked": checked,
        },
        lambda _d: "\n".join(lines),
    )


def register(app: typer.Typer, only: str | None = None) -> bool:
    """Add ``manifest`` (with new, sign, verify) to ``app``; True if it matched ``only``."""
    if only not in (None, "manifest"):
        return False
    if not manifest_app.registered_commands:
        add_commands(
            manifest_app, None, (("new", new_cmd), ("sign", sign_cmd), ("verify", verify_cmd))
        )
    return add_commands(app, only, (), (("manifest", manifest_app),))

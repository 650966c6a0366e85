"""The agent-side commands: ``agent`` (run the agent) and ``serve-artifacts``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from keystone.cli import agentrun
from keystone.cli.common import Command, add_commands
from keystone.errors import UsageError


def broker_flags(args: list[str]) -> dict[str, str]:
    """Go's ``--mqtt-*`` / ``--nats-*`` agent flags among ``args`` (``--flag value`` or
    ``--flag=value``; a boolean alone means true). Anything else is a usage error naming it."""
    try:
        return agentrun.broker_flags(args)
    except UsageError as exc:
        raise typer.BadParameter(str(exc)) from None


def agent_cmd(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="agent.toml")] = None,
    http: Annotated[
        str | None, typer.Option("--http", help="API listen address (default 127.0.0.1:8080)")
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="run the built-in db -> cache -> api stack")
    ] = False,
    apply: Annotated[
        Path | None, typer.Option("--apply", help="apply this plan file at start")
    ] = None,
    runtime: Annotated[
        Path | None, typer.Option("--runtime", envvar="KEYSTONE_RUNTIME", help="runtime dir")
    ] = None,
    labels: Annotated[
        str | None, typer.Option("--labels", help="device labels, comma separated")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="device id (default: hostname)")
    ] = None,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="JSON log lines for journald/collectors")
    ] = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
    insecure_skip_verify: Annotated[
        bool,
        typer.Option(
            "--insecure-skip-verify",
            envvar="KEYSTONE_INSECURE_SKIP_VERIFY",
            help="disable mandatory artifact integrity (sha256 + signature): recipe file, "
            "artifact and dataset manifest signatures and sha256 pins are no longer required "
            "(development only; a WARNING at start and for each)",
        ),
    ] = False,
    api_token: Annotated[
        str | None,
        typer.Option(
            "--api-token",
            help="bearer token for the API (or KEYSTONE_API_TOKEN) [default: a generated one "
            "in RUNTIME/api.token]; required to listen beyond loopback",
            show_default=False,
        ),
    ] = None,
    clock_policy: Annotated[
        str | None,
        typer.Option(
            "--clock-policy",
            help="high-water or strict (or KEYSTONE_CLOCK_POLICY) [default: high-water]",
            show_default=False,
        ),
    ] = None,
    reconcile_interval: Annotated[
        str | None,
        typer.Option(
            "--reconcile-interval",
            help="re-apply the plan in effect on this interval, e.g. 5m (0 disables it; or "
            "KEYSTONE_RECONCILE_INTERVAL)",
            show_default=False,
        ),
    ] = None,
    reconcile_jitter: Annotated[
        str | None,
        typer.Option(
            "--reconcile-jitter",
            help="spread reconcile passes across a fleet by this much [default: 10% of the "
            "interval]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the agent in the foreground until SIGTERM/SIGINT.

    Also takes the Go agent's broker flags (--mqtt-broker, --mqtt-qos, --nats-url,
    --nats-jetstream, ... as in docs/brokers.md); they win over KEYSTONE_MQTT_* / KEYSTONE_NATS_*
    and the [mqtt] / [nats] tables of agent.toml. `keystone --http ADDR ...` (one dash or two,
    no `agent`) is the Go agent's command line for the same thing (docs/go-compat.md);
    `--http ""` runs without the HTTP API.
    """
    opts = agentrun.AgentOptions(
        config=config,
        http=http,
        demo=demo,
        apply=apply,
        runtime=runtime,
        labels=labels,
        device=device,
        log_json=log_json,
        log_level=log_level,
        insecure_skip_verify=insecure_skip_verify,
        flags=broker_flags(list(ctx.args)),
        api_token=api_token,
        clock_policy=clock_policy,
        reconcile_interval=reconcile_interval,
        reconcile_jitter=reconcile_jitter,
    )
    if demo and apply:
        raise typer.BadParameter("--demo and --apply are exclusive")
    try:
        code = agentrun.run_agent(opts, warn=lambda text: typer.echo(text, err=True))
    except UsageError as exc:
        raise typer.BadParameter(str(exc)) from None
    raise typer.Exit(code)


def serve_artifacts_cmd(
    root: Annotated[Path, typer.Option("--root", help="directory to serve")] = Path("artifacts"),
    addr: Annotated[
        str, typer.Option("--addr", help="listen address; ':9000' means all interfaces")
    ] = ":9000",
    deltas: Annotated[
        bool,
        typer.Option(
            "--deltas",
            help="also serve bsdiff+zstd patches between the versions under --root "
            "(GET /delta/{from}/{to}, the Go agent's route)",
        ),
    ] = False,
    deltas_cache: Annotated[
        Path | None,
        typer.Option(
            "--deltas-cache",
            help="where patches are kept (default $XDG_CACHE_HOME/keystone/deltas)",
        ),
    ] = None,
    delta_max_source_mb: Annotated[
        int,
        typer.Option(
            "--delta-max-source-mb",
            help="do not diff versions whose tar is larger (bsdiff needs ~17x the old tar in RAM)",
        ),
    ] = 64,
    delta_generate_wait: Annotated[
        float,
        typer.Option(
            "--delta-generate-wait",
            help="seconds a request waits for a new patch before answering 404 (clients retry)",
        ),
    ] = 10.0,
) -> None:
    """Serve artifact files over HTTP with Range, ETag and /healthz (the Go keystoneserver)."""
    # lazy: the server and its delta support load only to serve
    from keystone.serve import DeltaOptions, serve_artifacts

    if not root.is_dir():
        raise typer.BadParameter(f"{root} is not a directory", param_hint="--root")
    if delta_max_source_mb <= 0:
        raise typer.BadParameter("must be positive", param_hint="--delta-max-source-mb")
    options = (
        DeltaOptions(
            cache_dir=deltas_cache,
            max_source_bytes=delta_max_source_mb << 20,
            generate_wait=delta_generate_wait,
        )
        if deltas
        else None
    )
    serve_artifacts(root, addr, deltas=options)


agent_cmd.context_settings = {  # type: ignore[attr-defined]
    "allow_extra_args": True,
    "ignore_unknown_options": True,
}

COMMANDS: tuple[tuple[str, Command], ...] = (
    ("agent", agent_cmd),
    ("serve-artifacts", serve_artifacts_cmd),
)


def register(app: typer.Typer, only: str | None = None) -> bool:
    """Add ``agent`` and ``serve-artifacts`` to ``app`` (just ``only`` when given); True if
    any matched."""
    return add_commands(app, only, COMMANDS)

"""The agent-side commands: ``agent`` (run the agent) and ``serve-artifacts``."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from keystone.cli.common import Command, add_commands
from keystone.demo import DEMO_DIR, DEMO_PLAN

_BOOLEAN_FLAGS = frozenset({"tls-verify", "jetstream", "accept-local-plans"})
INSECURE_ENV = "KEYSTONE_INSECURE_SKIP_VERIFY"


def _duration_flag(text: str | None, flag: str) -> float | None:
    """A Go duration flag (``30s``, ``5m``, ``0``) in seconds; a malformed one is misuse."""
    if text is None:
        return None
    # lazy: the units parser only when the flag is given
    from keystone.units import parse_duration

    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=flag) from None
    if value < 0:
        raise typer.BadParameter("must not be negative", param_hint=flag)
    return value


def broker_flags(args: list[str]) -> dict[str, str]:
    """Go's ``--mqtt-*`` / ``--nats-*`` agent flags among ``args`` (``--flag value`` or
    ``--flag=value``; a boolean alone means true). Anything else is a usage error naming it."""
    # lazy: the broker settings load with the agent, not with --help
    from keystone.brokerconfig import FLAG_FIELDS

    flags: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.lstrip("-").partition("=")
        prefix, _, rest = name.partition("-")
        if not arg.startswith("-") or rest not in FLAG_FIELDS.get(prefix, {}):
            raise typer.BadParameter(
                f"unknown option {arg!r} (broker flags are --mqtt-* and --nats-*: see "
                "docs/brokers.md)"
            )
        if not eq:
            following = args[i + 1] if i + 1 < len(args) else None
            if rest in _BOOLEAN_FLAGS and (following is None or following.startswith("-")):
                value = "true"
            elif following is None:
                raise typer.BadParameter(f"{arg} needs a value")
            else:
                value, i = following, i + 1
        flags[name] = value
        i += 1
    return flags


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
    flags = broker_flags(list(ctx.args))
    if clock_policy is not None and clock_policy not in ("high-water", "strict"):
        raise typer.BadParameter("expected high-water or strict", param_hint="--clock-policy")
    interval = _duration_flag(reconcile_interval, "--reconcile-interval")
    jitter = _duration_flag(reconcile_jitter, "--reconcile-jitter")
    # Flags win over the environment; every reader (the API, the workers, the verifiers) takes
    # these from the environment, the one way they all share.
    if api_token and api_token.strip():  # empty, as in Go: not given
        os.environ["KEYSTONE_API_TOKEN"] = api_token.strip()
    if clock_policy is not None:
        os.environ["KEYSTONE_CLOCK_POLICY"] = clock_policy
    if insecure_skip_verify:
        os.environ[INSECURE_ENV] = "true"
    # lazy: asyncio, loguru, the config parser and the agent itself: only to run it, not --help
    import asyncio

    from loguru import logger

    from keystone import log
    from keystone.agent import Agent
    from keystone.config import load_config

    log.setup(level=log_level.upper(), json=log_json)
    if insecure_skip_verify:
        logger.warning(
            "artifact integrity verification is DISABLED (--insecure-skip-verify / {}): "
            "recipe files, artifacts and dataset manifests are NOT authenticated. Do not use "
            "in production.",
            INSECURE_ENV,
        )
    cfg = load_config(config)
    if interval is not None:
        cfg = replace(cfg, reconcile_interval=interval)
    if jitter is not None:
        cfg = replace(cfg, reconcile_jitter=jitter)
    # [trust] trust_bundle / leaf_cert reach every reader of KEYSTONE_TRUST_BUNDLE and
    # KEYSTONE_LEAF_CERT (dataset resolver, recipe and artifact signatures, the workers) the
    # one way they all share; load_config already let the environment win.
    os.environ.update(cfg.trust.environ())
    if runtime is not None:
        cfg = replace(cfg, runtime=runtime)
    if labels is not None:
        cfg = replace(cfg, labels=tuple(x.strip() for x in labels.split(",") if x.strip()))
    if device is not None:
        cfg = replace(cfg, device_id=device)
    if flags:
        # lazy: broker settings and errors, only when broker flags are given
        from keystone.brokerconfig import apply_broker_flags
        from keystone.errors import KeystoneError

        try:
            mqtt, nats = apply_broker_flags(cfg.mqtt, cfg.nats, flags)
        except KeystoneError as exc:
            raise typer.BadParameter(str(exc)) from None
        cfg = replace(cfg, mqtt=mqtt, nats=nats)
    if demo and apply:
        raise typer.BadParameter("--demo and --apply are exclusive")

    agent = Agent(cfg, http=http)
    initial = None
    source = ""
    if demo or apply:
        plan_path = DEMO_PLAN if demo else apply
        assert plan_path is not None
        # A plan that does not validate stops us here, before anything is started.
        initial = agent.load_plan_file(
            plan_path,
            root=DEMO_DIR if demo else None,
            verify_signatures=not demo,
            insecure_skip_verify=insecure_skip_verify,
        )
        source = "demo" if demo else str(plan_path)
        for line in initial.unknown_fields:
            typer.echo(f"warning: {line}", err=True)
    raise typer.Exit(asyncio.run(agent.run(initial=initial, initial_source=source)))


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

"""``keystone agent`` without typer: the agent is a long-lived process, and what it imports
stays resident for its whole life.

typer, click and their helpers cost the running agent ~4-5 MB of RSS and ~40 ms of start-up
for a command line it parses once. :func:`fast_agent` reads the agent's options itself (the
same names, ``--opt value`` and ``--opt=value``, the same environment variables) and declines
(returns None) anything it is not sure of: ``--help``, an unknown option, a broker flag that
does not parse, a value missing. The typer command (``keystone.cli.agent``) then runs and says
what is wrong, exactly as before. Both run :func:`run_agent`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from keystone.errors import KeystoneError, UsageError

BOOLEAN_BROKER_FLAGS = frozenset({"tls-verify", "jetstream", "accept-local-plans"})


@dataclass(frozen=True)
class AgentOptions:
    """The options of ``keystone agent``, as typer or :func:`fast_agent` read them."""

    config: Path | None = None
    http: str | None = None
    demo: bool = False
    apply: Path | None = None
    runtime: Path | None = None
    labels: str | None = None
    device: str | None = None
    log_json: bool = False
    log_level: str = "INFO"
    insecure_skip_verify: bool = False
    flags: dict[str, str] = field(default_factory=dict)
    api_token: str | None = None  # --api-token: wins over KEYSTONE_API_TOKEN
    clock_policy: str | None = None  # --clock-policy: high-water or strict
    reconcile_interval: str | None = None  # --reconcile-interval: a Go duration
    reconcile_jitter: str | None = None  # --reconcile-jitter: a Go duration


INSECURE_ENV = "KEYSTONE_INSECURE_SKIP_VERIFY"


def duration_flag(text: str | None, flag: str) -> float | None:
    """A Go duration flag (``30s``, ``5m``, ``0``) in seconds.

    Raises:
        UsageError: a malformed or negative duration, naming the flag.
    """
    if text is None:
        return None
    # lazy: the units parser only when the flag is given
    from keystone.units import parse_duration

    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    if value < 0:
        raise UsageError(f"{flag}: must not be negative")
    return value


def broker_flags(args: Sequence[str]) -> dict[str, str]:
    """Go's ``--mqtt-*`` / ``--nats-*`` agent flags among ``args`` (``--flag value`` or
    ``--flag=value``; a boolean alone means true).

    Raises:
        UsageError: anything else, naming it; a flag without its value.
    """
    # lazy: the broker settings load with the agent, not with --help
    from keystone.brokerconfig import FLAG_FIELDS

    flags: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.lstrip("-").partition("=")
        prefix, _, rest = name.partition("-")
        if not arg.startswith("-") or rest not in FLAG_FIELDS.get(prefix, {}):
            raise UsageError(
                f"unknown option {arg!r} (broker flags are --mqtt-* and --nats-*: see "
                "docs/brokers.md)"
            )
        if not eq:
            following = args[i + 1] if i + 1 < len(args) else None
            if rest in BOOLEAN_BROKER_FLAGS and (following is None or following.startswith("-")):
                value = "true"
            elif following is None:
                raise UsageError(f"{arg} needs a value")
            else:
                value, i = following, i + 1
        flags[name] = value
        i += 1
    return flags


def run_agent(opts: AgentOptions, *, warn: Callable[[str], None]) -> int:
    """Run the agent in the foreground until SIGTERM/SIGINT; its exit code.

    Raises:
        UsageError: ``--demo`` with ``--apply``, or broker flags that do not apply.
        keystone.errors.KeystoneError: the configuration or the plan does not load.
    """
    if opts.clock_policy is not None and opts.clock_policy not in ("high-water", "strict"):
        raise UsageError("--clock-policy: expected high-water or strict")
    interval = duration_flag(opts.reconcile_interval, "--reconcile-interval")
    jitter = duration_flag(opts.reconcile_jitter, "--reconcile-jitter")
    if opts.demo and opts.apply:
        raise UsageError("--demo and --apply are exclusive")
    # Flags win over the environment; every reader (the API, the workers, the verifiers) takes
    # these from the environment, the one way they all share.
    if opts.api_token and opts.api_token.strip():  # empty, as in Go: not given
        os.environ["KEYSTONE_API_TOKEN"] = opts.api_token.strip()
    if opts.clock_policy is not None:
        os.environ["KEYSTONE_CLOCK_POLICY"] = opts.clock_policy
    if opts.insecure_skip_verify:
        os.environ[INSECURE_ENV] = "true"
    # lazy: asyncio, loguru, the config parser and the agent itself: only to run it
    import asyncio

    from loguru import logger

    from keystone import log
    from keystone.agent import Agent
    from keystone.config import load_config
    from keystone.demo import DEMO_DIR, DEMO_PLAN

    log.setup(level=opts.log_level.upper(), json=opts.log_json)
    if opts.insecure_skip_verify:
        logger.warning(
            "artifact integrity verification is DISABLED (--insecure-skip-verify / {}): "
            "recipe files, artifacts and dataset manifests are NOT authenticated. Do not use "
            "in production.",
            INSECURE_ENV,
        )
    cfg = load_config(opts.config)
    if interval is not None:
        cfg = replace(cfg, reconcile_interval=interval)
    if jitter is not None:
        cfg = replace(cfg, reconcile_jitter=jitter)
    # [trust] trust_bundle / leaf_cert reach every reader of KEYSTONE_TRUST_BUNDLE and
    # KEYSTONE_LEAF_CERT (dataset resolver, recipe and artifact signatures, the workers) the
    # one way they all share; load_config already let the environment win.
    os.environ.update(cfg.trust.environ())
    if opts.runtime is not None:
        cfg = replace(cfg, runtime=opts.runtime)
    if opts.labels is not None:
        cfg = replace(cfg, labels=tuple(x.strip() for x in opts.labels.split(",") if x.strip()))
    if opts.device is not None:
        cfg = replace(cfg, device_id=opts.device)
    if opts.flags:
        # lazy: broker settings, only when broker flags are given
        from keystone.brokerconfig import apply_broker_flags

        try:
            mqtt, nats = apply_broker_flags(cfg.mqtt, cfg.nats, opts.flags)
        except KeystoneError as exc:
            raise UsageError(str(exc)) from None
        cfg = replace(cfg, mqtt=mqtt, nats=nats)

    agent = Agent(cfg, http=opts.http)
    initial = None
    source = ""
    if opts.demo or opts.apply:
        plan_path = DEMO_PLAN if opts.demo else opts.apply
        assert plan_path is not None
        # A plan that does not validate stops us here, before anything is started.
        initial = agent.load_plan_file(
            plan_path,
            root=DEMO_DIR if opts.demo else None,
            verify_signatures=not opts.demo,
            insecure_skip_verify=opts.insecure_skip_verify,
        )
        source = "demo" if opts.demo else str(plan_path)
        for line in initial.unknown_fields:
            warn(f"warning: {line}")
    return asyncio.run(agent.run(initial=initial, initial_source=source))


_VALUED = {
    "--config": "config",
    "-c": "config",
    "--http": "http",
    "--apply": "apply",
    "--runtime": "runtime",
    "--labels": "labels",
    "--device": "device",
    "--log-level": "log_level",
    "--api-token": "api_token",
    "--clock-policy": "clock_policy",
    "--reconcile-interval": "reconcile_interval",
    "--reconcile-jitter": "reconcile_jitter",
}
_FLAGS = {
    "--demo": "demo",
    "--log-json": "log_json",
    "--insecure-skip-verify": "insecure_skip_verify",
}
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def parse_agent_args(argv: Sequence[str], environ: dict[str, str]) -> AgentOptions | None:
    """The options in ``argv`` (after ``agent``), or None when typer should read them."""
    values: dict[str, str] = {}
    flags: dict[str, bool] = {}
    extra: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in _VALUED and not (eq and name == "-c"):
            if not eq:
                if i + 1 >= len(argv):
                    return None
                i += 1
                value = argv[i]
            values[_VALUED[name]] = value
        elif arg in _FLAGS:
            flags[_FLAGS[arg]] = True
        elif arg.startswith(("--mqtt-", "--nats-")):
            extra.append(arg)
        elif extra and not arg.startswith("-"):
            extra.append(arg)  # the value of the broker flag before it
        else:
            return None  # --help, --, an unknown option or argument: typer's job
        i += 1
    try:
        broker = broker_flags(extra)
    except UsageError:
        return None
    runtime = values.get("runtime") or environ.get("KEYSTONE_RUNTIME") or None
    insecure = flags.get("insecure_skip_verify", False)
    if not insecure and environ.get("KEYSTONE_INSECURE_SKIP_VERIFY"):
        raw = environ["KEYSTONE_INSECURE_SKIP_VERIFY"].strip().lower()
        if raw not in _TRUE | _FALSE:
            return None
        insecure = raw in _TRUE
    opts = AgentOptions(
        config=Path(values["config"]) if "config" in values else None,
        http=values.get("http"),
        demo=flags.get("demo", False),
        apply=Path(values["apply"]) if "apply" in values else None,
        runtime=Path(runtime) if runtime else None,
        labels=values.get("labels"),
        device=values.get("device"),
        log_json=flags.get("log_json", False),
        log_level=values.get("log_level", "INFO"),
        insecure_skip_verify=insecure,
        flags=broker,
        api_token=values.get("api_token"),
        clock_policy=values.get("clock_policy"),
        reconcile_interval=values.get("reconcile_interval"),
        reconcile_jitter=values.get("reconcile_jitter"),
    )
    if opts.demo and opts.apply:
        return None  # the usage error is typer's to print
    return opts


def fast_agent(argv: Sequence[str]) -> int | None:
    """Run ``keystone agent`` without typer; the exit code, or None to let typer run it."""
    from keystone.env import load_dotenv

    load_dotenv()  # as the typer app's root callback does, before options are read
    opts = parse_agent_args(argv, dict(os.environ))
    if opts is None:
        return None

    def warn(text: str) -> None:
        print(text, file=sys.stderr)

    try:
        return run_agent(opts, warn=warn)
    except KeystoneError as exc:
        # A usage error here may come from the agent itself (an API address beyond loopback
        # without a token, say), after it took the runtime dir: said once, never run again.
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code

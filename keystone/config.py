"""Agent configuration: ``agent.toml``, environment variables and command-line flags.

Every key has a default, so ``keystone agent`` alone runs. Precedence: flag, then environment,
then file (DESIGN section 6).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from keystone.brokerconfig import (  # brokers: light dataclasses only (a model, like this module)
    MqttConfig,
    NatsConfig,
    apply_broker_env,
    parse_broker_tables,
)
from keystone.errors import ValidationError
from keystone.limits import BOUNDS, Limits, read_bounded
from keystone.recipe import check_segment
from keystone.tomlsrc import Path_, Reader
from keystone.units import parse_duration, parse_size
from keystone.windows import Maintenance, read_maintenance


@dataclass(frozen=True)
class SourceConfig:
    type: str = "git"  # git | http
    url: str = ""
    ref: str = "refs/heads/main"
    interval: float = 60.0
    jitter: float = 10.0
    soak: float = 30.0
    timeout: float = 120.0
    # The wall-clock bound of a sync's fetch, verification and resolution (the sync worker is
    # killed past it), besides the per-read ``timeout``: a drip-feeding server cannot hold it.
    deadline: float = 300.0


#: The default of ``[source] deadline`` / ``KEYSTONE_SYNC_DEADLINE``.
DEFAULT_SYNC_DEADLINE = 300.0


def parse_deadline(raw: str, *, where: str) -> float:
    """A sync deadline: a duration (``"5m"``) or a number of seconds, > 0."""
    text = raw.strip()
    try:
        value = float(text) if text.replace(".", "", 1).isdigit() else parse_duration(text)
    except ValueError as exc:
        raise ValidationError(
            f"{exc} (a duration such as 5m or a number of seconds)", field=where
        ) from None
    if not value > 0:
        raise ValidationError(f"expected a deadline > 0, got {raw!r}", field=where)
    return value


@dataclass(frozen=True)
class TrustConfig:
    allowed_signers: Path | None = None
    gpg_home: Path | None = None
    revoked_keys: Path | None = None
    verify: str = "tip"  # tip | all
    max_age: float = 0.0
    allow_unsigned_artifacts: bool = True
    # The PEM roots for dataset manifests, recipe and artifact signatures; the file equivalent
    # of KEYSTONE_TRUST_BUNDLE / KEYSTONE_LEAF_CERT (the environment wins).
    trust_bundle: Path | None = None
    leaf_cert: Path | None = None

    def environ(self) -> dict[str, str]:
        """``KEYSTONE_TRUST_BUNDLE`` / ``KEYSTONE_LEAF_CERT`` for what is set here."""
        out: dict[str, str] = {}
        if self.trust_bundle is not None:
            out["KEYSTONE_TRUST_BUNDLE"] = str(self.trust_bundle)
        if self.leaf_cert is not None:
            out["KEYSTONE_LEAF_CERT"] = str(self.leaf_cert)
        return out


@dataclass(frozen=True)
class ApiConfig:
    listen: str = "127.0.0.1:8080"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None


@dataclass(frozen=True)
class ContainersConfig:
    """``[containers]``: the engine for ``type = "container"`` components.

    ``engine`` is ``auto`` (podman, docker, nerdctl: the first on PATH), an engine name or
    an executable path; ``runtime`` the OCI runtime the engine uses (``runc``, ``crun``; empty:
    the engine's default); ``extra_args`` go before every engine subcommand.
    """

    engine: str = "auto"
    runtime: str = ""
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentConfig:
    device_id: str = field(default_factory=socket.gethostname)
    labels: tuple[str, ...] = ()
    source: SourceConfig | None = None
    trust: TrustConfig = field(default_factory=TrustConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    runtime: Path = Path("runtime")
    reconcile_interval: float = 0.0
    reconcile_jitter: float | None = None
    bundle_watch: tuple[str, ...] = ()
    drift_interval: float = 3600.0  # re-hash installed files this often; 0: only on demand
    limits: Limits = field(default_factory=Limits)
    # [security] allow_privileged_install: an install script whose recipe says
    # require_privilege = true may run with the agent's privileges (else it is refused).
    allow_privileged_install: bool = False
    mqtt: MqttConfig | None = None  # brokers: [mqtt]
    nats: NatsConfig | None = None  # brokers: [nats]
    maintenance: Maintenance | None = None  # [maintenance]: when new revisions may deploy
    containers: ContainersConfig = field(default_factory=ContainersConfig)
    file: str | None = None

    @property
    def state_dir(self) -> Path:
        return self.runtime / "state"


def _dur(r: Reader, path: Path_, default: float) -> float:
    raw = r.get(path)
    if raw is None:
        return default
    if not isinstance(raw, str):
        raise r.error(path, 'expected a duration string such as "60s"')
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise r.error(path, str(exc)) from None


def _path(r: Reader, path: Path_, base: Path) -> Path | None:
    raw = r.text(path)
    if raw is None or raw == "":
        return None
    try:
        p = Path(raw).expanduser()
    except RuntimeError as exc:  # ~user with no such user
        raise r.error(path, f"cannot expand {raw!r}: {exc}") from None
    return p if p.is_absolute() else base / p


def _pem_file(r: Reader, path: Path_, base: Path) -> Path | None:
    """A PEM file that must exist now: a typo is reported at its line, not at the first refresh."""
    p = _path(r, path, base)
    if p is not None and not p.is_file():
        raise r.error(path, f"{p} is not a readable file")
    return p


def _limits(r: Reader) -> Limits:
    """``[limits]``: every bound of keystone.limits by name; sizes may be written "2M"."""
    out = Limits()
    for name, bound in BOUNDS.items():
        path: Path_ = ("limits", name)
        raw = r.get(path)
        if raw is None:
            continue
        value: object = raw
        if bound.unit == "bytes" and isinstance(raw, str):
            try:
                value = parse_size(raw)
            except ValueError as exc:
                raise r.error(path, str(exc)) from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            kind = "a size such as 1M or a number" if bound.unit == "bytes" else "a number"
            raise r.error(path, f"expected {kind} >= 1, got {raw!r}")
        out = replace(out, **{name: value})
    return out


def parse_config(
    text: str, *, file: str, base: Path | None = None, limits: Limits | None = None
) -> AgentConfig:
    """Parse ``agent.toml``; relative paths are relative to the file's directory.

    ``limits`` bounds the file itself (default: ``Limits.from_env()``); the ``[limits]`` table
    it holds becomes ``AgentConfig.limits``.
    """
    r = Reader.from_text(text, file=file, limits=limits, size_bound="max_config_bytes")
    base = base or Path(file).parent
    r.table(
        (),
        {
            "device",
            "source",
            "trust",
            "api",
            "paths",
            "reconcile",
            "bundles",
            "limits",
            "mqtt",
            "nats",
            "drift",
            "security",
            "maintenance",
            "containers",
        },
    )
    r.table(("device",), {"id", "labels"})
    cfg = AgentConfig()
    dev_id = r.text(("device", "id"))
    if dev_id is not None:
        why = check_segment(dev_id)
        if why:
            raise r.error(("device", "id"), f"{why}, got {dev_id!r}")
        cfg = replace(cfg, device_id=dev_id)
    labels = r.str_list(("device", "labels"))
    if labels is not None:
        for i, label in enumerate(labels):
            why = check_segment(label)
            if why:
                raise r.error(("device", "labels", i), f"label {label!r}: {why}")
        cfg = replace(cfg, labels=labels)
    if (
        r.table(
            ("source",),
            {"type", "url", "ref", "interval", "jitter", "soak", "timeout", "deadline"},
        )
        is not None
    ):
        kind = r.text(("source", "type")) or "git"
        if kind not in ("git", "http"):
            raise r.error(("source", "type"), f"expected git or http, got {kind!r}")
        url = r.text(("source", "url"), required=True) or ""
        deadline = _dur(r, ("source", "deadline"), DEFAULT_SYNC_DEADLINE)
        if not deadline > 0:
            raise r.error(("source", "deadline"), "expected a duration > 0 (the default is 5m)")
        ref = r.text(("source", "ref")) or "refs/heads/main"
        cfg = replace(
            cfg,
            source=SourceConfig(
                type=kind,
                url=url,
                ref=ref,
                interval=_dur(r, ("source", "interval"), 60.0),
                jitter=_dur(r, ("source", "jitter"), 10.0),
                soak=_dur(r, ("source", "soak"), 30.0),
                timeout=_dur(r, ("source", "timeout"), 120.0),
                deadline=deadline,
            ),
        )
    if (
        r.table(
            ("trust",),
            {
                "allowed_signers",
                "gpg_home",
                "revoked_keys",
                "verify",
                "max_age",
                "allow_unsigned_artifacts",
                "trust_bundle",
                "leaf_cert",
            },
        )
        is not None
    ):
        verify = r.text(("trust", "verify")) or "tip"
        if verify not in ("tip", "all"):
            raise r.error(("trust", "verify"), f"expected tip or all, got {verify!r}")
        cfg = replace(
            cfg,
            trust=TrustConfig(
                allowed_signers=_path(r, ("trust", "allowed_signers"), base),
                gpg_home=_path(r, ("trust", "gpg_home"), base),
                revoked_keys=_path(r, ("trust", "revoked_keys"), base),
                verify=verify,
                max_age=_dur(r, ("trust", "max_age"), 0.0),
                allow_unsigned_artifacts=r.flag(
                    ("trust", "allow_unsigned_artifacts"), default=True
                ),
                trust_bundle=_pem_file(r, ("trust", "trust_bundle"), base),
                leaf_cert=_pem_file(r, ("trust", "leaf_cert"), base),
            ),
        )
    if r.table(("api",), {"listen", "tls_cert", "tls_key", "client_ca"}) is not None:
        cfg = replace(
            cfg,
            api=ApiConfig(
                listen=r.text(("api", "listen")) or "127.0.0.1:8080",
                tls_cert=_path(r, ("api", "tls_cert"), base),
                tls_key=_path(r, ("api", "tls_key"), base),
                client_ca=_path(r, ("api", "client_ca"), base),
            ),
        )
    if r.table(("paths",), {"runtime"}) is not None:
        rt = _path(r, ("paths", "runtime"), base)
        if rt is not None:
            cfg = replace(cfg, runtime=rt)
    if r.table(("reconcile",), {"interval", "jitter"}) is not None:
        cfg = replace(
            cfg,
            reconcile_interval=_dur(r, ("reconcile", "interval"), 0.0),
            reconcile_jitter=_dur(r, ("reconcile", "jitter"), 0.0)
            if r.get(("reconcile", "jitter"))
            else None,
        )
    if r.table(("bundles",), {"watch"}) is not None:
        cfg = replace(cfg, bundle_watch=r.str_list(("bundles", "watch")) or ())
    if r.table(("drift",), {"interval"}) is not None:
        cfg = replace(cfg, drift_interval=_dur(r, ("drift", "interval"), cfg.drift_interval))
    if r.table(("security",), {"allow_privileged_install"}) is not None:
        cfg = replace(
            cfg,
            allow_privileged_install=r.flag(("security", "allow_privileged_install")),
        )
    if r.table(("containers",), {"engine", "runtime", "extra_args"}) is not None:
        engine = r.text(("containers", "engine")) or "auto"
        if engine not in ("auto", "podman", "docker", "nerdctl") and "/" not in engine:
            raise r.error(
                ("containers", "engine"),
                f"expected auto, podman, docker, nerdctl or a path, got {engine!r}",
            )
        cfg = replace(
            cfg,
            containers=ContainersConfig(
                engine=engine,
                runtime=r.text(("containers", "runtime")) or "",
                extra_args=r.str_list(("containers", "extra_args")) or (),
            ),
        )
    if r.table(("limits",), set(BOUNDS)) is not None:
        cfg = replace(cfg, limits=_limits(r))
    mqtt, nats = parse_broker_tables(r, base)  # brokers
    cfg = replace(cfg, mqtt=mqtt, nats=nats)
    cfg = replace(cfg, maintenance=read_maintenance(r, ("maintenance",)))
    unknown = r.unknown_messages()
    if unknown:
        raise ValidationError("; ".join(unknown) + " (remove or fix these keys)", file=file)
    return replace(cfg, file=file)


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Load ``path`` (or defaults) and apply environment overrides.

    Raises:
        ValidationError: the file is missing, unreadable, over ``max_config_bytes`` (checked
            before reading it) or does not validate, naming it.
        UsageError: a ``KEYSTONE_MAX_*`` variable that is not a whole number >= 1.
    """
    env = os.environ if environ is None else environ
    if path is None:
        cfg = AgentConfig()
    else:
        lim = Limits.from_env(env)
        text = read_bounded(
            path,
            limits=lim,
            bound="max_config_bytes",
            display=str(path),
            what="config",
        )
        try:
            base = path.resolve().parent
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (3.11)
            raise ValidationError(
                f"cannot resolve the config path: {exc}", file=str(path)
            ) from None
        cfg = parse_config(text, file=str(path), base=base, limits=lim)
    cfg = replace(cfg, limits=Limits.from_env(env, base=cfg.limits))
    if env.get("KEYSTONE_DEVICE_ID"):
        cfg = replace(cfg, device_id=env["KEYSTONE_DEVICE_ID"])
    if env.get("KEYSTONE_LABELS"):
        cfg = replace(
            cfg, labels=tuple(x.strip() for x in env["KEYSTONE_LABELS"].split(",") if x.strip())
        )
    if env.get("KEYSTONE_RUNTIME"):
        cfg = replace(cfg, runtime=Path(env["KEYSTONE_RUNTIME"]))
    if env.get("KEYSTONE_RECONCILE_INTERVAL"):
        try:
            cfg = replace(
                cfg, reconcile_interval=parse_duration(env["KEYSTONE_RECONCILE_INTERVAL"])
            )
        except ValueError as exc:
            raise ValidationError(str(exc), field="KEYSTONE_RECONCILE_INTERVAL") from None
    if env.get("KEYSTONE_RECONCILE_JITTER"):
        try:
            cfg = replace(cfg, reconcile_jitter=parse_duration(env["KEYSTONE_RECONCILE_JITTER"]))
        except ValueError as exc:
            raise ValidationError(str(exc), field="KEYSTONE_RECONCILE_JITTER") from None
    if env.get("KEYSTONE_DRIFT_INTERVAL"):
        try:
            cfg = replace(cfg, drift_interval=parse_duration(env["KEYSTONE_DRIFT_INTERVAL"]))
        except ValueError as exc:
            raise ValidationError(str(exc), field="KEYSTONE_DRIFT_INTERVAL") from None
    allow = env.get("KEYSTONE_ALLOW_PRIVILEGED_INSTALL", "").strip().lower()
    if allow:
        if allow not in ("1", "true", "yes", "0", "false", "no"):
            raise ValidationError(
                f"expected 1/true/yes or 0/false/no, got {allow!r}",
                field="KEYSTONE_ALLOW_PRIVILEGED_INSTALL",
            )
        cfg = replace(cfg, allow_privileged_install=allow in ("1", "true", "yes"))
    if env.get("KEYSTONE_SYNC_DEADLINE", "").strip() and cfg.source is not None:
        deadline = parse_deadline(env["KEYSTONE_SYNC_DEADLINE"], where="KEYSTONE_SYNC_DEADLINE")
        cfg = replace(cfg, source=replace(cfg.source, deadline=deadline))
    if env.get("KEYSTONE_CLOCK_POLICY") and env["KEYSTONE_CLOCK_POLICY"] not in (
        "high-water",
        "strict",
    ):
        raise ValidationError("expected high-water or strict", field="KEYSTONE_CLOCK_POLICY")
    # The environment wins over [trust] trust_bundle / leaf_cert, as everywhere.
    trust = cfg.trust
    if env.get("KEYSTONE_TRUST_BUNDLE", "").strip():
        trust = replace(trust, trust_bundle=Path(env["KEYSTONE_TRUST_BUNDLE"].strip()))
    if env.get("KEYSTONE_LEAF_CERT", "").strip():
        trust = replace(trust, leaf_cert=Path(env["KEYSTONE_LEAF_CERT"].strip()))
    cfg = replace(cfg, trust=trust)
    mqtt, nats = apply_broker_env(cfg.mqtt, cfg.nats, env)  # brokers
    return replace(cfg, mqtt=mqtt, nats=nats, containers=_containers_env(cfg.containers, env))


def _containers_env(cfg: ContainersConfig, env: Mapping[str, str]) -> ContainersConfig:
    """``KEYSTONE_CONTAINER_ENGINE``, ``_RUNTIME`` and ``_ARGS`` (shell words) over the file."""
    if env.get("KEYSTONE_CONTAINER_ENGINE", "").strip():
        cfg = replace(cfg, engine=env["KEYSTONE_CONTAINER_ENGINE"].strip())
    if env.get("KEYSTONE_CONTAINER_RUNTIME", "").strip():
        cfg = replace(cfg, runtime=env["KEYSTONE_CONTAINER_RUNTIME"].strip())
    if env.get("KEYSTONE_CONTAINER_ARGS", "").strip():
        import shlex  # lazy: only for this variable

        try:
            args = tuple(shlex.split(env["KEYSTONE_CONTAINER_ARGS"]))
        except ValueError as exc:
            raise ValidationError(str(exc), field="KEYSTONE_CONTAINER_ARGS") from None
        cfg = replace(cfg, extra_args=args)
    return cfg

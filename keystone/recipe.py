"""Component recipes: the Go Keystone's TOML format (GO-COMPAT.md), as frozen dataclasses.

``load_recipe`` parses and validates one recipe file. Errors name the file, the line, the field
and what was expected. Unknown keys are collected (``Recipe.unknown_fields``): a dry run and a
sync refuse them, a local apply warns. ``${VAR}`` / ``${VAR:-default}`` in ``command``, ``args``
and ``env`` is expanded from the given environment when the recipe is loaded.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from keystone.datasetspec import DatasetSpec, parse_datasets, reload_plan
from keystone.deltaspec import DeltaSpec, parse_delta_table
from keystone.env import SubstitutionError, substitute
from keystone.limits import Limits, read_bounded
from keystone.openssl import sha256
from keystone.semver import Constraint, Version
from keystone.tomlsrc import Path_, Reader, dotted
from keystone.units import parse_duration, parse_size

SAFE_SEGMENT = re.compile(r"[A-Za-z0-9._+-]{1,128}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CAPABILITY = re.compile(r"CAP_[A-Z_]+")
_USER = re.compile(r"[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?")


def validate_check(check: str) -> str | None:
    """Why a health ``check`` string is unusable, or None if it is fine.

    Accepted: ``http://host[:port][/path]``, ``https://...``, ``tcp://host:port`` and
    ``cmd:<shell command>``.
    """
    if check.startswith("cmd:"):
        return None if check[4:].strip() else "expected a shell command after cmd:"
    if check.startswith(("http://", "https://", "tcp://")):
        try:
            url = urlsplit(check)
            port = url.port
        except ValueError as exc:
            return f"invalid check URL {check!r}: {exc}"
        if not url.hostname:
            return f"expected a host in {check!r}"
        if any(c in check for c in " \r\n\t"):
            return f"whitespace in check URL {check!r}: percent-encode it"
        if url.scheme == "tcp":
            if port is None or port == 0:
                return f"expected tcp://host:port with a port from 1 to 65535, got {check!r}"
            if url.path not in ("", "/") or url.query or url.fragment or url.username:
                return f"expected tcp://host:port with nothing after the port, got {check!r}"
        elif port == 0:
            return f"port 0 in {check!r}: expected a port from 1 to 65535"
        return None
    return (
        f"expected http://..., https://..., tcp://host:port or cmd:<shell command>, got {check!r}"
    )


def check_segment(value: str) -> str | None:
    """Why ``value`` is not a safe path segment, or None if it is."""
    if not SAFE_SEGMENT.fullmatch(value):
        return "expected 1-128 characters of [A-Za-z0-9._+-]"
    if value in (".", "..") or ".." in value:
        return "must not be '.' or '..' or contain '..'"
    return None


class DependencyType(StrEnum):
    """How a dependency constrains start order and restarts."""

    HARD = "hard"
    SOFT = "soft"
    ORDERING = "ordering"

    @property
    def cascades(self) -> bool:
        """Whether a restart of the dependency restarts the dependent."""
        return self is not DependencyType.ORDERING


class RestartPolicy(StrEnum):
    """When the supervisor restarts an exited process."""

    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


@dataclass(frozen=True)
class Metadata:
    name: str
    version: str
    description: str = ""
    publisher: str = ""
    type: str = ""


@dataclass(frozen=True)
class Dependency:
    name: str
    version: str = ""
    type: DependencyType = DependencyType.HARD
    line: int | None = None

    def allows(self, version: str) -> bool:
        """True if ``version`` satisfies this dependency's constraint (non-semver: exact match)."""
        if not self.version:
            return True
        try:
            return Constraint.parse(self.version).allows(Version.parse(version))
        except ValueError:
            return self.version == version


@dataclass(frozen=True)
class Artifact:
    uri: str
    sha256: str | None = None
    sig_uri: str | None = None
    cert_uri: str | None = None
    unpack: bool = False
    github_token: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)
    delta: DeltaSpec | None = None


@dataclass(frozen=True)
class Install:
    script: str = ""
    require_privilege: bool = False
    timeout: float | None = None


@dataclass(frozen=True)
class Exec:
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Health:
    check: str
    interval: float = 10.0
    timeout: float = 3.0
    failure_threshold: int = 3
    start_timeout: float = 60.0


@dataclass(frozen=True)
class Security:
    user: str | None = None
    no_new_privileges: bool = False
    capabilities: tuple[str, ...] | None = None


class PullPolicy(StrEnum):
    """When a container image is pulled (Go's ``pull_policy``)."""

    ALWAYS = "always"
    IF_NOT_PRESENT = "if-not-present"
    NEVER = "never"


@dataclass(frozen=True)
class Mount:
    """One ``[[lifecycle.run.container.mounts]]``: a bind mount, a named volume or a tmpfs."""

    target: str
    source: str = ""
    type: str = "bind"
    read_only: bool = False


@dataclass(frozen=True)
class PortMapping:
    """One ``[[lifecycle.run.container.ports]]`` (bridge network mode)."""

    host_port: int
    container_port: int
    host_ip: str = "0.0.0.0"
    protocol: str = "tcp"


@dataclass(frozen=True)
class ContainerResources:
    """``[lifecycle.run.container.resources]``, Go's units: MB, shares, microseconds."""

    memory_mb: int | None = None
    memory_swap: int | None = None
    cpu_shares: int | None = None
    cpu_quota: int | None = None
    cpu_period: int | None = None
    pids_limit: int | None = None


@dataclass(frozen=True)
class Container:
    """``[lifecycle.run.container]``: what a ``type = "container"`` component runs.

    ``image`` may pin a digest (``name@sha256:<64 hex>``); :attr:`digest` is then that digest.
    """

    image: str
    runtime: str = "auto"
    pull_policy: PullPolicy = PullPolicy.IF_NOT_PRESENT
    network_mode: str = ""
    user: str = ""
    privileged: bool = False
    hostname: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    ports: tuple[PortMapping, ...] = ()
    resources: ContainerResources = field(default_factory=ContainerResources)

    @property
    def digest(self) -> str | None:
        """The pinned ``sha256:...`` digest of :attr:`image`, or None."""
        _, _, digest = self.image.partition("@")
        return digest or None

    @property
    def reference(self) -> str:
        """:attr:`image` without its pinned digest (the name to pull or to look up)."""
        return self.image.partition("@")[0]


@dataclass(frozen=True)
class Run:
    type: str = "process"
    restart_policy: RestartPolicy = RestartPolicy.ALWAYS
    max_retries: int = 5
    stop_timeout: float = 10.0
    exec: Exec | None = None
    health: Health | None = None
    security: Security = field(default_factory=Security)
    container: Container | None = None


@dataclass(frozen=True)
class Reload:
    signal: str | None = None
    script: str | None = None
    grace: float = 30.0


@dataclass(frozen=True)
class Shutdown:
    script: str = ""
    timeout: float = 30.0


@dataclass(frozen=True)
class Defer:
    """``[lifecycle.defer]``: asked before an update stops the component (DeferComponentUpdate).

    ``check`` is ``cmd:<shell command>`` or an ``http(s)://`` URL; an answer whose first line is
    ``defer <duration>`` (``defer 30``, ``defer 5m``) or a JSON ``{"defer": seconds}`` puts the
    update off; anything else (or no answer within ``timeout``) lets it proceed. The deferrals
    of one revision add up to at most ``max``, after which the update proceeds unasked.
    """

    check: str
    timeout: float = 5.0
    max: float = 3600.0


@dataclass(frozen=True)
class Resources:
    open_files: int | None = None
    memory_limit: int | None = None
    cpu_quota: float | None = None


@dataclass(frozen=True)
class Recipe:
    """One validated recipe."""

    metadata: Metadata
    dependencies: tuple[Dependency, ...] = ()
    artifacts: tuple[Artifact, ...] = ()
    install: Install = field(default_factory=Install)
    run: Run = field(default_factory=Run)
    reload: Reload | None = None
    shutdown: Shutdown | None = None
    resources: Resources = field(default_factory=Resources)
    defer: Defer | None = None
    drift: str = "report"
    datasets: tuple[DatasetSpec, ...] = ()
    source: str = ""
    unknown_fields: tuple[str, ...] = ()
    text: str = field(default="", repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> str:
        return self.metadata.version

    def content_hash(self) -> str:
        """SHA-256 over everything that changes what runs (not the file name or comments).

        Computed once per recipe (a recipe is immutable).
        """
        cached: str | None = self.__dict__.get("_content_hash")
        if cached is None:
            cached = self._hash()
            object.__setattr__(self, "_content_hash", cached)
        return cached

    def _hash(self) -> str:
        data = _plain(self)
        # drift only says what to do when installed files change: not a reason to restart;
        # defer only says when an update may stop it
        for key in ("source", "unknown_fields", "text", "drift", "defer"):
            data.pop(key, None)
        for dep in data["dependencies"]:
            dep.pop("line", None)
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return sha256(blob).hexdigest()


_FIELDS: dict[type, tuple[str, ...]] = {}


def _plain(obj: Any) -> Any:
    """``dataclasses.asdict`` for JSON: the same document once dumped, without its deep copies.

    Dataclasses become dicts, tuples and lists lists, dicts dicts; any other value is kept as
    it is (``json.dumps`` writes it, or its ``str``, exactly as it would a copy of it).
    """
    names = _FIELDS.get(type(obj))
    if names is not None:
        return {name: _plain(getattr(obj, name)) for name in names}
    if obj is None or isinstance(obj, str | int | float):  # also bool and the StrEnums
        return obj
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if is_dataclass(obj) and not isinstance(obj, type):
        _FIELDS[type(obj)] = tuple(f.name for f in fields(obj))
        return _plain(obj)
    return obj


_TOP = {"metadata", "dependencies", "artifacts", "datasets", "lifecycle", "resources", "drift"}
DRIFT_POLICIES = ("report", "repair")
"""What the agent does when a component's installed files drift: say so, or reinstall them."""
_ARTIFACT = {"uri", "sha256", "sig_uri", "cert_uri", "unpack", "github_token", "headers", "delta"}
_CONTAINER = {
    "image",
    "runtime",
    "pull_policy",
    "network_mode",
    "user",
    "privileged",
    "hostname",
    "env",
    "labels",
    "mounts",
    "ports",
    "resources",
}
CONTAINER_RUNTIMES = ("auto", "cli", "containerd", "podman", "docker", "nerdctl")
"""Go's ``[lifecycle.run.container] runtime`` selector."""
NETWORK_MODES = ("host", "bridge", "none")
MOUNT_TYPES = ("bind", "volume", "tmpfs")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,511}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_SIGNALS = {"SIGHUP", "SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGQUIT"}
_HEX64 = re.compile(r"^(?:sha256:)?([0-9a-fA-F]{64})$")


def _duration(r: Reader, path: Path_, default: float, *, minimum: float = 0.0) -> float:
    value = r.get(path)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise r.error(path, 'expected a duration such as "500ms", "30s" or "5m"')
    try:
        seconds = parse_duration(str(value))
    except ValueError as exc:
        raise r.error(path, str(exc)) from None
    if seconds < minimum:
        raise r.error(path, f"expected at least {minimum}s, got {value!r}")
    return seconds


def _sub(r: Reader, path: Path_, text: str, environ: Mapping[str, str]) -> str:
    try:
        return substitute(text, environ)
    except SubstitutionError as exc:
        raise r.error(path, str(exc)) from None


def parse_recipe(
    text: str,
    *,
    file: str,
    environ: Mapping[str, str] | None = None,
    limits: Limits | None = None,
    reader: Reader | None = None,
) -> Recipe:
    """Parse and validate recipe TOML ``text`` (``file`` is used in messages).

    ``limits`` (default: ``Limits.from_env()``) bounds its size and nesting. ``reader`` is
    ``text`` already parsed under those bounds (``Reader.from_text`` or ``from_parsed``).

    Raises:
        ValidationError: with file, line, field and what was expected (``LimitExceeded``
            for a recipe over a bound, ``DuplicateKeyError`` for a key defined twice).
    """
    env = environ if environ is not None else {}
    r = reader or Reader.from_text(text, file=file, limits=limits, size_bound="max_recipe_bytes")
    r.table((), _TOP)

    r.table(("metadata",), {"name", "version", "description", "publisher", "type"}, required=True)
    meta = Metadata(
        name=_segment(r, ("metadata", "name")),
        version=_segment(r, ("metadata", "version")),
        description=r.text(("metadata", "description")) or "",
        publisher=r.text(("metadata", "publisher")) or "",
        type=r.text(("metadata", "type")) or "",
    )

    deps: list[Dependency] = []
    dep_lines = r.header_lines("dependencies")
    for path, _ in r.tables(("dependencies",), {"name", "version", "type"}):
        name = r.text((*path, "name"), required=True)
        assert name is not None
        kind = (r.text((*path, "type")) or "hard").lower()
        try:
            dtype = DependencyType(kind)
        except ValueError:
            raise r.error(
                (*path, "type"), f"expected hard, soft or ordering, got {kind!r}"
            ) from None
        constraint = r.text((*path, "version")) or ""
        if constraint:
            try:
                Constraint.parse(constraint)
            except ValueError as exc:
                raise r.error((*path, "version"), str(exc)) from None
        at = path[-1]
        line = (
            dep_lines[at]
            if dep_lines is not None and isinstance(at, int) and at < len(dep_lines)
            else r.index.line(path)
        )
        deps.append(Dependency(name, constraint, dtype, line))

    artifacts: list[Artifact] = []
    for path, tbl in r.tables(("artifacts",), _ARTIFACT):
        uri = r.text((*path, "uri"), required=True)
        assert uri is not None
        sha = r.text((*path, "sha256"))
        if sha:
            m = _HEX64.match(sha)
            if not m:
                raise r.error(
                    (*path, "sha256"), "expected 64 hex digits (optionally prefixed sha256:)"
                )
            sha = m.group(1).lower()
        delta: DeltaSpec | None = None
        if "delta" in tbl:
            dpath: Path_ = (*path, "delta")
            # Unknown keys are recorded on the reader like every other table's.
            r.table(dpath, {"server", "sha256", "format"})
            delta = parse_delta_table(
                tbl["delta"], file=file, line=r.index.line(dpath), field=dotted(dpath)
            )
        artifacts.append(
            Artifact(
                uri=uri,
                sha256=sha or None,
                sig_uri=r.text((*path, "sig_uri")),
                cert_uri=r.text((*path, "cert_uri")),
                unpack=r.flag((*path, "unpack")),
                github_token=r.text((*path, "github_token")) or None,
                headers=r.str_table((*path, "headers")),
                delta=delta,
            )
        )

    if meta.type == AGENT_TYPE:
        # The agent itself, as a pinned wheel (docs/self-update.md): nothing for a runner.
        return _agent_recipe(r, meta, artifacts, text=text, file=file)

    datasets = parse_datasets(r)

    r.table(("lifecycle",), {"install", "run", "reload", "shutdown", "defer"})
    install = Install()
    if r.table(("lifecycle", "install"), {"script", "require_privilege", "timeout"}) is not None:
        install = Install(
            script=r.text(("lifecycle", "install", "script")) or "",
            require_privilege=r.flag(("lifecycle", "install", "require_privilege")),
            timeout=_duration(r, ("lifecycle", "install", "timeout"), 0.0) or None,
        )

    run_path: Path_ = ("lifecycle", "run")
    r.table(
        run_path,
        {
            "type",
            "restart_policy",
            "max_retries",
            "stop_timeout",
            "exec",
            "health",
            "security",
            "container",
        },
        required=True,
    )
    run_type = r.text((*run_path, "type")) or "process"
    if run_type not in ("process", "container"):
        raise r.error((*run_path, "type"), f"expected process or container, got {run_type!r}")
    if run_type != "container" and r.get((*run_path, "container")) is not None:
        raise r.error(
            (*run_path, "container"),
            'only a container component (type = "container") takes [lifecycle.run.container]',
        )
    container = _container(r, run_path, env) if run_type == "container" else None
    policy_text = r.text((*run_path, "restart_policy")) or "always"
    try:
        policy = RestartPolicy(policy_text)
    except ValueError:
        raise r.error(
            (*run_path, "restart_policy"),
            f"expected always, on-failure or never, got {policy_text!r}",
        ) from None
    max_retries = r.integer((*run_path, "max_retries"), default=5, minimum=0)
    assert max_retries is not None

    exec_: Exec | None = None
    ep: Path_ = (*run_path, "exec")
    if r.table(ep, {"command", "args", "env"}) is not None:
        command = r.text((*ep, "command"), required=True)
        assert command is not None
        if not command.strip():
            raise r.error((*ep, "command"), "must not be empty")
        args = r.str_list((*ep, "args")) or ()
        envt = r.str_table((*ep, "env"))
        for key in envt:
            if not _ENV_NAME.fullmatch(key):
                raise r.error(
                    (*ep, "env", key),
                    "expected an environment variable name [A-Za-z_][A-Za-z0-9_]*",
                )
        exec_ = Exec(
            command=_sub(r, (*ep, "command"), command, env),
            args=tuple(_sub(r, (*ep, "args"), a, env) for a in args),
            env={k: _sub(r, (*ep, "env", k), v, env) for k, v in envt.items()},
        )
    elif container is None:
        raise r.error(run_path, "a process component needs [lifecycle.run.exec] with a command")

    health: Health | None = None
    hp: Path_ = (*run_path, "health")
    if (
        r.table(hp, {"check", "interval", "timeout", "failure_threshold", "start_timeout"})
        is not None
    ):
        check = r.text((*hp, "check"), required=True)
        assert check is not None
        check = _sub(r, (*hp, "check"), check, env)
        why = validate_check(check)
        if why:
            raise r.error((*hp, "check"), why)
        threshold = r.integer((*hp, "failure_threshold"), default=3, minimum=1)
        assert threshold is not None
        health = Health(
            check=check,
            interval=_duration(r, (*hp, "interval"), 10.0, minimum=0.05),
            timeout=_duration(r, (*hp, "timeout"), 3.0, minimum=0.05),
            failure_threshold=threshold,
            start_timeout=_duration(r, (*hp, "start_timeout"), 60.0, minimum=0.1),
        )

    sp: Path_ = (*run_path, "security")
    security = Security()
    if r.table(sp, {"user", "no_new_privileges", "capabilities"}) is not None:
        caps = r.str_list((*sp, "capabilities"))
        if caps is not None:
            norm: list[str] = []
            for c in caps:
                name = c.upper() if c.upper().startswith("CAP_") else "CAP_" + c.upper()
                if not _CAPABILITY.fullmatch(name):
                    raise r.error((*sp, "capabilities"), f"not a capability name: {c!r}")
                norm.append(name)
            caps = tuple(norm)
        user = r.text((*sp, "user"))
        if user is not None and not _USER.fullmatch(user):
            raise r.error((*sp, "user"), "expected user, uid, user:group or uid:gid")
        security = Security(
            user=user, no_new_privileges=r.flag((*sp, "no_new_privileges")), capabilities=caps
        )
        if container is not None and security != Security():
            raise r.error(
                sp,
                "[lifecycle.run.security] only applies to process components; confine a "
                "container through [lifecycle.run.container] (user, privileged) instead",
            )

    run = Run(
        type=run_type,
        restart_policy=policy,
        max_retries=max_retries,
        stop_timeout=_duration(r, (*run_path, "stop_timeout"), 10.0),
        exec=exec_,
        health=health,
        security=security,
        container=container,
    )

    reload: Reload | None = None
    rp: Path_ = ("lifecycle", "reload")
    if r.table(rp, {"signal", "script", "grace"}) is not None:
        sig = r.text((*rp, "signal"))
        if sig is not None:
            sig = sig.upper() if sig.upper().startswith("SIG") else "SIG" + sig.upper()
            if sig not in _SIGNALS:
                raise r.error((*rp, "signal"), "expected SIGHUP, SIGUSR1 or SIGUSR2")
        script = r.text((*rp, "script"))
        if not sig and not script:
            raise r.error(rp, "expected signal or script")
        reload = Reload(signal=sig, script=script, grace=_duration(r, (*rp, "grace"), 30.0))
    if datasets and reload is not None:
        # Go's dataset reload rules: one of signal or script, a signal from the allow-list.
        reload_plan(reload.signal, reload.script, reload.grace, run_type=run_type, file=file)

    shutdown: Shutdown | None = None
    shp: Path_ = ("lifecycle", "shutdown")
    if r.table(shp, {"script", "timeout"}) is not None:
        shutdown = Shutdown(
            script=r.text((*shp, "script")) or "", timeout=_duration(r, (*shp, "timeout"), 30.0)
        )

    defer: Defer | None = None
    dfp: Path_ = ("lifecycle", "defer")
    if r.table(dfp, {"check", "timeout", "max"}) is not None:
        check = r.text((*dfp, "check"), required=True) or ""
        why = validate_check(check)
        if why is None and check.startswith("tcp://"):
            why = "a deferral check answers: expected cmd:<shell command> or an http(s):// URL"
        if why:
            raise r.error((*dfp, "check"), why)
        defer = Defer(
            check=check,
            timeout=_duration(r, (*dfp, "timeout"), 5.0, minimum=0.001),
            max=_duration(r, (*dfp, "max"), 3600.0),
        )

    resources = Resources()
    rsp: Path_ = ("resources",)
    if r.table(rsp, {"open_files", "memory_limit", "cpu_quota"}) is not None:
        mem_raw = r.get((*rsp, "memory_limit"))
        mem: int | None = None
        if mem_raw is not None:
            if isinstance(mem_raw, bool) or not isinstance(mem_raw, str | int):
                raise r.error(
                    (*rsp, "memory_limit"), 'expected a size such as "128M" or a number of bytes'
                )
            try:
                mem = parse_size(mem_raw)
            except ValueError as exc:
                raise r.error((*rsp, "memory_limit"), str(exc)) from None
        resources = Resources(
            # Go: 0 means "not set" (its container example writes open_files = 0)
            open_files=r.integer((*rsp, "open_files"), minimum=0) or None,
            memory_limit=mem,
            cpu_quota=_cpu_quota(r, (*rsp, "cpu_quota")),
        )

    drift = r.text(("drift",)) or "report"
    if drift not in DRIFT_POLICIES:
        raise r.error(("drift",), f"expected report or repair, got {drift!r}")

    return Recipe(
        drift=drift,
        metadata=meta,
        dependencies=tuple(deps),
        artifacts=tuple(artifacts),
        install=install,
        run=run,
        reload=reload,
        shutdown=shutdown,
        resources=resources,
        defer=defer,
        datasets=datasets,
        source=file,
        unknown_fields=tuple(r.unknown_messages()),
        text=text,
    )


def _container(r: Reader, run_path: Path_, environ: Mapping[str, str]) -> Container:
    """``[lifecycle.run.container]`` with Go's fields and meanings."""
    cp: Path_ = (*run_path, "container")
    if r.table(cp, _CONTAINER) is None:
        raise r.error(cp, "a container component needs [lifecycle.run.container] with an image")
    image = r.text((*cp, "image"), required=True) or ""
    if not _IMAGE.fullmatch(image) or image.count("@") > 1:
        raise r.error(
            (*cp, "image"),
            f"expected an image reference such as docker.io/library/nginx:alpine, got {image!r}",
        )
    _, at, digest = image.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise r.error(
            (*cp, "image"),
            f"a pinned digest must be sha256: and 64 lowercase hex digits, got {digest!r}",
        )
    runtime = (r.text((*cp, "runtime")) or "auto").strip().lower()
    if runtime not in CONTAINER_RUNTIMES:
        raise r.error(
            (*cp, "runtime"), f"expected one of {', '.join(CONTAINER_RUNTIMES)}, got {runtime!r}"
        )
    pull_text = r.text((*cp, "pull_policy")) or "if-not-present"
    try:
        pull = PullPolicy(pull_text)
    except ValueError:
        raise r.error(
            (*cp, "pull_policy"), f"expected always, if-not-present or never, got {pull_text!r}"
        ) from None
    network = r.text((*cp, "network_mode")) or ""
    if network and network not in NETWORK_MODES:
        raise r.error((*cp, "network_mode"), f"expected host, bridge or none, got {network!r}")
    user = r.text((*cp, "user")) or ""
    if user and not _USER.fullmatch(user):
        raise r.error((*cp, "user"), "expected uid, uid:gid or a user name")
    envt = r.str_table((*cp, "env"))
    for key in envt:
        if not _ENV_NAME.fullmatch(key):
            raise r.error(
                (*cp, "env", key), "expected an environment variable name [A-Za-z_][A-Za-z0-9_]*"
            )
    mounts: list[Mount] = []
    for path, _ in r.tables((*cp, "mounts"), {"source", "target", "type", "read_only"}):
        kind = r.text((*path, "type")) or "bind"
        if kind not in MOUNT_TYPES:
            raise r.error((*path, "type"), f"expected bind, volume or tmpfs, got {kind!r}")
        target = _host_env(r.text((*path, "target"), required=True) or "", environ)
        if not target.startswith("/"):
            raise r.error(
                (*path, "target"), f"expected an absolute path inside the container, got {target!r}"
            )
        source = _host_env(r.text((*path, "source")) or "", environ)
        if kind != "tmpfs" and not source:
            raise r.error(
                (*path, "source"), f"a {kind} mount needs a source (host path or volume name)"
            )
        if kind == "bind" and not source.startswith("/") and "$" not in source:
            raise r.error(
                (*path, "source"),
                f"a bind mount's source must be an absolute host path, got {source!r}",
            )
        mounts.append(
            Mount(target=target, source=source, type=kind, read_only=r.flag((*path, "read_only")))
        )
    ports: list[PortMapping] = []
    for path, _ in r.tables((*cp, "ports"), {"host_ip", "host_port", "container_port", "protocol"}):
        proto = (r.text((*path, "protocol")) or "tcp").lower()
        if proto not in ("tcp", "udp"):
            raise r.error((*path, "protocol"), f"expected tcp or udp, got {proto!r}")
        host_port = _port(r, (*path, "host_port"))
        container_port = _port(r, (*path, "container_port"))
        ports.append(
            PortMapping(host_port, container_port, r.text((*path, "host_ip")) or "0.0.0.0", proto)
        )
    rp: Path_ = (*cp, "resources")
    resources = ContainerResources()
    if (
        r.table(
            rp, {"memory_mb", "memory_swap", "cpu_shares", "cpu_quota", "cpu_period", "pids_limit"}
        )
        is not None
    ):

        def num(key: str, minimum: int) -> int | None:
            value = r.integer((*rp, key), minimum=minimum)
            return value or None  # Go: 0 means unset

        swap = r.integer((*rp, "memory_swap"), minimum=-1)
        resources = ContainerResources(
            memory_mb=num("memory_mb", 0),
            memory_swap=swap or None,
            cpu_shares=num("cpu_shares", 0),
            cpu_quota=num("cpu_quota", 0),
            cpu_period=num("cpu_period", 0),
            pids_limit=num("pids_limit", 0),
        )
    return Container(
        image=image,
        runtime=runtime,
        pull_policy=pull,
        network_mode=network,
        user=user,
        privileged=r.flag((*cp, "privileged")),
        hostname=r.text((*cp, "hostname")) or "",
        env={k: _sub(r, (*cp, "env", k), v, environ) for k, v in envt.items()},
        labels=r.str_table((*cp, "labels")),
        mounts=tuple(mounts),
        ports=tuple(ports),
        resources=resources,
    )


def _port(r: Reader, path: Path_) -> int:
    value = r.integer(path)
    if value is None:
        raise r.error(path, "required: a port from 1 to 65535")
    if not 1 <= value <= 65535:
        raise r.error(path, f"expected a port from 1 to 65535, got {value}")
    return value


def _host_env(text: str, environ: Mapping[str, str]) -> str:
    """Go's mount interpolation: ``$VAR``, ``${VAR}``, ``${VAR:-default}``; an unset variable
    without a default stays as written (the runner refuses such a bind mount when it starts)."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        value = environ.get(name)
        if value:
            return value
        return m.group(2) if m.group(2) is not None else m.group(0)

    return _HOST_ENV.sub(repl, text)


AGENT_TYPE = "agent"
"""``[metadata] type`` of the recipe that pins the agent's own version (its wheel)."""

_AGENT_ONLY = ("metadata", "artifacts")


def _agent_recipe(
    r: Reader,
    meta: Metadata,
    artifacts: list[Artifact],
    *,
    text: str,
    file: str,
) -> Recipe:
    """A ``type = "agent"`` recipe: ``[metadata]`` and pinned ``[[artifacts]]``, nothing else.

    The agent runs itself (:mod:`keystone.selfupdate`), so a run, an install script, datasets,
    resources or dependencies would be ignored: each is refused, naming the key.
    """
    for key in sorted(r.data):
        if key in _TOP and key not in _AGENT_ONLY:
            raise r.error(
                (key,),
                'an agent recipe (type = "agent") takes only [metadata] and [[artifacts]]: '
                "the agent runs itself",
            )
    if not artifacts:
        raise r.error(("artifacts",), "an agent recipe needs the agent's wheel as an artifact")
    for i, a in enumerate(artifacts):
        if not a.sha256:
            raise r.error(
                ("artifacts", i, "sha256"), "the agent's wheel must be pinned by its sha256"
            )
    return Recipe(
        metadata=meta,
        artifacts=tuple(artifacts),
        source=file,
        unknown_fields=tuple(r.unknown_messages()),
        text=text,
    )


def _segment(r: Reader, path: Path_) -> str:
    value = r.text(path, required=True)
    assert value is not None
    why = check_segment(value)
    if why:
        raise r.error(path, f"{why}, got {value!r}")
    return value


def _cpu_quota(r: Reader, path: Path_) -> float | None:
    """``cpu_quota``: cores as a number (``0.5``) or a string (``"0.5"``, ``"50%"``)."""
    value: Any = r.get(path)
    if value is None:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError
        if isinstance(value, str) and value.strip().endswith("%"):
            cores = float(value.strip()[:-1]) / 100.0
        else:
            cores = float(value)
    except ValueError:
        raise r.error(
            path, f'expected cores as a number (0.5) or a percentage ("50%"), got {value!r}'
        ) from None
    if not math.isfinite(cores) or cores <= 0:
        raise r.error(path, f"expected a positive, finite quota, got {value!r}")
    return cores


def load_recipe(
    path: Path,
    *,
    environ: Mapping[str, str] | None = None,
    display: str | None = None,
    limits: Limits | None = None,
) -> Recipe:
    """Read and parse a recipe file; a missing, unreadable or oversized file is a
    ValidationError naming it (the size is checked before the file is read)."""
    lim = limits or Limits.from_env()
    name = display or str(path)
    text = read_bounded(
        path,
        limits=lim,
        bound="max_recipe_bytes",
        display=name,
        what="recipe",
    )
    return parse_recipe(text, file=name, environ=environ, limits=lim)

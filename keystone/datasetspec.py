"""The recipe's ``[[datasets]]`` table and ``[lifecycle.reload]``, as the Go Keystone reads them.

A dataset entry (Go's ``recipe.Dataset`` + ``dataset.ParseSpec``)::

    [[datasets]]
    name     = "oui"                                   # a directory and KEYSTONE_DATASET_OUI
    manifest = "https://hub.plant.local/oui.manifest.toml"
    sig_uri  = "..."        # default: <manifest>.sig
    cert_uri = "..."        # default: KEYSTONE_LEAF_CERT
    refresh  = "24h"        # default 24h, at least 1m
    max_age  = "72h"        # default 3 x refresh, never below refresh
    keep     = 2            # default 2, at least 2 (a rollback target)
    required = true         # default true
    headers  = { Authorization = "Bearer ..." }
    github_token = "..."

:func:`parse_datasets` is the hook the recipe loader calls with its located reader, so every error
names the file, the line and the field.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keystone.errors import ValidationError
from keystone.tomlsrc import Path_, Reader
from keystone.units import format_duration, parse_duration

DEFAULT_REFRESH = 24 * 3600.0
DEFAULT_KEEP = 2
DEFAULT_GRACE = 30.0
MAX_AGE_MULTIPLE = 3
MINIMUM_REFRESH = 60.0

DATASET_KEYS = frozenset(
    {
        "name",
        "manifest",
        "sig_uri",
        "cert_uri",
        "refresh",
        "max_age",
        "keep",
        "required",
        "headers",
        "github_token",
    }
)

# Go's allow-list: a reload makes a component reread a file; SIGKILL or SIGTERM would turn "your
# data changed" into an outage with no restart behind it.
RELOAD_SIGNALS: Mapping[str, signal.Signals] = {
    "SIGHUP": signal.SIGHUP,
    "HUP": signal.SIGHUP,
    "SIGUSR1": signal.SIGUSR1,
    "USR1": signal.SIGUSR1,
    "SIGUSR2": signal.SIGUSR2,
    "USR2": signal.SIGUSR2,
}

_SEGMENT = re.compile(r"^[A-Za-z0-9._+-]{1,128}$")


def check_name(value: str) -> str | None:
    """Why ``value`` cannot name a dataset (or a dataset version) directory, or None.

    Go's path-segment rule (``[A-Za-z0-9._+-]``, no ``..``) plus: no leading dot (the store keeps
    its own files under dot names) and not ``current`` (the link).
    """
    if not _SEGMENT.match(value):
        return "expected 1-128 characters of [A-Za-z0-9._+-]"
    if ".." in value:
        return "must not contain '..'"
    if value.startswith("."):
        return "must not start with '.'"
    if value == "current":
        return "'current' is the name of the active-version link"
    return None


@dataclass(frozen=True)
class DatasetSpec:
    """A validated, defaulted ``[[datasets]]`` entry (Go's ``dataset.Spec``); durations in seconds."""

    name: str
    manifest: str
    sig_uri: str
    cert_uri: str = ""
    refresh: float = DEFAULT_REFRESH
    max_age: float = DEFAULT_REFRESH * MAX_AGE_MULTIPLE
    keep: int = DEFAULT_KEEP
    required: bool = True
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    github_token: str = field(default="", repr=False)

    @property
    def env_name(self) -> str:
        """The variable the component reads its dataset path from (:func:`env_name`)."""
        return env_name(self.name)

    def to_json(self) -> dict[str, Any]:
        """The spec for status output (no headers or token: they may hold credentials)."""
        return {
            "name": self.name,
            "manifest": self.manifest,
            "sig_uri": self.sig_uri,
            "cert_uri": self.cert_uri,
            "refresh": format_duration(self.refresh),
            "max_age": format_duration(self.max_age),
            "keep": self.keep,
            "required": self.required,
        }


@dataclass(frozen=True)
class ReloadPlan:
    """How a component is told its data changed (Go's ``dataset.ReloadPlan``)."""

    signal: str = ""
    script: str = ""
    grace: float = DEFAULT_GRACE

    @property
    def declared(self) -> bool:
        """Whether the recipe asked for any reload at all."""
        return bool(self.signal or self.script)


def env_name(name: str) -> str:
    """``KEYSTONE_DATASET_<NAME>``: upper-cased, anything not a letter or digit an underscore."""
    tail = "".join(c if ("A" <= c <= "Z" or "0" <= c <= "9") else "_" for c in name.upper())
    return "KEYSTONE_DATASET_" + tail


def parse_signal(name: str) -> signal.Signals:
    """Resolve a reload signal name from the allow-list (SIGHUP, SIGUSR1, SIGUSR2).

    Raises:
        ValueError: any other name.
    """
    sig = RELOAD_SIGNALS.get(name.strip().upper())
    if sig is None:
        raise ValueError(
            f"reload signal {name!r} is not allowed (supported: SIGHUP, SIGUSR1, SIGUSR2)"
        )
    return sig


def _duration(r: Reader, path: Path_, default: float) -> float:
    value = r.get(path)
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if not isinstance(value, str):
        raise r.error(path, 'expected a duration string such as "24h" or "30m"')
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise r.error(path, f'{value!r} is not a duration (try "24h", "30m")') from None
    if seconds <= 0:
        raise r.error(path, f"{value!r} must be positive")
    return seconds


def parse_dataset(r: Reader, path: Path_) -> DatasetSpec:
    """Validate one ``[[datasets]]`` entry at ``path`` and fill in Go's defaults.

    Raises:
        ValidationError: located at the offending field.
    """
    name = (r.text((*path, "name")) or "").strip()
    if not name:
        raise r.error((*path, "name"), "dataset has no name")
    why = check_name(name)
    if why:
        raise r.error((*path, "name"), f"dataset name {name!r}: {why}")
    manifest = (r.text((*path, "manifest")) or "").strip()
    if not manifest:
        raise r.error((*path, "manifest"), f"dataset {name!r} has no manifest URL")
    refresh = _duration(r, (*path, "refresh"), DEFAULT_REFRESH)
    if refresh < MINIMUM_REFRESH:
        raise r.error(
            (*path, "refresh"),
            f"dataset {name!r} refresh {format_duration(refresh)} is below the 1m minimum: "
            "a dataset is not a poll loop",
        )
    max_age = _duration(r, (*path, "max_age"), MAX_AGE_MULTIPLE * refresh)
    if max_age < refresh:
        raise r.error(
            (*path, "max_age"),
            f"dataset {name!r} max_age {format_duration(max_age)} is shorter than its refresh "
            f"{format_duration(refresh)}, so it would report stale between every update",
        )
    keep = r.integer((*path, "keep"), default=0)
    assert keep is not None
    if keep == 0:
        keep = DEFAULT_KEEP
    if keep < 2:
        raise r.error(
            (*path, "keep"), f"dataset {name!r} keep={keep} leaves nothing to roll back to"
        )
    sig = (r.text((*path, "sig_uri")) or "").strip() or manifest + ".sig"
    return DatasetSpec(
        name=name,
        manifest=manifest,
        sig_uri=sig,
        cert_uri=(r.text((*path, "cert_uri")) or "").strip(),
        refresh=refresh,
        max_age=max_age,
        keep=keep,
        required=r.flag((*path, "required"), default=True),
        headers=r.str_table((*path, "headers")),
        github_token=r.text((*path, "github_token")) or "",
    )


def parse_datasets(r: Reader, path: Path_ = ("datasets",)) -> tuple[DatasetSpec, ...]:
    """Every ``[[datasets]]`` entry of a recipe, validated; duplicate names are refused.

    The recipe loader's hook: ``datasets = parse_datasets(r)`` (unknown keys are recorded on
    ``r`` like every other table's).

    Raises:
        ValidationError: naming the file, line and field.
    """
    out: list[DatasetSpec] = []
    seen: dict[str, Path_] = {}
    for sub, _tbl in r.tables(path, set(DATASET_KEYS)):
        spec = parse_dataset(r, sub)
        if spec.name in seen:
            # One directory and one environment variable cannot serve two entries.
            raise r.error((*sub, "name"), f"duplicate dataset name {spec.name!r}")
        seen[spec.name] = sub
        out.append(spec)
    return tuple(out)


def parse_datasets_text(text: str, *, file: str) -> tuple[DatasetSpec, ...]:
    """Parse the ``[[datasets]]`` of a recipe's TOML text (for tools and tests)."""
    return parse_datasets(Reader.from_text(text, file=file))


def reload_plan(
    signal_name: str | None,
    script: str | None,
    grace: float | None,
    *,
    run_type: str = "process",
    file: str | None = None,
) -> ReloadPlan:
    """Validate ``[lifecycle.reload]`` for datasets, by Go's ``ParseReload`` rules.

    Both a signal and a script is refused (pick one); a signal for a container is refused (it has
    no PID); the signal must be on the allow-list.

    Raises:
        ValidationError: at ``lifecycle.reload``.
    """
    sig = (signal_name or "").strip()
    scr = (script or "").strip()
    where = "lifecycle.reload"
    if sig and scr:
        raise ValidationError("declares both signal and script; pick one", file=file, field=where)
    if sig and run_type == "container":
        raise ValidationError(
            "signal is not available for a container component (it has no PID to signal); "
            "use script",
            file=file,
            field=where + ".signal",
        )
    if sig:
        try:
            parse_signal(sig)
        except ValueError as exc:
            raise ValidationError(str(exc), file=file, field=where + ".signal") from None
    return ReloadPlan(signal=sig, script=scr, grace=DEFAULT_GRACE if grace is None else grace)


def required_names(specs: Sequence[DatasetSpec]) -> tuple[str, ...]:
    """The names of the required datasets, in recipe order."""
    return tuple(s.name for s in specs if s.required)

"""Staged rollouts: ``rollout.toml`` at the root of the fleet repository, and a device's wave.

The file is signed with the rest of the revision; each device reads it from the verified
revision and decides for itself, with no server, when its turn comes::

    waves = ["1%", "10%", "50%", "100%"]   # cumulative fractions of the fleet (or label)
    wait = "1h"                            # between waves (or one duration per gap)
    canary_labels = ["canary"]             # devices with these labels are always in wave 1
    halted = false                         # true: devices that have not applied it stay put

    [maintenance]                          # the fleet's windows (see keystone.windows)
    windows = ["mon-fri 02:00-04:00"]
    timezone = "Europe/Berlin"

    [labels.site-berlin]                   # a label's own settings (any of the above)
    waves = ["50%", "100%"]
    wait = "10m"

Wave ``k`` (1-based) opens ``sum(wait[:k-1])`` after the commit's committer time. A device's
point in ``[0, 1)`` is a SHA-256 of its id and the revision, so each rollout picks other
canaries; its wave is the first whose fraction is above its point. A device uses the settings of
the first of its labels that has a ``[labels.<name>]`` table, else the top-level ones.

Strict: an unknown key is an error naming its line (a misspelt ``halted`` must not be ignored).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from keystone.errors import ValidationError
from keystone.limits import Limits
from keystone.openssl import sha256
from keystone.recipe import check_segment
from keystone.tomlsrc import Path_, Reader
from keystone.units import parse_duration
from keystone.windows import Maintenance, read_maintenance

ROLLOUT_FILE = "rollout.toml"
MAX_WAVES = 32
_KEYS = {"waves", "wait", "canary_labels", "halted", "maintenance"}


@dataclass(frozen=True)
class Policy:
    """One set of rollout settings: the top-level ones or a label's.

    Attributes:
        waves: cumulative fractions, increasing, the last 1.0.
        waits: seconds between consecutive waves (``len(waves) - 1`` of them).
        canary_labels: devices with any of these labels are in wave 1.
        halted: no device that has not applied the revision deploys it.
        maintenance: the fleet's windows (None: any time).
    """

    waves: tuple[float, ...] = (1.0,)
    waits: tuple[float, ...] = ()
    canary_labels: tuple[str, ...] = ()
    halted: bool = False
    maintenance: Maintenance | None = None

    def offsets(self) -> tuple[float, ...]:
        """Seconds after the commit at which each wave opens."""
        out, at = [0.0], 0.0
        for w in self.waits:
            at += w
            out.append(at)
        return tuple(out)


@dataclass(frozen=True)
class RolloutSpec:
    """A parsed ``rollout.toml``."""

    default: Policy = field(default_factory=Policy)
    labels: Mapping[str, Policy] = field(default_factory=dict)
    file: str = ROLLOUT_FILE

    def policy_for(self, labels: Sequence[str]) -> tuple[Policy, str | None]:
        """The settings of the first of ``labels`` with its own table, else the top-level ones."""
        for label in labels:
            if label in self.labels:
                return self.labels[label], label
        return self.default, None


@dataclass(frozen=True)
class Assignment:
    """Where one device stands in the rollout of one revision.

    Attributes:
        wave: the device's wave (1-based).
        waves: how many waves the rollout has.
        at: wall time (epoch seconds) its wave opens.
        canary: the device is in wave 1 (by its point, or pinned by a canary label).
        pinned: wave 1 because of a canary label.
        point: the device's point in ``[0, 1)`` for this revision.
        fraction: the cumulative fraction of the fleet its wave reaches.
        halted: the rollout is halted.
        label: the label whose settings apply (None: the top-level ones).
        starts: wall time of every wave.
        maintenance: the fleet's windows for this device.
    """

    wave: int
    waves: int
    at: float
    canary: bool
    pinned: bool
    point: float
    fraction: float
    halted: bool
    label: str | None
    starts: tuple[float, ...]
    maintenance: Maintenance | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "wave": self.wave,
            "waves": self.waves,
            "at": self.at,
            "canary": self.canary,
            "pinned": self.pinned,
            "point": round(self.point, 6),
            "fraction": self.fraction,
            "halted": self.halted,
            "label": self.label,
            "starts": list(self.starts),
            "maintenance": self.maintenance.to_json() if self.maintenance else None,
        }


def wave_point(device_id: str, revision: str) -> float:
    """The device's point in ``[0, 1)`` for ``revision``: stable, and new for each revision."""
    digest = sha256(f"{device_id}\n{revision}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def wave_of(point: float, waves: Sequence[float]) -> int:
    """The 1-based wave of ``point``: the first whose cumulative fraction is above it."""
    for i, fraction in enumerate(waves):
        if point < fraction:
            return i + 1
    return len(waves)


def assign(
    spec: RolloutSpec,
    *,
    device_id: str,
    labels: Sequence[str],
    revision: str,
    commit_time: float,
) -> Assignment:
    """This device's wave of ``revision`` (committed at ``commit_time``) and when it opens."""
    policy, label = spec.policy_for(labels)
    point = wave_point(device_id, revision)
    pinned = any(c in labels for c in policy.canary_labels)
    wave = 1 if pinned else wave_of(point, policy.waves)
    starts = tuple(commit_time + o for o in policy.offsets())
    return Assignment(
        wave=wave,
        waves=len(policy.waves),
        at=starts[wave - 1],
        canary=wave == 1,
        pinned=pinned,
        point=point,
        fraction=policy.waves[wave - 1],
        halted=policy.halted,
        label=label,
        starts=starts,
        maintenance=policy.maintenance,
    )


# --- parsing --------------------------------------------------------------------------------


def _fraction(r: Reader, path: Path_, value: Any) -> float:
    if isinstance(value, str):
        text = value.strip()
        if not text.endswith("%"):
            raise r.error(path, f'expected a percentage such as "10%", got {value!r}')
        try:
            pct = float(text[:-1])
        except ValueError:
            raise r.error(path, f'expected a percentage such as "10%", got {value!r}') from None
        frac = pct / 100.0
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise r.error(path, f'expected a percentage such as "10%" or a fraction, got {value!r}')
    elif isinstance(value, int) and value != 1:
        raise r.error(path, f'expected a fraction up to 1 (write {value} percent as "{value}%")')
    else:
        frac = float(value)
    if not 0.0 < frac <= 1.0:
        raise r.error(path, f"expected a share above 0% and up to 100%, got {value!r}")
    return frac


def _waves(r: Reader, path: Path_) -> tuple[float, ...] | None:
    raw = r.get(path)
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise r.error(path, 'expected a list of percentages such as ["1%", "10%", "100%"]')
    if len(raw) > MAX_WAVES:
        raise r.error(path, f"at most {MAX_WAVES} waves, got {len(raw)}")
    out: list[float] = []
    for i, item in enumerate(raw):
        frac = _fraction(r, (*path, i), item)
        if out and frac <= out[-1]:
            raise r.error(
                (*path, i),
                f"waves are cumulative shares and must grow: {item!r} after {raw[i - 1]!r}",
            )
        out.append(frac)
    if out[-1] != 1.0:
        raise r.error(
            (*path, len(out) - 1),
            'the last wave must be "100%" (halt a rollout with halted = true)',
        )
    return tuple(out)


def _seconds(r: Reader, path: Path_, value: Any) -> float:
    if not isinstance(value, str):
        raise r.error(path, f'expected a duration such as "1h" or "30m", got {value!r}')
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise r.error(path, str(exc)) from None


def _waits(r: Reader, path: Path_, waves: int) -> tuple[float, ...] | None:
    raw = r.get(path)
    if raw is None:
        return None
    gaps = waves - 1
    if isinstance(raw, list):
        if len(raw) != gaps:
            raise r.error(
                path,
                f"expected {gaps} duration{'s' if gaps != 1 else ''} (one between each two of "
                f"the {waves} waves), got {len(raw)}",
            )
        return tuple(_seconds(r, (*path, i), v) for i, v in enumerate(raw))
    return (_seconds(r, path, raw),) * gaps


def _labels(r: Reader, path: Path_) -> tuple[str, ...] | None:
    labels = r.str_list(path)
    for i, label in enumerate(labels or ()):
        why = check_segment(label)
        if why:
            raise r.error((*path, i), f"label {label!r}: {why}")
    return labels


def _policy(r: Reader, path: Path_, base: Policy | None, allowed: set[str] = _KEYS) -> Policy:
    r.table(path, allowed)
    waves = _waves(r, (*path, "waves"))
    n = len(waves) if waves is not None else len(base.waves) if base else 1
    waits = _waits(r, (*path, "wait"), n)
    if waits is None:
        if base is not None and len(base.waits) == n - 1:
            waits = base.waits
        elif n > 1 and base is not None and base.waits and len(set(base.waits)) == 1:
            waits = (base.waits[0],) * (n - 1)
        elif n > 1:
            raise r.error((*path, "waves"), f'{n} waves need a wait between them (wait = "1h")')
        else:
            waits = ()
    policy = Policy(
        waves=waves if waves is not None else base.waves if base else (1.0,),
        waits=waits,
        canary_labels=_labels(r, (*path, "canary_labels")) or (base.canary_labels if base else ()),
        halted=r.flag((*path, "halted"), default=base.halted if base else False),
        maintenance=read_maintenance(r, (*path, "maintenance"))
        or (base.maintenance if base else None),
    )
    if base is not None and r.get((*path, "canary_labels")) == []:
        policy = replace(policy, canary_labels=())
    return policy


def parse_rollout(
    text: str, *, file: str = ROLLOUT_FILE, limits: Limits | None = None
) -> RolloutSpec:
    """Parse ``rollout.toml`` (bounded and strict as plans are).

    Raises:
        ValidationError: naming file, line and field of anything that does not validate,
            unknown keys included.
    """
    r = Reader.from_text(text, file=file, limits=limits, size_bound="max_plan_bytes")
    default = _policy(r, (), None, {*_KEYS, "labels"})
    labels: dict[str, Policy] = {}
    raw = r.get(("labels",))
    if raw is not None and not isinstance(raw, dict):
        raise r.error(("labels",), "expected tables of label settings ([labels.<name>])")
    for name, value in (raw or {}).items():
        why = check_segment(name)
        if why:
            raise r.error(("labels", name), f"label {name!r}: {why}")
        if not isinstance(value, dict):  # labels.x = 1
            raise r.error(("labels", name), "expected a table ([labels.<name>])")
        labels[name] = _policy(r, ("labels", name), default)
    unknown = r.unknown_messages()
    if unknown:
        raise ValidationError("; ".join(unknown) + " (remove or fix these keys)")
    return RolloutSpec(default, labels, file)

"""What the API and the metrics show of datasets, in the Go Keystone's shapes and names.

``GET /v1/datasets`` answers a list of :func:`dataset_info` objects (Go's ``adapter.DatasetInfo``:
camelCase keys, empty ones left out, ``stale`` always present, durations as Go prints them);
:func:`dataset_detail` adds what a per-dataset view needs. :func:`metric_samples` gives Go's
series as plain data for the metrics module::

    keystone_dataset_age_seconds{name}            absent when the clock cannot be trusted
    keystone_dataset_stale{name}                  1 past max_age; absent with the age
    keystone_dataset_activations_total{name,result}   ok, rolled-back, failed
    keystone_dataset_refreshes_total{name,result}     updated, unchanged, failed
    keystone_dataset_last_timestamp_seconds{name}     the last refresh attempt (this agent's)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from keystone.datasets.manager import DatasetManager
from keystone.manifest import format_time
from keystone.units import go_duration


def _rfc3339(ts: float) -> str:
    return format_time(datetime.fromtimestamp(int(ts), UTC))


def dataset_info(manager: DatasetManager, name: str) -> dict[str, Any]:
    """One entry of ``GET /v1/datasets``, in Go's shape."""
    store = manager.store
    state = store.load_state(name)
    active = store.active(name)
    record = state.versions.get(active)
    out: dict[str, Any] = {"name": name}
    if active:
        out["version"] = active
    if record is not None:
        out["published"] = format_time(record.published)
    if state.manifest_uri:
        out["manifestUri"] = state.manifest_uri
    out["path"] = str(store.path(name))
    if state.last_refresh is not None:
        out["lastRefresh"] = _rfc3339(state.last_refresh)
    if state.last_result:
        out["lastResult"] = state.last_result
    binding = manager.bindings.get(name)
    stale = False
    if binding is not None:
        out["refresh"] = go_duration(binding.spec.refresh)
        out["maxAge"] = go_duration(binding.spec.max_age)
        age = manager.age(name)
        if age is None:
            # A plausible wrong number would silence the alert that should fire.
            out["ageUnknown"] = True
        else:
            if int(age):
                out["ageSeconds"] = int(age)
            stale = age > binding.spec.max_age
    out["stale"] = stale
    return out


def datasets_json(manager: DatasetManager) -> list[dict[str, Any]]:
    """``GET /v1/datasets``: every bound dataset, by name."""
    return [dataset_info(manager, n) for n in sorted(manager.bindings)]


def dataset_detail(manager: DatasetManager, name: str) -> dict[str, Any]:
    """``GET /v1/datasets/{name}``: the list entry plus versions, bad manifests and the spec.

    Raises:
        KeyError: ``name`` is not bound.
    """
    binding = manager.bindings[name]
    state = manager.store.load_state(name)
    versions = manager.store.versions(name)
    active = manager.store.active(name)
    return {
        **dataset_info(manager, name),
        "component": binding.component,
        "required": binding.spec.required,
        "keep": binding.spec.keep,
        "sigUri": binding.spec.sig_uri,
        "certUri": binding.spec.cert_uri or None,
        "env": binding.spec.env_name,
        "versions": [
            {
                "version": v,
                "active": v == active,
                **(
                    {
                        "published": format_time(state.versions[v].published),
                        "sha256": state.versions[v].sha256,
                        "size": state.versions[v].size,
                    }
                    if v in state.versions
                    else {}
                ),
            }
            for v in versions
        ],
        "rejected": [b.to_json() for b in state.bad],
        "acceptedPublished": format_time(state.accepted_published)
        if state.accepted_published
        else None,
    }


@dataclass(frozen=True)
class Sample:
    """One metric sample: name, kind (``gauge``/``counter``), help, labels and value."""

    name: str
    kind: str
    help: str
    labels: tuple[tuple[str, str], ...]
    value: float


_HELP = {
    "keystone_dataset_age_seconds": (
        "gauge",
        "How old the active dataset is, from its signed publication time. Absent when the "
        "clock cannot be trusted.",
    ),
    "keystone_dataset_stale": ("gauge", "1 when the active dataset is older than its max_age."),
    "keystone_dataset_activations_total": (
        "counter",
        "Dataset version activations by outcome (ok, rolled-back, failed).",
    ),
    "keystone_dataset_refreshes_total": (
        "counter",
        "Refresh attempts by outcome (updated, unchanged, failed).",
    ),
    "keystone_dataset_last_timestamp_seconds": (
        "gauge",
        "Unix timestamp of the last refresh attempt of the dataset, whatever its outcome.",
    ),
}


def _sample(name: str, labels: dict[str, str], value: float) -> Sample:
    kind, text = _HELP[name]
    return Sample(name, kind, text, tuple(sorted(labels.items())), float(value))


def metric_samples(manager: DatasetManager) -> list[Sample]:
    """Every dataset series as plain data (a metrics module renders them)."""
    out: list[Sample] = []
    for name in sorted(manager.bindings):
        spec = manager.bindings[name].spec
        age = manager.age(name)
        if age is not None:
            out.append(_sample("keystone_dataset_age_seconds", {"name": name}, age))
            out.append(
                _sample(
                    "keystone_dataset_stale", {"name": name}, 1.0 if age > spec.max_age else 0.0
                )
            )
        last = manager.store.load_state(name).last_refresh
        if last is not None:
            out.append(_sample("keystone_dataset_last_timestamp_seconds", {"name": name}, last))
    for (name, result), n in sorted(manager.activations.items()):
        out.append(
            _sample("keystone_dataset_activations_total", {"name": name, "result": result}, n)
        )
    for (name, result), n in sorted(manager.refreshes.items()):
        out.append(_sample("keystone_dataset_refreshes_total", {"name": name, "result": result}, n))
    return out

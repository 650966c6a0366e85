"""The recipe's ``[[datasets]]`` table and ``[lifecycle.reload]`` rules (:mod:`keystone.datasetspec`).

The parsing lives beside the other recipe models, in :mod:`keystone.datasetspec`, so the recipe
loader reaches it without importing this package (which knows the runtime); this module keeps
the names where the rest of the package imports them.
"""

from __future__ import annotations

from keystone.datasetspec import (
    DATASET_KEYS,
    DEFAULT_GRACE,
    DEFAULT_KEEP,
    DEFAULT_REFRESH,
    MAX_AGE_MULTIPLE,
    MINIMUM_REFRESH,
    RELOAD_SIGNALS,
    DatasetSpec,
    ReloadPlan,
    check_name,
    env_name,
    parse_dataset,
    parse_datasets,
    parse_datasets_text,
    parse_signal,
    reload_plan,
    required_names,
)

__all__ = [
    "DATASET_KEYS",
    "DEFAULT_GRACE",
    "DEFAULT_KEEP",
    "DEFAULT_REFRESH",
    "MAX_AGE_MULTIPLE",
    "MINIMUM_REFRESH",
    "RELOAD_SIGNALS",
    "DatasetSpec",
    "ReloadPlan",
    "check_name",
    "env_name",
    "parse_dataset",
    "parse_datasets",
    "parse_datasets_text",
    "parse_signal",
    "reload_plan",
    "required_names",
]

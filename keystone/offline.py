"""A local plan, read and checked on this machine without an agent.

``prepare_plan`` reads a plan's recipe files and rewrites the plan for upload (``keystone apply``);
``dry_run`` plans it against the plan the local agent last applied (``keystone apply --dry``
with no agent answering). Nothing here prints or deploys: the CLI is the face.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from keystone.diff import plan_actions
from keystone.env import substitution_env
from keystone.errors import ValidationError
from keystone.plan import (
    STORE_REF,
    DesiredPlan,
    FileRecipes,
    RecipeStore,
    load_desired,
    parse_plan,
    plan_from_json,
)
from keystone.recipe import check_segment, parse_recipe
from keystone.statefile import StateDamage, decode_json, read_bytes

LocalRecipe = tuple[str, str, str, str]
"""A recipe file to upload: ``(name, version, text, file)``."""


def runtime_dir() -> Path:
    """The runtime dir the local agent uses (``KEYSTONE_RUNTIME``, else ``./runtime``)."""
    return Path(os.environ.get("KEYSTONE_RUNTIME") or "runtime")


# --- plans for upload -----------------------------------------------------------------------


class _RecordingEnv(Mapping[str, str]):
    """The local environment for checking recipes; remembers the ``${VAR}`` it lacks (the agent
    substitutes recipes with its own environment, which may well set them)."""

    def __init__(self, base: Mapping[str, str]) -> None:
        self.base = dict(base)
        self.base.setdefault("KEYSTONE_PYTHON", sys.executable)
        self.missing: set[str] = set()

    def __getitem__(self, key: str) -> str:
        return self.base[key]

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self.base:
            self.missing.add(key)
        return self.base.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def recipe_ref(text: str, file: str) -> tuple[str, str]:
    """``(name, version)`` of a local recipe, validated here as far as this machine can.

    A recipe that names a ``${VAR}`` unset here is checked by the agent instead; its name and
    version are still read (and must be safe path segments).
    """
    env = _RecordingEnv(os.environ)
    try:
        recipe = parse_recipe(text, file=file, environ=env)
        return recipe.name, recipe.version
    except ValidationError:
        if not env.missing:
            raise
    try:
        meta = tomllib.loads(text).get("metadata")
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(str(exc), file=file) from None
    out = []
    for key in ("name", "version"):
        value = meta.get(key) if isinstance(meta, dict) else None
        why = check_segment(value) if isinstance(value, str) else "required, a string"
        if why:
            raise ValidationError(why, file=file, field=f"metadata.{key}")
        out.append(str(value))
    return out[0], out[1]


def prepare_plan(text: str, *, file: str) -> tuple[str, list[LocalRecipe], list[str]]:
    """Read a local plan (``text``, from ``file``) and the recipe files it names, for upload.

    Returns the plan text with every file reference rewritten to ``name:version`` (comments,
    order, line numbers and unknown fields kept), the recipes to upload as
    ``(name, version, text, file)``, and the plan's own unknown fields.

    Raises:
        ValidationError: the plan or a recipe does not parse or validate (file, line, field).
    """
    import tomlkit  # lazy: only a rewrite keeps comments and layout; a dry run does not

    parsed = parse_plan(text, file=file)
    doc = tomlkit.parse(text)
    tables = doc.get("components") or []
    reader = FileRecipes(Path.cwd(), None, allow_absolute=True)
    recipes: list[LocalRecipe] = []
    for table, entry in zip(tables, parsed.entries, strict=True):
        if not entry.enabled or (STORE_REF.match(entry.recipe) and "/" not in entry.recipe):
            continue  # removed by enabled = false, or already a reference to the agent's store
        recipe_text, display = reader(entry)
        name, version = recipe_ref(recipe_text, display)
        table["recipe"] = f"{name}:{version}"
        recipes.append((name, version, recipe_text, display))
    return tomlkit.dumps(doc), recipes, list(parsed.unknown_fields)


# --- dry runs -------------------------------------------------------------------------------


def _applied_plan(runtime: Path, environ: dict[str, str]) -> DesiredPlan:
    # Read, never moved aside: the snapshot is the agent's (it reports damage at its start).
    try:
        data = read_bytes(runtime / "state" / "agent.json")
        if data is None:
            return DesiredPlan.empty()  # no agent has applied a plan here
        from keystone.ledger import Snapshot  # lazy: only where an agent kept its state

        snap = Snapshot.from_json(decode_json(data))
    except StateDamage:
        snap = None
    if snap is not None and snap.plan:
        try:
            return plan_from_json(snap.plan, environ=environ)
        except Exception:  # a saved plan that no longer parses: compare against nothing
            return DesiredPlan.empty()
    return DesiredPlan.empty()


def dry_run(path: Path, *, runtime: Path | None = None) -> dict[str, Any]:
    """Validate ``path`` with its recipes and return the layers and ordered actions.

    Actions are relative to the plan the local agent last applied (from its state dir), or to
    nothing. Raises ValidationError with file, line and field for a bad plan or recipe.
    """
    rt = runtime or runtime_dir()
    env = substitution_env()
    desired = load_desired(path, store=RecipeStore(rt / "recipes"), environ=env)
    current = _applied_plan(rt, env)
    changes, actions = plan_actions(current, desired)
    return {
        "plan": str(path),
        "layers": [list(layer) for layer in desired.graph.layers],
        "changes": changes.to_json(),
        "actions": [a.to_json() for a in actions],
        "unknown_fields": list(desired.unknown_fields),
        "warnings": list(desired.warnings),
        "components": {
            n: {"recipe": c.recipe.name, "version": c.version, "file": c.recipe.source}
            for n, c in desired.components.items()
        },
    }

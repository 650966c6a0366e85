"""Commands that work without a running agent: plan dry runs, fleet checkout tools."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from keystone.plan import DesiredPlan, RecipeStore, load_desired, plan_from_json
from keystone.runtime.deployer import plan_actions
from keystone.state import read_json


def runtime_dir() -> Path:
    """The runtime dir the local agent uses (``KEYSTONE_RUNTIME``, else ``./runtime``)."""
    return Path(os.environ.get("KEYSTONE_RUNTIME") or "runtime")


def _applied_plan(runtime: Path, environ: dict[str, str]) -> DesiredPlan:
    snap = read_json(runtime / "state" / "agent.json", {}) or {}
    if snap.get("plan"):
        try:
            return plan_from_json(snap["plan"], environ=environ)
        except Exception:  # a saved plan that no longer parses: compare against nothing
            return DesiredPlan.empty()
    return DesiredPlan.empty()


def dry_run(path: Path, *, runtime: Path | None = None) -> dict[str, Any]:
    """Validate ``path`` with its recipes and return the layers and ordered actions.

    Actions are relative to the plan the local agent last applied (from its state dir), or to
    nothing. Raises ValidationError with file, line and field for a bad plan or recipe.
    """
    from keystone.env import substitution_env

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


def verify_revision(
    repo: Path, rev: str, allowed_signers: Path | None, json: bool, *, gpg_home: Path | None = None
) -> int:
    """``keystone verify --rev REF``: print the verdict on a commit of a fleet checkout.

    Returns the exit code: 0 when the commit verifies, 3 when it does not.
    """
    import json as jsonlib

    import typer

    from keystone import fleet

    data = fleet.verify(repo, rev, allowed_signers=allowed_signers, gpg_home=gpg_home)
    if json:
        typer.echo(jsonlib.dumps(data, indent=2, sort_keys=True))
    else:
        mark = "good" if data["ok"] else "BAD"
        who = f" by {data['signer']}" if data.get("signer") else ""
        typer.echo(f"{data['revision']}: {mark} {data['format']} signature{who}: {data['reason']}")
        if data.get("fingerprint"):
            typer.echo(f"key: {data['fingerprint']}")
    return 0 if data["ok"] else 3

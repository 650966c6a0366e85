"""The change set between the applied plan and a desired plan (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from keystone.plan import Component, DesiredPlan


@dataclass(frozen=True)
class ChangeSet:
    """What a deployment does, by component name.

    ``changed`` components have a new recipe content hash; ``restarted`` ones are unchanged
    themselves but depend (along hard or soft edges, transitively) on a changed one.
    """

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    restarted: tuple[str, ...]
    unchanged: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.restarted)

    def to_json(self) -> dict[str, list[str]]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "restarted": list(self.restarted),
            "unchanged": list(self.unchanged),
        }

    def summary(self) -> str:
        parts = []
        for label, names in (
            ("added", self.added),
            ("changed", self.changed),
            ("restarted", self.restarted),
            ("removed", self.removed),
        ):
            if names:
                parts.append(f"{label}: {', '.join(names)}")
        return "; ".join(parts) or "no changes"


def _same(a: Component, b: Component) -> bool:
    # One recipe object (recipes are immutable and cached by content): the same content hash,
    # without computing it.
    return a.recipe is b.recipe or a.content_hash() == b.content_hash()


def diff_plans(current: DesiredPlan, desired: DesiredPlan) -> ChangeSet:
    """Compare two plans by component name and recipe content hash."""
    cur, new = current.components, desired.components
    added = sorted(set(new) - set(cur))
    removed = sorted(set(cur) - set(new))
    changed = sorted(n for n in set(cur) & set(new) if not _same(cur[n], new[n]))
    cascade = desired.graph.dependents(changed) if changed else set()
    changed_set = set(changed)
    restarted = sorted(n for n in cascade if n in cur and n not in changed_set)
    unchanged = sorted(set(cur) & set(new) - changed_set - set(restarted))
    return ChangeSet(
        tuple(added), tuple(removed), tuple(changed), tuple(restarted), tuple(unchanged)
    )


@dataclass(frozen=True)
class Action:
    """One step of a deployment, in order."""

    action: str  # "stop" or "start"
    component: str
    version: str
    layer: int
    reason: str

    def to_json(self) -> dict[str, object]:
        return {
            "action": self.action,
            "component": self.component,
            "version": self.version,
            "layer": self.layer,
            "reason": self.reason,
        }


def plan_actions(current: DesiredPlan, desired: DesiredPlan) -> tuple[ChangeSet, list[Action]]:
    """The ordered actions that take ``current`` to ``desired`` (a dry run; pure)."""
    changes = diff_plans(current, desired)
    actions: list[Action] = []
    cur_layers = current.graph.layers
    removed, added, changed = set(changes.removed), set(changes.added), set(changes.changed)
    for layer_no in range(len(cur_layers) - 1, -1, -1):
        for name in reversed(cur_layers[layer_no]):
            if name in removed:
                actions.append(
                    Action("stop", name, current.components[name].version, layer_no, "removed")
                )
    bounce = changed | set(changes.restarted)
    for layer_no in range(len(cur_layers) - 1, -1, -1):
        for name in reversed(cur_layers[layer_no]):
            if name in bounce:
                why = "changed" if name in changed else "dependency changed"
                actions.append(
                    Action("stop", name, current.components[name].version, layer_no, why)
                )
    starting = added | bounce
    for layer_no, layer in enumerate(desired.graph.layers):
        for name in layer:
            if name in starting:
                why = (
                    "added"
                    if name in added
                    else "changed"
                    if name in changed
                    else "dependency changed"
                )
                actions.append(
                    Action("start", name, desired.components[name].version, layer_no, why)
                )
    return changes, actions

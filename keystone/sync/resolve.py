"""The desired plan of one device, read from one verified revision of the fleet repository.

A device's plan is the merge, in this order, of ``plans/default.toml``, each
``labels/<label>/plan.toml`` in the order the device lists its labels, then
``devices/<id>/plan.toml`` (DESIGN section 3). A later entry with the same component name
replaces the earlier one whole; ``enabled = false`` removes it. Recipe paths are relative to the
repository root and may not leave it. The ``[maintenance]`` windows of every plan file that
declares them are kept (all must be open for the plan to be deployed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, Protocol

from keystone import repopath
from keystone.errors import ValidationError
from keystone.plan import (
    STORE_REF,
    DesiredPlan,
    Documents,
    PlanEntry,
    PlanFile,
    merge_entries,
    merge_windows,
    parse_plan,
    resolve_entries,
)
from keystone.recipe import check_segment
from keystone.tomlsrc import Parsed


class Tree(Protocol):
    """Read access to one revision's files."""

    def read(self, path: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""
        ...


def repo_path(
    path: str, *, file: str | None = None, line: int | None = None, field: str = "recipe"
) -> str:
    """Normalise a repo-relative path; refuse absolute paths and any that leave the root."""
    return repopath.repo_path(path, file=file, line=line, field=field)


def plan_files(device_id: str, labels: Sequence[str]) -> list[str]:
    """The plan files of a device, in merge order."""
    for label in labels:
        why = check_segment(label)
        if why:
            raise ValidationError(f"label {label!r}: {why}", field="device.labels")
    why = check_segment(device_id)
    if why:
        raise ValidationError(f"device id {device_id!r}: {why}", field="device.id")
    return [
        "plans/default.toml",
        *(f"labels/{label}/plan.toml" for label in labels),
        f"devices/{device_id}/plan.toml",
    ]


def _store_ref(recipe: str) -> bool:
    return bool(STORE_REF.match(recipe)) and "/" not in recipe and not recipe.endswith(".toml")


def _text(data: bytes, file: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("not UTF-8 text", file=file) from None


def _keeper(
    docs: Documents | None, content_id: str | None, text: str
) -> Callable[[Parsed], None] | None:
    if docs is None or content_id is None:
        return None
    return lambda parsed: docs.put(content_id, text, parsed)


def resolve(
    tree: Tree,
    *,
    device_id: str,
    labels: Sequence[str],
    environ: Mapping[str, str],
    revision: str = "",
    cache: MutableMapping[Any, Any] | None = None,
    documents: Documents | None = None,
) -> DesiredPlan:
    """The validated DesiredPlan of this device at ``revision`` (``tree``).

    Each component's ``origin`` is the plan file it came from. Raises ValidationError naming
    the file, line and revision for anything that does not validate. Recipes are cached by
    content (``cache``, default the process's :data:`keystone.plan.RECIPES`); a tree that
    names blob ids (a git revision) lets unchanged recipes skip even the read, and with
    ``documents`` (:class:`keystone.plan.Documents`) the parse in a later process too.
    """
    blob_id = getattr(tree, "blob_id", None)
    docs = documents if blob_id is not None else None
    files: list[PlanFile] = []
    found: list[str] = []
    for path in plan_files(device_id, labels):
        # A plan file kept parsed by an earlier process (documents) is not read or parsed.
        found_id = blob_id(path) if docs is not None and blob_id is not None else None
        content_id = f"git:{found_id}" if isinstance(found_id, str) else None
        kept = docs.get(content_id) if docs is not None and content_id is not None else None
        if kept is not None:
            text = kept[0]
        else:
            data = tree.read(path)
            if data is None:
                continue
            text = _text(data, path)
        found.append(path)
        keep = _keeper(docs, content_id, text)
        parsed = kept[1] if kept is not None else None
        files.append(parse_plan(text, file=path, parsed=parsed, keep=keep))
    entries, unknown = merge_entries(files)

    def identify(e: PlanEntry) -> tuple[str, str] | None:
        # A git tree names each file's content: a recipe cached by its blob id is not read.
        if blob_id is None or _store_ref(e.recipe):
            return None
        path = repo_path(e.recipe, file=e.file, line=e.line)
        found = blob_id(path)
        return (f"git:{found}", path) if isinstance(found, str) else None

    def read(e: PlanEntry) -> tuple[str, str]:
        if _store_ref(e.recipe):
            raise ValidationError(
                f"recipe {e.recipe!r}: a fleet repository names recipes by path (e.g. recipes/x.recipe.toml)",
                file=e.file,
                line=e.line,
                field="recipe",
            )
        path = repo_path(e.recipe, file=e.file, line=e.line)
        data = tree.read(path)
        if data is None:
            at = f" at {revision[:12]}" if revision else ""
            raise ValidationError(
                f"recipe file not found{at}: {path}", file=e.file, line=e.line, field="recipe"
            )
        return _text(data, path), path

    try:
        return resolve_entries(
            entries,
            read,
            environ=environ,
            sources=tuple(found),
            unknown=unknown,
            cache=cache,
            identify=identify,
            maintenance=merge_windows(files),
            documents=docs,
        )
    except ValidationError as exc:
        if revision and exc.file and "@" not in exc.file:
            raise ValidationError(
                exc.reason, file=f"{exc.file}@{revision[:12]}", line=exc.line, field=exc.field
            ) from None
        raise


def render(plan: DesiredPlan) -> list[dict[str, object]]:
    """Per component: name, recipe, version, recipe file and the plan file it came from."""
    return [
        {
            "name": c.name,
            "recipe": c.recipe.name,
            "version": c.version,
            "recipe_file": c.recipe.source,
            "from": c.origin,
            "layer": plan.graph.layer_of(c.name),
        }
        for c in sorted(
            plan.components.values(), key=lambda c: (plan.graph.layer_of(c.name), c.name)
        )
    ]

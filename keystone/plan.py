"""Deployment plans: ``[[components]]`` with ``name`` and ``recipe``, resolved to recipes.

A plan may also declare ``[maintenance]`` windows (as agent.toml and ``rollout.toml`` do, read
by :func:`keystone.windows.read_maintenance`): a sync deploys a new revision only while the
windows of every plan file the device merges are open.

``load_plan`` reads a plan file; ``resolve_plan`` loads the recipes it names (a path inside the
plan root, or ``name:version`` from the recipe store) and validates the dependency graph. The
result, a ``DesiredPlan``, is what the deployer and the sync engine work with.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections import OrderedDict
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from keystone.dag import Graph, build_graph
from keystone.errors import ValidationError
from keystone.limits import Limits, read_bounded
from keystone.recipe import Recipe, check_segment, parse_recipe
from keystone.repopath import repo_path_problem
from keystone.state import atomic_write
from keystone.tomlsrc import Parsed, Reader
from keystone.windows import (
    Maintenance,
    WindowError,
    read_maintenance,
    window_from_json,
    window_to_json,
)

_VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
STORE_REF = re.compile(r"^([A-Za-z0-9._+-]+):([A-Za-z0-9._+-]+)\Z")


@dataclass(frozen=True)
class PlanEntry:
    """One ``[[components]]`` entry as written."""

    name: str
    recipe: str
    enabled: bool = True
    file: str = ""
    line: int | None = None


@dataclass(frozen=True)
class PlanFile:
    """A parsed plan file."""

    entries: tuple[PlanEntry, ...]
    file: str
    unknown_fields: tuple[str, ...] = ()
    maintenance: Maintenance | None = None  # [maintenance]: when this plan may be deployed


@dataclass(frozen=True)
class Component:
    """A component of a desired plan: its name, recipe and where both came from."""

    name: str
    recipe: Recipe
    origin: str  # the plan file that declared it
    recipe_ref: str  # as written in the plan

    @property
    def version(self) -> str:
        return self.recipe.version

    def content_hash(self) -> str:
        return self.recipe.content_hash()


@dataclass(frozen=True)
class DesiredPlan:
    """A validated plan: components by name, and their graph.

    ``maintenance`` holds the ``[maintenance]`` windows of each plan file that declares them,
    by file, in merge order: a sync deploys the plan only while all of them are open.
    """

    components: Mapping[str, Component]
    graph: Graph
    sources: tuple[str, ...] = ()
    unknown_fields: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    maintenance: tuple[tuple[str, Maintenance], ...] = ()

    @classmethod
    def empty(cls) -> DesiredPlan:
        return cls({}, build_graph({}))

    def recipes(self) -> dict[str, Recipe]:
        return {n: c.recipe for n, c in self.components.items()}


class LRU(MutableMapping[Any, Any]):
    """A dict that keeps its ``size`` most recently used entries."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Any, Any] = OrderedDict()

    def __getitem__(self, key: Any) -> Any:
        value = self._data[key]
        self._data.move_to_end(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def __delitem__(self, key: Any) -> None:
        del self._data[key]

    def __iter__(self) -> Any:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


RECIPES: MutableMapping[Any, Any] = LRU(2048)
"""Parsed recipes by content (the text, or a git blob id) and display name, shared by every
plan this process resolves: between the two revisions of a diff, across diffs and across the
syncs of the agent. A recipe is immutable, so sharing one is safe; the key also holds the
bounds in force and the values of the variables the recipe names."""

PLANS: MutableMapping[Any, Any] = LRU(32)
"""Parsed plan files by text, file name and bounds (a plan file rarely changes)."""


def parse_plan(
    text: str,
    *,
    file: str,
    limits: Limits | None = None,
    parsed: Parsed | None = None,
    keep: Callable[[Parsed], None] | None = None,
) -> PlanFile:
    """Parse plan TOML; duplicate names and unsafe names are errors naming file and line.

    ``limits`` (default: ``Limits.from_env()``) bounds its size, nesting and number of
    components. The same text is parsed once per process (:data:`PLANS`). ``parsed`` is
    ``text`` as parsed by an earlier process (``Documents``): only validated; when ``text`` is
    parsed here, ``keep`` is given the parsed document.
    """
    lim = limits or Limits.from_env()
    key = (text, file, lim)
    cached: PlanFile | None = PLANS.get(key)
    if cached is None:
        if parsed is not None:
            r = Reader.from_parsed(text, parsed, file=file, limits=lim, size_bound=_PLAN_BOUND)
        else:
            r = Reader.from_text(text, file=file, limits=lim, size_bound=_PLAN_BOUND)
            if keep is not None:
                keep(r.parsed())
        cached = PLANS[key] = _parse_plan(r, file=file, lim=lim)
    return cached


_PLAN_BOUND = "max_plan_bytes"


def _parse_plan(r: Reader, *, file: str, lim: Limits) -> PlanFile:
    r.table((), {"components", "maintenance"})
    windows = read_maintenance(r, ("maintenance",))
    listed = r.get(("components",))
    if isinstance(listed, list) and len(listed) > lim.max_components:
        raise lim.refuse(
            "max_components",
            len(listed),
            what="the number of components",
            file=file,
            line=r.index.line(("components", lim.max_components)),
            field="components",
        )
    entries: list[PlanEntry] = []
    seen: dict[str, int | None] = {}
    # The lines of entries and their recipe keys without the index where that is certain
    # (a plan of thousands of components would scan every line only to name each one's line).
    located = r.entry_key_lines("components", "recipe")
    for path, _ in r.tables(("components",), {"name", "recipe", "enabled"}):
        name = r.text((*path, "name"), required=True)
        recipe = r.text((*path, "recipe"), required=True)
        assert name is not None and recipe is not None
        why = check_segment(name)
        if why:
            raise r.error((*path, "name"), f"{why}, got {name!r}")
        at = path[-1]
        known = located[at] if located is not None and isinstance(at, int) else None
        line = known[0] if known is not None else r.index.line(path)
        if name in seen:
            raise r.error(
                (*path, "name"), f"duplicate component name {name!r} (first at line {seen[name]})"
            )
        seen[name] = line
        if not recipe.strip():
            raise r.error((*path, "recipe"), "must not be empty")
        recipe_line = (
            known[1] if known is not None and known[1] else r.index.line((*path, "recipe"))
        )
        entries.append(
            PlanEntry(name, recipe, r.flag((*path, "enabled"), default=True), file, recipe_line)
        )
    return PlanFile(tuple(entries), file, tuple(r.unknown_messages()), windows)


def load_plan(path: Path, *, display: str | None = None, limits: Limits | None = None) -> PlanFile:
    """Read and parse a plan file (its size checked before it is read)."""
    lim = limits or Limits.from_env()
    name = display or str(path)
    text = read_bounded(
        path,
        limits=lim,
        bound="max_plan_bytes",
        display=name,
        what="plan",
    )
    return parse_plan(text, file=name, limits=lim)


def merge_windows(files: list[PlanFile]) -> tuple[tuple[str, Maintenance], ...]:
    """The ``[maintenance]`` windows of the plan files that declare them, by file: every one
    of them must be open (they do not replace one another as components do)."""
    return tuple((pf.file, pf.maintenance) for pf in files if pf.maintenance is not None)


def merge_entries(files: list[PlanFile]) -> tuple[list[PlanEntry], list[str]]:
    """Merge plan files in order: a later entry with the same name replaces the earlier one
    whole, and ``enabled = false`` removes it. Returns entries and collected unknown fields."""
    merged: dict[str, PlanEntry] = {}
    unknown: list[str] = []
    for pf in files:
        unknown.extend(pf.unknown_fields)
        for e in pf.entries:
            merged.pop(e.name, None)
            if e.enabled:
                merged[e.name] = e
    return list(merged.values()), unknown


RecipeReader = Callable[[PlanEntry], tuple[str, str]]
"""Returns ``(recipe TOML text, display name)`` for a plan entry, raising ValidationError."""

RecipeIdentity = Callable[[PlanEntry], tuple[str, str] | None]
"""Returns ``(content id, display name)`` of a plan entry's recipe without reading it (a git
blob id), or None when it cannot (then the recipe is read)."""


class Documents(Protocol):
    """Parsed recipe documents by content id (a git blob id), kept between processes."""

    def get(self, content_id: str) -> tuple[str, Parsed] | None:
        """The text and parsed document with this content id, or None (not kept, or damaged)."""
        ...

    def put(self, content_id: str, text: str, parsed: Parsed) -> None:
        """Keep ``text``, whose content id this is, parsed as ``parsed`` (before validation)."""
        ...


def resolve_entries(
    entries: list[PlanEntry],
    read: RecipeReader,
    *,
    environ: Mapping[str, str] | None = None,
    sources: tuple[str, ...] = (),
    unknown: list[str] | None = None,
    cache: MutableMapping[Any, Any] | None = None,
    limits: Limits | None = None,
    identify: RecipeIdentity | None = None,
    maintenance: tuple[tuple[str, Maintenance], ...] = (),
    documents: Documents | None = None,
) -> DesiredPlan:
    """Load the recipe of every entry and validate the graph.

    ``cache`` (default: :data:`RECIPES`, shared by the process) reuses recipes parsed from the
    same text with the same values of the variables it names. With ``identify``, a recipe
    whose content id (its git blob id) is cached is not even read: between two revisions only
    the recipes whose tree entries changed are read and parsed. ``limits`` (default:
    ``Limits.from_env()``) bounds the number of components after the merge and every recipe.
    ``maintenance`` (:func:`merge_windows`) is carried to the result. ``documents`` keeps
    recipes parsed by content id across processes: one found there is neither read nor parsed
    again, only validated (with the bounds and variables in force).
    """
    lim = limits or Limits.from_env()
    if len(entries) > lim.max_components:
        first = entries[lim.max_components]
        raise lim.refuse(
            "max_components",
            len(entries),
            what="the number of components of the merged plan",
            file=first.file or None,
            line=first.line,
            field="components",
        )
    comps: dict[str, Component] = {}
    unknown_all = list(unknown or [])
    env = environ if environ is not None else os.environ
    store = RECIPES if cache is None else cache
    for e in entries:
        recipe = None
        known = identify(e) if identify is not None else None
        if known is not None:
            recipe = _cached(store, ("id", *known, lim), env)
        if recipe is None:
            kept = documents.get(known[0]) if documents is not None and known else None
            if kept is not None and known is not None:
                text, display = kept[0], known[1]
            else:
                text, display = read(e)
            text_key = ("text", text, display, lim)
            recipe = _cached(store, text_key, env)
            if recipe is None:
                reader = None
                if kept is not None:
                    reader = Reader.from_parsed(text, kept[1], file=display, limits=lim)
                elif documents is not None and known:
                    reader = Reader.from_text(text, file=display, limits=lim)
                    documents.put(known[0], text, reader.parsed())  # before validation reads it
                recipe = parse_recipe(text, file=display, environ=env, limits=lim, reader=reader)
                names = tuple(sorted(set(_VAR_REF.findall(text))))
                _remember(store, text_key, names, env, recipe)
            if known is not None:
                names = tuple(sorted(set(_VAR_REF.findall(text))))
                _remember(store, ("id", *known, lim), names, env, recipe)
        unknown_all.extend(recipe.unknown_fields)
        comps[e.name] = Component(e.name, recipe, e.file, e.recipe)
    graph = build_graph(
        {n: c.recipe for n, c in comps.items()}, origin={n: c.origin for n, c in comps.items()}
    )
    return DesiredPlan(comps, graph, sources, tuple(unknown_all), graph.warnings, maintenance)


def _cached(store: MutableMapping[Any, Any], key: Any, env: Mapping[str, str]) -> Recipe | None:
    """The recipe cached under ``key`` for the values ``env`` gives the variables it names."""
    slot = store.get(key)
    if slot is None:
        return None
    names, by_values = slot
    found: Recipe | None = by_values.get(tuple(env.get(n) for n in names))
    return found


def _remember(
    store: MutableMapping[Any, Any],
    key: Any,
    names: tuple[str, ...],
    env: Mapping[str, str],
    recipe: Recipe,
) -> None:
    slot = store.get(key)
    if slot is None:
        slot = (names, {})
    by_values: dict[Any, Recipe] = slot[1]
    by_values[tuple(env.get(n) for n in names)] = recipe
    while len(by_values) > 8:  # a bound per recipe too: environments rarely vary
        del by_values[next(iter(by_values))]
    store[key] = slot


def safe_join(
    root: Path,
    rel: str,
    *,
    file: str | None = None,
    line: int | None = None,
    field: str = "recipe",
    allow_absolute: bool = False,
    resolved_root: Path | None = None,
) -> Path:
    """``root / rel`` if it stays inside ``root`` (symlinks resolved), else a ValidationError.

    With ``allow_absolute`` an absolute ``rel`` is taken as it is, wherever it points (a
    local plan or one sent to the API may name a recipe file anywhere on the device, as the
    Go agent allows); a relative one must still stay inside ``root``.

    A path the system cannot resolve (too long, a NUL, a symlink loop) is a ValidationError
    naming it too. ``resolved_root`` is ``root.resolve()`` when the caller already has it (a
    reader joining many recipes to one root resolves it once).
    """
    try:
        if allow_absolute and rel.startswith("/"):
            return Path(rel).resolve()
        walked = _plain_join(resolved_root or root.resolve(), rel)
        if walked is not None:
            return walked[0]
        if not rel or (
            rel.startswith("/")
            and not Path(rel).resolve().is_relative_to(resolved_root or root.resolve())
        ):
            raise ValidationError(
                f"path {_short(rel)!r} is outside the plan root {root}",
                file=file,
                line=line,
                field=field,
            )
        candidate = (root / rel).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: a symlink loop (3.11)
        raise ValidationError(
            f"cannot resolve path {_short(rel)!r}: {_reason(exc)}",
            file=file,
            line=line,
            field=field,
        ) from None
    plain = rel.startswith("/") or repo_path_problem(rel) is None  # no '..', no backslash
    if not plain or not candidate.is_relative_to(resolved_root or root.resolve()):
        raise ValidationError(
            f"path {_short(rel)!r} escapes the plan root {root}",
            file=file,
            line=line,
            field=field,
        )
    return candidate


def _plain_join(base: Path, rel: str) -> tuple[Path, int] | None:
    """``(base / rel).resolve()`` for a resolved ``base`` and a plain relative ``rel`` (no
    ``..``, no backslash), found by an ``lstat`` of ``rel``'s own components: when none of them
    is a symlink, the resolved path is ``base / rel`` as written, and it is inside ``base``.
    With it, the mode of its last component (0 when something on the way is missing).

    None when ``rel`` is not plain, or a component is a symlink or cannot be looked at (other
    than missing): then ``Path.resolve`` decides, and the caller checks where it points. A
    missing component ends the walk as ``resolve`` does: nothing below it exists, so nothing
    below it is a symlink.
    """
    if not rel or rel.startswith("/") or repo_path_problem(rel) is not None:
        return None
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    head = str(base)
    sep = "" if head.endswith("/") else "/"
    mode = 0
    for i, part in enumerate(parts):
        head = f"{head}{sep}{part}"
        sep = "/"
        try:
            mode = os.lstat(head).st_mode
        except FileNotFoundError:
            return Path(head, *parts[i + 1 :]), 0
        except (OSError, ValueError):
            return None
        if stat.S_ISLNK(mode):
            return None
    return Path(head), mode


def _short(text: str, keep: int = 120) -> str:
    """``text`` cut to ``keep`` characters for a message (a path may be kilobytes long)."""
    return text if len(text) <= keep else f"{text[:keep]}...({len(text)} characters)"


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


class FileRecipes:
    """Reads recipes named by plan entries from the filesystem and the recipe store.

    A relative path is looked up under the plan root (the working directory or the fleet
    repository root) and then next to the plan file; it must not leave either. With
    ``allow_absolute`` (a plan on the device, or one sent to the API, as in the Go agent) an
    absolute path names its file wherever it is.
    """

    def __init__(
        self,
        root: Path,
        store: RecipeStore | None = None,
        limits: Limits | None = None,
        *,
        verify: Callable[[Path, str], None] | None = None,
        allow_absolute: bool = False,
    ) -> None:
        self.root = root
        self.store = store
        self.allow_absolute = allow_absolute
        self.limits = limits or Limits.from_env()
        # Called with (path, text) for every recipe read from the filesystem (not the store):
        # the agent's recipe signature check.
        self.verify = verify
        self._roots: dict[Path, Path] = {}
        self._cwd: str | None = None  # os.getcwd() and "/", read once
        self._plan_dirs: dict[str, Path] = {}  # the directory of each plan file named

    def _resolved(self, base: Path) -> Path | None:
        """``base.resolve()``, once per reader (None when it cannot be resolved: then
        ``safe_join`` resolves it and reports the error itself)."""
        if base not in self._roots:
            try:
                self._roots[base] = base.resolve()
            except (OSError, ValueError, RuntimeError):
                return None
        return self._roots[base]

    def _display(self, p: Path) -> str:
        """``p`` relative to the working directory when it is below it, else as it is."""
        if self._cwd is None:
            cwd = os.getcwd()
            self._cwd = cwd if cwd.endswith("/") else f"{cwd}/"
        text = str(p)
        if text.startswith(self._cwd):
            return text[len(self._cwd) :] or "."
        return "." if f"{text}/" == self._cwd else text

    def _found(self, p: Path) -> tuple[str, str]:
        display = self._display(p)
        text = self._read(p, display)
        if self.verify is not None:
            self.verify(p, text)
        return text, display

    def _read(self, p: Path, display: str) -> str:
        lim = self.limits
        return read_bounded(
            p,
            limits=lim,
            bound="max_recipe_bytes",
            display=display,
            what="recipe",
        )

    def __call__(self, e: PlanEntry) -> tuple[str, str]:
        m = STORE_REF.match(e.recipe)
        if m and "/" not in e.recipe:
            if self.store is None:
                raise ValidationError(
                    f"recipe {e.recipe!r} names the recipe store, which is not available here",
                    file=e.file,
                    line=e.line,
                    field="recipe",
                )
            path = self.store.path(m.group(1), m.group(2))
            if path is None:
                raise ValidationError(
                    f"recipe {e.recipe!r} is not in the recipe store (upload it first)",
                    file=e.file,
                    line=e.line,
                    field="recipe",
                )
            return self._read(path, f"store:{e.recipe}"), f"store:{e.recipe}"
        plan_dir = self._plan_dirs.get(e.file)
        if plan_dir is None:
            plan_dir = self._plan_dirs[e.file] = Path(e.file).parent if e.file else self.root
        tried: list[Path] = []
        for base in (self.root, plan_dir):
            resolved = self._resolved(base)
            # A plain path with no symlink on the way is found by its walk (and is a file or
            # not by the mode seen there); anything else by safe_join and a stat.
            walked = _plain_join(resolved, e.recipe) if resolved is not None else None
            if walked is not None:
                p, mode = walked
                if stat.S_ISREG(mode):
                    return self._found(p)
                tried.append(p)
                continue
            p = safe_join(
                base,
                e.recipe,
                file=e.file,
                line=e.line,
                allow_absolute=self.allow_absolute,
                resolved_root=resolved,
            )
            tried.append(p)
            try:
                found = p.is_file()
            except (OSError, ValueError) as exc:
                raise ValidationError(
                    f"cannot read recipe {_short(str(p))}: {_reason(exc)}",
                    file=e.file,
                    line=e.line,
                    field="recipe",
                ) from None
            if found:
                return self._found(p)
        looked = ", ".join(sorted({_short(str(t)) for t in tried}))
        raise ValidationError(
            f"recipe file not found: {_short(e.recipe)} (looked in {looked})",
            file=e.file,
            line=e.line,
            field="recipe",
        )


def load_desired(
    plan_path: Path,
    *,
    root: Path | None = None,
    store: RecipeStore | None = None,
    environ: Mapping[str, str] | None = None,
    limits: Limits | None = None,
) -> DesiredPlan:
    """Load a local plan file and its recipes into a validated DesiredPlan."""
    lim = limits or Limits.from_env()
    pf = load_plan(plan_path, limits=lim)
    entries, unknown = merge_entries([pf])
    return resolve_entries(
        entries,
        FileRecipes(root or Path.cwd(), store, lim, allow_absolute=True),
        environ=environ,
        sources=(str(plan_path),),
        unknown=unknown,
        limits=lim,
    )


class RecipeStore:
    """Recipes uploaded through the API: ``<dir>/<name>/<version>.recipe.toml``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str, version: str) -> Path | None:
        if check_segment(name) or check_segment(version):
            return None
        p = self.root / name / f"{version}.recipe.toml"
        return p if p.is_file() else None

    def list(self) -> list[tuple[str, str, Path]]:
        out = []
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                for f in sorted(d.glob("*.recipe.toml")):
                    out.append((d.name, f.name[: -len(".recipe.toml")], f))
        return out

    def put(
        self, text: str, *, force: bool, environ: Mapping[str, str] | None = None
    ) -> tuple[Recipe, Path, bool]:
        """Validate and store; returns (recipe, path, replaced). Raises FileExistsError."""
        recipe = parse_recipe(
            text, file="uploaded recipe", environ=environ if environ is not None else os.environ
        )
        p = self.root / recipe.name / f"{recipe.version}.recipe.toml"
        existed = p.exists()
        if existed and not force:
            raise FileExistsError(
                f"recipe {recipe.name}:{recipe.version} is already stored (use force)"
            )
        atomic_write(p, text.encode())
        return recipe, p, existed

    def delete(self, name: str, version: str) -> bool:
        p = self.path(name, version)
        if p is None:
            return False
        p.unlink()
        with contextlib.suppress(OSError):
            p.parent.rmdir()
        return True


def plan_to_json(plan: DesiredPlan) -> dict[str, object]:
    """A self-contained snapshot of a desired plan (recipes included), for the state file.

    ``maintenance`` is written only for a plan with windows (a snapshot without it has none).
    """
    out: dict[str, object] = {
        "sources": list(plan.sources),
        "components": [
            {
                "name": c.name,
                "recipe_ref": c.recipe_ref,
                "origin": c.origin,
                "recipe_source": c.recipe.source,
                "recipe_text": c.recipe.text,
            }
            for c in plan.components.values()
        ],
    }
    if plan.maintenance:
        out["maintenance"] = [
            {
                "file": name,
                "windows": [window_to_json(w) for w in m.windows],
                "timezone": m.timezone,
            }
            for name, m in plan.maintenance
        ]
    return out


def _windows_from_json(data: object, file: str) -> tuple[tuple[str, Maintenance], ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ValidationError("expected a list", file=file, field="plan.maintenance")
    out: list[tuple[str, Maintenance]] = []
    for i, item in enumerate(data):
        where = f"plan.maintenance[{i}]"
        if not isinstance(item, Mapping):
            raise ValidationError("expected an object", file=file, field=where)
        name, windows, zone = item.get("file"), item.get("windows"), item.get("timezone")
        if not isinstance(name, str):
            raise ValidationError("expected a string", file=file, field=f"{where}.file")
        if zone is not None and not isinstance(zone, str):
            raise ValidationError("expected a string", file=file, field=f"{where}.timezone")
        if not isinstance(windows, list) or not windows:
            raise ValidationError("expected a list of windows", file=file, field=f"{where}.windows")
        parsed = []
        for j, w in enumerate(windows):
            try:
                parsed.append(window_from_json(w))
            except WindowError as exc:
                raise ValidationError(str(exc), file=file, field=f"{where}.windows[{j}]") from None
        out.append((name, Maintenance(tuple(parsed), zone or None)))
    return tuple(out)


def plan_from_json(
    data: Mapping[str, object],
    *,
    environ: Mapping[str, str],
    file: str = "state snapshot",
    limits: Limits | None = None,
) -> DesiredPlan:
    """Rebuild a DesiredPlan from ``plan_to_json`` output.

    Raises:
        ValidationError: naming ``file`` and the field, for a snapshot of the wrong shape
            (a damaged state file), as well as for a recipe in it that no longer parses.
    """
    if not isinstance(data, Mapping):
        raise ValidationError(
            f"expected an object, got {type(data).__name__}", file=file, field="plan"
        )
    comps = data.get("components") or []
    if not isinstance(comps, list):
        raise ValidationError("expected a list", file=file, field="plan.components")
    texts: dict[str, tuple[str, str]] = {}
    entries: list[PlanEntry] = []
    for i, c in enumerate(comps):
        where = f"plan.components[{i}]"
        if not isinstance(c, Mapping):
            raise ValidationError("expected an object", file=file, field=where)
        name, ref, text = c.get("name"), c.get("recipe_ref"), c.get("recipe_text")
        origin, source = c.get("origin", ""), c.get("recipe_source") or ref
        for key, value in (
            ("name", name),
            ("recipe_ref", ref),
            ("recipe_text", text),
            ("origin", origin),
            ("recipe_source", source),
        ):
            if not isinstance(value, str):
                raise ValidationError(
                    f"expected a string, got {type(value).__name__}",
                    file=file,
                    field=f"{where}.{key}",
                )
        assert isinstance(name, str) and isinstance(ref, str) and isinstance(text, str)
        assert isinstance(origin, str) and isinstance(source, str)
        entries.append(PlanEntry(name, ref, True, origin, None))
        texts[name] = (text, source)
    sources = data.get("sources") or []
    if not isinstance(sources, list) or not all(isinstance(x, str) for x in sources):
        raise ValidationError("expected a list of strings", file=file, field="plan.sources")
    return resolve_entries(
        entries,
        lambda e: texts[e.name],
        environ=environ,
        sources=tuple(sources),
        limits=limits,
        maintenance=_windows_from_json(data.get("maintenance"), file),
    )

"""What every command prints: tables for people, ``--json`` for scripts (keys sorted).

The renderers are plain functions of the API's (or a fleet tool's) JSON, and this module does
not import typer, so the typer commands and the typer-free fast path (``keystone.cli.fast``)
print exactly the same thing. The fast path's own renderers, ``emit`` and ``report_error`` live
in :mod:`keystone.cli.fastviews` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keystone.cli.fastviews import (
    components_text,
    damaged_text,
    drift_summary,
    duration,
    emit,
    health_text,
    report_error,
    revision_text,
    short,
    status_text,
    sync_text,
    table,
    when,
)

__all__ = [
    "Human",
    "actions_text",
    "bundle_created_text",
    "bundle_text",
    "commit_verdict_text",
    "components_text",
    "damaged_text",
    "drift_summary",
    "drift_text",
    "duration",
    "emit",
    "graph_text",
    "health_text",
    "history_text",
    "plan_diff_text",
    "recipes_text",
    "reconcile_text",
    "render_text",
    "report_error",
    "report_verdict_text",
    "restart_text",
    "revision_text",
    "rollout_render_text",
    "short",
    "staged_text",
    "status_text",
    "sync_text",
    "table",
    "when",
]

Human = Callable[[Any], str]


# --- renderers ------------------------------------------------------------------------------


def report_verdict_text(d: dict[str, Any]) -> str:
    """``report verify``: who signed it and what it says, or why it is refused."""
    if not d.get("ok"):
        return f"refused: {d['file']}: {d.get('reason')}"
    lines = [
        f"ok: {d['file']}",
        f"  device:     {d.get('device') or '-'} ({d.get('fingerprint')})",
        f"  written:    {d.get('created_at') or '-'}",
        f"  outcome:    {d.get('outcome') or '-'}",
        f"  applied:    {d.get('applied') or '-'}",
    ]
    for c in (d.get("report") or {}).get("components") or []:
        lines.append(
            f"  {c.get('name')}: {c.get('state')} {c.get('version') or ''}"
            f" drift {drift_summary(c.get('drift'))}"
        )
    return "\n".join(lines)


def drift_text(d: dict[str, Any]) -> str:
    """``verify --installed``: each component's drift and the files it names."""
    comps = d.get("components") or []
    if not comps:
        return "no components"
    lines = []
    for c in comps:
        drift = c.get("drift")
        policy = c.get("policy") or "report"
        state = drift_summary(drift) if drift else "no install manifest"
        lines.append(f"{c['name']}: {state} (drift = {policy})")
        files = (drift or {}).get("files") or {}
        for kind in ("changed", "added", "removed"):
            lines += [f"  {kind:<8} {p}" for p in files.get(kind) or []]
    return "\n".join(lines)


def graph_text(d: dict[str, Any]) -> str:
    """Start layers, one per line, then the dependency edges."""
    # lazy: only the graph command needs the graph reader
    from keystone.graph import picture

    pic = picture(d)
    if not pic.layers:
        return "empty plan"
    lines = [f"layer {i}: {', '.join(layer)}" for i, layer in enumerate(pic.layers)]
    if pic.edges:
        lines.append("")
        lines += [f"{comp} -> {dep} ({kind})" for comp, dep, kind in pic.edges]
    return "\n".join(lines)


def actions_text(d: dict[str, Any]) -> str:
    """An apply (or dry run): status, layers, the ordered actions and warnings."""
    lines = []
    head = d.get("status") or ("dry-run (offline)" if d.get("offline") else "")
    if head:
        lines.append(f"status: {head}")
    if d.get("uploaded"):
        lines.append("uploaded recipes: " + ", ".join(d["uploaded"]))
    layers = d.get("layers") or []
    lines.append("layers: " + (" | ".join(", ".join(layer) for layer in layers) or "-"))
    rows = [
        [
            a.get("action", ""),
            a.get("component", ""),
            a.get("version", ""),
            a.get("layer", ""),
            a.get("reason", ""),
        ]
        for a in d.get("actions") or []
    ]
    lines.append(
        table(rows, ["ACTION", "COMPONENT", "VERSION", "LAYER", "WHY"]) if rows else "no changes"
    )
    for w in d.get("warnings") or []:
        lines.append(f"warning: {w}")
    for u in d.get("unknownFields") or d.get("unknown_fields") or []:
        lines.append(f"unknown field: {u}")
    if d.get("result"):
        lines.append(f"result: {d['result']}" + (f": {d['error']}" if d.get("error") else ""))
    return "\n".join(lines)


def recipes_text(rows: list[dict[str, Any]]) -> str:
    """The recipe store."""
    if not rows:
        return "no recipes stored (keystone upload-recipe FILE)"
    body = [[r.get("name", ""), r.get("version", ""), str(r.get("sha256", ""))[:16]] for r in rows]
    return table(body, ["NAME", "VERSION", "SHA256"])


def reconcile_text(d: dict[str, Any]) -> str:
    """A reconcile pass: what it repaired, or why it was skipped."""
    if d.get("skipped"):
        return f"skipped: {d.get('reason') or 'no reason given'}"
    took = f" ({d['duration']})" if d.get("duration") else ""
    return f"repaired: {', '.join(d.get('repaired') or []) or 'nothing'}{took}"


def restart_text(d: dict[str, Any]) -> str:
    """A restart, or the order a dry restart would follow."""
    if "stopOrder" in d:
        return (
            f"stop:  {' -> '.join(d['stopOrder']) or '-'}\n"
            f"start: {' -> '.join(d.get('startOrder') or []) or '-'}"
        )
    deps = d.get("dependents") or []
    names = ", ".join(deps if isinstance(deps, list) else sorted(deps)) or "none"
    return f"restarted {d.get('component')} (pid {d.get('pid') or '-'}); dependents: {names}"


def commit_verdict_text(d: dict[str, Any]) -> str:
    """``verify --rev``: the signature verdict on a fleet commit, and its key."""
    mark = "good" if d["ok"] else "BAD"
    who = f" by {d['signer']}" if d.get("signer") else ""
    lines = [f"{d['revision']}: {mark} {d['format']} signature{who}: {d['reason']}"]
    if d.get("fingerprint"):
        lines.append(f"key: {d['fingerprint']}")
    return "\n".join(lines)


# --- GitOps ---------------------------------------------------------------------------------


def _changes_brief(ch: dict[str, list[str]]) -> str:
    parts = [f"{k} {','.join(v)}" for k, v in ch.items() if v and k != "unchanged"]
    return "; ".join(parts)


def _history_detail(r: dict[str, Any]) -> str:
    if r.get("error"):
        return str(r["error"])
    if r.get("changes"):
        return _changes_brief(r["changes"])
    if r.get("from") and r.get("to"):  # a self-update
        why = f": {r['reason']}" if r.get("reason") else ""
        return f"{r['from']} -> {r['to']}{why}"
    return ""


def history_text(rows: list[dict[str, Any]]) -> str:
    """The history, newest first: time, kind, result, revision and a detail."""
    if not rows:
        return "no history yet"
    body = [
        [
            when(r.get("time")),
            r.get("kind", ""),
            r.get("result", ""),
            short(r.get("revision")),
            _history_detail(r)[:90],
        ]
        for r in rows
    ]
    return table(body, ["TIME", "KIND", "RESULT", "REVISION", "DETAIL"])


# --- fleet tools ----------------------------------------------------------------------------


def render_text(d: dict[str, Any]) -> str:
    """``plan render``: the device's components in start layers, and where each came from."""
    out = [
        f"revision: {d['revision']}   device: {d['device']}   labels: {', '.join(d['labels']) or '-'}",
        f"plan files: {', '.join(d['plan_files']) or 'none'}",
        "",
    ]
    rows = [
        [str(c["layer"]), c["name"], c["recipe"], c["version"], c["recipe_file"], c["from"]]
        for c in d["components"]
    ]
    out.append(
        table(rows, ["LAYER", "COMPONENT", "RECIPE", "VERSION", "RECIPE FILE", "FROM"])
        if rows
        else "no components"
    )
    out += [f"warning: {w}" for w in d["warnings"] + d["unknown_fields"]]
    if d.get("rollout"):
        out.append(rollout_render_text(d["rollout"]))
    return "\n".join(out)


def rollout_render_text(r: dict[str, Any]) -> str:
    """``plan render``'s rollout line: the device's wave and when it opens."""
    shares = ", ".join(f"{f * 100:g}%" for f in r.get("fractions") or [])
    delays = ", ".join("+" + duration(x) if x else "at commit" for x in r.get("delays") or [])
    lines = [
        f"rollout: waves {shares} ({delays})"
        + (f" from [labels.{r['label']}]" if r.get("label") else "")
    ]
    if r.get("halted"):
        lines.append("  HALTED: devices that have not applied this revision stay where they are")
    if r.get("wave") is None:
        lines.append("  wave: decided by the commit id (render with --rev to see it)")
    else:
        pin = " (canary by label)" if r.get("pinned") else " (canary)" if r.get("canary") else ""
        at = f" at {r['at_utc']}" if r.get("at_utc") else ""
        lines.append(f"  wave {r['wave']} of {r['waves']}{pin}{at}")
    m = r.get("maintenance")
    if m:
        tz = m.get("timezone") or "device local time"
        lines.append(f"  maintenance windows ({tz}): {', '.join(m['windows'])}")
    return "\n".join(lines)


def plan_diff_text(d: dict[str, Any]) -> str:
    """``plan diff``: what changes between two revisions, then the actions in order."""
    out = [f"{short(d['from'])} -> {short(d['to'])}"]
    ch = d["changes"]
    for key in ("added", "changed", "restarted", "removed", "unchanged"):
        out.append(f"  {key:<10} {', '.join(ch[key]) or '-'}")
    if d["actions"]:
        out.append("")
        out.append(
            table(
                [
                    [a["action"], a["component"], a["version"], str(a["layer"]), a["reason"]]
                    for a in d["actions"]
                ],
                ["ACTION", "COMPONENT", "VERSION", "LAYER", "WHY"],
            )
        )
    return "\n".join(out)


def bundle_created_text(d: dict[str, Any]) -> str:
    """``bundle create``: the file written, its revision, artifacts, size and prerequisites."""
    text = (
        f"wrote {d['bundle']}: {short(d['revision'])}, {len(d['artifacts'])} artifact(s), "
        f"{d['size']} bytes"
    )
    if d.get("datasets"):
        text += f", {len({x['path'].split('/')[1] for x in d['datasets']})} dataset(s)"
    if d.get("images"):
        text += f", {len(d['images'])} container image(s)"
    if d["prerequisites"]:
        text += f", needs {', '.join(short(p) for p in d['prerequisites'])}"
    return text


def bundle_text(d: dict[str, Any]) -> str:
    """``bundle inspect``: revision, signer, prerequisites, components per label, artifacts."""
    out = [
        f"bundle:        {d['path']} ({d['kind']}, {d['size']} bytes)",
        f"revision:      {d['revision']} ({d['ref']})",
        f"prerequisites: {', '.join(short(p) for p in d['prerequisites']) or 'none (full bundle)'}",
    ]
    sig = d.get("signature")
    if sig:
        out.append(
            f"signature:     {'good' if sig['ok'] else 'BAD'} ({sig['format']}) {sig.get('signer') or ''} {sig['reason']}"
        )
    for label, comps in d.get("components", {}).items():
        out.append(f"components [{label}]: {', '.join(comps) or '-'}")
    for a in d["artifacts"]:
        out.append(f"artifact:      {a['sha256'][:16]}  {a['size']:>12}  {a['name']}")
    for x in d.get("datasets", ()):
        out.append(f"dataset:       {x['sha256'][:16]}  {x['size']:>12}  {x['path']}")
    if d.get("error"):
        out.append(f"note:          {d['error']}")
    return "\n".join(out)


def staged_text(bundle: Any, d: dict[str, Any]) -> str:
    """``bundle import`` with no agent answering: where ``bundle`` waits for the next start."""
    return f"no agent answered; staged {bundle} as {d['path']}: the agent imports it when it starts"

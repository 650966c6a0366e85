"""What the keystonectl commands print, and a typer-free fast path for the hot read-only ones.

People get tables, scripts get ``--json`` (the agent's own JSON, keys sorted). The renderers are
plain functions of the API's JSON so that ``keystone.ctl`` (typer) and ``fast_main`` (hand-parsed
argv) print exactly the same thing.

``fast_main`` exists for speed: importing typer (with pydantic) costs a few hundred milliseconds,
an eternity for ``keystone status`` in a monitoring loop. It serves ``status [--revision]``,
``components`` and ``health`` with the connection options, and declines (returns None) anything
else, including ``--help``, so typer handles it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from keystone.errors import KeystoneError

Human = Callable[[Any], str]


# --- formatting -----------------------------------------------------------------------------


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Left-aligned columns separated by two spaces, header first."""
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def short(rev: Any) -> str:
    """A revision shortened to 12 characters, or ``-``."""
    return str(rev)[:12] if rev else "-"


def when(t: Any) -> str:
    """A Unix time as local ``YYYY-MM-DD HH:MM:SS``, or ``-``."""
    if t in (None, ""):
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))
    except (TypeError, ValueError, OverflowError):
        return str(t)


def duration(seconds: Any) -> str:
    """``3d4h``, ``2h05m``, ``4m10s``, ``12s``."""
    try:
        s = int(float(seconds))
    except (TypeError, ValueError):
        return str(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def emit(data: Any, as_json: bool, human: Human | None = None) -> None:
    """Print ``data`` as JSON (``--json``: indented, keys sorted) or as ``human(data)``."""
    if as_json or human is None:
        text = json.dumps(data, indent=2, sort_keys=True, default=str)
    else:
        text = human(data)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def report_error(exc: KeystoneError, as_json: bool) -> int:
    """Print an error (stderr; with ``--json`` also as JSON on stdout); return its exit code."""
    code = int(exc.exit_code)
    if as_json:
        emit(
            {
                "error": str(exc),
                "kind": getattr(exc, "api_kind", None) or exc.kind,
                "status": getattr(exc, "status", None),
                "exit_code": code,
            },
            True,
        )
    sys.stderr.write(f"error: {exc}\n")
    sys.stderr.flush()
    return code


# --- renderers ------------------------------------------------------------------------------


def components_text(rows: list[dict[str, Any]]) -> str:
    """The components table."""
    if not rows:
        return "no components (apply a plan: keystone apply plan.toml)"
    body = [
        [
            c.get("name", ""),
            c.get("state", ""),
            c.get("version") or "-",
            c.get("pid") or "-",
            c.get("restarts", 0),
            duration(time.time() - float(c["since"])) if c.get("since") else "-",
            " ".join(str(c.get("error") or c.get("last_health") or "").split())[:60],
        ]
        for c in rows
    ]
    return table(body, ["COMPONENT", "STATE", "VERSION", "PID", "RESTARTS", "FOR", "HEALTH"])


def health_text(h: dict[str, Any]) -> str:
    """One line: status, uptime, version, device, applied revision."""
    parts = [
        f"agent {h.get('status', '?')}",
        f"up {duration(h.get('uptime', 0))}",
        f"keystone {h.get('version') or '?'}",
    ]
    if h.get("device"):
        parts.append(f"device {h['device']}")
    parts.append(f"revision {short(h.get('revision'))}")
    return ", ".join(parts)


def status_text(d: dict[str, Any]) -> str:
    """``status``: agent health, plan state and the components table."""
    lines = [health_text(d.get("health") or {})]
    plan = f"plan {d.get('status', '?')}"
    if d.get("planPath"):
        plan += f" ({d['planPath']})"
    if d.get("lastReconcile"):
        plan += f", last reconcile {when(d['lastReconcile'])}"
    lines.append(plan)
    if d.get("error"):
        lines.append(f"error: {d['error']}")
    lines += [f"warning: unknown field {u}" for u in d.get("unknownFields") or []]
    lines += ["", components_text(d.get("components") or [])]
    return "\n".join(lines)


def revision_text(d: dict[str, Any]) -> str:
    """``status --revision``: applied, last known-good, source, signer, when, last sync."""
    last = d.get("last_sync") or {}
    lkg = short(d.get("last_known_good")) + ("  (soaking)" if d.get("soaking") else "")
    lines = [
        f"applied:          {d.get('applied') or '-'}",
        f"last known-good:  {lkg}",
        f"source:           {' '.join(str(x) for x in (d.get('source'), d.get('ref')) if x) or '-'}",
        f"signer:           {' '.join(str(x) for x in (d.get('signer'), d.get('fingerprint')) if x) or '-'}",
        f"applied at:       {when(d.get('applied_at'))}",
        f"last sync:        {last.get('result', '-')} {short(last.get('revision'))} "
        f"at {when(last.get('time'))}",
    ]
    if last.get("error"):
        lines.append(f"  reason:         {last['error']}")
    if d.get("suspended"):
        lines.append("polling:          SUSPENDED (keystone resume)")
    for rev, info in (d.get("failed") or {}).items():
        info = info if isinstance(info, dict) else {"reason": info}
        lines.append(
            f"failed:           {short(rev)} {info.get('kind', '')}: {info.get('reason', '')}"[:160]
        )
    return "\n".join(lines)


def graph_text(d: dict[str, Any]) -> str:
    """Start layers, one per line, then the dependency edges."""
    order = d.get("order") or []
    if not order:
        return "empty plan"
    lines = [f"layer {i}: {', '.join(layer)}" for i, layer in enumerate(order)]
    edges = d.get("edges") or []
    if edges:
        lines.append("")
        lines += [f"{e['from']} -> {e['to']} ({e.get('type', 'hard')})" for e in edges]
    return "\n".join(lines)


def _dot_id(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def graph_dot(d: dict[str, Any]) -> str:
    """Graphviz: dependency -> dependent (the start order), one rank per layer; ``soft`` edges
    dashed, ``ordering`` dotted."""
    style = {"hard": "solid", "soft": "dashed", "ordering": "dotted"}
    lines = ["digraph keystone {", "  rankdir=LR;", "  node [shape=box];"]
    for layer in d.get("order") or []:
        lines.append("  { rank=same; " + " ".join(_dot_id(n) + ";" for n in layer) + " }")
    for n in d.get("nodes") or []:
        lines.append(f"  {_dot_id(n)};")
    for e in d.get("edges") or []:
        kind = e.get("type", "hard")
        lines.append(
            f"  {_dot_id(e['to'])} -> {_dot_id(e['from'])} "
            f'[style={style.get(kind, "solid")}, label="{kind}"];'
        )
    lines.append("}")
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


# --- shared command bodies ------------------------------------------------------------------


def run_status(client: Any, revision: bool) -> tuple[Any, Human]:
    """``status``: health + plan status (one JSON object, the Go ``/v1/plan/status`` keys plus
    ``health``), or with ``revision`` the GitOps state."""
    if revision:
        return client.get("/v1/revision"), revision_text
    health = client.get("/healthz")
    plan = client.get("/v1/plan/status")
    data = dict(plan) if isinstance(plan, dict) else {"components": plan}
    data["health"] = health
    return data, status_text


def run_components(client: Any) -> tuple[Any, Human]:
    return client.get("/v1/components"), components_text


def run_health(client: Any) -> tuple[Any, Human]:
    return client.get("/healthz", timeout=10), health_text


# --- fast path ------------------------------------------------------------------------------

_FAST: dict[str, tuple[Callable[..., tuple[Any, Human]], frozenset[str]]] = {
    "status": (run_status, frozenset({"--revision"})),
    "components": (run_components, frozenset()),
    "health": (run_health, frozenset()),
}
_VALUED = ("--addr", "--token", "--ssh", "--runtime")


def parse_fast(argv: Sequence[str]) -> tuple[str, dict[str, str], set[str]] | None:
    """``(command, options, flags)`` when ``argv`` is a fast-path command; None otherwise.

    The connection options may also come before the command, as the Go keystonectl's global
    flags do (``keystonectl --addr URL status``).
    """
    options: dict[str, str] = {}
    flags: set[str] = set()
    command: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in _VALUED:
            if not eq:
                if i + 1 >= len(argv):
                    return None
                i += 1
                value = argv[i]
            options[name[2:]] = value
        elif command is None:
            if arg not in _FAST:
                return None
            command = arg
        elif arg in _FAST[command][1] | {"--json"}:
            flags.add(arg)
        else:
            return None  # --help, typos, arguments: typer's job
        i += 1
    if command is None:
        return None
    return command, options, flags


def fast_main(argv: Sequence[str]) -> int | None:
    """Run ``status``, ``components`` or ``health`` without typer; return the exit code, or
    None when ``argv`` is anything else (the caller then runs the full CLI)."""
    parsed = parse_fast(argv)
    if parsed is None:
        return None
    command, options, flags = parsed
    from keystone.client import Client
    from keystone.env import load_dotenv

    load_dotenv()
    as_json = "--json" in flags
    run = _FAST[command][0]
    try:
        runtime = Path(options["runtime"]) if options.get("runtime") else None
        with Client(
            options.get("addr"), options.get("token"), options.get("ssh"), runtime=runtime
        ) as client:
            data, human = run(client, "--revision" in flags) if command == "status" else run(client)
    except KeystoneError as exc:
        return report_error(exc, as_json)
    emit(data, as_json, human)
    return 0

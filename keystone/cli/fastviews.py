"""What the hot read commands print (``status``, ``components``, ``health``, ``sync``), and how
every command prints: JSON or a table, errors on stderr.

Split from :mod:`keystone.cli.views` (which re-exports all of it) so that the typer-free fast
path (``keystone.cli.fast``) loads only these renderers: ``keystone status`` in a monitoring
loop pays for every line of source it compiles. Nothing here imports ``typing``.
"""

from __future__ import annotations

import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
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


def indented_json(value: Any) -> str:
    """``json.dumps(value, indent=2, sort_keys=True, default=str)``, the same text, faster.

    With an indent the standard library lays JSON out in pure Python, a generator per value
    (20 ms for the dry run of 2,000 components); here one recursive function lays out the
    containers, and the C encoder quotes every string. A test holds it to ``json.dumps`` on
    generated values. A value that contains itself recurses until Python stops it.
    """
    from json.encoder import encode_basestring_ascii

    out: list[str] = []
    _lay(value, out, encode_basestring_ascii, "\n")
    return "".join(out)


def _float(f: float) -> str:
    if f != f:
        return "NaN"
    if f in (float("inf"), float("-inf")):
        return "Infinity" if f > 0 else "-Infinity"
    return float.__repr__(f)


def _lay(o: Any, out: list[str], quote: Callable[[str], str], nl: str) -> None:
    """Append ``o`` to ``out``, checking types in the order ``json`` does; ``nl`` is a newline
    and the indentation of the line ``o`` is on."""
    if isinstance(o, str):
        out.append(quote(o))
    elif o is None:
        out.append("null")
    elif o is True:
        out.append("true")
    elif o is False:
        out.append("false")
    elif isinstance(o, int):
        out.append(int.__repr__(o))
    elif isinstance(o, float):
        out.append(_float(o))
    elif isinstance(o, list | tuple):
        if not o:
            out.append("[]")
            return
        inner = nl + "  "
        sep = "[" + inner
        for v in o:
            out.append(sep)
            sep = "," + inner
            _lay(v, out, quote, inner)
        out.append(nl + "]")
    elif isinstance(o, dict):
        if not o:
            out.append("{}")
            return
        inner = nl + "  "
        sep = "{" + inner
        for k, v in sorted(o.items()):
            if isinstance(k, str):
                key = k
            elif isinstance(k, float):
                key = _float(k)
            elif k is True or k is False or k is None:
                key = "true" if k is True else "false" if k is False else "null"
            elif isinstance(k, int):
                key = int.__repr__(k)
            else:
                raise TypeError(
                    f"keys must be str, int, float, bool or None, not {k.__class__.__name__}"
                )
            out.append(sep + quote(key) + ": ")
            sep = "," + inner
            _lay(v, out, quote, inner)
        out.append(nl + "}")
    else:
        _lay(str(o), out, quote, nl)  # default=str


def emit(data: Any, as_json: bool, human: Human | None = None) -> None:
    """Print ``data`` as JSON (``--json``: indented, keys sorted) or as ``human(data)``."""
    text = indented_json(data) if as_json or human is None else human(data)
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
            c.get("phase") or "-",
            c.get("version") or "-",
            c.get("pid") or (f"ctr:{c['container_id'][:12]}" if c.get("container_id") else "-"),
            c.get("restarts", 0),
            duration(time.time() - float(c["since"])) if c.get("since") else "-",
            _health_cell(c),
        ]
        for c in rows
    ]
    return table(
        body, ["COMPONENT", "STATE", "PHASE", "VERSION", "PID", "RESTARTS", "FOR", "HEALTH"]
    )


def _health_cell(c: dict[str, Any]) -> str:
    """``last_health``, then why (the error, or the probe's detail)."""
    verdict = str(c.get("last_health") or "")
    detail = " ".join(str(c.get("error") or c.get("health_detail") or "").split())
    if verdict and detail:
        return f"{verdict}: {detail}"[:60]
    return (verdict or detail)[:60]


def health_text(h: dict[str, Any]) -> str:
    """One line: status, uptime, version, device, applied revision."""
    parts = [
        f"agent {h.get('status', '?')}"
        + (" (components degraded)" if h.get("components_status") == "degraded" else ""),
        f"up {_uptime(h)}",
        f"keystone {h.get('version') or '?'}",
    ]
    if h.get("device"):
        parts.append(f"device {h['device']}")
    parts.append(f"revision {short(h.get('revision'))}")
    return ", ".join(parts)


def _uptime(h: dict[str, Any]) -> str:
    """The health answer's uptime: seconds (``uptime_seconds``) or Go's duration text."""
    seconds = h.get("uptime_seconds")
    if isinstance(seconds, int | float):
        return duration(seconds)
    value = h.get("uptime")
    return duration(value) if isinstance(value, int | float) else str(value or "?")


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
    hold = (d.get("health") or {}).get("rollout") or {}
    if hold.get("message"):
        lines.append(f"rollout: {hold['message']}")
    lines += [f"warning: unknown field {u}" for u in d.get("unknownFields") or []]
    lines += [f"damaged state: {damaged_text(r)}" for r in d.get("damagedState") or []]
    checked = [c for c in d.get("components") or [] if c.get("drift")]
    if checked:
        lines.append(
            "drift: " + "; ".join(f"{c['name']} {drift_summary(c['drift'])}" for c in checked)
        )
    lines += ["", components_text(d.get("components") or [])]
    return "\n".join(lines)


def damaged_text(r: dict[str, Any]) -> str:
    """One recovered state file: which, what was wrong, where it was moved."""
    moved = f"; moved to {r['moved_to']}" if r.get("moved_to") else ""
    return f"{r.get('path', '?')}: {r.get('problem', '')}{moved} ({when(r.get('time'))})"


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
    ro = d.get("rollout")
    if ro:
        wave = f"wave {ro['wave']} of {ro['waves']}" if ro.get("wave") else ""
        canary = " (canary)" if ro.get("canary") else ""
        detail = ro.get("message") or f"{ro.get('state')} {short(ro.get('revision'))}"
        lines.append(f"rollout:          {detail}" + (f"; {wave}{canary}" if wave else ""))
    lines += [f"damaged state:    {damaged_text(r)}" for r in d.get("damaged_state") or []]
    key = d.get("device_key")
    if key:
        lines.append(f"device key:       {key.get('algorithm')} {key.get('fingerprint')}")
    for rev, info in (d.get("failed") or {}).items():
        info = info if isinstance(info, dict) else {"reason": info}
        lines.append(
            f"failed:           {short(rev)} {info.get('kind', '')}: {info.get('reason', '')}"[:160]
        )
    return "\n".join(lines)


def drift_summary(d: dict[str, Any] | None) -> str:
    """One component's drift in a few words: ``clean``, ``3 changed, 1 added``, or ``-``."""
    if not d:
        return "-"
    if not d.get("drifted"):
        return "clean"
    parts = [f"{d[k]} {k}" for k in ("changed", "added", "removed") if d.get(k)]
    return ", ".join(parts)


def sync_text(d: dict[str, Any]) -> str:
    """A sync, rollback or bundle import: result, revision, signer, source, changes, reason."""
    out = [f"result:    {d['result']}", f"revision:  {d.get('revision') or '-'}"]
    if d.get("previous") and d.get("previous") != d.get("revision"):
        out.append(f"previous:  {d['previous']}")
    if d.get("signer"):
        out.append(f"signer:    {d['signer']} {d.get('fingerprint') or ''}".rstrip())
    if d.get("source"):
        out.append(f"source:    {d['source']}")
    ch = d.get("changes")
    if ch:
        for key in ("added", "changed", "restarted", "removed"):
            if ch.get(key):
                out.append(f"{key + ':':<10} {', '.join(ch[key])}")
        if not any(ch.get(k) for k in ("added", "changed", "restarted", "removed")):
            out.append("changes:   none")
    if d.get("error"):
        out.append(f"reason:    {d['error']}")
    out.append(f"took:      {d.get('duration', 0):.2f}s")
    return "\n".join(out)

"""The seam between the agent and everything that drives it (HTTP API, tests).

``AgentControl`` is what the API server calls. Every method is safe to call from any thread:
the agent marshals the work onto its event loop and blocks the caller until it is done (or the
timeout given passes). Return values are plain JSON-ready dicts and lists whose shapes are the
Go Keystone's API bodies (GO-COMPAT.md) plus our additions.
"""

from __future__ import annotations

from typing import Any, BinaryIO, Protocol

JSON = dict[str, Any]


class NotFound(LookupError):
    """The named component, recipe or revision does not exist (HTTP 404)."""


class Conflict(RuntimeError):
    """The request conflicts with the current state, e.g. a recipe already stored (HTTP 409)."""


class AgentControl(Protocol):
    """Operations the agent offers to its API and CLI.

    Errors: ``NotFound`` -> 404, ``Conflict`` -> 409, ``keystone.errors.ValidationError`` and
    other ``Refused`` -> 400/422 with the message, ``TimeoutError`` -> 504,
    ``keystone.errors.KeystoneError`` -> 500 with the message.
    """

    def health(self) -> JSON:
        """Go's ``{status, uptime, closed, time_utc, clock_trusted, clock_source}`` (``status``
        ``ok``, ``uptime`` a Go duration), then ``uptime_seconds``, ``components_status`` (``ok``
        or ``degraded``), ``version``, ``device``, ``revision``, ``components``."""
        ...

    def components(self) -> list[JSON]:
        """``[{name, state, restarts, last_health, pid, recipe, version, phase, health_detail,
        healthy, since, error}]``: ``state`` and ``last_health`` in Go's vocabulary
        (keystone.runtime.reported), ``phase`` the supervisor's."""
        ...

    def stop_component(self, name: str) -> str | None:
        """Stop one component (it stays stopped until restarted or the plan is re-applied).

        Returns the operation id of the stop (serialized with deployments).
        """
        ...

    def restart_component(self, name: str, *, wait: str | None, timeout: float, dry: bool) -> JSON:
        """Restart one component and its hard/soft dependents.

        ``wait`` is ``None``, ``"pid"`` or ``"health"``. Returns ``{component, pid, dependents,
        wait, timeout, dependentsOrder, operation}`` (``dependents`` name -> pid; the restart is
        serialized with deployments), or for a dry run ``{stopOrder, startOrder}`` (the
        dependents only, then the component and its dependents). Raises ``TimeoutError`` past
        ``timeout``.
        """
        ...

    def recipes(self) -> list[JSON]:
        """The recipe store: ``[{name, version, sha256, path, file}]``."""
        ...

    def recipe_files(self) -> list[str]:
        """The recipe store as Go lists it: ``["<name>-<version>.toml", ...]``, sorted."""
        ...

    def upload_recipe(self, text: str, *, force: bool) -> JSON:
        """Validate and store a recipe; ``Conflict`` if that name/version exists and not force."""
        ...

    def delete_recipe(self, name: str, version: str) -> None:
        """Remove a stored recipe; ``NotFound`` if absent; ``Conflict`` if the applied plan uses it."""
        ...

    def plan_status(self) -> JSON:
        """``{planPath, status, error, unknownFields, lastReconcile, lastReconcileResult,
        components}`` (the two reconcile keys only once a pass has run)."""
        ...

    def plan_graph(self) -> JSON:
        """``{nodes, edges, order, layers, typedEdges}`` of the applied plan (keystone.dag)."""
        ...

    def apply_plan(self, text: str, *, dry: bool) -> JSON:
        """Validate a plan given as TOML text and apply it (asynchronously; 202) or dry-run it.

        Recipes are ``name:version`` references to the store, or recipe files on the device
        (relative to the agent's working directory, or absolute). Returns ``{status, actions, layers}`` and, unless a dry run, the
        ``operation`` whose result is the deployment's history entry.
        """
        ...

    def reconcile(self) -> JSON:
        """Start again what the applied plan says should run and does not: Go's
        ``{skipped, reason, repaired, duration}``."""
        ...

    def stop_plan(self) -> str | None:
        """Stop every component in reverse order; the plan stays stopped across restarts.

        Returns the operation id of the stop (serialized with deployments).
        """
        ...

    def metrics_text(self) -> tuple[bytes, str]:
        """Prometheus exposition (body, content type)."""
        ...

    # --- datasets ----------------------------------------------------------------------------

    def datasets(self) -> list[JSON]:
        """Every dataset a component declares, in the Go agent's shape (``GET /v1/datasets``)."""
        ...

    def dataset(self, name: str) -> JSON:
        """One dataset with its versions, refused manifests and spec; NotFound if undeclared."""
        ...

    def refresh_datasets(self) -> list[JSON]:
        """Check every dataset for a new version now (full verification), then list them."""
        ...

    # --- GitOps (sync engine) ---------------------------------------------------------------

    def drift(self) -> JSON:
        """``GET /v1/drift``: the last drift check of every component's installed files."""
        ...

    def drift_check(self) -> JSON:
        """``POST /v1/drift:check``: check every component's installed files now."""
        ...

    def revision(self) -> JSON:
        """``{applied, last_known_good, source, signer, applied_at, last_sync, suspended}``."""
        ...

    def sync(self, *, dry_run: bool, allow_rollback: bool, retry: bool = False) -> JSON:
        """Run one sync now, joining one in flight; returns the sync result record.

        The record names its ``operation`` (the one joined, for a duplicate).

        ``retry`` tries a revision that failed before again.
        """
        ...

    def history(self, *, limit: int) -> list[JSON]:
        """Newest first: syncs, deployments, rollbacks, imports."""
        ...

    def rollback(self, *, to: str | None) -> JSON:
        """Deploy the last known-good revision (or ``to``) again; the record names its operation."""
        ...

    def suspend(self) -> JSON:
        """Stop polling the source; running components are untouched."""
        ...

    def resume(self) -> JSON:
        """Start polling again."""
        ...

    def import_bundle(self, stream: BinaryIO, length: int | None) -> JSON:
        """Import a bundle streamed in the request body and deploy it; names its operation."""
        ...

    # --- operations -------------------------------------------------------------------------

    def operation(self, op_id: str, *, wait: float | None = None) -> JSON:
        """``{id, kind, state, submitted, started, finished, result, error, superseded_by}``.

        ``state`` is ``queued``, ``running`` or ``done``; with ``wait`` (seconds) the answer
        comes as soon as the operation is done, or when ``wait`` passes. ``NotFound`` for an
        id the agent does not know (it keeps the newest operations).
        """
        ...

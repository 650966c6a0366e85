"""The OpenAPI 3 document of the agent API, served at ``GET /v1/openapi.json``.

Every route that ``keystone.api.ROUTES`` serves is described here with its parameters, request
body, answers and error statuses; a unit test keeps the two in step. Bodies are those of the Go
Keystone (GO-COMPAT.md) plus our additions; fields marked as additions are not in the Go API.
"""

from __future__ import annotations

from typing import Any

from keystone import __version__

JSON = dict[str, Any]


def _ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: JSON, description: str) -> JSON:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, JSON]:
    text = {
        400: "Malformed request: bad query parameter, malformed JSON (with the parser's reason), "
        "or a plan/recipe that does not validate (file, line, field)",
        401: "Missing or wrong bearer token (answered with WWW-Authenticate: Bearer); "
        "nothing was changed",
        404: "No such component, recipe or revision",
        405: "Method not allowed (see the Allow header)",
        409: "Conflicts with the current state (a stored recipe without force, a recipe in use)",
        411: "Content-Length required",
        413: "Request body over KEYSTONE_MAX_REQUEST_BYTES (4 MiB) or, for a bundle, "
        "KEYSTONE_MAX_BUNDLE_BYTES (4 GiB)",
        422: "Well-formed but refused: signature, trust, anti-rollback, damaged bundle",
        500: "The agent failed (kind rolled-back: the deployment failed and was rolled back)",
        503: "Not ready or unreachable source: try again later",
        504: "Timed out waiting (restart with wait)",
    }
    return {str(c): {**_json(_ref("Error"), text[c])} for c in codes}


def _query(name: str, description: str, schema: JSON | None = None, example: Any = None) -> JSON:
    p: JSON = {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }
    if example is not None:
        p["example"] = example
    return p


def _path(name: str, description: str, example: str) -> JSON:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._+-]{1,128}$"},
        "example": example,
    }


_BOOL = {"type": "boolean", "default": False}
_STR = {"type": "string"}
_STRN = {"type": "string", "nullable": True}
_NUM = {"type": "number"}
_NUMN = {"type": "number", "nullable": True}
_INT = {"type": "integer"}
_INTN = {"type": "integer", "nullable": True}
_STRS = {"type": "array", "items": _STR}
_OBJ = {"type": "object", "additionalProperties": True}

_TOML_PLAN = {
    "description": "The plan TOML itself (recipes as name:version from the recipe store), or "
    'JSON {"plan": "<TOML>", "dry": true}. A JSON planPath is refused (400): the API never '
    "reads a file whose path a client names.",
    "required": True,
    "content": {
        "application/toml": {
            "schema": _STR,
            "example": '[[components]]\nname = "api"\nrecipe = "com.example.api:1.2.0"\n',
        },
        "text/plain": {"schema": _STR},
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["plan"],
                "properties": {"plan": _STR, "dry": _BOOL},
            }
        },
    },
}

_TOML_RECIPE = {
    "description": 'The recipe TOML itself, or JSON {"recipe": "<TOML>", "force": true}.',
    "required": True,
    "content": {
        "application/toml": {"schema": _STR},
        "text/plain": {"schema": _STR},
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["recipe"],
                "properties": {"recipe": _STR, "force": _BOOL},
            }
        },
    },
}

SCHEMAS: dict[str, JSON] = {
    "Error": {
        "type": "object",
        "required": ["error", "status"],
        "properties": {
            "error": {**_STR, "description": "What failed, where, and what to do"},
            "status": _INT,
            "kind": {
                "type": "string",
                "enum": ["usage", "refused", "retryable", "rolled-back", "error"],
                "description": "Class of the failure; keystone's CLI exits 2, 3, 1, 4, 1",
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "uptime", "closed", "time_utc", "clock_trusted", "clock_source"],
        "properties": {
            "status": {
                "type": "string",
                "enum": ["ok"],
                "description": "The agent answers (Go's value); see components_status",
            },
            "uptime": {
                **_STR,
                "description": "Since the agent started, as a Go duration (1h2m3.5s)",
            },
            "closed": {**_BOOL, "description": "True once the agent has begun to shut down"},
            "time_utc": {**_STR, "format": "date-time"},
            "clock_trusted": {
                **_BOOL,
                "description": "False while the system clock is behind what the device has seen",
            },
            "clock_source": {
                "type": "string",
                "enum": ["system", "high-water", "build"],
                "description": "Where the time certificates are judged at comes from",
            },
            "uptime_seconds": {**_NUM, "description": "Uptime in seconds; addition"},
            "components_status": {
                "type": "string",
                "enum": ["ok", "degraded"],
                "description": "degraded while a component is failed, unhealthy or in backoff",
            },
            "version": _STR,
            "device": _STR,
            "revision": {**_STRN, "description": "Applied revision (commit id); addition"},
            "components": _INT,
        },
    },
    "Dataset": {
        "type": "object",
        "required": ["name", "path", "stale"],
        "properties": {
            "name": _STR,
            "version": _STR,
            "published": _STR,
            "manifestUri": _STR,
            "path": _STR,
            "lastRefresh": _STR,
            "lastResult": _STR,
            "refresh": _STR,
            "maxAge": _STR,
            "ageSeconds": _INT,
            "ageUnknown": _BOOL,
            "stale": _BOOL,
        },
    },
    "Component": {
        "type": "object",
        "required": ["name", "state", "restarts", "last_health", "pid"],
        "properties": {
            "name": _STR,
            "state": {
                "type": "string",
                "enum": ["none", "stopped", "running", "failed"],
                "description": "Go's states: running only while the process is alive",
            },
            "restarts": _INT,
            "last_health": {
                "type": "string",
                "enum": ["healthy", "unhealthy", "unknown"],
                "description": "The last probe's verdict while running; unknown otherwise, "
                "and always for a component without a health check",
            },
            "pid": {**_INT, "description": "The live process; 0 when there is none"},
            "recipe": _STR,
            "version": _STR,
            "phase": {
                "type": "string",
                "enum": [
                    "pending",
                    "installing",
                    "starting",
                    "healthy",
                    "unhealthy",
                    "backoff",
                    "stopping",
                    "stopped",
                    "failed",
                ],
                "description": "The supervisor's finer lifecycle; addition",
            },
            "health_detail": {**_STR, "description": "The last probe's detail; addition"},
            "healthy": _BOOL,
            "since": _NUMN,
            "error": _STRN,
        },
    },
    "RestartResult": {
        "type": "object",
        "required": ["component", "pid", "dependents", "wait", "timeout"],
        "properties": {
            "component": _STR,
            "pid": _INT,
            "dependents": {
                "type": "object",
                "additionalProperties": _INT,
                "description": "Restarted dependents that have a process: name -> pid",
            },
            "wait": {"type": "string", "enum": ["pid", "health"]},
            "timeout": {**_STR, "description": "As a Go duration (60s)"},
            "dependentsOrder": {
                **_STRS,
                "description": "Every restarted dependent, in start order",
            },
            "operation": _STR,
        },
    },
    "RestartDryResult": {
        "type": "object",
        "required": ["stopOrder", "startOrder"],
        "properties": {
            "stopOrder": {**_STRS, "description": "The dependents stopped first, farthest first"},
            "startOrder": {**_STRS, "description": "The component, then its dependents"},
        },
    },
    "Recipe": {
        "type": "object",
        "properties": {
            "name": _STR,
            "version": _STR,
            "sha256": _STR,
            "path": _STR,
            "file": {**_STR, "description": "<name>-<version>.toml, as Go lists it"},
        },
    },
    "RecipeStored": {
        "type": "object",
        "required": ["status", "name", "version"],
        "properties": {
            "status": {"type": "string", "enum": ["created"]},
            "name": _STR,
            "version": _STR,
            "path": _STR,
            "replaced": _BOOL,
            "unknownFields": _STRS,
        },
    },
    "PlanStatus": {
        "type": "object",
        "required": ["status", "components"],
        "properties": {
            "planPath": _STR,
            "status": {
                "type": "string",
                "enum": ["idle", "applying", "running", "failed", "dry-run", "stopped"],
            },
            "error": _STRN,
            "unknownFields": _STRS,
            "lastReconcile": {
                **_STR,
                "format": "date-time",
                "description": "When the last reconcile pass ran; absent before the first",
            },
            "lastReconcileResult": {
                **_STR,
                "description": "ok, repaired <names>, skipped: <reason> or failed: <error>",
            },
            "components": {"type": "array", "items": _ref("Component")},
        },
    },
    "ComponentLogs": {
        "type": "object",
        "required": ["component", "stdout", "stderr"],
        "properties": {
            "component": _STR,
            "lines": {**_INT, "description": "The lines asked for"},
            "stdout": {**_STRS, "description": "Last lines of stdout.log, oldest first"},
            "stderr": {**_STRS, "description": "Last lines of stderr.log, oldest first"},
        },
    },
    "Graph": {
        "type": "object",
        "required": ["nodes", "edges", "order"],
        "properties": {
            "nodes": _STRS,
            "edges": {
                "type": "object",
                "additionalProperties": _STRS,
                "description": "Each dependency -> the components that depend on it (Go's shape)",
            },
            "order": {**_STRS, "description": "A start order: dependencies before dependents"},
            "layers": {
                "type": "array",
                "items": _STRS,
                "description": "Start layers: every component of a layer depends only on "
                "earlier layers; addition",
            },
            "typedEdges": {
                "type": "array",
                "description": "The edges with their dependency type; addition",
                "items": {
                    "type": "object",
                    "properties": {
                        "from": {**_STR, "description": "The dependent component"},
                        "to": {**_STR, "description": "The component it depends on"},
                        "type": {"type": "string", "enum": ["hard", "soft", "ordering"]},
                    },
                },
            },
        },
    },
    "ApplyResult": {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["applying", "dry-run"]},
            "changes": _OBJ,
            "actions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "action": _STR,
                        "component": _STR,
                        "version": _STR,
                        "layer": _INT,
                        "reason": _STR,
                    },
                },
            },
            "layers": {"type": "array", "items": _STRS},
            "unknownFields": _STRS,
            "warnings": _STRS,
        },
    },
    "ReconcileResult": {
        "type": "object",
        "required": ["skipped", "duration"],
        "properties": {
            "skipped": {**_BOOL, "description": "True when the pass deliberately changed nothing"},
            "reason": {**_STR, "description": "Why it was skipped"},
            "repaired": {**_STRS, "description": "Started again by this pass (absent when none)"},
            "duration": {**_STR, "description": "As a Go duration (12ms)"},
        },
    },
    "Drift": {
        "type": "object",
        "properties": {
            "last_check": _NUMN,
            "checks": {"type": "integer"},
            "drifted": _STRS,
            "components": {"type": "array", "items": _OBJ},
        },
    },
    "Revision": {
        "type": "object",
        "properties": {
            "applied": _STRN,
            "last_known_good": _STRN,
            "source": _STRN,
            "signer": _STRN,
            "applied_at": _NUMN,
            "last_sync": {"nullable": True, **_OBJ},
            "suspended": _BOOL,
            "rollout": {
                "nullable": True,
                "description": "Addition: the device's place in a staged rollout (state, "
                "message such as 'waiting for wave 2 at ...', revision, wave, waves, canary, at)",
                **_OBJ,
            },
            "device_key": {
                "nullable": True,
                "description": "The device's Ed25519 report key: algorithm, public_key "
                "(base64), fingerprint (sha256:<hex>), file",
                **_OBJ,
            },
        },
    },
    "SyncResult": {
        "type": "object",
        "properties": {
            "result": {
                "type": "string",
                "description": "applied, up-to-date, dry-run, rolled-back, refused, known-bad, "
                "unreachable, error, waiting (a rollout wave, maintenance window or deferral) "
                "or halted (a halted rollout)",
            },
            "revision": _STRN,
            "signer": _STRN,
            "changes": _OBJ,
            "error": _STRN,
            "operation": {
                "type": "string",
                "description": "The operation id (GET /v1/operations/{id})",
            },
        },
        "additionalProperties": True,
    },
    "Operation": {
        "type": "object",
        "properties": {
            "id": _STR,
            "kind": {
                "type": "string",
                "description": "sync, import, rollback, apply, stop, restart or soak-rollback",
            },
            "state": {"type": "string", "enum": ["queued", "running", "done"]},
            "submitted": _NUM,
            "started": _NUMN,
            "finished": _NUMN,
            "result": {
                "nullable": True,
                "description": "Once done: the sync record, or the apply history entry",
                **_OBJ,
            },
            "error": _STRN,
            "superseded_by": _STRN,
        },
    },
    "HistoryEntry": {
        "type": "object",
        "properties": {
            "time": _NUM,
            "kind": _STR,
            "result": _STR,
            "revision": _STRN,
            "error": _STRN,
        },
        "additionalProperties": True,
    },
}


def _op(
    summary: str,
    description: str,
    op_id: str,
    ok: dict[str, JSON],
    *,
    errors: tuple[int, ...] = (),
    params: list[JSON] | None = None,
    body: JSON | None = None,
    auth: bool = True,
) -> JSON:
    op: JSON = {
        "summary": summary,
        "description": description,
        "operationId": op_id,
        "responses": {**ok, **_errors(*((401,) if auth else ()), *errors)},
    }
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = body
    if not auth:
        op["security"] = []
    return op


def _no_content(description: str) -> dict[str, JSON]:
    return {"204": {"description": description}}


def _paths() -> dict[str, JSON]:
    name = _path("name", "Component name as given in the plan", "api")
    return {
        "/": {
            "get": _op(
                "Landing page",
                "One line of text saying the agent runs and where to look (as the Go agent).",
                "root",
                {
                    "200": {
                        "description": "Plain text",
                        "content": {"text/plain": {"schema": _STR}},
                    }
                },
            )
        },
        "/healthz": {
            "get": _op(
                "Agent liveness",
                "Needs no token. Go's body (status ok, uptime as a Go duration, closed, time, "
                "clock_trusted, clock_source), then uptime_seconds, components_status, "
                "version, device and the applied revision.",
                "healthz",
                {"200": _json(_ref("Health"), "The agent answers")},
                auth=False,
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics",
                "Component state, health, restarts, CPU and memory; reconcile, sync, "
                "deployment and rollback counters; build info and uptime.",
                "metrics",
                {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4",
                        "content": {"text/plain": {"schema": _STR}},
                    }
                },
            )
        },
        "/v1/openapi.json": {
            "get": _op(
                "This document",
                "The OpenAPI 3 description of every route.",
                "openapi",
                {"200": _json(_OBJ, "The OpenAPI document")},
            )
        },
        "/v1/components": {
            "get": _op(
                "List components",
                "Every supervised component with its state, pid, restarts and last health.",
                "components",
                {"200": _json({"type": "array", "items": _ref("Component")}, "Components")},
            )
        },
        "/v1/components/{name}:stop": {
            "post": _op(
                "Stop one component",
                "Stops a single component; its dependents are left running. It stays stopped "
                "until restarted or the plan is applied again. With dry=true (an addition), "
                "answers what would stop and what depends on it, and changes nothing.",
                "stop_component",
                {
                    "204": {
                        "description": "Stopped; the Keystone-Operation header names the "
                        "operation (stops are serialized with deployments)",
                    },
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {"stopOrder": _STRS, "dependents": _STRS},
                        },
                        "With dry=true: the component that would stop, and its dependents",
                    ),
                },
                errors=(400, 404, 500),
                params=[name, _query("dry", "true: report only", _BOOL, "true")],
            )
        },
        "/v1/components/{name}:restart": {
            "post": _op(
                "Restart one component",
                "Restarts a component and its hard and soft dependents (ordering dependencies "
                "do not cascade). With dry=true, answers the planned order and changes nothing.",
                "restart_component",
                {
                    "200": _json(
                        {"oneOf": [_ref("RestartResult"), _ref("RestartDryResult")]},
                        "Restarted (or, with dry=true, the stop and start order)",
                    )
                },
                errors=(400, 404, 500, 504),
                params=[
                    name,
                    _query(
                        "wait",
                        "pid (default): answer once a new pid exists; health: once it probes "
                        "healthy",
                        {"type": "string", "enum": ["pid", "health"]},
                        "health",
                    ),
                    _query(
                        "timeout", "How long to wait, as a duration (default 60s)", None, "120s"
                    ),
                    _query("dry", "true: report what would be restarted", _BOOL, "true"),
                ],
            )
        },
        "/v1/components/{name}/logs": {
            "get": _op(
                "Recent log lines of one component",
                "The last lines of the component's stdout.log and stderr.log (an addition: "
                "not in the Go API). At most 1000 lines of each, read from the last 256 KiB.",
                "component_logs",
                {"200": _json(_ref("ComponentLogs"), "The log tails")},
                errors=(400, 404),
                params=[
                    name,
                    _query(
                        "lines",
                        "How many lines of each log (1 to 1000, default 50)",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                        "50",
                    ),
                ],
            )
        },
        "/v1/recipes": {
            "get": _op(
                "List the recipe store",
                "Recipes uploaded to the agent, which plans name as name:version: as Go lists "
                "them, their file names (<name>-<version>.toml); with detail=true, objects "
                "with the digest and path.",
                "recipes",
                {
                    "200": _json(
                        {"oneOf": [_STRS, {"type": "array", "items": _ref("Recipe")}]},
                        "Stored recipes (file names, or with detail=true objects)",
                    )
                },
                params=[_query("detail", "true: objects with digest and path", _BOOL, "true")],
            ),
            "post": _op(
                "Store a recipe",
                "Validates and stores a recipe TOML document so plans can refer to it as "
                "name:version. An existing name:version is a conflict unless force=true.",
                "upload_recipe",
                {"201": _json(_ref("RecipeStored"), "Stored")},
                errors=(400, 409, 411, 413),
                params=[_query("force", "true: replace a stored recipe", _BOOL, "true")],
                body=_TOML_RECIPE,
            ),
        },
        "/v1/recipes/{name}/{version}": {
            "delete": _op(
                "Delete a stored recipe",
                "Removes name:version from the store; refused while the applied plan uses it.",
                "delete_recipe",
                _no_content("Deleted"),
                errors=(404, 409),
                params=[
                    _path("name", "Recipe metadata.name", "com.example.api"),
                    _path("version", "Recipe metadata.version", "1.2.0"),
                ],
            )
        },
        "/v1/plan/status": {
            "get": _op(
                "Plan status",
                "The applied plan, its status, the last error, unknown fields and components.",
                "plan_status",
                {"200": _json(_ref("PlanStatus"), "Plan status")},
            )
        },
        "/v1/plan/graph": {
            "get": _op(
                "Dependency graph",
                "Nodes, edges and start layers of the applied plan. With format=dot, mermaid "
                "or svg (an addition), the same graph drawn, nodes coloured by state.",
                "plan_graph",
                {
                    "200": {
                        "description": "The graph (JSON), or its picture",
                        "content": {
                            "application/json": {"schema": _ref("Graph")},
                            "image/svg+xml": {"schema": _STR},
                            "text/vnd.graphviz": {"schema": _STR},
                            "text/vnd.mermaid": {"schema": _STR},
                        },
                    }
                },
                errors=(400,),
                params=[
                    _query(
                        "format",
                        "json (default), dot, mermaid or svg",
                        {"type": "string", "enum": ["json", "dot", "mermaid", "svg"]},
                        "svg",
                    )
                ],
            )
        },
        "/v1/plan/apply": {
            "post": _op(
                "Apply a plan",
                "The body is the plan TOML; recipes are name:version references to the store, "
                "or recipe files on the device (relative to the agent's working directory, "
                "without '..', or absolute), which pass the recipe signature check. "
                "Validates, then applies in the background (202). With dry=true, answers the "
                "layers and actions and changes nothing; unknown fields refuse a dry run.",
                "apply_plan",
                {"202": _json(_ref("ApplyResult"), "Accepted (or the dry-run report)")},
                errors=(400, 411, 413, 503),
                params=[_query("dry", "true: validate and report only", _BOOL, "true")],
                body=_TOML_PLAN,
            )
        },
        "/v1/plan/reconcile": {
            "post": _op(
                "Repair the plan in effect",
                "Starts again what the applied plan says should run and does not; never "
                "resurrects a plan an operator stopped. A pass that changes nothing on purpose "
                "(no plan applied, the plan stopped) answers skipped=true with its reason.",
                "reconcile",
                {"200": _json(_ref("ReconcileResult"), "What was repaired")},
                errors=(500,),
            )
        },
        "/v1/plan/stop": {
            "post": _op(
                "Stop every component",
                "Stops the plan in reverse dependency order; it stays stopped across restarts.",
                "stop_plan",
                _no_content("Stopped; the Keystone-Operation header names the operation"),
                errors=(500,),
            )
        },
        "/v1/datasets": {
            "get": _op(
                "List datasets",
                "What each dataset a component declares is serving, in the Go agent's shape: "
                "version, published, lastRefresh, lastResult, refresh, maxAge, ageSeconds; "
                "stale past max_age; ageUnknown when the clock cannot be trusted.",
                "datasets",
                {"200": _json({"type": "array", "items": _ref("Dataset")}, "Datasets")},
            )
        },
        "/v1/datasets/{name}": {
            "get": _op(
                "One dataset (addition)",
                "The list entry plus its component, versions on disk, refused manifests, the "
                "anti-replay anchor and the variable its component reads the path from.",
                "dataset",
                {"200": _json(_ref("Dataset"), "The dataset")},
                errors=(404,),
                params=[_path("name", "Dataset name as the recipe declares it", "oui")],
            )
        },
        "/v1/datasets:refresh": {
            "post": _op(
                "Refresh datasets now",
                "Checks every dataset for a new version immediately, through the same "
                "signature, anti-replay, activation, reload and rollback as a scheduled refresh; "
                "answers the list afterwards (one failing dataset does not hide the others).",
                "datasets_refresh",
                {"200": _json({"type": "array", "items": _ref("Dataset")}, "Datasets")},
                errors=(500,),
            )
        },
        "/v1/drift": {
            "get": _op(
                "Drift of installed files (addition)",
                "Per component: files changed, added or removed since install at the last "
                "check, and its drift policy (report or repair).",
                "drift",
                {"200": _json(_ref("Drift"), "The last drift check")},
            )
        },
        "/v1/drift:check": {
            "post": _op(
                "Check installed files now (addition)",
                "Re-hashes every component's installed files and answers the drift; where a "
                'recipe says drift = "repair", a repair is queued behind any deployment.',
                "drift_check",
                {"200": _json(_ref("Drift"), "The drift found")},
                errors=(500,),
            )
        },
        "/v1/revision": {
            "get": _op(
                "Applied revision (addition)",
                "Applied and last known-good revision, source, signer, when, last sync.",
                "revision",
                {"200": _json(_ref("Revision"), "Revision state")},
            )
        },
        "/v1/sync": {
            "post": _op(
                "Sync now (addition)",
                "One fetch, verify, diff and deploy now, joining one in flight.",
                "sync",
                {"200": _json(_ref("SyncResult"), "The sync record")},
                errors=(400, 422, 500, 503),
                params=[
                    _query("dry", "true: fetch, verify and diff; deploy nothing", _BOOL),
                    _query(
                        "allow_rollback",
                        "true: accept a tip that does not descend from the applied revision",
                        _BOOL,
                    ),
                    _query("retry", "true: try a revision that failed before again", _BOOL),
                ],
            )
        },
        "/v1/history": {
            "get": _op(
                "History (addition)",
                "Syncs, deployments, rollbacks and imports, newest first.",
                "history",
                {"200": _json({"type": "array", "items": _ref("HistoryEntry")}, "Entries")},
                errors=(400,),
                params=[
                    _query(
                        "limit",
                        "At most this many entries (default 50)",
                        {"type": "integer", "minimum": 1, "default": 50},
                    )
                ],
            )
        },
        "/v1/rollback": {
            "post": _op(
                "Roll back (addition)",
                "Deploys the last known-good revision again, or the revision named by to; it "
                "is verified like any other.",
                "rollback",
                {"200": _json(_ref("SyncResult"), "The rollback record")},
                errors=(400, 404, 422, 500),
                params=[_query("to", "Revision to go back to (default: last known-good)")],
            )
        },
        "/v1/suspend": {
            "post": _op(
                "Suspend polling (addition)",
                "Stops polling the source; running components are untouched.",
                "suspend",
                {"200": _json(_OBJ, "Suspended")},
                errors=(400,),
            )
        },
        "/v1/resume": {
            "post": _op(
                "Resume polling (addition)",
                "Starts polling the source again.",
                "resume",
                {"200": _json(_OBJ, "Resumed")},
                errors=(400,),
            )
        },
        "/v1/operations/{id}": {
            "get": _op(
                "One operation (addition)",
                "The state of a submission (sync, apply, import, rollback, stop, restart): "
                "queued, running or done with its result. With wait, the answer comes as soon "
                "as it is done (or when wait passes, at most 300s).",
                "operation",
                {"200": _json(_ref("Operation"), "The operation")},
                errors=(400, 404),
                params=[
                    _path("id", "Operation id as a reply named it", "op-1a2b3c4d-7"),
                    _query("wait", "Answer once done, waiting at most this long, e.g. 30s"),
                ],
            )
        },
        "/v1/bundles:import": {
            "post": _op(
                "Import a bundle (addition)",
                "The body is the bundle file (keystone bundle create, or git bundle create), "
                "streamed to disk; its commit is verified exactly as a git sync, then deployed. "
                "Capped by KEYSTONE_MAX_BUNDLE_BYTES (4 GiB), not by the 4 MiB request cap.",
                "import_bundle",
                {"200": _json(_ref("SyncResult"), "The import record")},
                errors=(411, 413, 422, 500),
                body={
                    "required": True,
                    "content": {
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        }
                    },
                },
            )
        },
    }


def openapi_document() -> JSON:
    """The OpenAPI 3.0 document of the agent API."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Keystone agent API",
            "version": __version__,
            "description": "Local control API of a Keystone agent. Every route but /healthz "
            "needs Authorization: Bearer <token> (KEYSTONE_API_TOKEN, or the token the agent "
            "writes to runtime/api.token). Request bodies are capped at 4 MiB.",
        },
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
        },
    }

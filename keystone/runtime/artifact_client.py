"""The agent's side of artifact preparation: a worker process does the network and crypto.

``WorkerPreparer`` implements the deployer's ``ArtifactPreparer``: it sends every artifact of
the components about to start to ``python -m keystone.runtime.artifact_worker`` (which
downloads, hash-checks, verifies signatures and unpacks into the content-addressed cache), then
places the prepared files into each component's work dir. httpx and cryptography never load in
the resident agent.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from keystone import errors
from keystone.plan import Component
from keystone.runtime import drift
from keystone.runtime.deployer import LOCAL_ARTIFACTS, ArtifactContext
from keystone.runtime.process import ProcessRunner
from keystone.workerproc import ErrorInfo, call

WORKER = "keystone.runtime.artifact_worker"


def error_from(err: Mapping[str, Any]) -> errors.KeystoneError:
    """The exception an artifact worker reported, with its reason, component and uri.

    An unknown type (or a worker claiming a rolled-back deployment) is an ``ArtifactFetchError``.
    """
    # The artifact error classes live in the heavy artifacts module; load it only for an error.
    from keystone.runtime.artifact_worker import ARTIFACT_ERRORS

    info = ErrorInfo.from_json(err)
    if not info.message:
        info = ErrorInfo.from_json({**err, "message": "artifact preparation failed"})
    return info.to_exception(
        types=ARTIFACT_ERRORS,
        default=errors.ArtifactFetchError,
        refuse=(errors.DeploymentFailed,),
    )


def _raise(err: Mapping[str, Any]) -> None:
    raise error_from(err)


class WorkerPreparer:
    """Prepares artifacts in a short-lived worker and installs them into work dirs."""

    def __init__(
        self, runner: ProcessRunner, runtime: Path, *, allow_unsigned: bool = True
    ) -> None:
        self.runner = runner
        self.runtime = runtime
        self.allow_unsigned = allow_unsigned
        self.timeout = 1800.0 + 60.0
        self._prepared: dict[str, list[dict[str, Any]]] = {}
        self.clock_trusted: bool | None = None
        # Told of every artifact the worker prepared (how it came, bytes on the wire): metrics.
        self.on_prepared: Callable[[Mapping[str, Any]], None] | None = None

    def policy(self, context: ArtifactContext = LOCAL_ARTIFACTS) -> dict[str, Any]:
        """The artifact policy for the worker: the Go environment variables plus our settings."""
        # The artifacts module is large: the agent loads it when a plan has artifacts.
        from keystone.runtime.artifacts import ArtifactPolicy

        policy = ArtifactPolicy.from_env(
            self.runtime / "artifacts",
            os.environ,
            repo_root=context.root(),
            allow_unsigned=self.allow_unsigned,
            require_sha256=context.require_sha256,
            state_dir=self.runtime / "state",
        )
        return policy.to_json()

    async def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.runtime.mkdir(parents=True, exist_ok=True)
        reply = await call(
            self.runner, WORKER, request, cwd=self.runtime, env=os.environ, timeout=self.timeout
        )
        if reply.timed_out:
            raise errors.ArtifactFetchError(
                f"artifact preparation timed out after {self.timeout:g}s"
            )
        if reply.answer is None:
            raise errors.ArtifactFetchError(
                f"artifact worker exited {reply.returncode} without an answer"
            )
        return reply.answer

    async def prepare(
        self, components: Sequence[Component], *, context: ArtifactContext = LOCAL_ARTIFACTS
    ) -> None:
        """Fetch and verify every artifact of ``components``; raise on the first refusal."""
        items = [
            {"component": c.name, "artifact": {**asdict(a), "headers": dict(a.headers)}}
            for c in components
            for a in c.recipe.artifacts
        ]
        if not items:
            return
        request: dict[str, Any] = {"policy": self.policy(context), "artifacts": items}
        answer = await self._call(request)
        self._observe(answer)
        if answer.get("error"):
            _raise(answer["error"])
        by_component: dict[str, list[dict[str, Any]]] = {}
        for prepared in answer.get("prepared") or []:
            by_component.setdefault(str(prepared["component"]), []).append(prepared)
            if self.on_prepared is not None:
                self.on_prepared(prepared)
        for c in components:
            if c.recipe.artifacts:
                self._prepared[c.content_hash()] = by_component.get(c.name, [])

    async def install(
        self, component: Component, workdir: Path, *, context: ArtifactContext = LOCAL_ARTIFACTS
    ) -> None:
        """Copy prepared artifacts into ``workdir`` (the cached originals stay immutable), then
        record the manifest of what was installed (``keystone.runtime.drift``)."""
        # As in policy(): loaded only for a plan with artifacts.
        from keystone.runtime.artifacts import ArtifactPolicy, ArtifactStore, PreparedArtifact
        from keystone.runtime.artifacts.files import link_go_view

        prepared = self._prepared.get(component.content_hash())
        if prepared is None:
            await self.prepare([component], context=context)
            prepared = self._prepared.get(component.content_hash(), [])
        store = ArtifactStore(ArtifactPolicy.from_json(self.policy(context)))
        files: list[str] = []
        dirs: list[str] = []
        try:
            for p in prepared:
                item = PreparedArtifact.from_json(p)
                store.install(item, workdir)
                # Go's runtime/artifacts/<name>/<version>/<file>, for Go recipes' scripts.
                blob = store.blob_path(item.sha256)
                link_go_view(store.root, blob, item.name, component.recipe.name, component.version)
                if item.unpacked is not None:
                    tree_files, tree_dirs = drift.tree_paths(item.unpacked)
                    files += tree_files
                    dirs += tree_dirs
                else:
                    files.append(item.name)
        finally:
            store.close()
        # Hashing what was installed may take a while for a large tree: not on the loop.
        await asyncio.to_thread(drift.record, workdir, files, dirs)

    def _observe(self, answer: dict[str, Any]) -> None:
        if answer.get("clock_trusted") is not None:
            self.clock_trusted = bool(answer["clock_trusted"])

    def prepared_for(self, component: Component) -> list[dict[str, Any]]:
        """What ``prepare`` produced for this component version (empty if nothing)."""
        return list(self._prepared.get(component.content_hash(), []))

    async def gc(self, keep: set[str]) -> dict[str, Any]:
        """Evict least recently used cache entries beyond the limit, never those in ``keep``."""
        answer = await self._call(
            {"policy": self.policy(), "artifacts": [], "gc_keep": sorted(keep)}
        )
        self._observe(answer)
        return dict(answer.get("gc") or {})

"""The agent's side of artifact preparation: a worker process does the network and crypto.

``WorkerPreparer`` implements the deployer's ``ArtifactPreparer``: it sends every artifact of
the components about to start to ``python -m keystone.runtime.artifact_worker`` (which
downloads, hash-checks, verifies signatures and unpacks into the content-addressed cache), then
places the prepared files into each component's work dir. httpx and cryptography never load in
the resident agent.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from keystone import errors
from keystone.plan import Component
from keystone.runtime.process import ProcessRunner


def _raise(err: dict[str, Any]) -> None:
    cls = getattr(errors, str(err.get("type", "")), None)
    message = str(err.get("message", "artifact preparation failed"))
    if (
        isinstance(cls, type)
        and issubclass(cls, errors.KeystoneError)
        and cls is not errors.DeploymentFailed
    ):
        if issubclass(cls, errors.ValidationError):
            raise errors.ValidationError(message)
        raise cls(message)
    raise errors.ArtifactFetchError(message)


class WorkerPreparer:
    """Prepares artifacts in a short-lived worker and installs them into work dirs."""

    def __init__(
        self, runner: ProcessRunner, runtime: Path, *, allow_unsigned: bool = True
    ) -> None:
        self.runner = runner
        self.runtime = runtime
        self.allow_unsigned = allow_unsigned
        self.repo_root: Path = Path.cwd()
        self.require_sha256 = False
        self.timeout = 1800.0 + 60.0
        self._prepared: dict[str, list[dict[str, Any]]] = {}
        self.clock_trusted: bool | None = None

    def policy(self) -> dict[str, Any]:
        """The artifact policy for the worker: the Go environment variables plus our settings."""
        from keystone.runtime.artifacts import ArtifactPolicy

        policy = ArtifactPolicy.from_env(
            self.runtime / "artifacts",
            os.environ,
            repo_root=self.repo_root,
            allow_unsigned=self.allow_unsigned,
            require_sha256=self.require_sha256,
            state_dir=self.runtime / "state",
        )
        return policy.to_json()

    async def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.runtime.mkdir(parents=True, exist_ok=True)
        result = await self.runner.run(
            [sys.executable, "-m", "keystone.runtime.artifact_worker"],
            cwd=self.runtime,
            env=dict(os.environ),
            timeout=self.timeout,
            input=json.dumps(request).encode(),
            max_output=64 << 20,
        )
        if result.timed_out:
            raise errors.ArtifactFetchError(
                f"artifact preparation timed out after {self.timeout:g}s"
            )
        try:
            answer: dict[str, Any] = json.loads(result.stdout.decode() or "null") or {}
        except json.JSONDecodeError:
            answer = {}
        if not answer:
            raise errors.ArtifactFetchError(
                f"artifact worker exited {result.returncode} without an answer"
            )
        return answer

    async def prepare(self, components: Sequence[Component]) -> None:
        """Fetch and verify every artifact of ``components``; raise on the first refusal."""
        items = [
            {"component": c.name, "artifact": {**asdict(a), "headers": dict(a.headers)}}
            for c in components
            for a in c.recipe.artifacts
        ]
        if not items:
            return
        request: dict[str, Any] = {"policy": self.policy(), "artifacts": items}
        answer = await self._call(request)
        self._observe(answer)
        if answer.get("error"):
            _raise(answer["error"])
        by_component: dict[str, list[dict[str, Any]]] = {}
        for prepared in answer.get("prepared") or []:
            by_component.setdefault(str(prepared["component"]), []).append(prepared)
        for c in components:
            if c.recipe.artifacts:
                self._prepared[c.content_hash()] = by_component.get(c.name, [])

    async def install(self, component: Component, workdir: Path) -> None:
        """Copy prepared artifacts into ``workdir`` (the cached originals stay immutable)."""
        from keystone.runtime.artifacts import ArtifactPolicy, ArtifactStore, PreparedArtifact

        prepared = self._prepared.get(component.content_hash())
        if prepared is None:
            await self.prepare([component])
            prepared = self._prepared.get(component.content_hash(), [])
        store = ArtifactStore(ArtifactPolicy.from_json(self.policy()))
        try:
            for p in prepared:
                store.install(PreparedArtifact.from_json(p), workdir)
        finally:
            store.close()

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

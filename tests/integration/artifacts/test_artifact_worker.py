"""The artifact worker as a real child process: JSON in, JSON out, refusals are answers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keystone.errors import KeystoneError
from keystone.runtime.artifact_worker import (
    MODULE,
    prepare_in_worker,
    prepare_in_worker_async,
)
from keystone.runtime.artifacts import (
    ArtifactPolicy,
    ArtifactRefusedError,
    ArtifactSpec,
)

from .conftest import Pki, RecordingServer

pytestmark = pytest.mark.integration


def run_worker(request: Any) -> tuple[int, dict[str, Any]]:
    raw = request if isinstance(request, bytes) else json.dumps(request).encode()
    proc = subprocess.run(
        [sys.executable, "-m", MODULE], input=raw, capture_output=True, timeout=60
    )
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


@pytest.fixture
def policy(tmp_path: Path, pki: Pki) -> ArtifactPolicy:
    return ArtifactPolicy(
        cache_dir=tmp_path / "runtime" / "artifacts",
        state_dir=tmp_path / "runtime" / "state",
        trust_bundle=pki.cert("ca"),
        backoff_base=0.01,
    )


class TestWorkerProtocol:
    def test_signed_artifacts_over_http_and_gc(
        self, pki: Pki, policy: ArtifactPolicy, http_server: RecordingServer, tmp_path: Path
    ) -> None:
        """Two signed artifacts prepared in a child; GC keeps them and the pinned one."""
        items = []
        for name in ("a.bin", "b.bin"):
            f = tmp_path / name
            f.write_bytes(os.urandom(50_000))
            sig = pki.sign("leaf-p256", f)
            http_server.routes[f"/{name}"] = (200, {}, f.read_bytes())
            http_server.routes[f"/{name}.sig"] = (200, {}, sig.read_bytes())
            items.append(
                {
                    "component": name[0],
                    "artifact": {
                        "uri": http_server.url(f"/{name}"),
                        "sha256": "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest(),
                        "sig_uri": http_server.url(f"/{name}.sig"),
                        "cert_uri": pki.cert("leaf-p256").as_uri(),
                    },
                }
            )
        code, answer = run_worker(
            {"policy": policy.to_json(), "artifacts": items, "gc_keep": ["0" * 64]}
        )
        assert code == 0 and answer["error"] is None
        assert [p["component"] for p in answer["prepared"]] == ["a", "b"]
        assert all(p["signed_by"] == "CN=leaf-p256" for p in answer["prepared"])
        assert answer["gc"]["evicted"] == [] and answer["cache_bytes"] == 100_000
        assert answer["clock_trusted"] is True
        assert Path(answer["prepared"][0]["path"]).is_file()

    def test_refusal_is_an_answer_with_exit_zero(
        self, policy: ArtifactPolicy, tmp_path: Path
    ) -> None:
        """A hash mismatch comes back as JSON naming type, reason, component and uri."""
        f = tmp_path / "x.bin"
        f.write_bytes(b"payload")
        code, answer = run_worker(
            {
                "policy": policy.to_json(),
                "artifacts": [
                    {"component": "api", "artifact": {"uri": f.as_uri(), "sha256": "1" * 64}}
                ],
            }
        )
        assert code == 0
        err = answer["error"]
        assert err["type"] == "ArtifactIntegrityError" and err["reason"] == "hash-mismatch"
        assert err["component"] == "api" and err["uri"] == f.as_uri()
        assert "sha256 mismatch" in err["message"]

    def test_bad_request_is_an_answer(self) -> None:
        """Garbage on stdin is a usage error in the answer, not a crash."""
        code, answer = run_worker(b"{not json")
        assert code == 0 and answer["error"]["type"] == "UsageError"

    def test_crash_is_a_nonzero_exit(self, tmp_path: Path) -> None:
        """An unexpected failure (a cache dir under a regular file) exits non-zero."""
        blocker = tmp_path / "file"
        blocker.write_text("")
        f = tmp_path / "x.bin"
        f.write_bytes(b"payload")
        code, _answer = run_worker(
            {
                "policy": {"cache_dir": str(blocker / "cache")},
                "artifacts": [{"component": "c", "artifact": {"uri": f.as_uri()}}],
            }
        )
        assert code != 0


class TestWorkerClient:
    def test_refusal_is_raised_as_the_same_error(
        self, pki: Pki, policy: ArtifactPolicy, tmp_path: Path
    ) -> None:
        """The client re-raises the worker's refusal with its class, reason and component."""
        f = tmp_path / "x.bin"
        f.write_bytes(os.urandom(1000))
        sig = pki.sign("leaf-rogue", f)
        spec = ArtifactSpec(
            uri=f.as_uri(), sig_uri=sig.as_uri(), cert_uri=pki.cert("leaf-rogue").as_uri()
        )
        with pytest.raises(ArtifactRefusedError) as info:
            prepare_in_worker(policy, [("web", spec)])
        assert info.value.reason == "untrusted-chain" and info.value.component == "web"

    def test_async_client(self, policy: ArtifactPolicy, tmp_path: Path) -> None:
        """The asyncio client prepares an artifact in a child and returns it."""
        f = tmp_path / "x.bin"
        f.write_bytes(b"hello")
        result = asyncio.run(
            prepare_in_worker_async(policy, [("c", ArtifactSpec(uri=f.as_uri()))], gc_keep=[])
        )
        [(component, prepared)] = result.prepared
        assert component == "c" and prepared.sha256 == hashlib.sha256(b"hello").hexdigest()
        assert result.gc is not None and result.cache_bytes == 5

    def test_crash_is_a_keystone_error(self, tmp_path: Path) -> None:
        """A crashed worker surfaces as a KeystoneError carrying its stderr tail."""
        blocker = tmp_path / "file"
        blocker.write_text("")
        f = tmp_path / "x.bin"
        f.write_bytes(b"x")
        with pytest.raises(KeystoneError, match="crashed"):
            prepare_in_worker(
                ArtifactPolicy(cache_dir=blocker / "cache"), [("c", ArtifactSpec(uri=f.as_uri()))]
            )

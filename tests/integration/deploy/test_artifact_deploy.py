"""Artifacts are fetched and verified before a deployment touches anything running."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from keystone.errors import ArtifactIntegrityError
from keystone.plan import load_desired
from keystone.runtime.artifact_client import WorkerPreparer
from keystone.runtime.deployer import Deployer
from keystone.runtime.process import ProcessRunner
from keystone.runtime.supervisor import RestartTuning, State

from .conftest import SVC, Fleet

pytestmark = pytest.mark.integration


def recipe_with_artifact(fleet: Fleet, name: str, version: str, sha: str) -> None:
    args = [
        "svc.py",
        "--name",
        name,
        "--port",
        str(fleet.port(name)),
        "--log",
        str(fleet.log),
        "--tag",
        version,
    ]
    (fleet.root / f"{name}.recipe.toml").write_text(
        f'[metadata]\nname = "{name}"\nversion = "{version}"\n'
        f'\n[[artifacts]]\nuri = "file://{SVC}"\nsha256 = "{sha}"\n'
        f'\n[lifecycle.run]\nstop_timeout = "2s"\n'
        f"\n[lifecycle.run.exec]\ncommand = {json.dumps(sys.executable)}\nargs = {json.dumps(args)}\n"
        f'\n[lifecycle.run.health]\ncheck = "http://127.0.0.1:{fleet.port(name)}/healthz"\n'
        'interval = "200ms"\nstart_timeout = "10s"\n'
    )


class TestArtifactsBeforeDeploy:
    def test_bad_artifact_refuses_and_leaves_everything_running(
        self, fleet: Fleet, tmp_path: Path
    ) -> None:
        """v1 runs from its verified artifact; v2's hash mismatch is refused before anything stops."""
        good = hashlib.sha256(SVC.read_bytes()).hexdigest()
        recipe_with_artifact(fleet, "web", "1.0.0", good)
        v1 = load_desired(fleet.plan(["web"]), root=fleet.root, environ=dict(os.environ))
        recipe_with_artifact(fleet, "web", "2.0.0", "0" * 64)
        v2 = load_desired(fleet.plan(["web"]), root=fleet.root, environ=dict(os.environ))
        runtime = tmp_path / "rt"

        async def main() -> None:
            runner = ProcessRunner()
            deployer = Deployer(
                runner,
                runtime,
                preparer=WorkerPreparer(runner, runtime),
                tuning=RestartTuning(settle=0.3),
            )
            try:
                result = await deployer.deploy(v1)
                assert result.ok, result.reason
                web = deployer.supervisors["web"]
                assert (runtime / "components/web/1.0.0/svc.py").read_bytes() == SVC.read_bytes()
                pid = web.pid
                with pytest.raises(ArtifactIntegrityError) as exc:
                    await deployer.deploy(v2)
                assert "web" in str(exc.value) and "svc.py" in str(exc.value)
                assert (
                    deployer.supervisors["web"] is web
                    and web.pid == pid
                    and web.state is State.HEALTHY
                )
                assert deployer.applied is v1
                assert not (runtime / "components/web/2.0.0").exists()
            finally:
                await deployer.stop_all()
                for sup in deployer.supervisors.values():
                    await sup.close()

        asyncio.run(main())

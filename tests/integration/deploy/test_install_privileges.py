"""Install scripts run with the component's own [lifecycle.run.security], not the agent's
privileges; only a recipe with require_privilege = true, on an agent that allows it, gets them.
Real processes, run as root (skipped otherwise)."""

from __future__ import annotations

import asyncio
import os
import pwd
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from keystone.config import load_config, parse_config
from keystone.errors import ValidationError
from keystone.plan import DesiredPlan, load_desired
from keystone.runtime.deployer import Deployer
from keystone.runtime.process import ProcessRunner
from keystone.runtime.supervisor import State

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root"),
]
T = TypeVar("T")

try:
    NOBODY = pwd.getpwnam("nobody").pw_uid
except KeyError:  # pragma: no cover - every Debian has nobody
    NOBODY = -1


def recipe(root: Path, name: str, script: str, *, user: str | None, privileged: bool) -> None:
    text = f'[metadata]\nname = "{name}"\nversion = "1.0.0"\n'
    text += f"\n[lifecycle.install]\nscript = {script!r}\n"
    if privileged:
        text += "require_privilege = true\n"
    text += '\n[lifecycle.run]\nrestart_policy = "never"\nstop_timeout = "2s"\n'
    text += '\n[lifecycle.run.exec]\ncommand = "sleep"\nargs = ["300"]\n'
    if user:
        text += f'\n[lifecycle.run.security]\nuser = "{user}"\nno_new_privileges = true\n'
    (root / f"{name}.recipe.toml").write_text(text)


def plan(root: Path, names: list[str]) -> DesiredPlan:
    path = root / "plan.toml"
    path.write_text(
        "".join(f'[[components]]\nname = "{n}"\nrecipe = "{n}.recipe.toml"\n\n' for n in names)
    )
    return load_desired(path, root=root, environ=dict(os.environ))


def run(body: Callable[[Deployer], Awaitable[T]], runtime: Path, *, allow: bool = False) -> T:
    async def main() -> T:
        deployer = Deployer(ProcessRunner(), runtime, allow_privileged_install=allow)
        try:
            return await body(deployer)
        finally:
            await deployer.stop_all(reason="test teardown")
            for sup in deployer.supervisors.values():
                await sup.close()

    return asyncio.run(main())


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    root = tmp_path / "fleet"
    root.mkdir()
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory the agent (root) can write and the component's user cannot."""
    d = tmp_path / "outside"
    d.mkdir(mode=0o755)
    return d


@pytest.mark.skipif(NOBODY < 0, reason="no user nobody")
class TestInstallAsTheComponentUser:
    def test_install_script_writes_its_work_dir_as_its_user(
        self, fleet: Path, tmp_path: Path
    ) -> None:
        """With user = "nobody", the install script runs as nobody and writes its work dir."""
        recipe(fleet, "app", "id -u > inside.txt", user="nobody", privileged=False)

        async def body(d: Deployer) -> Path:
            result = await d.deploy(plan(fleet, ["app"]))
            assert result.ok, result
            return d.supervisors["app"].paths.workdir

        work = run(body, tmp_path / "rt")
        inside = work / "inside.txt"
        assert inside.read_text().strip() == str(NOBODY)
        assert inside.stat().st_uid == NOBODY

    def test_install_script_cannot_write_outside(
        self, fleet: Path, tmp_path: Path, outside: Path
    ) -> None:
        """The same script writing outside its work dir fails; nothing is written there and
        the deployment is not applied."""
        recipe(fleet, "app", f"echo x > {outside}/escaped", user="nobody", privileged=False)

        async def body(d: Deployer) -> None:
            result = await d.deploy(plan(fleet, ["app"]))
            assert not result.ok
            assert "install script failed" in (result.reason or ""), result

        run(body, tmp_path / "rt")
        assert not (outside / "escaped").exists()


@pytest.mark.skipif(NOBODY < 0, reason="no user nobody")
class TestRequirePrivilege:
    def test_allowed_privileged_install_runs_as_the_agent(
        self, fleet: Path, tmp_path: Path, outside: Path
    ) -> None:
        """require_privilege = true on an agent that allows it: the script writes outside."""
        recipe(fleet, "app", f"id -u > {outside}/escaped", user="nobody", privileged=True)

        async def body(d: Deployer) -> None:
            result = await d.deploy(plan(fleet, ["app"]))
            assert result.ok, result
            assert d.supervisors["app"].state is State.HEALTHY

        run(body, tmp_path / "rt", allow=True)
        assert (outside / "escaped").read_text().strip() == "0"

    def test_refused_without_the_agent_allowing_it(
        self, fleet: Path, tmp_path: Path, outside: Path
    ) -> None:
        """require_privilege = true on an agent that does not allow it is refused naming the
        recipe file and field; what runs keeps running, nothing is installed."""
        recipe(fleet, "keep", "true", user="nobody", privileged=False)
        recipe(fleet, "app", f"echo x > {outside}/escaped", user=None, privileged=True)

        async def body(d: Deployer) -> None:
            first = await d.deploy(plan(fleet, ["keep"]))
            assert first.ok, first
            pid = d.supervisors["keep"].pid
            with pytest.raises(ValidationError) as info:
                await d.deploy(plan(fleet, ["keep", "app"]))
            msg = str(info.value)
            assert "app.recipe.toml" in msg
            assert "lifecycle.install.require_privilege" in msg
            assert "[security] allow_privileged_install = true" in msg
            assert set(d.supervisors) == {"keep"}
            assert d.supervisors["keep"].pid == pid

        run(body, tmp_path / "rt")
        assert not (outside / "escaped").exists()


class TestConfig:
    def test_security_table_and_environment(self, tmp_path: Path) -> None:
        """[security] allow_privileged_install and KEYSTONE_ALLOW_PRIVILEGED_INSTALL set it."""
        assert not parse_config("", file="a.toml").allow_privileged_install
        text = "[security]\nallow_privileged_install = true\n"
        assert parse_config(text, file="a.toml").allow_privileged_install
        path = tmp_path / "agent.toml"
        path.write_text(text)
        env = {"KEYSTONE_ALLOW_PRIVILEGED_INSTALL": "0"}
        assert not load_config(path, env).allow_privileged_install
        with pytest.raises(ValidationError, match="KEYSTONE_ALLOW_PRIVILEGED_INSTALL"):
            load_config(path, {"KEYSTONE_ALLOW_PRIVILEGED_INSTALL": "maybe"})
        with pytest.raises(ValidationError, match=r"a\.toml"):
            parse_config('[security]\nallow_privileged_install = "yes"\n', file="a.toml")

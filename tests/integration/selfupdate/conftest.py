"""Real wheels of this repository at other versions, built once per session, for self-update.

Each is the source tree copied, its version bumped (``pyproject.toml`` and ``__version__``),
optionally broken on purpose, and built with ``pip wheel --no-deps``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version as dist_version
from pathlib import Path

import pytest

import keystone
from tests.integration.artifacts.conftest import Pki
from tests.integration.sync.conftest import make_agent, signed_fleet  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[3]

# Appended to keystone/agent.py of a broken version: the agent exits before it serves.
EXITS_AT_START = """

async def _exit_at_start(self, **kw):  # a broken release: exits at start
    raise SystemExit(70)

Agent.run = _exit_at_start
"""

# ... or it runs and supervises but never answers /healthz.
NO_HEALTHZ = """

def _no_api(self):  # a broken release: never answers /healthz
    self.api = None

Agent._start_api = _no_api
"""


@dataclass(frozen=True)
class Wheel:
    version: str
    path: Path
    sha256: str


def _new_setuptools() -> bool:
    try:
        return int(dist_version("setuptools").split(".")[0]) >= 77
    except Exception:
        return False


def build_wheel(work: Path, version: str, patch: str = "") -> Wheel:
    """The repository's wheel at ``version`` (with ``patch`` appended to keystone/agent.py)."""
    tree = work / f"src-{version}"
    shutil.copytree(
        REPO / "keystone", tree / "keystone", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    project = tree / "pyproject.toml"
    text = project.read_text()
    assert f'version = "{keystone.__version__}"' in text
    project.write_text(
        text.replace(f'version = "{keystone.__version__}"', f'version = "{version}"', 1)
    )
    init = tree / "keystone" / "__init__.py"
    init.write_text(
        init.read_text().replace(
            f'__version__ = "{keystone.__version__}"', f'__version__ = "{version}"'
        )
    )
    if patch:
        agent = tree / "keystone" / "agent.py"
        agent.write_text(agent.read_text() + patch)
    out = work / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(tree)]
    if _new_setuptools():
        cmd.insert(4, "--no-build-isolation")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob(f"keystone_agent-{version}-*.whl")
    return Wheel(version, path, hashlib.sha256(path.read_bytes()).hexdigest())


def derive_wheel(base: Wheel, work: Path, version: str, patch: str) -> Wheel:
    """``base`` rewritten as ``version`` with ``patch`` appended to keystone/agent.py: the
    version strings, the dist-info name and RECORD's hashes, as a build would write them
    (one pip build per session is enough)."""
    old_info = f"keystone_agent-{base.version}.dist-info/"
    new_info = f"keystone_agent-{version}.dist-info/"
    out = work / "dist" / base.path.name.replace(base.version, version)
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(base.path) as zin:
        for name in zin.namelist():
            data = zin.read(name)
            if name == "keystone/__init__.py":
                data = data.replace(base.version.encode(), version.encode())
            elif name == "keystone/agent.py":
                data += patch.encode()
            elif name == old_info + "METADATA":
                data = data.replace(
                    f"Version: {base.version}".encode(), f"Version: {version}".encode()
                )
            files[name.replace(old_info, new_info)] = data
    record = new_info + "RECORD"
    lines = []
    for name, data in files.items():
        if name == record:
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    lines.append(f"{record},,")
    files[record] = ("\n".join(lines) + "\n").encode()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for name, data in files.items():
            zout.writestr(name, data)
    return Wheel(version, out, hashlib.sha256(out.read_bytes()).hexdigest())


@pytest.fixture(scope="session")
def agent_wheels(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Wheel]:
    """``wheel("good" | "exits" | "no-healthz")``: made on first use, then cached."""
    work = tmp_path_factory.mktemp("wheels")
    base = keystone.__version__
    kinds = {
        "good": (f"{base}.post1", ""),
        "exits": (f"{base}.post2", EXITS_AT_START),
        "no-healthz": (f"{base}.post3", NO_HEALTHZ),
    }
    built: dict[str, Wheel] = {}

    def wheel(kind: str) -> Wheel:
        if kind not in built:
            version, patch = kinds[kind]
            if kind == "good":
                built[kind] = build_wheel(work, version)
            else:
                built[kind] = derive_wheel(wheel("good"), work, version, patch)
        return built[kind]

    return wheel


def agent_recipe(wheel: Wheel, sig: Path | None = None, cert: Path | None = None) -> str:
    """The ``type = "agent"`` recipe that pins ``wheel`` (the same text everywhere: one hash),
    with its detached signature and signer certificate when given."""
    text = (
        f'[metadata]\nname = "keystone"\nversion = "{wheel.version}"\ntype = "agent"\n'
        f'[[artifacts]]\nuri = "{wheel.path}"\nsha256 = "{wheel.sha256}"\n'
    )
    if sig is not None and cert is not None:
        text += f'sig_uri = "{sig.as_uri()}"\ncert_uri = "{cert.as_uri()}"\n'
    return text


@pytest.fixture(scope="session")
def signers(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA the devices trust with its code-signing leaf, and a rogue CA with its own leaf."""
    p = Pki(tmp_path_factory.mktemp("pki"))
    p.root_ca("ca")
    p.issue("leaf", "p256", "ca")
    p.root_ca("rogue-ca")
    p.issue("rogue", "p256", "rogue-ca")
    return p


@pytest.fixture(scope="session")
def agent_installs(
    tmp_path_factory: pytest.TempPathFactory, agent_wheels: Callable[[str], Wheel]
) -> Callable[[str], Path]:
    """``install(kind)``: ``<runtime>/agent/<version>`` as the agent's own prepare step makes
    it (once per session), for tests about the handover rather than the install. The install
    is relocatable: the agent runs it as ``<dir>/bin/python <dir>/bin/keystone``."""
    from keystone.plan import PlanEntry, resolve_entries
    from keystone.runtime.artifact_client import WorkerPreparer
    from keystone.runtime.deployer import LOCAL_ARTIFACTS
    from keystone.runtime.process import ProcessRunner
    from keystone.selfupdate import SelfUpdater

    made: dict[str, Path] = {}

    def install(kind: str) -> Path:
        if kind not in made:
            wheel = agent_wheels(kind)
            runtime = tmp_path_factory.mktemp(f"install-{kind}")
            plan = resolve_entries(
                [PlanEntry("keystone", "agent.recipe.toml", file="plan.toml")],
                lambda e: (agent_recipe(wheel), "agent.recipe.toml"),
                environ={},
            )

            async def go() -> None:
                runner = ProcessRunner()
                updater = SelfUpdater(
                    runtime,
                    runner,
                    WorkerPreparer(runner, runtime),
                    ledger=lambda: None,  # type: ignore[arg-type,return-value]
                    emit=lambda _e: None,
                    save=lambda: None,
                )
                await updater.prepare(plan.components["keystone"], LOCAL_ARTIFACTS)

            asyncio.run(go())
            made[kind] = runtime / "agent" / wheel.version
        return made[kind]

    return install

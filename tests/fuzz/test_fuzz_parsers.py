"""Fuzzing the recipe, plan and agent-config parsers with structured mutations.

The property, for every mutated document: the parser returns a valid model, or raises a
KeystoneError whose message names the file; never another exception, never a hang. The
normal suite runs a fixed, bounded set of examples (profile ``keystone-ci``); ``scripts/fuzz``
runs the same properties with random seeds for a time budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keystone.config import AgentConfig, load_config, parse_config
from keystone.errors import KeystoneError
from keystone.plan import DesiredPlan, PlanFile, load_desired, load_plan, parse_plan
from keystone.recipe import Recipe, load_recipe, parse_recipe
from tests.fuzz.conftest import EXAMPLES
from tests.fuzz.strategies import mutated, mutated_bytes
from tests.unit.test_recipe import FULL_RECIPE, GO_README_RECIPE

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parents[2]
ENV = {"KEYSTONE_PYTHON": "python3", "DB_URL": "postgres://db"}
TIME_BOUND = 20.0  # seconds one example may take, even on a loaded machine

RECIPES = [
    *(p.read_text() for p in sorted((ROOT / "example-repo" / "recipes").glob("*.toml"))),
    *(p.read_text() for p in sorted((ROOT / "keystone" / "demo").glob("*.recipe.toml"))),
    FULL_RECIPE,
    GO_README_RECIPE,
]
PLANS = [
    *(p.read_text() for p in sorted((ROOT / "example-repo").glob("**/*plan*.toml"))),
    (ROOT / "example-repo" / "plans" / "default.toml").read_text(),
    (ROOT / "keystone" / "demo" / "plan.toml").read_text(),
]
CONFIGS = [
    """\
[device]
id = "gw-1"
labels = ["gateway", "berlin"]

[source]
type = "git"
url = "https://example.com/fleet.git"
ref = "refs/heads/main"
interval = "60s"
jitter = "10s"
soak = "30s"
timeout = "2m"

[trust]
allowed_signers = "allowed_signers"
revoked_keys = "~/revoked"
verify = "tip"
max_age = "72h"
allow_unsigned_artifacts = false

[api]
listen = "127.0.0.1:8080"

[paths]
runtime = "runtime"

[reconcile]
interval = "5m"
jitter = "30s"

[bundles]
watch = ["/media/usb"]

[limits]
max_recipe_bytes = "2M"
max_components = 50
""",
    '[device]\nid = "x"\n',
]
SEGMENT = re.compile(r"[A-Za-z0-9._+-]{1,128}", re.ASCII)


class Hang(Exception):
    """An example ran past TIME_BOUND."""


@contextlib.contextmanager
def check_time(what: str) -> Iterator[None]:
    """Fail an example that runs past TIME_BOUND (a hang), instead of blocking the suite."""

    def expire(signum: int, frame: object) -> None:
        raise Hang(f"{what} ran for more than {TIME_BOUND}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, TIME_BOUND)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _strings(v)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            if f.name not in ("text", "unknown_fields", "source", "file"):
                yield from _strings(getattr(obj, f.name))


def _floats(obj: Any) -> Iterator[float]:
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _floats(v)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _floats(getattr(obj, f.name))


def assert_valid(model: object) -> None:
    """What every accepted document guarantees, whatever its text was."""
    assert all("\0" not in s for s in _strings(model)), "a NUL reached the model"
    assert all(math.isfinite(x) for x in _floats(model)), "a non-finite number was accepted"
    if isinstance(model, Recipe):
        assert SEGMENT.fullmatch(model.name) and SEGMENT.fullmatch(model.version)
        if model.run.exec is not None:
            assert model.run.exec.command.strip()
            assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) for k in model.run.exec.env)
        assert all(re.fullmatch(r"CAP_[A-Z_]+", c) for c in model.run.security.capabilities or ())
        assert model.resources.cpu_quota is None or model.resources.cpu_quota > 0
    elif isinstance(model, PlanFile):
        assert all(SEGMENT.fullmatch(e.name) for e in model.entries)
    elif isinstance(model, DesiredPlan):
        for c in model.components.values():
            assert_valid(c.recipe)
    elif isinstance(model, AgentConfig):
        assert SEGMENT.fullmatch(model.device_id)
        assert all(SEGMENT.fullmatch(label) for label in model.labels)


def check(name: str, parse: Callable[[], object], *files: str) -> None:
    """The property: a valid model or a KeystoneError naming one of ``files``; nothing else."""
    EXAMPLES[name] += 1
    started = time.monotonic()
    with check_time(name):
        try:
            model = parse()
        except KeystoneError as exc:
            assert any(f in str(exc) for f in files), f"the message names none of {files}: {exc}"
        else:
            assert_valid(model)
    assert time.monotonic() - started < TIME_BOUND


@given(mutated(RECIPES))
def test_recipe_parser(text: str) -> None:
    """Mutated recipes parse to a valid Recipe or fail with a KeystoneError naming the file."""
    check(
        "recipe",
        lambda: parse_recipe(text, file="fuzz.recipe.toml", environ=ENV),
        "fuzz.recipe.toml",
    )


@given(mutated(PLANS))
def test_plan_parser(text: str) -> None:
    """Mutated plans parse to a valid PlanFile or fail with a KeystoneError naming the file."""
    check("plan", lambda: parse_plan(text, file="fuzz-plan.toml"), "fuzz-plan.toml")


@given(mutated(CONFIGS))
def test_config_parser(text: str) -> None:
    """Mutated agent configs parse or fail with a KeystoneError naming the file."""
    check(
        "agent config",
        lambda: parse_config(text, file="fuzz-agent.toml", base=Path("/etc/keystone")),
        "fuzz-agent.toml",
    )


@given(st.sampled_from(["recipe", "plan", "config"]), st.data())
def test_file_loaders(kind: str, data: st.DataObject) -> None:
    """Mutated files (cut inside UTF-8, spliced with other bytes) load or fail naming the file."""
    seeds = {"recipe": RECIPES, "plan": PLANS, "config": CONFIGS}[kind]
    blob = data.draw(mutated_bytes(seeds))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz-{kind}.toml"
        path.write_bytes(blob)
        load: Callable[[], object] = {
            "recipe": lambda: load_recipe(path, environ=ENV),
            "plan": lambda: load_plan(path),
            "config": lambda: load_config(path, {}),
        }[kind]
        check(f"{kind} file", load, path.name)


@given(st.booleans(), st.data())
def test_dry_run_resolution(mutate_plan: bool, data: st.DataObject) -> None:
    """The offline dry-run path: a plan and the recipes it names, one of them mutated."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "recipes").mkdir()
        hello = (ROOT / "example-repo" / "recipes" / "hello.recipe.toml").read_text()
        uplink = (ROOT / "example-repo" / "recipes" / "uplink.recipe.toml").read_text()
        plan = (
            '[[components]]\nname = "hello"\nrecipe = "recipes/hello.recipe.toml"\n'
            '[[components]]\nname = "uplink"\nrecipe = "recipes/uplink.recipe.toml"\n'
        )
        if mutate_plan:
            plan = data.draw(mutated([plan]))
        else:
            hello = data.draw(mutated([hello]))
        (root / "recipes" / "hello.recipe.toml").write_bytes(hello.encode("utf-8", "surrogatepass"))
        (root / "recipes" / "uplink.recipe.toml").write_text(uplink)
        (root / "plan.toml").write_bytes(plan.encode("utf-8", "surrogatepass"))
        check(
            "dry-run plan",
            lambda: load_desired(root / "plan.toml", root=root, environ=ENV),
            "plan.toml",
            "hello.recipe.toml",
            "uplink.recipe.toml",
        )

"""Recipe files from disk need a valid ``<recipe>.sig`` when a trust bundle is configured.

Signatures made with the openssl CLI and with keystone's own signer; the plan loader's check
(:class:`keystone.recipesig.RecipeFileVerifier` in :class:`keystone.plan.FileRecipes`) and a real
``keystone agent --apply`` that refuses, accepts, and accepts loudly with --insecure-skip-verify.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from keystone import sign
from keystone.plan import FileRecipes, merge_entries, parse_plan, resolve_entries
from keystone.recipesig import RecipeFileVerifier
from tests.integration.agent.conftest import make_agent  # noqa: F401 - the fixture
from tests.integration.artifacts.conftest import Pki

pytestmark = pytest.mark.integration

RECIPE = f"""[metadata]
name = "app"
version = "1.0.0"

[lifecycle.run.exec]
command = "{sys.executable}"
args = ["-c", "import time; time.sleep(3600)"]
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    p = Pki(tmp_path_factory.mktemp("pki"))
    p.root_ca("ca")
    p.root_ca("rogue-ca")
    for kind in ("p256", "rsa", "ed25519"):
        p.issue(f"leaf-{kind}", kind, "ca")
    p.issue("leaf-rogue", "p256", "rogue-ca")
    return p


def write(tmp_path: Path, text: str = RECIPE) -> tuple[Path, Path]:
    recipe = tmp_path / "app.recipe.toml"
    recipe.write_text(text)
    plan = tmp_path / "plan.toml"
    plan.write_text('[[components]]\nname = "app"\nrecipe = "app.recipe.toml"\n')
    return recipe, plan


def openssl_sign(pki: Pki, leaf: str, recipe: Path) -> None:
    made = pki.sign(leaf, recipe)
    made.rename(sign.sig_path_for(recipe))
    shutil.copy(pki.cert(leaf), recipe.with_name(recipe.name + ".crt"))


def load(plan: Path, verify: RecipeFileVerifier | None) -> Any:
    pf = parse_plan(plan.read_text(), file=str(plan))
    entries, unknown = merge_entries([pf])
    return resolve_entries(
        entries, FileRecipes(plan.parent, None, verify=verify), environ={}, unknown=unknown
    )


@pytest.mark.parametrize("leaf", ["leaf-p256", "leaf-rsa", "leaf-ed25519"])
def test_openssl_signed_recipe_is_accepted(tmp_path: Path, pki: Pki, leaf: str) -> None:
    recipe, plan = write(tmp_path)
    openssl_sign(pki, leaf, recipe)
    verify = RecipeFileVerifier(pki.cert("ca"), environ={})
    assert load(plan, verify).components["app"].recipe.version == "1.0.0"


def test_keystone_signed_recipe_is_accepted(tmp_path: Path, pki: Pki) -> None:
    recipe, plan = write(tmp_path)
    signature = sign.sign_file(recipe, pki.key("leaf-rsa"), pki.cert("leaf-rsa"))
    sign.write_signature(sign.sig_path_for(recipe), signature)
    verify = RecipeFileVerifier(
        pki.cert("ca"), environ={"KEYSTONE_LEAF_CERT": str(pki.cert("leaf-rsa"))}
    )
    assert load(plan, verify).components["app"].name == "app"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unsigned", "missing-signature"),
        ("tampered", ""),
        ("rogue", ""),
        ("no-cert", "no-certificate"),
    ],
)
def test_refused_fail_closed(tmp_path: Path, pki: Pki, case: str, reason: str) -> None:
    recipe, plan = write(tmp_path)
    if case in ("tampered", "no-cert"):
        openssl_sign(pki, "leaf-p256", recipe)
    if case == "tampered":
        recipe.write_text(RECIPE.replace("3600", "3601"))
    if case == "no-cert":
        recipe.with_name(recipe.name + ".crt").unlink()
    if case == "rogue":
        openssl_sign(pki, "leaf-rogue", recipe)
    verify = RecipeFileVerifier(pki.cert("ca"), environ={})
    with pytest.raises(sign.RecipeSignatureError) as exc:
        load(plan, verify)
    assert "app.recipe.toml refused" in str(exc.value)
    if reason:
        assert exc.value.reason == reason


def test_no_trust_bundle_means_no_check_and_the_store_is_never_checked(tmp_path: Path) -> None:
    assert RecipeFileVerifier.from_env({}) is None
    insecure = RecipeFileVerifier.from_env({"KEYSTONE_INSECURE_SKIP_VERIFY": "1"})
    assert insecure is not None and insecure.insecure_skip_verify
    _recipe, plan = write(tmp_path)
    assert load(plan, insecure).components["app"].name == "app"


def test_agent_apply_refuses_then_accepts(make_agent: Any, tmp_path: Path, pki: Pki) -> None:  # noqa: F811
    """A real agent: unsigned refused (exit 3, the reason), signed started, insecure warned."""
    recipe, plan = write(tmp_path)
    env = {"KEYSTONE_TRUST_BUNDLE": str(pki.cert("ca"))}
    refused = make_agent("--apply", str(plan), env=env).start(wait=False)
    assert refused.proc.wait(60) == 3
    assert "missing detached signature app.recipe.toml.sig" in refused.output()

    loud = make_agent("--apply", str(plan), "--insecure-skip-verify", env=env).start()
    loud.wait_states({"app": "healthy"}, timeout=60)
    assert "signature NOT verified" in loud.output()
    assert loud.stop() == 0

    openssl_sign(pki, "leaf-ed25519", recipe)
    signed = make_agent("--apply", str(plan), env=env).start()
    signed.wait_states({"app": "healthy"}, timeout=60)
    assert "signature verified (signed by" in signed.output()

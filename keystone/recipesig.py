"""Detached signatures of recipe files read from the device's disk (Go's recipe file check).

When a trust bundle is configured (``KEYSTONE_TRUST_BUNDLE``), a recipe file a local plan names
(``keystone agent --apply plan.toml``) must carry a valid ``<recipe>.sig`` (Go's format, see
:mod:`keystone.sign`), or the plan is refused with the reason before anything starts:
fail-closed. Recipes that come with a signed git revision are covered by the commit signature,
and recipes uploaded through the API's recipe store by the API's authentication: neither comes
here. ``--insecure-skip-verify`` (or ``KEYSTONE_INSECURE_SKIP_VERIFY``) turns the check off and
says so in a WARNING for every recipe it lets through.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from loguru import logger

INSECURE_ENV = "KEYSTONE_INSECURE_SKIP_VERIFY"
TRUST_BUNDLE_ENV = "KEYSTONE_TRUST_BUNDLE"


def env_flag(environ: Mapping[str, str], name: str) -> bool:
    """Whether an environment flag is set to a true value (``1``, ``true``, ``yes``, ``on``)."""
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class RecipeFileVerifier:
    """Checks a recipe file's detached signature over the bytes the plan loader read.

    Called as ``verify(path, text)`` by :class:`keystone.plan.FileRecipes` for every recipe it
    reads from the filesystem (never for the recipe store).

    Args:
        trust_bundle: the PEM roots (``None`` with ``insecure_skip_verify`` only).
        insecure_skip_verify: accept every recipe, with a WARNING each time.
        environ: where ``KEYSTONE_LEAF_CERT`` is read.
    """

    def __init__(
        self,
        trust_bundle: Path | None,
        *,
        insecure_skip_verify: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.trust_bundle = trust_bundle
        self.insecure_skip_verify = insecure_skip_verify
        self.environ = dict(os.environ if environ is None else environ)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, insecure_skip_verify: bool = False
    ) -> RecipeFileVerifier | None:
        """The verifier the configuration asks for, or ``None`` when no trust bundle is set."""
        env = os.environ if environ is None else environ
        insecure = insecure_skip_verify or env_flag(env, INSECURE_ENV)
        bundle = env.get(TRUST_BUNDLE_ENV, "").strip()
        if not bundle and not insecure:
            return None
        return cls(Path(bundle) if bundle else None, insecure_skip_verify=insecure, environ=env)

    def __call__(self, path: Path, text: str) -> None:
        """Accept ``path`` (read as ``text``) or raise.

        Raises:
            keystone.sign.RecipeSignatureError: missing, unverifiable or untrusted signature,
                with its reason.
        """
        if self.insecure_skip_verify:
            logger.warning(
                "recipe {}: signature NOT verified (--insecure-skip-verify / {}): "
                "for development only",
                path,
                INSECURE_ENV,
            )
            return
        # lazy: keystone.sign and cryptography load only when a recipe signature is checked
        from keystone import sign

        signer = sign.verify_recipe_signature(
            path, self.trust_bundle, data=text.encode("utf-8"), environ=self.environ
        )
        logger.info("recipe {}: signature verified (signed by {})", path, signer)

"""The signed fleet and agent fixtures of the sync tests, for the crash and damage tests."""

from tests.integration.sync.conftest import make_agent, signed_fleet  # noqa: F401  (re-exports)

"""Hypothesis profiles for the parser fuzz suite, and a count of the examples run.

``keystone-ci`` (the default, used by ``./scripts/test``): a fixed seed (derandomized) and a
bounded number of examples, so the whole suite stays fast and reproducible. ``keystone-long``
(``scripts/fuzz``): random seeds and many more examples, run until a time budget is spent.
Choose with ``KEYSTONE_FUZZ_PROFILE``; ``KEYSTONE_FUZZ_EXAMPLES`` overrides the number of
examples per property; ``KEYSTONE_FUZZ_STATS`` names a JSON file that receives the counts.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

EXAMPLES: Counter[str] = Counter()

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
# No "explain" phase: it traces every line run by the megabyte-sized failing examples, which
# takes gigabytes; the shrunk example and its reproduce blob say enough.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]

settings.register_profile(
    "keystone-ci",
    max_examples=int(os.environ.get("KEYSTONE_FUZZ_EXAMPLES") or 120),
    derandomize=True,
    database=None,  # a fixed seed: nothing to replay, and nothing written to .hypothesis/
    deadline=None,  # the properties bound their own time (see check_time), load-independent
    suppress_health_check=_SLOW_OK,
    phases=_PHASES,
    print_blob=True,
)
settings.register_profile(
    "keystone-long",
    max_examples=int(os.environ.get("KEYSTONE_FUZZ_EXAMPLES") or 2000),
    derandomize=False,
    deadline=None,
    suppress_health_check=_SLOW_OK,
    phases=_PHASES,
    print_blob=True,
)
settings.load_profile(os.environ.get("KEYSTONE_FUZZ_PROFILE") or "keystone-ci")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Add this run's example counts to ``KEYSTONE_FUZZ_STATS`` (for scripts/fuzz)."""
    target = os.environ.get("KEYSTONE_FUZZ_STATS")
    if not target or not EXAMPLES:
        return
    path = Path(target)
    total: Counter[str] = Counter()
    if path.exists():
        total.update(json.loads(path.read_text() or "{}"))
    total.update(EXAMPLES)
    path.write_text(json.dumps(dict(total), indent=2, sort_keys=True))

"""The built-in demo stack (db -> cache -> api) run by ``keystone agent --demo``."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_PLAN = DEMO_DIR / "plan.toml"

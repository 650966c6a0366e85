"""Logging: loguru to stderr, readable for people or JSON lines for journald and collectors."""

from __future__ import annotations

import sys

from loguru import logger


def setup(*, level: str = "INFO", json: bool = False) -> None:
    """Send logs to stderr (journald picks them up under systemd)."""
    logger.remove()
    if json:
        logger.add(sys.stderr, level=level, serialize=True)
    else:
        logger.add(
            sys.stderr,
            level=level,
            format="<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}",
            colorize=None,
        )

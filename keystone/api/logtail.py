"""The last lines of a component's logs, read from the end of the files (bounded)."""

from __future__ import annotations

import os
from pathlib import Path

MAX_LINES = 1000
"""Most lines a log tail answers with."""

MAX_BYTES = 256 << 10
"""Most bytes read from the end of one log file for a tail."""


def tail_lines(path: Path, lines: int, *, max_bytes: int = MAX_BYTES) -> list[str]:
    """The last ``lines`` lines of ``path`` (decoded, invalid UTF-8 replaced); [] if missing.

    Reads at most ``max_bytes`` from the end, so a huge log costs no more than a small one; the
    first line of that window is dropped when it may be cut.
    """
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read(max_bytes)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        return []
    text = data.decode("utf-8", "replace").splitlines()
    if start > 0 and text:
        text = text[1:]
    return text[-lines:] if lines > 0 else []

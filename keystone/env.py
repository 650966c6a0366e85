"""The environment: ``.env`` loading and ``${VAR}`` / ``${VAR:-default}`` substitution."""

from __future__ import annotations

import os
import re
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, MutableMapping

# Pattern texts, compiled on first use (re caches them): the CLI's fast path loads this module
# for ``load_dotenv`` and, without a .env file, needs neither.
_REF = r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}"
_LINE = r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$"


class SubstitutionError(ValueError):
    """A ``${VAR}`` that is not set and has no default."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"${{{name}}} is not set (set it in the environment or .env, or write ${{{name}:-default}})"
        )


def substitute(text: str, environ: Mapping[str, str]) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; ``$$`` is a literal ``$``.

    A bare ``$VAR`` is left alone so that shell snippets keep their own variables.
    """
    if "$" not in text:
        return text  # most values name nothing (and a recipe has many values)

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        value = environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise SubstitutionError(name)
            return default
        return value

    return re.sub(_REF, repl, text)


def parse_dotenv(text: str) -> dict[str, str]:
    """Parse a ``.env`` file: ``KEY=value`` lines, ``#`` comments, optional quotes and ``export``."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(_LINE, line)
        if not m:
            continue
        key, value = m.group(1), m.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
            if raw.strip().split("=", 1)[1].strip().startswith('"'):
                value = value.replace("\\n", "\n").replace('\\"', '"')
        else:
            value = re.sub(r"\s+#.*$", "", value)
        out[key] = value
    return out


def load_dotenv(
    path: str | os.PathLike[str] = ".env", environ: MutableMapping[str, str] | None = None
) -> int:
    """Load ``path`` into ``environ`` (default ``os.environ``) without overriding what is set.

    Returns how many variables were added. A missing file is not an error.
    """
    target = os.environ if environ is None else environ
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return 0
    added = 0
    for key, value in parse_dotenv(text).items():
        if key not in target:
            target[key] = value
            added += 1
    return added


def substitution_env() -> dict[str, str]:
    """What ``${VAR}`` in recipes may name: the agent's environment plus KEYSTONE_PYTHON."""
    env = dict(os.environ)
    env.setdefault("KEYSTONE_PYTHON", sys.executable)
    return env

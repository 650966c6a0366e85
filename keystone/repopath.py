"""The one rule for paths inside the fleet repository, shared by every layer.

A repository path is relative to the repository root and ``/``-separated. ``.`` segments and
empty segments (``a//b``, a trailing ``/``) carry no meaning and are dropped; everything that
could name something outside the root, or name it ambiguously, is refused: an absolute path, a
``..`` segment (``a/../b`` included: it is refused, never normalised), a backslash, a NUL or any
other control character, and the empty path unless the root itself is wanted.

Recipe paths in plans, repo-relative artifact URIs, and every read of a tree in the mirror or a
checkout go through :func:`split_repo_path`, so that a path accepted in one place is accepted in
all of them. This module imports only :mod:`keystone.errors`, so any layer may use it.
"""

from __future__ import annotations

import re

from keystone.errors import ValidationError

__all__ = ["repo_path", "repo_path_problem", "split_repo_path"]

_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\]")  # a control character or a backslash


def repo_path_problem(path: object, *, allow_root: bool = False) -> str | None:
    """Say what is wrong with ``path`` as a repository path, or None when it is acceptable.

    For callers that report refusals in their own terms (an artifact reason code, a plan-root
    message); everyone else calls :func:`split_repo_path`.
    """
    if not isinstance(path, str):
        return f"repository path must be a string, got {type(path).__name__}"
    if path.startswith("/"):
        return f"{path!r} is absolute; paths in the fleet repository are relative to its root"
    if _UNSAFE.search(path):
        return (
            f"{path!r} contains a backslash or a control character; use plain '/'-separated names"
        )
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        return f"{path!r} contains '..'; paths may not leave the repository root"
    if not parts and not allow_root:
        return "empty path; name a file inside the repository"
    return None


def split_repo_path(
    path: str,
    *,
    allow_root: bool = False,
    file: str | None = None,
    line: int | None = None,
    field: str = "path",
) -> list[str]:
    """Split a repository-relative path into its segments, refusing anything that could escape.

    ``a/b.toml`` and ``./a//b.toml/`` give ``["a", "b.toml"]``. An absolute path, a ``..``
    segment, a backslash, a NUL or a control character is refused, as is the empty path unless
    ``allow_root`` (then ``[]`` is the root).

    Args:
        path: The path to check.
        allow_root: Whether ``""`` (or ``.``) may name the repository root.
        file: The file the path was read from, for the error message.
        line: The line in ``file``.
        field: The field the path came from (``path``, ``recipe``, ``artifacts.uri``).

    Raises:
        keystone.errors.ValidationError: naming the path and what is wrong with it.
    """
    problem = repo_path_problem(path, allow_root=allow_root)
    if problem is not None:
        raise ValidationError(problem, file=file, line=line, field=field)
    return [p for p in path.split("/") if p not in ("", ".")]


def repo_path(
    path: str, *, file: str | None = None, line: int | None = None, field: str = "path"
) -> str:
    """Return ``path`` in its plain form (``./a//b/`` -> ``a/b``) after :func:`split_repo_path`.

    Raises:
        keystone.errors.ValidationError: the path is not an acceptable repository path.
    """
    return "/".join(split_repo_path(path, file=file, line=line, field=field))

"""One invocation of a command: where its agent is, how it prints, and how it exits.

Typer-free, so the fast path (``keystone.cli.fast``) and the typer commands (through
``keystone.cli.common``) share one client factory, one ``emit`` and one exit-code table.
"""

from __future__ import annotations

from enum import IntEnum

from keystone.cli import fastviews as views

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path
    from typing import Any

    from keystone.client import Client
    from keystone.errors import KeystoneError


class ExitCode(IntEnum):
    """The CLI's exit codes (DESIGN section 8); ``KeystoneError.exit_code`` uses the same."""

    OK = 0
    FAILED = 1  # the agent or the network failed
    MISUSE = 2
    REFUSED = 3  # refused by verification or validation
    ROLLED_BACK = 4  # the deployment failed and was rolled back


RESULT_EXIT: Mapping[str, ExitCode] = {
    "ok": ExitCode.OK,
    "applied": ExitCode.OK,
    "up-to-date": ExitCode.OK,
    "dry-run": ExitCode.OK,
    "rolled-back": ExitCode.ROLLED_BACK,
    "refused": ExitCode.REFUSED,
    "known-bad": ExitCode.REFUSED,
    "unreachable": ExitCode.FAILED,
    "error": ExitCode.FAILED,
    "waiting": ExitCode.OK,  # verified; deploys at its wave, window or the end of a deferral
    "halted": ExitCode.OK,  # verified; the rollout is halted
}
"""The exit code of an outcome the agent reports (a sync, rollback, import or apply result)."""


def exit_for(result: object) -> ExitCode:
    """The exit code of the outcome ``result``; an unknown one is a failure."""
    return RESULT_EXIT.get(str(result), ExitCode.FAILED)


# Plain classes rather than dataclasses: ``dataclasses`` imports ``inspect`` (~7 ms), which the
# fast path of ``keystone status`` does not otherwise load.


class Output:
    """How one invocation prints: JSON for scripts (``--json``) or a table for people."""

    __slots__ = ("as_json",)

    def __init__(self, as_json: bool = False) -> None:
        self.as_json = as_json

    def emit(self, data: Any, human: views.Human | None = None) -> None:
        """Print ``data`` as JSON, or as ``human(data)``."""
        views.emit(data, self.as_json, human)

    def report(self, exc: KeystoneError) -> int:
        """Print an error (stderr; with ``--json`` also as JSON on stdout); return its exit code."""
        return views.report_error(exc, self.as_json)

    def fields(self) -> dict[str, Any]:
        """What this invocation was given, by option name."""
        return {"as_json": self.as_json}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Output):
            return NotImplemented
        return type(other) is type(self) and other.fields() == self.fields()

    def __hash__(self) -> int:
        return hash((type(self), *self.fields().values()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.fields().items())
        return f"{type(self).__name__}({args})"


class Session(Output):
    """An invocation that talks to the agent, with the connection options it was given."""

    __slots__ = ("addr", "runtime", "ssh", "token")

    def __init__(
        self,
        as_json: bool = False,
        addr: str | None = None,
        token: str | None = None,
        ssh: str | None = None,
        runtime: Path | None = None,
    ) -> None:
        super().__init__(as_json)
        self.addr = addr
        self.token = token
        self.ssh = ssh
        self.runtime = runtime

    def fields(self) -> dict[str, Any]:
        """What this invocation was given, by option name."""
        return {
            **super().fields(),
            "addr": self.addr,
            "token": self.token,
            "ssh": self.ssh,
            "runtime": self.runtime,
        }

    def client(self) -> Client:
        """A client for the agent (``--addr``, ``--token``, ``--ssh``, ``--runtime``)."""
        from keystone.client import Client

        return Client(self.addr, self.token, self.ssh, runtime=self.runtime)

    def request(self, method: str, path: str, **kw: Any) -> Any:
        """One request to the agent on a connection of its own (the keywords of
        ``Client.request``); the decoded answer."""
        with self.client() as client:
            return client.request(method, path, **kw)

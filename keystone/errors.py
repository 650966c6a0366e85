"""Every error Keystone raises on purpose, under one root.

The tree, classified by what the caller (a sync loop, the CLI) should do next::

    KeystoneError                      exit 1 unless a subclass says otherwise
    ├── UsageError                     misuse of a command or config (exit 2)
    ├── Refused                        wait for new input; do not retry the same thing (exit 3)
    │   ├── ValidationError            a recipe, plan or config that does not validate
    │   │   ├── GraphError             dependency cycle, missing hard dependency
    │   │   ├── DuplicateKeyError      a TOML key or table defined twice (both lines)
    │   │   └── LimitExceeded          an input over a bound of keystone.limits
    │   ├── VerificationError          signatures, trust, anti-rollback, freshness
    │   │   ├── SignatureError         a commit or artifact signature that does not verify
    │   │   ├── RollbackRefused        the new revision does not descend from the applied one
    │   │   └── StaleRevision          the signed commit is older than max_age
    │   ├── ArtifactIntegrityError     hash mismatch, bad detached signature, size bound
    │   ├── UnsafeArchiveError         an archive member that would escape or is not a file
    │   └── BundleError                a damaged or unusable bundle
    ├── Retryable                      back off and try again later (exit 1)
    │   ├── SourceUnreachable          the git remote / bundle URL does not answer
    │   ├── ArtifactFetchError         an artifact download failed
    │   └── AgentUnreachable           the CLI found no agent at the address
    ├── ProcessError                   a component could not be spawned or stopped
    └── DeploymentFailed               a deployment failed and was rolled back (exit 4)

Foreign exceptions (dulwich, httpx, tomlkit, cryptography) are translated at the module that
calls the library: ``raise SourceUnreachable(...) from exc``.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import ClassVar


class KeystoneError(Exception):
    """Root of every error Keystone raises on purpose."""

    exit_code: ClassVar[int] = 1
    kind: ClassVar[str] = "error"


class UsageError(KeystoneError):
    """A command or configuration used the wrong way."""

    exit_code = 2
    kind = "usage"


class Refused(KeystoneError):
    """Input that will not become acceptable by retrying: wait for a new revision."""

    exit_code = 3
    kind = "refused"


class ValidationError(Refused):
    """A recipe, plan or config that does not validate.

    The message always says where: ``file:line: field: what was expected``.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.reason = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "")
        parts = [p for p in (where, self.field) if p]
        return ": ".join([*parts, self.reason])


class GraphError(ValidationError):
    """A dependency cycle or a missing hard dependency."""


class DuplicateKeyError(ValidationError):
    """A TOML key or table defined twice: ``duplicate key 'x' at f.toml:7, first defined at
    line 3``."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        first_line: int | None = None,
    ) -> None:
        self.first_line = first_line
        super().__init__(message, file=file, line=line, field=field)

    def _render(self) -> str:
        # The location sits inside the sentence, so it is not repeated as a prefix.
        where = (self.file or "") + (f":{self.line}" if self.line else "")
        first = f", first defined at line {self.first_line}" if self.first_line else ""
        at = f" at {where}" if where else ""
        return f"{self.reason}{at}{first}"


class LimitExceeded(ValidationError):
    """An input over one of the bounds of ``keystone.limits``; the message names the bound
    and how to raise it."""

    def __init__(
        self,
        message: str,
        *,
        bound: str,
        limit: int,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.bound = bound
        self.limit = limit
        super().__init__(message, file=file, line=line, field=field)


class VerificationError(Refused):
    """A revision or artifact that fails a trust check."""


class SignatureError(VerificationError):
    """A commit or artifact signature that does not verify."""


class RollbackRefused(VerificationError):
    """The new revision does not descend from the applied one."""


class StaleRevision(VerificationError):
    """The signed commit time is older than the configured max_age."""


class ArtifactIntegrityError(Refused):
    """An artifact whose bytes, signature or size is not what the recipe pins."""


class UnsafeArchiveError(Refused):
    """An archive that would write outside its directory or is over its bounds."""


class BundleError(Refused):
    """A bundle that is damaged, truncated or lacks what it needs."""


class Retryable(KeystoneError):
    """A failure that may pass: back off and try again."""

    kind = "retryable"


class SourceUnreachable(Retryable):
    """The git remote or bundle URL did not answer."""


class ArtifactFetchError(Retryable):
    """An artifact download failed after its retries."""


class AgentUnreachable(Retryable):
    """No agent answered at the address the CLI used."""


class ProcessError(KeystoneError):
    """A component process could not be spawned, signalled or stopped."""


class DeploymentFailed(KeystoneError):
    """A deployment failed; touched components were rolled back."""

    exit_code = 4
    kind = "rolled-back"

    def __init__(self, message: str, *, component: str | None = None) -> None:
        self.component = component
        super().__init__(message)

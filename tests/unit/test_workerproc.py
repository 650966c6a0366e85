"""The worker codec: error documents keep every field; answers are one bounded JSON object."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keystone import errors
from keystone.runtime.artifact_client import error_from
from keystone.runtime.artifacts import ArtifactDownloadError, ArtifactRefusedError
from keystone.workerproc import ErrorInfo, call, decode_answer, read_request, write_answer


class TestErrorInfo:
    @pytest.mark.parametrize(
        "exc",
        [
            errors.SignatureError("bad signature on abc"),
            errors.ValidationError("expected a string", file="plan.toml", line=3, field="name"),
            errors.DeploymentFailed("deployment failed", component="db"),
            errors.SourceUnreachable("no route"),
        ],
        ids=lambda e: type(e).__name__,
    )
    def test_round_trip_rebuilds_the_same_error(self, exc: errors.KeystoneError) -> None:
        """An error sent as JSON comes back as the same class with the same message and fields."""
        doc = json.loads(json.dumps(ErrorInfo.of(exc).to_json()))
        back = ErrorInfo.from_json(doc).to_exception()
        assert type(back) is type(exc) and str(back) == str(exc)
        for name in ("file", "line", "field", "component"):
            assert getattr(back, name, None) == getattr(exc, name, None)
        assert back.kind == exc.kind

    def test_every_field_is_in_the_document(self) -> None:
        """The document names type, kind, message and every context field, even when absent."""
        doc = ErrorInfo.of(errors.BundleError("damaged")).to_json()
        assert set(doc) == {
            "type",
            "kind",
            "message",
            "reason",
            "component",
            "uri",
            "file",
            "line",
            "field",
        }
        assert doc["type"] == "BundleError" and doc["kind"] == "refused"

    @pytest.mark.parametrize(
        ("doc", "cls"),
        [
            ({"type": "NoSuchError", "message": "x"}, errors.KeystoneError),
            ({"type": "ValueError", "message": "x"}, errors.KeystoneError),
            ({"message": "x"}, errors.KeystoneError),
        ],
    )
    def test_unknown_types_become_the_default(self, doc: dict[str, Any], cls: type) -> None:
        """A type that is not a Keystone error is built as the default class."""
        assert type(ErrorInfo.from_json(doc).to_exception()) is cls

    def test_generic_fields_survive_on_any_class(self) -> None:
        """reason, component and uri are set on the rebuilt error even when its class has none."""
        info = ErrorInfo("BundleError", "refused", "m", reason="r", component="c", uri="u")
        exc = info.to_exception()
        assert vars(exc)["reason"] == "r" and vars(exc)["component"] == "c"
        assert vars(exc)["uri"] == "u"


class TestArtifactErrors:
    @pytest.mark.parametrize(
        ("type_name", "cls", "base"),
        [
            ("ArtifactIntegrityError", ArtifactRefusedError, errors.ArtifactIntegrityError),
            ("ArtifactFetchError", ArtifactDownloadError, errors.ArtifactFetchError),
        ],
    )
    def test_reason_component_and_uri_are_kept(self, type_name: str, cls: type, base: type) -> None:
        """artifact_client raises the worker's error with its reason, component and uri."""
        exc = error_from(
            {
                "type": type_name,
                "message": "web: hash mismatch",
                "reason": "hash-mismatch",
                "component": "web",
                "uri": "https://example.com/a.tgz",
            }
        )
        assert isinstance(exc, cls) and isinstance(exc, base)
        assert (exc.reason, exc.component, exc.uri) == (  # type: ignore[attr-defined]
            "hash-mismatch",
            "web",
            "https://example.com/a.tgz",
        )
        assert str(exc) == "web: hash mismatch"

    @pytest.mark.parametrize(
        ("doc", "cls"),
        [
            ({"type": "DeploymentFailed", "message": "m"}, errors.ArtifactFetchError),
            ({"type": "Nope", "message": "m"}, errors.ArtifactFetchError),
            (
                {"type": "ValidationError", "message": "f:1: uri: bad"},
                errors.ValidationError,
            ),
        ],
    )
    def test_other_types(self, doc: dict[str, Any], cls: type) -> None:
        """A worker cannot claim a rolled-back deployment; unknown types are fetch errors."""
        assert type(error_from(doc)) is cls


class TestAnswers:
    @pytest.mark.parametrize(
        ("stdout", "truncated", "expected"),
        [
            (b'{"ok": true}', False, {"ok": True}),
            (b'{"ok": true}', True, None),
            (b"", False, None),
            (b"null", False, None),
            (b"[1]", False, None),
            (b"{}", False, None),
            (b"{not json", False, None),
            (b"\xff", False, None),
        ],
    )
    def test_decode(self, stdout: bytes, truncated: bool, expected: Any) -> None:
        """Only one whole, non-empty JSON object is an answer."""
        assert decode_answer(stdout, truncated=truncated) == expected

    def test_request_round_trip_and_bound(self) -> None:
        """A worker reads its request within a bound and writes one line of answer."""
        assert read_request(io.BytesIO(b'{"op": "x"}')) == {"op": "x"}
        with pytest.raises(errors.UsageError):
            read_request(io.BytesIO(b'{"op": "xxxxxxxx"}'), limit=4)
        with pytest.raises(errors.UsageError, match="not JSON"):
            read_request(io.BytesIO(b"garbage"))
        out = io.StringIO()
        write_answer({"ok": True}, out)
        assert out.getvalue() == '{"ok": true}\n'


@dataclass
class FakeResult:
    returncode: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    truncated: bool = False


class FakeRunner:
    """Records the command and answers with a fixed result."""

    def __init__(self, result: FakeResult) -> None:
        self.result = result
        self.calls: list[tuple[list[str], bytes | None, int]] = []

    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        timeout: float,
        input: bytes | None = None,
        max_output: int = 0,
    ) -> FakeResult:
        self.calls.append((list(argv), input, max_output))
        return self.result


class TestCall:
    @pytest.mark.parametrize(
        ("result", "answer"),
        [
            (FakeResult(stdout=b'{"ok": true}'), {"ok": True}),
            (FakeResult(stdout=b'{"ok": true}', timed_out=True, returncode=-9), None),
            (FakeResult(returncode=1, stderr=b"Traceback"), None),
            (FakeResult(stdout=b'{"ok": tr', truncated=True), None),
        ],
    )
    def test_one_request_one_answer(self, result: FakeResult, answer: Any) -> None:
        """The request goes on stdin as JSON; the reply carries the answer or says why not."""
        runner = FakeRunner(result)
        reply = asyncio.run(
            call(
                runner,
                "keystone.x",
                {"op": "fetch", "token": "s"},
                cwd=Path("."),
                env={},
                timeout=5,
                max_answer=123,
                python="py",
            )
        )
        assert reply.answer == answer and reply.timed_out == result.timed_out
        argv, stdin, bound = runner.calls[0]
        assert argv == ["py", "-m", "keystone.x"] and "s" not in argv
        assert json.loads(stdin or b"") == {"op": "fetch", "token": "s"} and bound == 123

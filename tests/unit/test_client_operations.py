"""Client.wait_operation: the agent holds each request until done; the client asks again only
after such a wait, and says so when its own timeout passes."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keystone.api import ApiServer
from keystone.client import OPERATION_WAIT, Client, OperationTimeout
from keystone.control import NotFound
from keystone.errors import UsageError

TOKEN = "operations-test-token"


class Operations:
    """An AgentControl with only operations: ``pending`` answers "running", then "done"."""

    def __init__(self, pending: int) -> None:
        self.pending = pending
        self.waits: list[float | None] = []
        self.lock = threading.Lock()

    def operation(self, op_id: str, *, wait: float | None = None) -> dict[str, Any]:
        with self.lock:
            self.waits.append(wait)
            if op_id != "op-1":
                raise NotFound(f"operation {op_id!r} is not known")
            state = "running" if len(self.waits) <= self.pending else "done"
        return {
            "id": op_id,
            "state": state,
            "result": {"result": "ok"} if state == "done" else None,
        }


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Operations, Client]]:
    control = Operations(request.param)
    server = ApiServer(control, listen="127.0.0.1:0", token=TOKEN, token_file=tmp_path / "t")  # type: ignore[arg-type]
    server.start()
    try:
        with Client(server.address, TOKEN, environ={"PATH": os.environ["PATH"]}) as client:
            yield control, client
    finally:
        server.stop()


class TestWaitOperation:
    @pytest.mark.parametrize("served", [0, 2], indirect=True)
    def test_returns_the_done_operation(self, served: tuple[Operations, Client]) -> None:
        """Each request asks the agent to hold it (at most OPERATION_WAIT); done comes back."""
        control, client = served
        op = client.wait_operation("op-1", timeout=600)
        assert op["state"] == "done" and op["result"] == {"result": "ok"}
        assert len(control.waits) == control.pending + 1
        assert all(w is not None and 0 < w <= OPERATION_WAIT for w in control.waits)

    @pytest.mark.parametrize("served", [5], indirect=True)
    def test_timeout_says_what_state_it_was_in(self, served: tuple[Operations, Client]) -> None:
        """With no time left the client asks once, without holding, and raises with the state."""
        control, client = served
        with pytest.raises(OperationTimeout) as info:
            client.wait_operation("op-1", timeout=0)
        assert info.value.operation["state"] == "running" and control.waits == [None]
        assert "running" in str(info.value)

    @pytest.mark.parametrize("served", [0], indirect=True)
    def test_unknown_operation(self, served: tuple[Operations, Client]) -> None:
        """An id the agent does not know is a 404 usage error."""
        _, client = served
        with pytest.raises(UsageError, match="not known"):
            client.wait_operation("op-9", timeout=5)

"""The CLI's API client against a real ApiServer: tokens, errors and exit codes, keep-alive,
streamed uploads with Expect 100-continue, --ssh through an ssh stand-in, HTTPS with mTLS."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from keystone.api import ApiServer, TlsConfig
from keystone.client import (
    ApiError,
    ApiRefused,
    ApiRolledBack,
    ApiUnavailable,
    ApiUsageError,
    Client,
    SshTarget,
    api_call,
    component_path,
    error_for,
    find_token,
    parse_ssh_target,
    ssh_command,
    token_files,
)
from keystone.control import Conflict, NotFound
from keystone.errors import (
    AgentUnreachable,
    BundleError,
    DeploymentFailed,
    SourceUnreachable,
    UsageError,
    ValidationError,
)
from tests.conftest import free_port

TOKEN = "client-test-token"


class Control:
    """A small AgentControl: fixed answers, recorded calls, a recipe store and plan in memory."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.lock = threading.Lock()
        self.store: dict[tuple[str, str], str] = {}
        self.plans: list[tuple[str, bool]] = []
        self.bundle: bytes = b""
        self.history_entries: list[dict[str, Any]] = []
        self.operations: dict[str, dict[str, Any]] = {}
        self.fail: dict[str, Exception] = {}

    def _rec(self, name: str, arg: Any = None) -> None:
        with self.lock:
            self.calls.append((name, arg))
        if name in self.fail:
            raise self.fail[name]

    def health(self) -> dict[str, Any]:
        self._rec("health")
        return {
            "status": "ok",
            "uptime": "1h2m5s",
            "closed": False,
            "time_utc": "2026-01-01T00:00:00Z",
            "clock_trusted": True,
            "clock_source": "system",
            "uptime_seconds": 3725.0,
            "components_status": "degraded",
            "version": "0.1.0",
            "device": "gw-1",
            "revision": "0123456789abcdef0123",
        }

    def components(self) -> list[dict[str, Any]]:
        self._rec("components")
        return [
            {"name": "api", "state": "running", "pid": 12, "restarts": 1, "version": "1.2.0",
             "last_health": "healthy", "recipe": "com.example.api", "phase": "healthy",
             "health_detail": "HTTP 200"},
            {"name": "db", "state": "failed", "pid": 0, "restarts": 5, "version": "1.0.0",
             "last_health": "unknown", "error": "exited 1", "recipe": "com.example.db",
             "phase": "failed", "health_detail": ""},
        ]  # fmt: skip

    def stop_component(self, name: str) -> None:
        self._rec("stop", name)
        if name not in ("api", "db"):
            raise NotFound(f"component {name!r} is not in the applied plan")

    def restart_component(self, name: str, *, wait: str | None, timeout: float, dry: bool) -> Any:
        self._rec("restart", (name, wait, timeout, dry))
        if name not in ("api", "db"):
            raise NotFound(f"component {name!r} is not in the applied plan")
        if dry:
            return {"stopOrder": ["api", name], "startOrder": [name, "api"]}
        return {"component": name, "pid": 77, "dependents": ["api"]}

    def recipes(self) -> list[dict[str, Any]]:
        self._rec("recipes")
        return [
            {"name": n, "version": v, "sha256": hashlib.sha256(t.encode()).hexdigest(), "path": ""}
            for (n, v), t in sorted(self.store.items())
        ]

    def recipe_files(self) -> list[str]:
        self._rec("recipe_files")
        return sorted(f"{n}-{v}.toml" for n, v in self.store)

    def upload_recipe(self, text: str, *, force: bool) -> dict[str, Any]:
        self._rec("upload", force)
        import tomllib

        meta = tomllib.loads(text)["metadata"]
        key = (meta["name"], meta["version"])
        if key in self.store and not force:
            raise Conflict(f"recipe {key[0]}:{key[1]} is already stored (use force)")
        replaced = key in self.store
        self.store[key] = text
        return {"name": key[0], "version": key[1], "replaced": replaced}

    def delete_recipe(self, name: str, version: str) -> None:
        self._rec("delete", (name, version))
        if self.store.pop((name, version), None) is None:
            raise NotFound(f"recipe {name}:{version} is not in the store")

    def plan_status(self) -> dict[str, Any]:
        self._rec("plan_status")
        return {"planPath": "api", "status": "running", "error": None, "unknownFields": [],
                "lastReconcile": None, "components": self.components()}  # fmt: skip

    def plan_graph(self) -> dict[str, Any]:
        self._rec("plan_graph")
        return {
            "nodes": ["db", "api"],
            "edges": [{"from": "api", "to": "db", "type": "hard"}],
            "order": [["db"], ["api"]],
        }

    def apply_plan(self, text: str, *, dry: bool) -> dict[str, Any]:
        self._rec("apply", dry)
        if "refuse-me" in text:
            raise ValidationError("unknown field x", file="request body", line=1)
        self.plans.append((text, dry))
        op: dict[str, Any] = {}
        if not dry:
            entry = {"time": 1.0 + len(self.plans), "kind": "apply", "result": "ok"}
            self.history_entries.insert(0, entry)
            op = {"operation": f"op-{len(self.plans)}"}
            self.operations[op["operation"]] = entry
        return {"status": "dry-run" if dry else "applying", "layers": [["db"], ["api"]],
                "actions": [{"action": "start", "component": "db", "version": "1", "layer": 0,
                             "reason": "added"}], "unknownFields": [], "warnings": [],
                **op}  # fmt: skip

    def operation(self, op_id: str, *, wait: float | None = None) -> dict[str, Any]:
        self._rec("operation", op_id)
        if op_id not in self.operations:
            raise NotFound(f"no operation {op_id}")
        # The entry object itself: a test may change the outcome after the apply returned.
        return {"id": op_id, "kind": "apply", "state": "done", "result": self.operations[op_id]}

    def reconcile(self) -> dict[str, Any]:
        self._rec("reconcile")
        return {"repaired": ["db"]}

    def stop_plan(self) -> None:
        self._rec("stop_plan")

    def metrics_text(self) -> tuple[bytes, str]:
        self._rec("metrics")
        return b"keystone_up 1\n", "text/plain; version=0.0.4; charset=utf-8"

    def drift(self) -> dict[str, Any]:
        self._rec("drift")
        return {"last_check": None, "checks": 0, "drifted": [], "components": []}

    def drift_check(self) -> dict[str, Any]:
        self._rec("drift_check")
        drift = {
            "drifted": True,
            "changed": 1,
            "added": 0,
            "removed": 0,
            "files": {"changed": ["bin/app"], "added": [], "removed": []},
            "checked": 3,
            "checked_at": 2.0,
        }
        return {"last_check": 2.0, "checks": 1, "drifted": ["api"],
                "components": [{"name": "api", "version": "1.2.0", "policy": "report",
                                "drift": drift}]}  # fmt: skip

    def revision(self) -> dict[str, Any]:
        self._rec("revision")
        return {"applied": "a" * 40, "last_known_good": "a" * 40, "source": "git",
                "signer": "ops@example.com", "applied_at": 1.0,
                "last_sync": {"result": "up-to-date", "revision": "a" * 40, "time": 2.0},
                "suspended": False}  # fmt: skip

    def sync(self, *, dry_run: bool, allow_rollback: bool, retry: bool = False) -> dict[str, Any]:
        self._rec("sync", (dry_run, allow_rollback, retry))
        return {"result": "up-to-date"}

    def history(self, *, limit: int) -> list[dict[str, Any]]:
        self._rec("history", limit)
        return self.history_entries[:limit]

    def rollback(self, *, to: str | None) -> dict[str, Any]:
        self._rec("rollback", to)
        raise DeploymentFailed("api failed its health check; rolled back to aaaa")

    def suspend(self) -> dict[str, Any]:
        self._rec("suspend")
        raise SourceUnreachable("git.example.com does not answer")

    def resume(self) -> dict[str, Any]:
        self._rec("resume")
        return {"suspended": False}

    def import_bundle(self, stream: BinaryIO, length: int | None) -> dict[str, Any]:
        self._rec("import", length)
        self.bundle = stream.read()
        if self.bundle.startswith(b"damaged"):
            raise BundleError("the bundle's pack is damaged")
        return {"result": "applied", "bytes": len(self.bundle)}


@pytest.fixture
def control() -> Control:
    return Control()


@pytest.fixture
def server(control: Control, tmp_path: Path) -> Iterator[ApiServer]:
    s = ApiServer(control, listen="127.0.0.1:0", token=TOKEN, token_file=tmp_path / "api.token")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def once(c: Client, method: str, path: str, **kw: Any) -> Any:
    """One request on a client that is closed afterwards."""
    with c:
        return c.request(method, path, **kw)


def client(server: ApiServer, **env: str) -> Client:
    """A Client for ``server`` with only ``env`` as its environment."""
    return Client(server.address, TOKEN, environ={"PATH": os.environ["PATH"], **env})


class TestSshTarget:
    @pytest.mark.parametrize(
        ("dest", "want"),
        [
            ("edge-001", SshTarget("edge-001")),
            ("ops@edge-001", SshTarget("ops@edge-001")),
            ("ops@edge-001:2222", SshTarget("ops@edge-001", "2222")),
            ("edge.example.com:22", SshTarget("edge.example.com", "22")),
            ("[::1]:2200", SshTarget("[::1]", "2200")),
            ("[fe80::1]", SshTarget("[fe80::1]")),
            ("ops@[::1]:22", SshTarget("ops@[::1]", "22")),
            ("::1", SshTarget("::1")),
            ("a@b@host", SshTarget("a@b@host")),
        ],
    )
    def test_valid(self, dest: str, want: SshTarget) -> None:
        """[user@]host[:port], bracketed IPv6 with a port, a bare IPv6 address without."""
        assert parse_ssh_target(dest) == want

    @pytest.mark.parametrize(
        "dest",
        ["", "  ", "-oProxyCommand=x", "@host", "host:", "host:port", "host:70000", "[::1",
         "[::1]x", "a:b:c", "ops@-x", "host name"],
    )  # fmt: skip
    def test_invalid(self, dest: str) -> None:
        """What ssh could read as an option, or what is not a destination, is misuse."""
        with pytest.raises(UsageError, match="--ssh"):
            parse_ssh_target(dest)

    @pytest.mark.parametrize(
        ("target", "host", "port", "want"),
        [
            (SshTarget("edge"), "127.0.0.1", 8080, ["edge", "-W", "127.0.0.1:8080"]),
            (SshTarget("ops@edge", "2222"), "localhost", 80,
             ["-p", "2222", "ops@edge", "-W", "localhost:80"]),
            (SshTarget("edge"), "::1", 8080, ["edge", "-W", "[::1]:8080"]),
        ],
    )  # fmt: skip
    def test_command(self, target: SshTarget, host: str, port: int, want: list[str]) -> None:
        """ssh -o LogLevel=ERROR [-p PORT] HOST -W host:port, as the Go keystonectl runs it."""
        assert ssh_command(target, host, port) == ["ssh", "-o", "LogLevel=ERROR", *want]


class TestToken:
    def test_order(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """--token, then KEYSTONE_API_TOKEN, then --runtime, KEYSTONE_RUNTIME, ./runtime."""
        monkeypatch.chdir(tmp_path)
        for d, tok in (("flag", "from-runtime-flag"), ("env", "from-runtime-env")):
            (tmp_path / d).mkdir()
            (tmp_path / d / "api.token").write_text(tok + "\n")
        (tmp_path / "runtime").mkdir()
        (tmp_path / "runtime" / "api.token").write_text("from-cwd\n")
        env = {"KEYSTONE_API_TOKEN": "from-env", "KEYSTONE_RUNTIME": str(tmp_path / "env")}
        rt = tmp_path / "flag"
        assert find_token("from-flag", runtime=rt, environ=env) == "from-flag"
        assert find_token(None, runtime=rt, environ=env) == "from-env"
        del env["KEYSTONE_API_TOKEN"]
        assert find_token(None, runtime=rt, environ=env) == "from-runtime-flag"
        assert find_token(None, environ=env) == "from-runtime-env"
        assert find_token(None, environ={}) == "from-cwd"
        assert token_files(None, {})[-1] == Path("/var/lib/keystone/api.token")

    def test_empty_and_unreadable_files_are_skipped(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An empty token file does not count; the next place is tried."""
        monkeypatch.chdir(tmp_path)
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "api.token").write_text("\n")
        (tmp_path / "runtime").mkdir()
        (tmp_path / "runtime" / "api.token").write_text("good\n")
        assert find_token(None, runtime=tmp_path / "a", environ={}) == "good"

    def test_through_ssh_no_local_file_is_used(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A local token file belongs to a local agent: with --ssh it is not sent."""
        monkeypatch.chdir(tmp_path)
        (tmp_path / "runtime").mkdir()
        (tmp_path / "runtime" / "api.token").write_text("local\n")
        assert Client(ssh="edge", environ={}).token is None
        assert Client(environ={}).token == "local"
        assert Client(ssh="edge", environ={"KEYSTONE_API_TOKEN": "t"}).token == "t"


class TestErrors:
    @pytest.mark.parametrize(
        ("status", "kind", "cls", "code"),
        [
            (400, "usage", ApiUsageError, 2),
            (404, "usage", ApiUsageError, 2),
            (409, None, ApiUsageError, 2),
            (400, "refused", ApiRefused, 3),
            (422, None, ApiRefused, 3),
            (500, "rolled-back", ApiRolledBack, 4),
            (503, "retryable", ApiUnavailable, 1),
            (504, None, ApiUnavailable, 1),
            (500, "error", ApiError, 1),
            (500, None, ApiError, 1),
        ],
    )
    def test_exit_code_by_kind(self, status: int, kind: str | None, cls: type, code: int) -> None:
        """The agent's kind picks the exit code: misuse 2, refused 3, rolled back 4, else 1."""
        err = error_for(status, "msg", kind)
        assert type(err) is cls and err.exit_code == code and err.status == status

    def test_nothing_listening(self) -> None:
        """No agent: AgentUnreachable says where and how to start one (exit 1)."""
        port = free_port()
        with pytest.raises(AgentUnreachable) as info:
            once(Client(f"http://127.0.0.1:{port}", "t", environ={}), "GET", "/healthz")
        msg = str(info.value)
        assert (
            f"no agent answers at http://127.0.0.1:{port}; start one with `keystone agent`" in msg
        )
        assert "(or pass --addr)" in msg and "refused" in msg
        assert info.value.exit_code == 1

    def test_default_address(self) -> None:
        """Without --addr or KEYSTONE_ADDR the client talks to http://127.0.0.1:8080."""
        c = Client(environ={})
        assert (c.base, c.host, c.port) == ("http://127.0.0.1:8080", "127.0.0.1", 8080)
        assert Client(environ={"KEYSTONE_ADDR": "10.0.0.1:9"}).base == "http://10.0.0.1:9"
        assert Client("https://h", environ={}).port == 443

    @pytest.mark.parametrize("addr", ["ftp://x", "http://", "http://h:port"])
    def test_bad_address(self, addr: str) -> None:
        """An --addr that is not an http(s) URL is misuse."""
        with pytest.raises(UsageError, match="--addr"):
            Client(addr, environ={})

    def test_answers_map_to_exceptions(self, server: ApiServer) -> None:
        """404 -> 2, a validation refusal -> 3, rolled back -> 4, source down -> 1."""
        with client(server) as c:
            with pytest.raises(ApiUsageError, match="ghost") as e404:
                c.post(component_path("ghost", "stop"))
            assert e404.value.status == 404
            with pytest.raises(ApiRefused, match="unknown field"):
                c.post("/v1/plan/apply", body=b"refuse-me", content_type="application/toml")
            with pytest.raises(ApiRolledBack, match="rolled back") as rb:
                c.post("/v1/rollback")
            assert rb.value.exit_code == 4
            with pytest.raises(ApiUnavailable, match="does not answer"):
                c.post("/v1/suspend")
            recipe = b'[metadata]\nname = "x"\nversion = "1"\n'
            c.post("/v1/recipes", body=recipe, content_type="application/toml")
            with pytest.raises(ApiUsageError, match="already stored") as conflict:
                c.post("/v1/recipes", body=recipe, content_type="application/toml")
            assert conflict.value.status == 409

    def test_wrong_token_says_how_to_fix(self, server: ApiServer) -> None:
        """401 is misuse (exit 2) and names --token, KEYSTONE_API_TOKEN and --runtime."""
        with pytest.raises(ApiUsageError) as info:
            once(Client(server.address, "wrong", environ={}), "GET", "/v1/components")
        assert info.value.status == 401 and info.value.exit_code == 2
        assert "--token" in str(info.value) and "KEYSTONE_RUNTIME" in str(info.value)


class TestRequests:
    def test_json_204_and_text(self, server: ApiServer, control: Control) -> None:
        """JSON answers are parsed, 204 is None, /metrics is text."""
        with client(server) as c:
            assert c.get("/healthz")["device"] == "gw-1"
            assert c.post(component_path("api", "stop")) is None
            assert c.get("/metrics") == "keystone_up 1\n"
        assert ("stop", "api") in control.calls

    def test_connection_is_reused(self, server: ApiServer) -> None:
        """One command's requests share one connection (keep-alive)."""
        with client(server) as c:
            c.get("/healthz")
            first = c._conn
            c.get("/v1/plan/status")
            c.get("/v1/components")
            assert c._conn is first and first is not None

    def test_a_closed_kept_connection_is_replaced(
        self, server: ApiServer, control: Control, tmp_path: Path
    ) -> None:
        """When the agent restarted between two requests, the second goes on a new connection."""
        port = int(server.address.rsplit(":", 1)[1])
        c = client(server)
        try:
            assert c.get("/healthz")["status"] == "ok"
            server.stop()
            again = ApiServer(
                control, listen=f"127.0.0.1:{port}", token=TOKEN, token_file=tmp_path / "t2"
            )
            again.start()
            try:
                assert c.get("/v1/components")[0]["name"] == "api"
            finally:
                again.stop()
        finally:
            c.close()

    def test_query_and_escaped_path(self, server: ApiServer, control: Control) -> None:
        """Parameters are encoded; a name cannot reshape the URL."""
        assert component_path("a/b c", "stop") == "/v1/components/a%2Fb%20c:stop"
        with client(server) as c:
            c.post(
                component_path("db", "restart"),
                params={"wait": "health", "timeout": "90s", "dry": "true"},
            )
        assert ("restart", ("db", "health", 90.0, True)) in control.calls

    def test_api_call_helper(self, server: ApiServer) -> None:
        """api_call is one request on a fresh connection (the GitOps commands use it)."""
        data = api_call(server.address, TOKEN, None, "POST", "/v1/sync", params={"dry": "true"})
        assert data == {"result": "up-to-date"}


class TestUploads:
    def test_large_stream_with_expect_continue(self, server: ApiServer, control: Control) -> None:
        """A 3 MiB file object is streamed (Expect: 100-continue) and arrives intact."""
        blob = os.urandom(3 << 20)
        with client(server) as c:
            answer = c.post(
                "/v1/bundles:import", body=io.BytesIO(blob), content_type="application/octet-stream"
            )
        assert answer == {"result": "applied", "bytes": len(blob)}
        assert control.bundle == blob

    def test_wrong_token_is_refused_before_the_body(
        self, server: ApiServer, control: Control
    ) -> None:
        """With Expect: 100-continue the agent answers 401 and the upload never starts."""
        with pytest.raises(ApiUsageError) as info:
            once(
                Client(server.address, "wrong", environ={}),
                "POST",
                "/v1/bundles:import",
                body=io.BytesIO(b"x" * (2 << 20)),
            )
        assert info.value.status == 401
        assert not [c for c in control.calls if c[0] == "import"]

    def test_over_the_bundle_limit_is_413(
        self, control: Control, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """KEYSTONE_MAX_BUNDLE_BYTES bounds a bundle upload; the agent is not called."""
        monkeypatch.setenv("KEYSTONE_MAX_BUNDLE_BYTES", str(1 << 20))
        s = ApiServer(control, listen="127.0.0.1:0", token=TOKEN, token_file=tmp_path / "t")
        s.start()
        try:
            with pytest.raises(ApiUsageError) as info, client(s) as c:
                c.post("/v1/bundles:import", body=b"x" * ((1 << 20) + 1))
            assert info.value.status == 413
            with client(s) as c:
                assert c.post("/v1/bundles:import", body=b"x" * (1 << 20))["bytes"] == 1 << 20
        finally:
            s.stop()
        assert [a for n, a in control.calls if n == "import"] == [1 << 20]

    def test_a_refused_bundle_is_refused_exit_3(self, server: ApiServer) -> None:
        """A damaged bundle is refused by the agent: 422, exit 3."""
        with pytest.raises(ApiRefused) as info, client(server) as c:
            c.post("/v1/bundles:import", body=b"damaged" + b"\0" * 100)
        assert info.value.status == 422 and info.value.exit_code == 3

    def test_large_body_over_the_request_cap(self, server: ApiServer, control: Control) -> None:
        """A 5 MiB recipe is answered 413 before it is sent, and the connection stays usable."""
        with client(server) as c:
            with pytest.raises(ApiUsageError) as info:
                c.post("/v1/recipes", body=b"#" * (5 << 20), content_type="application/toml")
            assert info.value.status == 413 and "4194304" in str(info.value)
            assert c.get("/healthz")["status"] == "ok"
        assert not [c for c in control.calls if c[0] == "upload"]


FAKE_SSH = r"""#!{python}
import json, os, socket, sys, threading
argv = sys.argv[1:]
with open(os.environ["FAKE_SSH_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\n")
if os.environ.get("FAKE_SSH_FAIL"):
    sys.stderr.write("ops@edge: Permission denied (publickey).\n")
    sys.exit(255)
host, _, port = argv[argv.index("-W") + 1].rpartition(":")
s = socket.create_connection((host.strip("[]"), int(port)))
def inbound():
    while True:
        data = os.read(0, 65536)
        if not data:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(data)
threading.Thread(target=inbound, daemon=True).start()
while True:
    data = s.recv(65536)
    if not data:
        break
    os.write(1, data)
"""


@pytest.fixture
def fake_ssh(tmp_path: Path) -> dict[str, str]:
    """An ``ssh`` on PATH that does what ``ssh -W host:port`` does, locally, and logs its argv."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "ssh"
    exe.write_text(FAKE_SSH.replace("{python}", sys.executable))
    exe.chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_SSH_LOG": str(tmp_path / "ssh.log")}


class TestSsh:
    def test_requests_go_through_ssh_w(self, server: ApiServer, fake_ssh: dict[str, str]) -> None:
        """--ssh runs ssh -W with --addr as seen from the far side; requests work through it."""
        port = int(server.address.rsplit(":", 1)[1])
        with Client(server.address, TOKEN, "ops@edge:2222", environ=fake_ssh) as c:
            assert c.get("/healthz")["status"] == "ok"
            assert c.get("/v1/components")[0]["name"] == "api"
        calls = [json.loads(x) for x in Path(fake_ssh["FAKE_SSH_LOG"]).read_text().splitlines()]
        assert calls == [
            ["-o", "LogLevel=ERROR", "-p", "2222", "ops@edge", "-W", f"127.0.0.1:{port}"]
        ]

    def test_ssh_failure_is_reported(self, fake_ssh: dict[str, str]) -> None:
        """When ssh fails, its own words reach the operator (exit 1)."""
        env = {**fake_ssh, "FAKE_SSH_FAIL": "1"}
        with pytest.raises(AgentUnreachable) as info:
            once(Client("http://127.0.0.1:8080", "t", "ops@edge", environ=env), "GET", "/healthz")
        msg = str(info.value)
        assert "through ssh ops@edge" in msg and "Permission denied" in msg
        assert "exited with 255" in msg

    def test_no_ssh_binary(self, tmp_path: Path) -> None:
        """Without an ssh client on PATH the error says to install one."""
        with pytest.raises(AgentUnreachable, match="cannot run ssh"):
            once(
                Client("http://127.0.0.1:1", "t", "edge", environ={"PATH": str(tmp_path)}),
                "GET",
                "/",
            )


def openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    openssl(d, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key")
    openssl(
        d, "req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-days", "2",
        "-out", f"{name}.pem", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def make_leaf(d: Path, name: str, ca: str, ext: str) -> None:
    openssl(d, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key")
    openssl(d, "req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr")
    (d / f"{name}.ext").write_text(ext)
    openssl(
        d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """openssl-made: a CA, a server certificate for 127.0.0.1, a client certificate from the CA,
    and a client certificate from another CA."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    leaf = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    make_leaf(
        d, "server", "ca", leaf + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n"
    )
    make_leaf(d, "client", "ca", leaf + "extendedKeyUsage=clientAuth\n")
    make_leaf(d, "rogue", "other-ca", leaf + "extendedKeyUsage=clientAuth\n")
    return d


@pytest.fixture
def mtls_server(control: Control, pki: Path, tmp_path: Path) -> Iterator[ApiServer]:
    tls = TlsConfig(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    s = ApiServer(control, listen="127.0.0.1:0", token=TOKEN, token_file=tmp_path / "t", tls=tls)
    s.start()
    try:
        yield s
    finally:
        s.stop()


class TestMutualTls:
    def test_client_with_a_certificate_from_the_ca(self, mtls_server: ApiServer, pki: Path) -> None:
        """A client certificate issued by the configured CA gets through (and the token too)."""
        assert mtls_server.address.startswith("https://127.0.0.1:")
        env = {
            "KEYSTONE_CA_CERT": str(pki / "ca.pem"),
            "KEYSTONE_CLIENT_CERT": str(pki / "client.pem"),
            "KEYSTONE_CLIENT_KEY": str(pki / "client.key"),
        }
        with Client(mtls_server.address, TOKEN, environ=env) as c:
            assert c.get("/v1/components")[0]["name"] == "api"
        with pytest.raises(ApiUsageError) as info:
            once(Client(mtls_server.address, "wrong", environ=env), "GET", "/v1/components")
        assert info.value.status == 401

    @pytest.mark.parametrize("cert", [None, "rogue"], ids=["no-certificate", "other-ca"])
    def test_client_without_a_certificate_from_the_ca_is_refused(
        self, mtls_server: ApiServer, pki: Path, control: Control, cert: str | None
    ) -> None:
        """No client certificate, or one from another CA: the TLS handshake fails, nothing runs."""
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        if cert:
            ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
        port = int(mtls_server.address.rsplit(":", 1)[1])
        request = (
            b"POST /v1/plan/stop HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 0\r\n\r\n".encode()
        )
        with (
            pytest.raises((ssl.SSLError, ConnectionError)),
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            # TLS 1.3: the client learns of the refusal when it reads.
            tls.sendall(request)
            if not tls.recv(1024):
                raise ConnectionResetError("closed without an answer")
        env = {"KEYSTONE_CA_CERT": str(pki / "ca.pem")}
        with pytest.raises(AgentUnreachable, match="TLS"):
            once(Client(mtls_server.address, TOKEN, environ=env), "GET", "/v1/components")
        assert control.calls == []

    def test_plain_http_to_a_tls_port_gets_nothing(self, mtls_server: ApiServer) -> None:
        """Speaking plain HTTP to the TLS port does not reach the API."""
        port = int(mtls_server.address.rsplit(":", 1)[1])
        with pytest.raises((AgentUnreachable, ApiError)):
            once(Client(f"http://127.0.0.1:{port}", TOKEN, environ={}), "GET", "/v1/components")

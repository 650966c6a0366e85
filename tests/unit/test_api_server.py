"""The API server over a tiny fake AgentControl: routing, auth, limits, errors, token file."""

from __future__ import annotations

import http.client
import json
import os
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from keystone.api import ROUTES, ApiServer, TlsConfig, resolve_token
from keystone.control import Conflict, NotFound
from keystone.errors import UsageError, ValidationError

TOKEN = "s3cret-token-for-tests"
FOUR_MIB = 4 << 20


class FakeControl:
    """An AgentControl that records every call and answers with fixed bodies."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.lock = threading.Lock()
        self.comps = {"db": 101, "api": 102}

    def _rec(self, name: str, *args: Any) -> None:
        with self.lock:
            self.calls.append((name, args))

    def mutations(self) -> list[str]:
        reads = {"health", "components", "recipes", "plan_status", "plan_graph", "metrics_text"}
        reads |= {"revision", "history"}
        return [n for n, _ in self.calls if n not in reads]

    def health(self) -> dict[str, Any]:
        self._rec("health")
        return {"status": "ok", "uptime": 1.0, "time_utc": "now", "revision": "abc"}

    def components(self) -> list[dict[str, Any]]:
        self._rec("components")
        return [{"name": n, "state": "healthy", "pid": p} for n, p in sorted(self.comps.items())]

    def stop_component(self, name: str) -> None:
        self._rec("stop_component", name)
        if name not in self.comps:
            raise NotFound(f"component {name!r} is not in the applied plan")

    def restart_component(self, name: str, *, wait: str | None, timeout: float, dry: bool) -> Any:
        self._rec("restart_component", name, wait, timeout, dry)
        if name not in self.comps:
            raise NotFound(f"component {name!r} is not in the applied plan")
        if wait == "health" and timeout < 1:
            raise TimeoutError(f"restart of {name} did not finish within {timeout:g}s")
        if dry:
            return {"stopOrder": [name], "startOrder": [name]}
        return {"component": name, "pid": 999, "dependents": []}

    def recipes(self) -> list[dict[str, Any]]:
        self._rec("recipes")
        return []

    def upload_recipe(self, text: str, *, force: bool) -> dict[str, Any]:
        self._rec("upload_recipe", text, force)
        if "exists" in text and not force:
            raise Conflict("recipe x:1 is already stored; pass force=true")
        return {"name": "x", "version": "1"}

    def delete_recipe(self, name: str, version: str) -> None:
        self._rec("delete_recipe", name, version)
        raise NotFound(f"recipe {name}:{version} is not in the store")

    def plan_status(self) -> dict[str, Any]:
        self._rec("plan_status")
        return {"status": "running"}

    def plan_graph(self) -> dict[str, Any]:
        self._rec("plan_graph")
        return {"nodes": ["db"], "edges": [], "order": [["db"]]}

    def apply_plan(self, text: str, *, dry: bool) -> dict[str, Any]:
        self._rec("apply_plan", text, dry)
        if "bad" in text:
            raise ValidationError("expected a table", file="request body", line=1, field="x")
        return {"status": "dry-run" if dry else "applying", "actions": [], "layers": []}

    def reconcile(self) -> dict[str, Any]:
        self._rec("reconcile")
        return {"repaired": []}

    def stop_plan(self) -> None:
        self._rec("stop_plan")

    def metrics_text(self) -> tuple[bytes, str]:
        self._rec("metrics_text")
        return b"# nothing\n", "text/plain; version=0.0.4; charset=utf-8"

    def revision(self) -> dict[str, Any]:
        self._rec("revision")
        return {"applied": None}

    def sync(self, *, dry_run: bool, allow_rollback: bool, retry: bool = False) -> dict[str, Any]:
        self._rec("sync", dry_run, allow_rollback, retry)
        return {"result": "up-to-date"}

    def history(self, *, limit: int) -> list[dict[str, Any]]:
        self._rec("history", limit)
        return []

    def rollback(self, *, to: str | None) -> dict[str, Any]:
        self._rec("rollback", to)
        return {"result": "up-to-date"}

    def suspend(self) -> dict[str, Any]:
        self._rec("suspend")
        return {"suspended": True}

    def resume(self) -> dict[str, Any]:
        self._rec("resume")
        return {"suspended": False}

    def import_bundle(self, stream: BinaryIO, length: int | None) -> dict[str, Any]:
        self._rec("import_bundle", length)
        stream.read()
        return {"result": "up-to-date"}


class Api:
    """A running ApiServer on 127.0.0.1 and a small client for it."""

    def __init__(self, server: ApiServer, control: FakeControl) -> None:
        self.server = server
        self.control = control
        self.port = int(server.address.rsplit(":", 1)[1])

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        token: str | None = TOKEN,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = raw
        return resp.status, data, resp


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    control = FakeControl()
    server = ApiServer(
        control, listen="127.0.0.1:0", token=TOKEN, token_file=tmp_path / "api.token"
    )
    server.start()
    try:
        yield Api(server, control)
    finally:
        server.stop()


def concrete(path: str) -> str:
    """A route's path template with its parameters filled in."""
    return path.replace("{name}", "db").replace("{version}", "1.0.0")


AUTH_ROUTES = [r for r in ROUTES if r.path != "/healthz"]


class TestAuth:
    def test_healthz_needs_no_token(self, api: Api) -> None:
        """/healthz answers without a token and carries the applied revision."""
        status, body, _ = api.request("GET", "/healthz", token=None)
        assert status == 200
        assert body["status"] == "ok" and body["revision"] == "abc"

    @pytest.mark.parametrize("route", AUTH_ROUTES, ids=lambda r: f"{r.method} {r.path}")
    @pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", TOKEN[:-1], ""])
    def test_every_other_route_needs_the_token(self, api: Api, route: Any, token: str) -> None:
        """Without the right bearer token every route but /healthz is 401 and calls nothing."""
        status, body, resp = api.request(route.method, concrete(route.path), b"{}", token=token)
        assert status == 401, body
        assert resp.getheader("WWW-Authenticate", "").startswith("Bearer")
        assert "token" in body["error"]
        assert api.control.calls == []

    @pytest.mark.parametrize(
        "header", [f"Basic {TOKEN}", TOKEN, f"Bearer  {TOKEN}x", f"Token {TOKEN}"]
    )
    def test_other_schemes_are_refused(self, api: Api, header: str) -> None:
        """Only the Bearer scheme with the exact token is accepted."""
        status, _, _ = api.request(
            "POST", "/v1/plan/stop", token=None, headers={"Authorization": header}
        )
        assert status == 401
        assert api.control.mutations() == []

    def test_right_token_is_accepted(self, api: Api) -> None:
        """The right token reaches the control."""
        status, body, _ = api.request("POST", "/v1/plan/stop")
        assert status == 204 and body is None
        assert api.control.mutations() == ["stop_plan"]


class TestRouting:
    def test_unknown_path_is_404(self, api: Api) -> None:
        """A path that no route serves is 404 with a pointer to the OpenAPI document."""
        status, body, _ = api.request("GET", "/v1/nope")
        assert status == 404 and "openapi" in body["error"]

    @pytest.mark.parametrize(
        ("method", "path", "allowed"),
        [
            ("GET", "/v1/plan/apply", {"POST"}),
            ("DELETE", "/v1/components", {"GET", "HEAD"}),
            ("PUT", "/v1/recipes", {"GET", "HEAD", "POST"}),
            ("POST", "/healthz", {"GET", "HEAD"}),
            ("GET", "/v1/components/db:stop", {"POST"}),
        ],
    )
    def test_wrong_method_is_405_with_allow(
        self, api: Api, method: str, path: str, allowed: set[str]
    ) -> None:
        """A known path with the wrong method is 405 and says which methods are allowed."""
        status, _, resp = api.request(method, path)
        assert status == 405
        allow = {m.strip() for m in resp.getheader("Allow", "").split(",")}
        assert allowed <= allow
        assert api.control.mutations() == []

    def test_unknown_component_is_404(self, api: Api) -> None:
        """Stopping or restarting a component that is not in the plan is 404."""
        for path in ("/v1/components/ghost:stop", "/v1/components/ghost:restart"):
            status, body, _ = api.request("POST", path)
            assert status == 404, body
            assert "ghost" in body["error"]

    def test_restart_parameters_reach_the_control(self, api: Api) -> None:
        """wait, timeout and dry are parsed from the query string."""
        status, body, _ = api.request(
            "POST", "/v1/components/db:restart?wait=pid&timeout=90s&dry=false"
        )
        assert status == 200 and body == {"component": "db", "pid": 999, "dependents": []}
        status, body, _ = api.request("POST", "/v1/components/db:restart?dry=true")
        assert status == 200 and body == {"stopOrder": ["db"], "startOrder": ["db"]}
        restarts = [a for n, a in api.control.calls if n == "restart_component"]
        assert restarts == [("db", "pid", 90.0, False), ("db", None, 60.0, True)]

    def test_restart_timeout_is_504(self, api: Api) -> None:
        """A restart that does not finish within its timeout answers 504."""
        status, body, _ = api.request("POST", "/v1/components/db:restart?wait=health&timeout=1ms")
        assert status == 504, body

    @pytest.mark.parametrize("query", ["wait=forever", "timeout=soon", "dry=maybe", "timeout=-1s"])
    def test_bad_query_is_400(self, api: Api, query: str) -> None:
        """A query parameter that does not parse is 400 naming it, and nothing is restarted."""
        status, body, _ = api.request("POST", f"/v1/components/db:restart?{query}")
        assert status == 400, body
        assert query.split("=")[0] in body["error"]
        assert api.control.mutations() == []

    def test_recipe_store_statuses(self, api: Api) -> None:
        """Upload is 201, a duplicate without force 409, a missing delete 404."""
        assert api.request("POST", "/v1/recipes", b"[metadata]\n")[0] == 201
        assert api.request("POST", "/v1/recipes", b"# exists\n")[0] == 409
        assert api.request("POST", "/v1/recipes?force=true", b"# exists\n")[0] == 201
        assert api.request("DELETE", "/v1/recipes/x/1")[0] == 404

    def test_apply_is_202_and_dry_reaches_the_control(self, api: Api) -> None:
        """A plan TOML body is applied (202); ?dry=true makes it a dry run."""
        plan = b'[[components]]\nname = "db"\nrecipe = "db:1"\n'
        status, body, _ = api.request("POST", "/v1/plan/apply", plan)
        assert status == 202 and body["status"] == "applying"
        status, body, _ = api.request("POST", "/v1/plan/apply?dry=true", plan)
        assert status == 202 and body["status"] == "dry-run"
        assert [a[1] for n, a in api.control.calls if n == "apply_plan"] == [False, True]

    def test_invalid_plan_is_400_with_where(self, api: Api) -> None:
        """A plan that does not validate is refused with its file, line and field."""
        status, body, _ = api.request("POST", "/v1/plan/apply", b"bad")
        assert status in (400, 422), body
        assert "request body:1: x: expected a table" in body["error"]

    @pytest.mark.parametrize("key", ["planPath", "path"])
    def test_a_plan_path_is_never_read(self, api: Api, key: str) -> None:
        """The Go agent's JSON planPath is refused: the API never reads a path a client names."""
        body = json.dumps({key: "/etc/passwd"}).encode()
        status, data, _ = api.request(
            "POST", "/v1/plan/apply", body, headers={"Content-Type": "application/json"}
        )
        assert status == 400
        assert key in data["error"]
        assert api.control.mutations() == []

    @pytest.mark.parametrize(
        ("path", "body"),
        [
            ("/v1/plan/apply", b'{"plan": '),
            ("/v1/recipes", b'{"recipe": "x",}'),
            ("/v1/plan/reconcile", b"{nope}"),
            ("/v1/components/db:stop", b'{"a": 1'),
        ],
    )
    def test_malformed_json_is_400_with_reason(self, api: Api, path: str, body: bytes) -> None:
        """Malformed JSON is 400 with the parser's reason and position, and changes nothing."""
        status, data, _ = api.request(
            "POST", path, body, headers={"Content-Type": "application/json"}
        )
        assert status == 400, data
        assert "JSON" in data["error"] and "line 1 column" in data["error"]
        assert api.control.mutations() == []

    def test_metrics_content_type(self, api: Api) -> None:
        """/metrics is Prometheus text, not JSON."""
        status, body, resp = api.request("GET", "/metrics")
        assert status == 200 and body == b"# nothing\n"
        assert resp.getheader("Content-Type", "").startswith("text/plain")

    def test_head_has_no_body(self, api: Api) -> None:
        """HEAD on a GET route answers the headers only."""
        status, body, resp = api.request("HEAD", "/v1/components")
        assert status == 200 and body is None
        assert int(resp.getheader("Content-Length", "0")) > 0


class TestBodies:
    def test_body_over_4_mib_is_413(self, api: Api) -> None:
        """A body one byte over 4 MiB is 413 and never reaches the control."""
        status, body, _ = api.request("POST", "/v1/plan/apply", b"#" * (FOUR_MIB + 1))
        assert status == 413, body
        assert str(FOUR_MIB) in body["error"]
        assert api.control.calls == []

    def test_body_of_4_mib_is_read(self, api: Api) -> None:
        """A body of exactly 4 MiB is accepted."""
        text = b"#" * (FOUR_MIB - 1) + b"\n"
        status, _, _ = api.request("POST", "/v1/recipes", text)
        assert status == 201
        assert [len(a[0]) for n, a in api.control.calls if n == "upload_recipe"] == [FOUR_MIB]

    def test_limit_from_environment(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """KEYSTONE_MAX_REQUEST_BYTES lowers the cap."""
        monkeypatch.setenv("KEYSTONE_MAX_REQUEST_BYTES", "1024")
        control = FakeControl()
        server = ApiServer(control, listen="127.0.0.1:0", token=TOKEN, token_file=tmp_path / "t")
        server.start()
        try:
            client = Api(server, control)
            assert client.request("POST", "/v1/recipes", b"#" * 1025)[0] == 413
            assert client.request("POST", "/v1/recipes", b"#" * 1024)[0] == 201
        finally:
            server.stop()

    def test_413_without_token_is_401(self, api: Api) -> None:
        """An oversized body without the token is answered 401: auth comes first."""
        status, _, _ = api.request("POST", "/v1/plan/apply", b"#" * (FOUR_MIB + 1), token=None)
        assert status == 401


class TestConcurrency:
    def test_twenty_clients_get_the_same_answer(self, api: Api) -> None:
        """Twenty concurrent clients, 10 requests each, all get 200 and the same body."""

        def client(_: int) -> list[tuple[int, Any]]:
            return [api.request("GET", "/v1/components")[:2] for _ in range(10)]

        with ThreadPoolExecutor(20) as pool:
            answers = [a for batch in pool.map(client, range(20)) for a in batch]
        assert len(answers) == 200
        assert {json.dumps(a) for a in answers} == {json.dumps(answers[0])}
        assert answers[0][0] == 200


class TestOpenApi:
    def test_document_describes_every_route(self, api: Api) -> None:
        """/v1/openapi.json lists every served route with its method, and no other."""
        status, doc, _ = api.request("GET", "/v1/openapi.json")
        assert status == 200
        assert doc["openapi"].startswith("3.")
        documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
        served = {(r.method, r.path) for r in ROUTES}
        assert documented == served

    def test_go_routes_are_present(self) -> None:
        """Every route of the Go Keystone is served."""
        served = {(r.method, r.path) for r in ROUTES}
        go = {
            ("GET", "/healthz"),
            ("GET", "/metrics"),
            ("GET", "/v1/components"),
            ("POST", "/v1/components/{name}:stop"),
            ("POST", "/v1/components/{name}:restart"),
            ("GET", "/v1/recipes"),
            ("POST", "/v1/recipes"),
            ("DELETE", "/v1/recipes/{name}/{version}"),
            ("GET", "/v1/plan/status"),
            ("GET", "/v1/plan/graph"),
            ("POST", "/v1/plan/apply"),
            ("POST", "/v1/plan/reconcile"),
            ("POST", "/v1/plan/stop"),
            ("GET", "/v1/openapi.json"),
        }
        assert go <= served

    def test_healthz_is_documented_without_security(self, api: Api) -> None:
        """The document says /healthz needs no token and the rest need a bearer token."""
        _, doc, _ = api.request("GET", "/v1/openapi.json")
        assert doc["paths"]["/healthz"]["get"].get("security") == []
        schemes = doc["components"]["securitySchemes"]
        assert any(s.get("scheme") == "bearer" for s in schemes.values())


class TestListen:
    @pytest.mark.parametrize("listen", ["0.0.0.0:0", ":0", "[::]:0", "192.0.2.1:0"])
    def test_beyond_loopback_needs_a_token_or_mtls(self, tmp_path: Path, listen: str) -> None:
        """Without an explicit token or mTLS, a non-loopback address refuses to start."""
        with pytest.raises(UsageError, match="loopback"):
            ApiServer(FakeControl(), listen=listen, token=None, token_file=tmp_path / "t")

    def test_beyond_loopback_with_an_explicit_token(self, tmp_path: Path) -> None:
        """An operator's token allows a non-loopback address (the server is not started here)."""
        server = ApiServer(FakeControl(), listen=":0", token=TOKEN, token_file=tmp_path / "t")
        assert server.host == "0.0.0.0"

    def test_beyond_loopback_with_mtls(self, tmp_path: Path, tls_files: dict[str, Path]) -> None:
        """TLS with a client CA allows a non-loopback address without an explicit token."""
        tls = TlsConfig(tls_files["cert"], tls_files["key"], tls_files["ca"])
        ApiServer(FakeControl(), listen=":0", token=None, token_file=tmp_path / "t", tls=tls)

    def test_tls_without_client_ca_is_not_enough(
        self, tmp_path: Path, tls_files: dict[str, Path]
    ) -> None:
        """Server TLS without client certificates does not open a non-loopback address."""
        tls = TlsConfig(tls_files["cert"], tls_files["key"], None)
        with pytest.raises(UsageError):
            ApiServer(FakeControl(), listen=":0", token=None, token_file=tmp_path / "t", tls=tls)

    @pytest.mark.parametrize("listen", ["127.0.0.1:0", "localhost:0", "[::1]:0", "127.0.0.2:0"])
    def test_loopback_with_generated_token(self, tmp_path: Path, listen: str) -> None:
        """A loopback address is fine with the generated token."""
        ApiServer(FakeControl(), listen=listen, token=None, token_file=tmp_path / "t")

    @pytest.mark.parametrize("listen", ["8080", "127.0.0.1", "host:port", "1.2.3.4:70000"])
    def test_bad_listen_is_usage(self, tmp_path: Path, listen: str) -> None:
        """A listen address that is not host:port is a usage error naming the form."""
        with pytest.raises(UsageError, match="host:port"):
            ApiServer(FakeControl(), listen=listen, token=TOKEN, token_file=tmp_path / "t")


class TestToken:
    def test_generated_at_first_start_with_mode_0600(self, tmp_path: Path) -> None:
        """Without KEYSTONE_API_TOKEN a random token is written to runtime/api.token, 0600."""
        old = os.umask(0)
        try:
            token = resolve_token(tmp_path, {})
        finally:
            os.umask(old)
        path = tmp_path / "api.token"
        assert path.read_text().strip() == token and len(token) >= 32
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def test_kept_across_starts(self, tmp_path: Path) -> None:
        """The second start reads the same token."""
        assert resolve_token(tmp_path, {}) == resolve_token(tmp_path, {})

    def test_two_runtimes_get_different_tokens(self, tmp_path: Path) -> None:
        """Tokens are random per runtime directory."""
        assert resolve_token(tmp_path / "a", {}) != resolve_token(tmp_path / "b", {})

    def test_environment_wins_and_writes_nothing(self, tmp_path: Path) -> None:
        """KEYSTONE_API_TOKEN is used as is; no file is written."""
        assert resolve_token(tmp_path, {"KEYSTONE_API_TOKEN": "from-env"}) == "from-env"
        assert not (tmp_path / "api.token").exists()

    def test_server_uses_generated_token(self, tmp_path: Path) -> None:
        """A server without a token accepts the one in its token file, and no other."""
        control = FakeControl()
        server = ApiServer(
            control, listen="127.0.0.1:0", token=None, token_file=tmp_path / "api.token"
        )
        server.start()
        try:
            client = Api(server, control)
            token = (tmp_path / "api.token").read_text().strip()
            assert client.request("GET", "/v1/components", token=token)[0] == 200
            assert client.request("GET", "/v1/components", token=TOKEN)[0] == 401
        finally:
            server.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 (made with cryptography)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "cert.pem").write_bytes(cert.public_bytes(pem))
    (d / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem"}


class TestKeepAlive:
    def test_nagle_is_off_for_answers(self) -> None:
        """Regression: with Nagle on, every answer after the first on a kept-alive connection
        waited 40 ms for the client's delayed ACK (23 requests/s); the handler turns it off."""
        from keystone.api.handler import Handler

        assert Handler.disable_nagle_algorithm is True

    def test_many_requests_on_one_connection(self, api: Api) -> None:
        """One kept-alive connection serves a series of requests, errors included."""
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
        try:
            for path, token, want in [
                ("/v1/components", TOKEN, 200),
                ("/v1/components", "wrong", 401),
                ("/v1/nope", TOKEN, 404),
                ("/healthz", None, 200),
                ("/v1/components", TOKEN, 200),
            ]:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                assert resp.status == want
                assert not resp.will_close
        finally:
            conn.close()

"""The CLI's HTTP client for the agent API: stdlib ``http.client`` (fast to import), token
discovery, and ``--ssh`` tunnels through ``ssh -W`` as the Go keystonectl does.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode, urlsplit

from keystone.errors import AgentUnreachable, KeystoneError, Refused, UsageError

DEFAULT_ADDR = "http://127.0.0.1:8080"


class ApiError(KeystoneError):
    """The agent answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class ApiRefused(ApiError, Refused):
    """The agent refused the request's content (422)."""


class ApiMisuse(ApiError, UsageError):
    """The request was wrong (400, 404, 405, 409, 413)."""


def find_token(token: str | None) -> str | None:
    """--token, then KEYSTONE_API_TOKEN, then the agent's ``api.token`` file."""
    if token:
        return token
    if os.environ.get("KEYSTONE_API_TOKEN"):
        return os.environ["KEYSTONE_API_TOKEN"]
    candidates = (
        [Path(os.environ["KEYSTONE_RUNTIME"])] if os.environ.get("KEYSTONE_RUNTIME") else []
    )
    candidates += [Path("runtime"), Path("/var/lib/keystone")]
    for d in candidates:
        try:
            text = (d / "api.token").read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return None


def _ssh_socket(ssh: str, host: str, port: int) -> socket.socket:
    """A socket whose other end is ``ssh -W host:port`` on the remote side."""
    target, _, ssh_port = ssh.partition(":") if ssh.count(":") == 1 else (ssh, "", "")
    ours, theirs = socket.socketpair()
    cmd = [
        "ssh",
        "-o",
        "BatchMode=yes",
        "-W",
        f"{host}:{port}",
        *(["-p", ssh_port] if ssh_port else []),
        target,
    ]
    try:
        subprocess.Popen(
            cmd,
            stdin=theirs.fileno(),
            stdout=theirs.fileno(),
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
    except FileNotFoundError:
        raise AgentUnreachable("--ssh needs the ssh client, which is not installed") from None
    theirs.close()
    return ours


def api_call(
    addr: str | None,
    token: str | None,
    ssh: str | None,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    body: bytes | BinaryIO | None = None,
    timeout: float = 600.0,
    content_type: str = "application/json",
) -> Any:
    """One request; returns the parsed JSON body (None for 204).

    Raises AgentUnreachable when nothing answers (with how to start an agent), ApiRefused for
    422, ApiMisuse for 4xx, ApiError otherwise.
    """
    base = (addr or os.environ.get("KEYSTONE_ADDR") or DEFAULT_ADDR).rstrip("/")
    if "://" not in base:
        base = "http://" + base
    url = urlsplit(base)
    host = url.hostname or "127.0.0.1"
    port = url.port or (443 if url.scheme == "https" else 80)
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        import ssl

        ctx = ssl.create_default_context(cafile=os.environ.get("KEYSTONE_CA_CERT"))
        cert, key = os.environ.get("KEYSTONE_CLIENT_CERT"), os.environ.get("KEYSTONE_CLIENT_KEY")
        if cert:
            ctx.load_cert_chain(cert, key)
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    ssh = ssh or os.environ.get("KEYSTONE_SSH") or None
    full = path + ("?" + urlencode(params) if params else "")
    headers = {"Accept": "application/json"}
    tok = find_token(token)
    if tok:
        headers["Authorization"] = f"Bearer {tok}"
    if body is not None:
        headers["Content-Type"] = content_type
        if not isinstance(body, bytes):
            body.seek(0, os.SEEK_END)
            headers["Content-Length"] = str(body.tell())
            body.seek(0)
    try:
        if ssh:
            conn.sock = _ssh_socket(ssh, host, port)
        conn.request(method, full, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (TimeoutError, ConnectionError, OSError, http.client.HTTPException) as exc:
        where = f"{base} (via ssh {ssh})" if ssh else base
        raise AgentUnreachable(
            f"no agent answers at {where} ({exc}); start one with `keystone agent` (or pass --addr / set KEYSTONE_ADDR)"
        ) from None
    finally:
        conn.close()
    data: Any = None
    if raw:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            data = raw.decode(errors="replace")
    if resp.status >= 400:
        message = data.get("error") if isinstance(data, dict) else str(data)
        if resp.status == 401:
            raise ApiError(
                401,
                f"{message}: pass --token or set KEYSTONE_API_TOKEN (or KEYSTONE_RUNTIME to find runtime/api.token)",
            )
        if resp.status == 422:
            raise ApiRefused(422, str(message))
        if resp.status in (400, 404, 405, 409, 411, 413):
            raise ApiMisuse(resp.status, str(message))
        raise ApiError(resp.status, f"agent answered HTTP {resp.status}: {message}")
    return data

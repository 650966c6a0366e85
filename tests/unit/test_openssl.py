"""keystone.openssl: asyncio without ssl until someone imports it, and digests without OpenSSL."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import ssl
import subprocess
import sys
import types
from pathlib import Path

import pytest

from keystone import openssl

REPO = Path(__file__).resolve().parents[2]

# What every asyncio module binds, and whether its ``ssl`` is the ssl module; printed as JSON.
SNAPSHOT = (
    "import json, ssl, sys\n"
    "mods = {n: m for n, m in sys.modules.items() if n == 'asyncio' or n.startswith('asyncio.')}\n"
    "print(json.dumps({n: {'names': sorted(vars(m)), 'ssl': vars(m).get('ssl', 0) is ssl,\n"
    "  'again': [c.__name__ for c in getattr(m, 'SSLAgainErrors', ())]}\n"
    "  for n, m in sorted(mods.items())}))\n"
)


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=REPO,  # tests.tlscert is importable
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


class TestAsyncioWithoutSsl:
    def test_asyncio_loads_without_ssl_or_libcrypto(self) -> None:
        code = (
            "import sys\n"
            "from keystone.openssl import asyncio_without_ssl\n"
            "assert asyncio_without_ssl()\n"
            "import asyncio\n"
            "assert asyncio.sslproto.ssl is None and asyncio.base_events.ssl is None\n"
            "print(sorted(m for m in ('ssl', '_ssl', 'hashlib', '_hashlib', 'hmac') "
            "if m in sys.modules))\n"
            "print(any('libcrypto' in line for line in open('/proc/self/maps')))\n"
        )
        assert _run(code) == "[]\nFalse\n"

    def test_after_import_ssl_asyncio_is_what_a_plain_import_gives(self) -> None:
        """Every asyncio module binds the same names, and its ssl is the ssl module, exactly as
        when asyncio imported ssl itself (this is what breaks if a Python adds a name)."""
        plain = json.loads(_run("import asyncio\n" + SNAPSHOT))
        lazy = json.loads(
            _run(
                "from keystone.openssl import asyncio_without_ssl\n"
                "assert asyncio_without_ssl()\n"
                "import asyncio\n" + SNAPSHOT
            )
        )
        assert lazy == plain
        assert plain["asyncio.sslproto"]["ssl"] and plain["asyncio.sslproto"]["again"]

    def test_the_first_import_of_ssl_keeps_its_own_loader_and_the_finder_leaves(self) -> None:
        code = (
            "import sys\n"
            "from keystone.openssl import asyncio_without_ssl\n"
            "asyncio_without_ssl()\n"
            "import ssl\n"
            "print(type(ssl.__loader__).__name__, type(ssl.__spec__.loader).__name__)\n"
            "print([type(f).__name__ for f in sys.meta_path if 'Ssl' in type(f).__name__])\n"
        )
        assert _run(code) == "SourceFileLoader SourceFileLoader\n[]\n"

    def test_a_tls_round_trip_on_the_loop_after_ssl_is_imported(self, tmp_path: Path) -> None:
        """A real TLS connection through asyncio streams, server and client, once ssl is in."""
        code = (
            "from keystone.openssl import asyncio_without_ssl\n"
            "assert asyncio_without_ssl()\n"
            "import asyncio, ssl\n"
            "from pathlib import Path\n"
            "from tests.tlscert import server_context\n"
            f"srv_ctx, cert = server_context(Path({str(tmp_path)!r}))\n"
            "cli_ctx = ssl.create_default_context(cafile=cert)\n"
            "async def echo(r, w):\n"
            "    w.write((await r.readline()).upper()); await w.drain(); w.close()\n"
            "async def main():\n"
            "    srv = await asyncio.start_server(echo, '127.0.0.1', 0, ssl=srv_ctx)\n"
            "    port = srv.sockets[0].getsockname()[1]\n"
            "    r, w = await asyncio.open_connection('127.0.0.1', port, ssl=cli_ctx)\n"
            "    w.write(b'hello\\n'); await w.drain()\n"
            "    print((await r.readline()).decode().strip(), w.get_extra_info('cipher') is not None)\n"
            "    w.close(); srv.close(); await srv.wait_closed()\n"
            "asyncio.run(main())\n"
        )
        assert _run(code) == "HELLO True\n"

    def test_does_nothing_once_asyncio_or_ssl_is_loaded(self) -> None:
        import asyncio

        assert asyncio.sslproto.ssl is ssl  # this process imported it plainly
        assert openssl.asyncio_without_ssl() is False


class TestDigests:
    @pytest.mark.parametrize("data", [b"", b"abc", bytes(range(256)) * 1000])
    def test_sha256_is_hashlibs(self, data: bytes) -> None:
        h = openssl.sha256(data)
        assert h.hexdigest() == hashlib.sha256(data).hexdigest()
        h.update(b"more")
        assert h.digest() == hashlib.sha256(data + b"more").digest()

    def test_sha256_is_built_in_not_openssl(self) -> None:
        assert type(openssl.sha256()).__module__ in ("_sha2", "_sha256")

    def test_tokens_have_the_secrets_format(self) -> None:
        assert re.fullmatch(r"[0-9a-f]{16}", openssl.token_hex(8))
        token = openssl.token_urlsafe(32)
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
        assert len({openssl.token_urlsafe(32) for _ in range(50)}) == 50

    @pytest.mark.parametrize(("a", "b"), [(b"x", b"x"), (b"x", b"y"), ("tok", "tok"), (b"", b"a")])
    def test_compare_digest_is_hmacs(self, a: bytes | str, b: bytes | str) -> None:
        assert openssl.compare_digest(a, b) == hmac.compare_digest(a, b)  # type: ignore[arg-type]

    def test_a_half_imported_ssl_is_no_tls_and_no_error(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """While another thread imports ssl, sys.modules already holds the module, empty: an
        API connection accepted then must not fail on a missing ssl.SSLSocket (seen in CI: a
        broker library imported ssl while the API answered, and the connection was dropped)."""
        monkeypatch.setitem(sys.modules, "ssl", types.ModuleType("ssl"))
        with socket.socket() as plain:
            assert not openssl.is_tls_socket(plain)
        assert not openssl.is_tls_error(OSError("x"))

    def test_tls_socket_and_error(self) -> None:
        with socket.socket() as plain:
            assert not openssl.is_tls_socket(plain)
            ctx = ssl.create_default_context()
            with ctx.wrap_socket(socket.socket(), server_hostname="x") as tls:
                assert openssl.is_tls_socket(tls)
        assert openssl.is_tls_error(ssl.SSLError(1, "x"))
        assert not openssl.is_tls_error(OSError("x"))

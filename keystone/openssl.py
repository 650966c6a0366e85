"""OpenSSL on demand: the resident agent loads libcrypto only when it first needs it.

Loading libcrypto costs a process about 4 MB of RSS (its text, touched at load, and its
providers), more than the whole event loop. Two standard modules load it on import: ``ssl``,
which asyncio imports for its TLS transports, and ``hashlib`` (and ``hmac`` and ``secrets``
through it). An agent that speaks no TLS and hashes no file needs neither, so:

- :func:`asyncio_without_ssl` imports asyncio with ``ssl`` withheld; asyncio's modules then hold
  ``ssl = None`` as on a Python built without it. The first ``import ssl`` afterwards, by anyone
  (a probe of an ``https://`` URL, a TLS API, a broker library), hands the module to them, so
  asyncio's TLS is then exactly what a plain import gives (``tests/unit/test_openssl.py``
  compares the two namespaces).
- :func:`sha256`, :func:`token_hex`, :func:`token_urlsafe` and :func:`compare_digest` are what
  ``hashlib``, ``secrets`` and ``hmac`` give without OpenSSL: CPython's built-in SHA-256 (about a
  third of OpenSSL's speed, for the short strings it is used on here), ``os.urandom`` (what
  ``secrets`` reads) and the constant-time comparison ``hmac`` falls back to. Files are still
  hashed by ``hashlib``, imported where they are read.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, cast

__all__ = [
    "Hash",
    "asyncio_without_ssl",
    "compare_digest",
    "is_tls_error",
    "is_tls_socket",
    "sha256",
    "token_hex",
    "token_urlsafe",
]

if TYPE_CHECKING:
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec


class Hash(Protocol):
    """What :func:`sha256` returns: the part of ``hashlib``'s hash objects keystone uses."""

    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...
    def hexdigest(self) -> str: ...


def _builtin_sha256() -> Callable[..., Hash]:
    # CPython's own SHA-256: _sha2 from 3.12, _sha256 before. A Python built without them
    # (--without-builtin-hashlib-hashes) has OpenSSL's.
    for name in ("_sha2", "_sha256"):
        try:
            return cast("Callable[..., Hash]", importlib.import_module(name).sha256)
        except (ImportError, AttributeError):
            continue
    import hashlib

    return hashlib.sha256


sha256: Callable[..., Hash] = _builtin_sha256()
"""``hashlib.sha256`` without OpenSSL: ``sha256(data).hexdigest()``."""

# What hmac.compare_digest is on a Python without OpenSSL: constant-time for equal lengths.
from _operator import _compare_digest as compare_digest  # noqa: E402


def token_hex(nbytes: int) -> str:
    """``secrets.token_hex``: ``nbytes`` random bytes from the kernel, as hex."""
    return os.urandom(nbytes).hex()


def token_urlsafe(nbytes: int) -> str:
    """``secrets.token_urlsafe``: ``nbytes`` random bytes, URL-safe base64 without padding."""
    import base64  # lazy: a plan check never makes a token

    return base64.urlsafe_b64encode(os.urandom(nbytes)).rstrip(b"=").decode("ascii")


def _ssl_class(name: str) -> type | None:
    # sys.modules holds ssl from the moment another thread starts importing it: until that
    # import has defined ``name`` there is no instance of it to find (and no attribute to read).
    cls = getattr(sys.modules.get("ssl"), name, None)
    return cls if isinstance(cls, type) else None


def is_tls_socket(sock: object) -> bool:
    """Whether ``sock`` is an ``ssl.SSLSocket``, without importing ssl (none exists before)."""
    cls = _ssl_class("SSLSocket")
    return cls is not None and isinstance(sock, cls)


def is_tls_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an ``ssl.SSLError``, without importing ssl."""
    cls = _ssl_class("SSLError")
    return cls is not None and isinstance(exc, cls)


# -- asyncio without ssl, until someone imports it -----------------------------------------------


def asyncio_without_ssl() -> bool:
    """Import asyncio with ``ssl`` withheld; whether it was (it is not when either is loaded)."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return False
    sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` raises ImportError
    try:
        import asyncio  # noqa: F401  # the point: imported now, without ssl
    finally:
        del sys.modules["ssl"]
    # A new list, never one changed in place: another thread may be iterating the old one.
    sys.meta_path = [_SslImport(), *sys.meta_path]
    return True


def _give_asyncio(ssl: ModuleType) -> None:
    """Hand ``ssl`` to the asyncio modules that were imported without it."""
    for name, module in list(sys.modules.items()):
        ours = name == "asyncio" or name.startswith("asyncio.")
        if ours and module is not None and "ssl" in vars(module) and vars(module)["ssl"] is None:
            setattr(module, "ssl", ssl)  # noqa: B010
    sslproto = sys.modules.get("asyncio.sslproto")
    if sslproto is not None and not hasattr(sslproto, "SSLAgainErrors"):
        # The one name sslproto defines at import only when ssl is there.
        setattr(sslproto, "SSLAgainErrors", (ssl.SSLWantReadError, ssl.SSLSyscallError))  # noqa: B010


class _SslImport:
    """A meta path finder that sees the first ``import ssl`` and completes asyncio after it."""

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name != "ssl":
            return None
        # Once: from here on, imports are the interpreter's own (a new list, as above).
        sys.meta_path = [f for f in sys.meta_path if f is not self]
        import importlib.util

        spec = importlib.util.find_spec("ssl")
        if spec is None or spec.loader is None:
            return spec
        spec.loader = cast("Loader", _Completing(spec.loader))
        return spec


class _Completing:
    """The ssl module's loader, which hands the module to asyncio once it has run."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self.loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The module keeps the interpreter's own loader, as a plain import leaves it.
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _give_asyncio(module)

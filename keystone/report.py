"""Signed device reports written back to a USB stick, and the device key that signs them.

The device key is an Ed25519 key pair made at the agent's first start::

    runtime/state/device.key   the private key (PKCS#8 PEM, mode 0600)
    runtime/state/device.pub   the public key (SubjectPublicKeyInfo PEM)

Its fingerprint is ``sha256:`` and the hex SHA-256 of the 32 raw public key bytes. A report is
one JSON document (docs/reports.md)::

    {"report": {...}, "signature": {"algorithm": "ed25519", "key": "<fingerprint>",
                                    "public_key": "<base64 raw key>", "value": "<base64>"}}

where ``value`` signs ``canonical(report)``: the report as JSON with sorted keys, no
whitespace, UTF-8 (``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)``).

The resident agent never imports cryptography: it reads the public key from its PEM with the
standard library, and key generation and signing run in a short-lived worker
(``python -m keystone.report``, one JSON request on stdin, one answer on stdout). Verification
(``keystone report verify``) runs in the CLI, where cryptography is loaded on demand.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keystone.openssl import sha256, token_hex

FORMAT = "keystone-report/1"
KEY_FILE = "device.key"
PUB_FILE = "device.pub"
ALGORITHM = "ed25519"
NAME_PREFIX = "keystone-report-"

# The DER of an Ed25519 SubjectPublicKeyInfo is this 12-byte header and the 32 key bytes.
_SPKI_ED25519 = bytes.fromhex("302a300506032b6570032100")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ReportRefused(Exception):
    """A report that does not verify: the reason is the message."""


def canonical(doc: Any) -> bytes:
    """The bytes a report signature covers."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def fingerprint(raw_public: bytes) -> str:
    """``sha256:<hex>`` of the 32 raw public key bytes."""
    return "sha256:" + sha256(raw_public).hexdigest()


def _pem_body(text: str) -> bytes:
    lines = [ln.strip() for ln in text.strip().splitlines()]
    body = "".join(ln for ln in lines if ln and not ln.startswith("-----"))
    try:
        return base64.b64decode(body, validate=True)
    except ValueError as exc:
        raise ValueError(f"not a PEM public key: {exc}") from None


def raw_public_from_pem(text: str) -> bytes:
    """The 32 raw bytes of an Ed25519 public key PEM (no cryptography needed)."""
    der = _pem_body(text)
    if len(der) != len(_SPKI_ED25519) + 32 or not der.startswith(_SPKI_ED25519):
        raise ValueError("not an Ed25519 public key (SubjectPublicKeyInfo PEM)")
    return der[len(_SPKI_ED25519) :]


def public_info(state_dir: Path) -> dict[str, str] | None:
    """The device key as status shows it (algorithm, base64 key, fingerprint, file), or None
    before it exists."""
    try:
        raw = raw_public_from_pem((state_dir / PUB_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {
        "algorithm": ALGORITHM,
        "public_key": base64.b64encode(raw).decode(),
        "fingerprint": fingerprint(raw),
        "file": str(state_dir / PUB_FILE),
    }


# --- the worker's side (cryptography) ---------------------------------------------------------


def generate_key(state_dir: Path) -> dict[str, str]:
    """Make the device key pair if there is none (the private key 0600); its public info."""
    # lazy: cryptography is loaded by the short-lived worker or CLI only, never by the agent
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key_path, pub_path = state_dir / KEY_FILE, state_dir / PUB_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    if not key_path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = state_dir / f".{KEY_FILE}.{token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, key_path)  # never replaces a key another process made meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    key = _load_private(key_path)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not pub_path.exists() or pub_path.read_bytes() != pub:
        tmp_pub = state_dir / f".{PUB_FILE}.{token_hex(4)}"
        tmp_pub.write_bytes(pub)
        os.replace(tmp_pub, pub_path)
    info = public_info(state_dir)
    assert info is not None
    return info


def _load_private(path: Path) -> Any:
    # lazy: see generate_key
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def sign_report(state_dir: Path, report: Mapping[str, Any]) -> dict[str, Any]:
    """The signed document of ``report`` (made with the device key, created if missing)."""
    info = generate_key(state_dir)
    key = _load_private(state_dir / KEY_FILE)
    body = canonical(report)
    value = key.sign(body)
    return {
        "report": json.loads(body),  # a copy: exactly what was signed
        "signature": {
            "algorithm": ALGORITHM,
            "key": info["fingerprint"],
            "public_key": info["public_key"],
            "value": base64.b64encode(value).decode(),
        },
    }


def handle(request: Mapping[str, Any]) -> dict[str, Any]:
    """One worker request: ``{"op": "keygen", "state": dir}`` or ``{"op": "sign", "state":
    dir, "report": {...}}``."""
    state = Path(str(request.get("state") or ""))
    op = request.get("op")
    try:
        if op == "keygen":
            return {"key": generate_key(state), "error": None}
        if op == "sign":
            report = request.get("report")
            if not isinstance(report, dict):
                return {"error": "'report' must be a JSON object"}
            return {"document": sign_report(state, report), "error": None}
    except (OSError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"error": f"unknown op {op!r}"}


def main() -> int:
    """``python -m keystone.report``: one request on stdin, one answer on stdout."""
    # The worker codec is light; imported here so that ``import keystone.report`` stays small.
    from keystone.workerproc import read_request, write_answer

    write_answer(handle(read_request()))
    return 0


# --- the report -------------------------------------------------------------------------------


def utc_stamp(when: float) -> str:
    """``20261202T014512Z``: the time part of a report's file name."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))


def report_path(directory: Path, device: str, when: float) -> Path:
    """A new report's path in ``directory``: ``keystone-report-<device>-<time>.json``, with a
    ``-2``, ``-3``... suffix if that name is taken (two imports in one second)."""
    safe = _UNSAFE.sub("_", device).strip("._") or "device"
    base = f"{NAME_PREFIX}{safe}-{utc_stamp(when)}"
    path = directory / f"{base}.json"
    n = 2
    while path.exists():
        path = directory / f"{base}-{n}.json"
        n += 1
    return path


def write_document(directory: Path, device: str, when: float, document: Mapping[str, Any]) -> Path:
    """Write a signed report next to a bundle (a temp file, fsync, then a rename that never
    replaces another report). Raises OSError (a read-only or full stick)."""
    data = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    tmp = directory / f".{NAME_PREFIX}{token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        while True:
            path = report_path(directory, device, when)
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                continue
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --- verification (the office) ----------------------------------------------------------------


@dataclass(frozen=True)
class Verified:
    """A report that verified: its device, fingerprint and content."""

    device: str
    fingerprint: str
    report: dict[str, Any]


def expected_key(spec: str) -> tuple[bytes | None, str]:
    """``--device-key K``: a public key PEM file (raw bytes, fingerprint) or a fingerprint
    (``sha256:<hex>`` or the bare hex; None bytes)."""
    path = Path(spec)
    if path.is_file():
        raw = raw_public_from_pem(path.read_text())
        return raw, fingerprint(raw)
    text = spec.strip().lower()
    if text.startswith("sha256:"):
        text = text[len("sha256:") :]
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise ValueError(
            f"{spec}: neither a public key file nor a fingerprint (sha256:<64 hex digits>)"
        )
    return None, "sha256:" + text


def verify_document(document: Any, key_spec: str) -> Verified:
    """Check a report's signature and that it was made by the device key ``key_spec``.

    Raises ReportRefused with the reason, ValueError for a ``key_spec`` that is neither.
    """
    want_raw, want_fp = expected_key(key_spec)
    if not isinstance(document, dict):
        raise ReportRefused("not a report: the document is not a JSON object")
    report, sig = document.get("report"), document.get("signature")
    if not isinstance(report, dict) or not isinstance(sig, dict):
        raise ReportRefused("not a report: 'report' and 'signature' objects are needed")
    if report.get("format") != FORMAT:
        raise ReportRefused(f"unknown report format {report.get('format')!r} (want {FORMAT})")
    if sig.get("algorithm") != ALGORITHM:
        raise ReportRefused(f"unsupported signature algorithm {sig.get('algorithm')!r}")
    try:
        raw = base64.b64decode(str(sig.get("public_key") or ""), validate=True)
        value = base64.b64decode(str(sig.get("value") or ""), validate=True)
    except ValueError:
        raise ReportRefused("the signature or its public key is not base64") from None
    if len(raw) != 32:
        raise ReportRefused("the signature's public key is not an Ed25519 key")
    got_fp = fingerprint(raw)
    if (want_raw is not None and raw != want_raw) or got_fp != want_fp:
        raise ReportRefused(f"signed by another key: {got_fp}, expected {want_fp}")
    if sig.get("key") != got_fp:
        raise ReportRefused("the signature names a key other than the one it carries")
    # lazy: cryptography only for the office's verify command
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(value, canonical(report))
    except InvalidSignature:
        raise ReportRefused("bad signature: the report was changed after it was signed") from None
    return Verified(str(report.get("device") or ""), got_fp, report)


def verify_file(path: Path, key_spec: str) -> Verified:
    """``keystone report verify FILE --device-key K``: raises ReportRefused, ValueError, OSError."""
    try:
        document = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise ReportRefused(f"not JSON: {exc}") from None
    return verify_document(document, key_spec)


if __name__ == "__main__":
    sys.exit(main())

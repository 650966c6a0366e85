"""OpenPGP commit signatures, judged through ``gpg --status-fd`` in a dedicated home (as git does)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from keystone.trust.verdict import Verdict, _refused

_TRUST_LEVELS = ("undefined", "never", "marginal", "fully", "ultimate")
_GPG_EXCLUSIVE = {
    "GOODSIG": "G",
    "BADSIG": "B",
    "ERRSIG": "E",
    "EXPSIG": "X",
    "EXPKEYSIG": "Y",
    "REVKEYSIG": "R",
}
GPG_TIMEOUT = 60.0


@dataclass(frozen=True)
class _GpgStatus:
    result: str = "N"
    key_id: str | None = None
    signer: str | None = None
    fingerprint: str | None = None
    primary_fingerprint: str | None = None
    trust: int = -1
    no_pubkey: bool = False
    multiple: bool = False


def _parse_gpg_status(text: str) -> _GpgStatus:
    """git's parse_gpg_output() over ``[GNUPG:]`` status lines."""
    result, key_id, signer, fpr, primary = "N", None, None, None, None
    trust, seen, no_pubkey = -1, 0, False
    for line in text.split("\n"):
        if not line.startswith("[GNUPG:] "):
            continue
        words = line[len("[GNUPG:] ") :].split(" ")
        status, args = words[0], words[1:]
        if status in _GPG_EXCLUSIVE:
            seen += 1
            if seen > 1:
                return _GpgStatus(result="E", multiple=True)
            result = _GPG_EXCLUSIVE[status]
            key_id = args[0] if args else None
            if status != "ERRSIG" and len(args) > 1:
                signer = " ".join(args[1:])
        elif status == "VALIDSIG" and args:
            fpr = args[0]
            primary = args[9] if len(args) > 9 else None
        elif status.startswith("TRUST_"):
            level = status[len("TRUST_") :].lower()
            if level not in _TRUST_LEVELS:
                return _GpgStatus(result="E")
            trust = _TRUST_LEVELS.index(level)
        elif status == "NO_PUBKEY":
            no_pubkey = True
    return _GpgStatus(result, key_id, signer, fpr, primary, trust, no_pubkey)


def _verify_openpgp(payload: bytes, armored: bytes, home: Path, min_trust: str) -> Verdict:
    gpg = shutil.which("gpg")
    if gpg is None:
        return _refused("openpgp", "gpg is not installed: install gnupg", "config")
    if not Path(home).is_dir():
        return _refused("openpgp", f"gpg_home {home} is not a directory", "config")
    env = {k: v for k, v in os.environ.items() if k != "GNUPGHOME"}
    env["LC_ALL"] = "C"
    with tempfile.TemporaryDirectory(prefix="keystone-gpg-") as tmp:
        sig_file, data_file = Path(tmp) / "commit.sig", Path(tmp) / "commit.payload"
        sig_file.write_bytes(armored)
        data_file.write_bytes(payload)
        cmd = [
            gpg,
            "--homedir",
            str(home),
            "--batch",
            "--no-tty",
            "--no-auto-key-retrieve",
            "--keyid-format=long",
            "--status-fd=1",
            "--verify",
            str(sig_file),
            str(data_file),
        ]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, env=env, timeout=GPG_TIMEOUT, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            return _refused("openpgp", f"gpg --verify took over {GPG_TIMEOUT:.0f}s", "error")
        except OSError as exc:
            return _refused("openpgp", f"cannot run gpg: {exc}", "config")
    out = proc.stdout.decode(errors="replace")
    st = _parse_gpg_status(out)
    fingerprint = st.primary_fingerprint or st.fingerprint
    signer = st.signer
    key = fingerprint or st.key_id or "?"

    def refuse(reason: str, kind: str) -> Verdict:
        return _refused("openpgp", reason, kind, fingerprint=fingerprint, signer=signer)

    if st.multiple:
        return refuse("more than one OpenPGP signature on the commit", "bad-signature")
    if st.result == "E" and st.no_pubkey:
        return refuse(f"OpenPGP key {st.key_id} is not in the keyring {home}", "untrusted")
    if st.result == "B":
        return refuse(
            f"bad OpenPGP signature by {key}: the commit does not match it", "bad-signature"
        )
    if st.result == "Y":
        return refuse(f"OpenPGP key {key} ({signer}) has expired", "expired")
    if st.result == "X":
        return refuse(f"OpenPGP signature by {key} has expired", "expired")
    if st.result == "R":
        return refuse(f"OpenPGP key {key} ({signer}) is revoked", "revoked")
    good = proc.returncode == 0 and "\n[GNUPG:] GOODSIG " in out and st.result == "G"
    if not good:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        detail = err[-1] if err else f"gpg exit status {proc.returncode}"
        return refuse(f"OpenPGP signature does not verify: {detail}", "bad-signature")
    need = _TRUST_LEVELS.index(min_trust)
    if st.trust < need:
        have = _TRUST_LEVELS[st.trust] if st.trust >= 0 else "unknown"
        why = f"OpenPGP key {key} ({signer}) has trust {have}, below gpg_min_trust {min_trust}"
        return refuse(f"{why}; set its ownertrust in {home}", "untrusted")
    return Verdict(True, "openpgp", signer, fingerprint, "good signature", "good")

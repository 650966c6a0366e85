"""Allowed-signers and revocation files (``man ssh-keygen``), and the decision git reaches with them.

The decision is ``ssh-keygen -Y find-principals`` and then ``-Y verify`` per principal, at the
commit's committer time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from keystone.errors import ValidationError
from keystone.trust.patterns import (
    _fmt_time,
    match_pattern,
    match_pattern_list,
    parse_absolute_time,
)
from keystone.trust.sshkey import KEY_TYPES, SshKey, _read_key_text


@dataclass(frozen=True)
class AllowedSigner:
    """One line of an allowed-signers file.

    Attributes:
        principals: the comma-separated principal pattern list, as written.
        key: the public key (the CA key when ``cert_authority``).
        namespaces: the ``namespaces="..."`` pattern list, or ``None`` (any namespace).
        valid_after: ``valid-after`` in epoch seconds, or ``None``.
        valid_before: ``valid-before`` in epoch seconds, or ``None``.
        cert_authority: the key is a CA that certifies the signers.
        file: the file it came from. line: its line number (1-based).
    """

    principals: str
    key: SshKey
    namespaces: str | None = None
    valid_after: int | None = None
    valid_before: int | None = None
    cert_authority: bool = False
    file: str = ""
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


_WS = " \t\r\n"


def _strdelimw(s: str) -> tuple[str | None, str | None]:
    """OpenSSH ``strdelimw()``: the first whitespace-delimited (or quoted) token and the rest."""
    idx = next((i for i, c in enumerate(s) if c in _WS or c == '"'), -1)
    if idx < 0:
        return s, None
    if s[idx] == '"':
        s = s[:idx] + s[idx + 1 :]
        close = s.find('"', idx)
        if close < 0:
            return None, None
        return s[:close], s[close + 1 :].lstrip(_WS)
    return s[:idx], s[idx + 1 :].lstrip(_WS)


def _advance_past_options(s: str) -> int:
    """OpenSSH ``sshkey_advance_past_options()``: index of the first unquoted blank, or -1."""
    quoted = False
    i = 0
    while i < len(s) and (quoted or s[i] not in " \t"):
        if s[i] == "\\" and s[i + 1 : i + 2] == '"':
            i += 1
        elif s[i] == '"':
            quoted = not quoted
        i += 1
    return -1 if (i == len(s) and quoted) else i


def _dequote(opts: str, i: int) -> tuple[str, int]:
    """OpenSSH ``opt_dequote()`` from ``opts[i]``: the quoted value and the index after it."""
    if opts[i : i + 1] != '"':
        raise ValueError("missing start quote")
    i += 1
    out = []
    while i < len(opts) and opts[i] != '"':
        if opts[i] == "\\" and opts[i + 1 : i + 2] == '"':
            i += 1
        out.append(opts[i])
        i += 1
    if i >= len(opts):
        raise ValueError("missing end quote")
    return "".join(out), i + 1


def _parse_options(opts: str) -> tuple[str | None, int | None, int | None, bool]:
    """OpenSSH ``sshsigopt_parse()``: namespaces, valid-after, valid-before, cert-authority."""
    namespaces: str | None = None
    after: int | None = None
    before: int | None = None
    ca = False
    i = 0
    while i < len(opts) and opts[i] not in " \t":
        low = opts[i:].lower()
        if low.startswith("cert-authority"):
            ca = True
            i += len("cert-authority")
        elif low.startswith("namespaces="):
            if namespaces is not None:
                raise ValueError('multiple "namespaces" clauses')
            namespaces, i = _dequote(opts, i + len("namespaces="))
        elif low.startswith(("valid-after=", "valid-before=")):
            name = "valid-after" if low.startswith("valid-after=") else "valid-before"
            if (after if name == "valid-after" else before) is not None:
                raise ValueError(f'multiple "{name}" clauses')
            value, i = _dequote(opts, i + len(name) + 1)
            try:
                when = parse_absolute_time(value)
            except ValueError as exc:
                raise ValueError(f'invalid "{name}" time: {exc}') from exc
            if name == "valid-after":
                after = when
            else:
                before = when
        if i >= len(opts) or opts[i] in " \t":
            break
        if opts[i] != ",":
            raise ValueError(f"unknown key option at {opts[i:]!r}")
        i += 1
        if i >= len(opts):
            raise ValueError("unexpected end of options")
    if after is not None and before is not None and before <= after:
        raise ValueError('"valid-before" time is not after "valid-after"')
    return namespaces, after, before, ca


def parse_allowed_signers_line(text: str, *, file: str = "", line: int = 0) -> AllowedSigner | None:
    """Parse one allowed-signers line with OpenSSH's grammar.

    ``principal[,principal...] [options] keytype base64 [comment]``; blank lines and ``#``
    comments give ``None``.

    Raises:
        ValidationError: the line is malformed (with ``file`` and ``line``).
    """

    def bad(reason: str) -> ValidationError:
        return ValidationError(
            f"{reason}; expected 'principal[,principal] [options] keytype base64' "
            "(man ssh-keygen, ALLOWED SIGNERS)",
            file=file or None,
            line=line or None,
        )

    cp = text.lstrip(" \t")
    if not cp or cp[0] in "#\r\n":
        return None
    principals, rest = _strdelimw(cp)
    if principals is None or rest is None:
        raise bad("a line needs principals and a key")
    if not principals:
        raise bad("empty principal list")
    key, _comment, why = _read_key_text(rest)
    namespaces = after = before = None
    ca = False
    if key is None:
        first = rest.split(None, 1)[0] if rest.strip() else ""
        if not first:
            raise bad("missing key")
        if first in KEY_TYPES:  # no options: the key itself is wrong
            raise bad(f"invalid key: {why}")
        end = _advance_past_options(rest)
        if end < 0:
            raise bad("invalid options (unterminated quote)")
        opts = rest[:end]
        key_text = rest[end:].lstrip(" \t")
        if not key_text.strip(_WS):
            raise bad("missing key" if opts else why)
        key, _comment, why = _read_key_text(key_text)
        if key is None:
            raise bad(f"invalid key: {why}")
        try:
            namespaces, after, before, ca = _parse_options(opts)
        except ValueError as exc:
            raise bad(f"bad options: {exc}") from exc
    return AllowedSigner(principals, key, namespaces, after, before, ca, file, line)


def _read_lines(path: Path, what: str) -> list[str]:
    """The lines of a trust file, split on newlines only (as OpenSSH's getline() loop)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValidationError(
            f"cannot read the {what} ({exc.strerror or exc}); check [trust] in the agent config",
            file=str(path),
        ) from exc
    lines = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            lines.append(raw.decode() + "\n")
        except UnicodeDecodeError as exc:
            raise ValidationError(
                f"the {what} is not UTF-8 text", file=str(path), line=number
            ) from exc
    if lines and lines[-1] == "\n":
        lines.pop()  # the empty piece after the final newline
    return lines


def load_allowed_signers(path: Path | str) -> list[AllowedSigner]:
    """Read an allowed-signers file in git's/OpenSSH's format.

    Every line must parse: a bad line is reported rather than skipped, because a typo in a
    trust store should be fixed, not silently ignored. Time limits are not judged here: an
    expired line is valid and only matters for signatures it could have matched.

    Raises:
        ValidationError: unreadable file, or a bad line (``file`` and ``line`` set).
    """
    entries = []
    for number, text in enumerate(_read_lines(Path(path), "allowed signers file"), 1):
        entry = parse_allowed_signers_line(text, file=str(path), line=number)
        if entry is not None:
            entries.append(entry)
    return entries


def load_revoked_keys(path: Path | str) -> list[SshKey]:
    """Read a revocation list: one public key per line (``keytype base64 [comment]``).

    OpenSSH's binary KRL format is not read. As in OpenSSH, an RSA key below 1024 bits is
    skipped; any other bad line is an error (a revocation list that cannot be read fails
    closed).

    Raises:
        ValidationError: unreadable file, a KRL, or a bad line (``file`` and ``line`` set).
    """
    p = Path(path)
    try:
        if p.read_bytes().startswith(b"SSHKRL\n\0"):
            raise ValidationError(
                "binary KRL revocation lists are not supported; list the revoked public keys, "
                "one 'keytype base64' per line",
                file=str(p),
            )
    except OSError:
        pass  # reported with its reason by _read_lines
    keys = []
    for number, text in enumerate(_read_lines(p, "revoked keys file"), 1):
        cp = text.lstrip(" \t")
        if not cp or cp[0] in "#\r\n":
            continue
        key, _rest, why = _read_key_text(cp)
        if key is None:
            if "bits, below" in why:
                continue
            raise ValidationError(
                f"{why}; expected one 'keytype base64 [comment]' per line",
                file=str(p),
                line=number,
            )
        keys.append(key)
    return keys


# --------------------------------------------------------------------------------------------
# The allowed-signers decision (ssh-keygen -Y find-principals, then -Y verify per principal)
# --------------------------------------------------------------------------------------------


@dataclass
class _LineCheck:
    ok: bool
    principals: str = ""
    reason: str = ""  # why a line whose key matched was not accepted ("" = key did not match)
    kind: str = ""


def _cert_check(key: SshKey, verify_time: int, name: str | None) -> str | None:
    """OpenSSH ``sshkey_cert_check_authority()`` as sshsig uses it; None or the reason.

    A user certificate, valid at ``verify_time``, with principals, listing ``name`` exactly.
    """
    cert = key.cert
    assert cert is not None
    if cert.cert_type != 1:
        return "certificate is not a user certificate"
    if verify_time < cert.valid_after:
        return f"certificate is not valid before {_fmt_time(cert.valid_after)}"
    if verify_time >= cert.valid_before:
        return f"certificate expired at {_fmt_time(cert.valid_before)}"
    if not cert.principals:
        return "certificate lists no principals"
    if name is not None and name not in cert.principals:
        return f"certificate does not list principal {name}"
    return None


def _check_line(
    entry: AllowedSigner,
    key: SshKey,
    principal: str | None,
    namespace: str | None,
    verify_time: int,
    commit_time: int,
) -> _LineCheck:
    """OpenSSH ``check_allowed_keys_line()``."""
    plain_match = not entry.cert_authority and entry.key.same_key(key)
    ca_match = entry.cert_authority and key.cert is not None and key.cert.ca.same_public(entry.key)
    if principal is not None:
        hit = match_pattern_list(principal, entry.principals)
        if hit != 1:
            if hit == -1 and (plain_match or ca_match):
                return _LineCheck(
                    False,
                    reason=f"principal {principal} is excluded by a negated pattern in "
                    f'"{entry.principals}" ({entry.where})',
                    kind="untrusted",
                )
            return _LineCheck(False)
    principals = entry.principals
    who = principal or entry.principals
    if plain_match:
        pass
    elif ca_match:
        assert key.cert is not None
        if principal is not None:
            why = _cert_check(key, verify_time, principal)
            if why:
                return _LineCheck(False, reason=f"{why} ({entry.where})", kind="untrusted")
        else:
            # cert_filter_principals(): if the certificate is valid, those of its principals
            # that a pattern of the line matches (each pattern alone: "!" is not negation here;
            # the list ends at an empty item).
            why = _cert_check(key, verify_time, None)
            names: list[str] = []
            for pattern in [] if why else entry.principals.split(","):
                if not pattern:
                    break
                names += [p for p in key.cert.principals if match_pattern(p, pattern)]
            if not names:
                reason = why or "no principal of the certificate is allowed by this line"
                return _LineCheck(False, reason=f"{reason} ({entry.where})", kind="untrusted")
            principals = ",".join(names)
    else:
        return _LineCheck(False)
    if (
        namespace is not None
        and entry.namespaces is not None
        and match_pattern_list(namespace, entry.namespaces) != 1
    ):
        return _LineCheck(
            False,
            reason=f'signer {who} may not sign namespace "{namespace}" '
            f'(namespaces="{entry.namespaces}" at {entry.where})',
            kind="namespace",
        )
    when = f"commit time {_fmt_time(commit_time)}"
    if entry.valid_after is not None and verify_time < entry.valid_after:
        return _LineCheck(
            False,
            reason=f"signer {who} is not valid before {_fmt_time(entry.valid_after)} "
            f"({when}, {entry.where})",
            kind="not-yet-valid",
        )
    if entry.valid_before is not None and verify_time > entry.valid_before:
        return _LineCheck(
            False,
            reason=f"signer {who} expired at {_fmt_time(entry.valid_before)} "
            f"({when}, {entry.where})",
            kind="expired",
        )
    return _LineCheck(True, principals)


def _judge_allowed(
    entries: list[AllowedSigner], key: SshKey, verify_time: int, commit_time: int, file: str
) -> tuple[str | None, str, str]:
    """git's two ssh-keygen steps over ``entries``: the accepted principal, or the reason why not.

    Returns:
        ``(principal, reason, kind)``; ``principal`` is ``None`` when refused.
    """
    reasons: list[tuple[str, str]] = []
    found: str | None = None
    chosen: AllowedSigner | None = None
    for entry in entries:  # -Y find-principals: the first line with the key, in time
        check = _check_line(entry, key, None, None, verify_time, commit_time)
        if check.ok:
            found, chosen = check.principals, entry
            break
        if check.reason:
            reasons.append((check.reason, check.kind))
    if found is None or chosen is None:
        if reasons:
            return None, reasons[0][0], reasons[0][1]
        what = f"key {key.fingerprint}"
        if key.cert is not None:
            what = f"certificate {key.fingerprint} (CA {key.cert.ca.fingerprint})"
        return None, f"{what} is not in allowed signers {file}", "untrusted"
    candidates = []
    for name in found.split(","):  # ssh-keygen prints them one per line, up to an empty one
        if not name:
            break
        candidates.append(name)
    # The reason to report is the one of the line find-principals chose, if it has one.
    reasons = []
    own: list[tuple[str, str]] = []
    for name in candidates:  # -Y verify -n git -I name, for each until one is good
        for entry in entries:
            check = _check_line(entry, key, name, "git", verify_time, commit_time)
            if check.ok:
                return name, "good signature", "good"
            if check.reason:
                (own if entry is chosen else reasons).append((check.reason, check.kind))
    if own or reasons:
        return None, *(own or reasons)[0]
    return (
        None,
        f"key {key.fingerprint} matches allowed signers {file}, but no line accepts its "
        f"principals ({', '.join(candidates) or 'none'}) for namespace git",
        "untrusted",
    )

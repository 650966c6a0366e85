"""Air-gapped bundles: one file carrying a commit of the fleet repository and its artifacts.

Two kinds of file are accepted:

* A **Keystone bundle** (``kind="keystone"``): an uncompressed POSIX tar archive, so that
  ``tar tvf`` shows what is inside, with exactly these members in this order::

      keystone-bundle.json     manifest (below)
      repo.bundle              a standard git bundle (v2) of the fleet repository
      artifacts/<sha256>       one member per artifact, named by its content hash

  The manifest is JSON with sorted keys::

      {"format": "keystone-bundle", "version": 1,
       "revision": "<commit id>", "ref": "refs/heads/main", "prerequisites": ["<commit id>", ...],
       "repo": {"size": N, "sha256": "<hex>"},
       "artifacts": [{"sha256": "<hex>", "size": N, "name": "api.tar.gz"}, ...]}

  Every tar header has mtime 0, uid/gid 0, no user names and mode 0644; artifacts are stored
  sorted by hash; the git pack holds whole (undeltified) objects in a fixed order, compressed at
  a fixed level. The same commit and artifacts therefore always give the same bytes.

* A **plain git bundle** (``kind="git"``) as ``git bundle create`` writes it (v2 or v3,
  sha1). Its artifacts are then fetched from their URIs by the caller.

Import adds the pack with dulwich's ``add_thin_pack`` through :meth:`GitMirror.ingest_pack`
(quarantined and checked); dulwich's ``Bundle.store_objects`` and ``BundleClient.fetch`` are
not used because they fail on bundles made by git and on incremental ones (DESIGN section 9).
Prerequisites are checked against the mirror first. Refs change only after everything checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Literal

from keystone.errors import ArtifactIntegrityError, BundleError, KeystoneError, ValidationError
from keystone.sources.base import PackTooLarge
from keystone.sources.git import FETCHED_REF, GitMirror, PackRejected

__all__ = [
    "BundleArtifact",
    "BundleInfo",
    "create_bundle",
    "extract_bundle_artifact",
    "import_bundle",
    "inspect_bundle",
    "write_git_bundle",
]

FORMAT = "keystone-bundle"
FORMAT_VERSION = 1
MANIFEST_MEMBER = "keystone-bundle.json"
REPO_MEMBER = "repo.bundle"
ARTIFACT_PREFIX = "artifacts/"

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_GIT_HEADER_BYTES = 1024 * 1024
MAX_MEMBERS = 100_000
MAX_PAX_BYTES = 64 * 1024
_BLOCK = 512
_CHUNK = 1024 * 1024
_GIT_V2 = b"# v2 git bundle\n"
_GIT_V3 = b"# v3 git bundle\n"
_SHA1 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TYPE_ORDER = {1: 0, 4: 1, 2: 2, 3: 3}  # commits, tags, trees, blobs


@dataclass(frozen=True)
class BundleArtifact:
    """One artifact carried by a Keystone bundle, stored under ``artifacts/<sha256>``."""

    sha256: str
    size: int
    name: str


@dataclass(frozen=True)
class BundleInfo:
    """What a bundle carries, as read from its headers.

    Attributes:
        revision: The commit the bundle brings (its ref's tip).
        ref: The ref it is recorded under (``refs/heads/main``).
        prerequisites: Commits the device must already have (empty for a full bundle).
        artifacts: The artifacts inside (always empty for a plain git bundle).
        kind: ``"keystone"`` or ``"git"``.
        size: Size of the bundle file in bytes.
    """

    revision: str
    ref: str
    prerequisites: tuple[str, ...]
    artifacts: tuple[BundleArtifact, ...]
    kind: Literal["keystone", "git"]
    size: int

    def artifact(self, sha256: str) -> BundleArtifact | None:
        """Return the artifact with this hash, or None when the bundle does not carry it."""
        for artifact in self.artifacts:
            if artifact.sha256 == sha256:
                return artifact
        return None


# -- git bundle header ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _GitHeader:
    version: int
    prerequisites: tuple[str, ...]
    references: tuple[tuple[str, str], ...]  # (ref name, object id) in file order
    length: int  # bytes before the pack


class _Section:
    """A read-only window ``[start, start + length)`` of a file, for bounded reads."""

    def __init__(self, f: BinaryIO, start: int, length: int) -> None:
        self.f, self.start, self.length = f, start, length
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        left = self.length - self.pos
        if n < 0 or n > left:
            n = left
        if n <= 0:
            return b""
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def readline(self, limit: int) -> bytes:
        self.f.seek(self.start + self.pos)
        line = self.f.readline(min(limit, self.length - self.pos))
        self.pos += len(line)
        return line

    @property
    def remaining(self) -> int:
        return self.length - self.pos


def _parse_git_header(section: _Section, where: str) -> _GitHeader:
    first = section.readline(64)
    if first == _GIT_V2:
        version = 2
    elif first == _GIT_V3:
        version = 3
    else:
        raise BundleError(f"{where}: not a git bundle (header {first[:20]!r})")
    prerequisites: list[str] = []
    references: list[tuple[str, str]] = []
    while True:
        if section.pos > MAX_GIT_HEADER_BYTES:
            raise BundleError(
                f"{where}: git bundle header is longer than {MAX_GIT_HEADER_BYTES} bytes"
            )
        line = section.readline(MAX_GIT_HEADER_BYTES)
        if not line.endswith(b"\n"):
            raise BundleError(f"{where}: the git bundle header is truncated")
        if line == b"\n":
            break
        text = line[:-1].decode("utf-8", "replace")
        if text.startswith("@"):
            if version < 3 or prerequisites or references:
                raise BundleError(f"{where}: misplaced capability line {text!r}")
            if text != "@object-format=sha1":
                raise BundleError(
                    f"{where}: unsupported bundle capability {text[1:]!r} (only sha1 bundles "
                    "without filters are supported)"
                )
            continue
        if text.startswith("-"):
            sha = text[1:].split(" ", 1)[0]
            if not _SHA1.fullmatch(sha) or references:
                raise BundleError(f"{where}: malformed prerequisite line {text[:80]!r}")
            prerequisites.append(sha)
            continue
        sha, _, name = text.partition(" ")
        if not _SHA1.fullmatch(sha) or not name or any(c.isspace() for c in name):
            raise BundleError(f"{where}: malformed ref line {text[:80]!r}")
        references.append((name, sha))
    if not references:
        raise BundleError(f"{where}: the git bundle carries no refs")
    return _GitHeader(version, tuple(prerequisites), tuple(references), section.pos)


def _check_pack_start(section: _Section, where: str) -> None:
    head = section.read(12)
    section.pos -= len(head)
    if len(head) < 12 or head[:4] != b"PACK" or head[4:8] not in (b"\0\0\0\2", b"\0\0\0\3"):
        raise BundleError(f"{where}: no git pack after the bundle header (damaged or truncated)")
    if section.remaining < 12 + 20:
        raise BundleError(f"{where}: the pack is truncated")


def _choose_ref(
    references: Sequence[tuple[str, str]], wanted: str | None, where: str
) -> tuple[str, str]:
    refs = dict(references)
    if wanted is not None:
        for name in (wanted, f"refs/heads/{wanted}", f"refs/tags/{wanted}"):
            if name in refs:
                return name, refs[name]
        raise BundleError(f"{where}: no ref {wanted!r} in the bundle (it has {', '.join(refs)})")
    named = [(n, s) for n, s in references if n != "HEAD"]
    if "HEAD" in refs:
        same = [(n, s) for n, s in named if s == refs["HEAD"]]
        if same:
            return same[0]
        return "HEAD", refs["HEAD"]
    if len(named) == 1:
        return named[0]
    for name in ("refs/heads/main", "refs/heads/master"):
        if name in refs:
            return name, refs[name]
    raise BundleError(
        f"{where}: the bundle carries several refs ({', '.join(refs)}); name the one to import"
    )


# -- tar container -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    name: str
    offset: int
    size: int


def _octal(field: bytes, what: str, where: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values
        value = int.from_bytes(field[1:], "big")
        return value
    text = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(text or b"0", 8)
    except ValueError as exc:
        raise BundleError(f"{where}: corrupt tar header ({what} {field!r})") from exc


def _parse_pax(data: bytes, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            raise BundleError(f"{where}: corrupt pax header")
        try:
            length = int(data[pos:space])
        except ValueError as exc:
            raise BundleError(f"{where}: corrupt pax header") from exc
        record = data[space + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise BundleError(f"{where}: corrupt pax header")
        key, _, value = record[:-1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def _scan_tar(f: BinaryIO, file_size: int, where: str) -> list[_Member]:
    """List the members of a Keystone tar, reading only headers; refuse anything unexpected."""
    members: list[_Member] = []
    pos = 0
    pax: dict[str, str] = {}
    while True:
        f.seek(pos)
        header = f.read(_BLOCK)
        if len(header) < _BLOCK:
            raise BundleError(f"{where}: truncated (the tar archive ends in the middle)")
        if header == b"\0" * _BLOCK:
            # The end: two zero blocks (tar may pad to a 10 KiB record), and nothing else.
            f.seek(pos)
            tail = f.read(min(file_size - pos, 20 * _BLOCK + 1))
            if len(tail) < 2 * _BLOCK or len(tail) > 20 * _BLOCK or tail.strip(b"\0"):
                raise BundleError(
                    f"{where}: truncated or damaged after its last member (offset {pos})"
                )
            return members
        stored = _octal(header[148:156], "checksum", where)
        computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != computed:
            raise BundleError(f"{where}: corrupt tar header at offset {pos} (checksum mismatch)")
        if header[257:262] != b"ustar":
            raise BundleError(f"{where}: not a POSIX tar archive at offset {pos}")
        size = _octal(header[124:136], "size", where)
        kind = header[156:157]
        data_at = pos + _BLOCK
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if data_at + size > file_size:
            raise BundleError(f"{where}: truncated (member at offset {pos} runs past the end)")
        if kind == b"x":
            if size > MAX_PAX_BYTES:
                raise BundleError(f"{where}: oversized pax header at offset {pos}")
            f.seek(data_at)
            pax = _parse_pax(f.read(size), where)
            pos = data_at + padded
            continue
        if kind not in (b"0", b"\0"):
            raise BundleError(
                f"{where}: member at offset {pos} has tar type {kind!r}; a Keystone bundle "
                "holds regular files only"
            )
        name = header[0:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        text = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
        if "path" in pax:
            text = pax["path"]
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError as exc:
                raise BundleError(f"{where}: corrupt pax size") from exc
            padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
            if data_at + size > file_size:
                raise BundleError(f"{where}: truncated (member {text} runs past the end)")
        pax = {}
        members.append(_Member(text, data_at, size))
        if len(members) > MAX_MEMBERS:
            raise BundleError(f"{where}: more than {MAX_MEMBERS} members")
        pos = data_at + padded


def _tar_header(name: str, size: int) -> bytes:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


# -- the manifest --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where things are in an opened bundle file."""

    info: BundleInfo
    repo: _Member  # the git bundle (for kind "git": the whole file)
    repo_sha256: str | None
    git: _GitHeader
    artifacts: dict[str, _Member]


def _manifest_bytes(
    revision: str,
    ref: str,
    prerequisites: Sequence[str],
    repo_size: int,
    repo_sha256: str,
    artifacts: Sequence[BundleArtifact],
) -> bytes:
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "revision": revision,
        "ref": ref,
        "prerequisites": list(prerequisites),
        "repo": {"size": repo_size, "sha256": repo_sha256},
        "artifacts": [{"sha256": a.sha256, "size": a.size, "name": a.name} for a in artifacts],
    }
    return (json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode("ascii")


def _parse_manifest(data: bytes, where: str) -> dict[str, object]:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where}: {MANIFEST_MEMBER} is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleError(f"{where}: {MANIFEST_MEMBER} is not a Keystone bundle manifest")
    if doc.get("version") != FORMAT_VERSION:
        raise BundleError(
            f"{where}: bundle format version {doc.get('version')!r} is not supported (this "
            f"Keystone reads version {FORMAT_VERSION}); make the bundle with a matching keystone"
        )
    return doc


def _manifest_field(doc: dict[str, object], key: str, kind: type, where: str) -> object:
    value = doc.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BundleError(f"{where}: {MANIFEST_MEMBER}: field {key!r} is missing or malformed")
    return value


def _open_layout(f: BinaryIO, size: int, where: str, ref: str | None = None) -> _Layout:
    f.seek(0)
    start = f.read(len(_GIT_V2))
    if start in (_GIT_V2, _GIT_V3):
        repo = _Member(REPO_MEMBER, 0, size)
        git = _parse_git_header(_Section(f, 0, size), where)
        _check_pack_start(_Section(f, git.length, size - git.length), where)
        name, revision = _choose_ref(git.references, ref, where)
        info = BundleInfo(revision, name, git.prerequisites, (), "git", size)
        return _Layout(info, repo, None, git, {})
    if size < 3 * _BLOCK:
        raise BundleError(f"{where}: not a Keystone bundle or git bundle (too short)")
    f.seek(257)
    if f.read(5) != b"ustar":
        raise BundleError(
            f"{where}: not a Keystone bundle or a git bundle (unrecognised header); is it the "
            "right file, and was it copied completely?"
        )
    members = _scan_tar(f, size, where)
    if len(members) < 2 or members[0].name != MANIFEST_MEMBER or members[1].name != REPO_MEMBER:
        raise BundleError(
            f"{where}: a Keystone bundle starts with {MANIFEST_MEMBER} and {REPO_MEMBER}; this "
            f"one has {', '.join(m.name for m in members[:3]) or 'no members'}"
        )
    manifest, repo = members[0], members[1]
    if manifest.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{where}: {MANIFEST_MEMBER} is over {MAX_MANIFEST_BYTES} bytes")
    f.seek(manifest.offset)
    doc = _parse_manifest(f.read(manifest.size), where)
    revision = str(_manifest_field(doc, "revision", str, where))
    ref_name = str(_manifest_field(doc, "ref", str, where))
    prereqs = _manifest_field(doc, "prerequisites", list, where)
    repo_doc = _manifest_field(doc, "repo", dict, where)
    artifacts_doc = _manifest_field(doc, "artifacts", list, where)
    assert isinstance(prereqs, list) and isinstance(repo_doc, dict)
    assert isinstance(artifacts_doc, list)
    if not _SHA1.fullmatch(revision) or not all(
        isinstance(p, str) and _SHA1.fullmatch(p) for p in prereqs
    ):
        raise BundleError(f"{where}: {MANIFEST_MEMBER}: malformed revision or prerequisites")
    repo_sha = _manifest_field(repo_doc, "sha256", str, where)
    repo_size = _manifest_field(repo_doc, "size", int, where)
    if not isinstance(repo_sha, str) or not _SHA256.fullmatch(repo_sha):
        raise BundleError(f"{where}: {MANIFEST_MEMBER}: malformed repo sha256")
    if repo_size != repo.size:
        raise BundleError(
            f"{where}: {REPO_MEMBER} is {repo.size} bytes but the manifest says {repo_size}"
        )
    artifacts: list[BundleArtifact] = []
    for entry in artifacts_doc:
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: {MANIFEST_MEMBER}: malformed artifact entry")
        sha = _manifest_field(entry, "sha256", str, where)
        art_size = _manifest_field(entry, "size", int, where)
        art_name = _manifest_field(entry, "name", str, where)
        assert isinstance(sha, str) and isinstance(art_size, int) and isinstance(art_name, str)
        if not _SHA256.fullmatch(sha) or art_size < 0:
            raise BundleError(f"{where}: {MANIFEST_MEMBER}: malformed artifact {sha!r}")
        artifacts.append(BundleArtifact(sha, art_size, art_name))
    listed = {f"{ARTIFACT_PREFIX}{a.sha256}": a for a in artifacts}
    stored = {m.name: m for m in members[2:]}
    if len(stored) != len(members) - 2 or set(stored) != set(listed):
        extra = sorted(set(stored) - set(listed)) + sorted(set(listed) - set(stored))
        raise BundleError(
            f"{where}: the artifacts stored ({len(stored)}) do not match the manifest "
            f"({len(listed)}): {', '.join(extra[:3]) or 'duplicate members'}"
        )
    for name, artifact in listed.items():
        if stored[name].size != artifact.size:
            raise BundleError(
                f"{where}: {name} is {stored[name].size} bytes but the manifest says "
                f"{artifact.size}"
            )
    git = _parse_git_header(_Section(f, repo.offset, repo.size), f"{where}:{REPO_MEMBER}")
    _check_pack_start(
        _Section(f, repo.offset + git.length, repo.size - git.length), f"{where}:{REPO_MEMBER}"
    )
    if (ref_name, revision) not in git.references or tuple(prereqs) != git.prerequisites:
        raise BundleError(
            f"{where}: the manifest ({ref_name} at {revision}) does not match {REPO_MEMBER}"
        )
    info = BundleInfo(revision, ref_name, tuple(prereqs), tuple(artifacts), "keystone", size)
    artifact_members = {a.sha256: stored[f"{ARTIFACT_PREFIX}{a.sha256}"] for a in artifacts}
    return _Layout(info, repo, repo_sha, git, artifact_members)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the context manager below
    except OSError as exc:
        raise BundleError(f"cannot open bundle {path}: {exc.strerror or exc}") from exc
    with f:
        yield f, os.fstat(f.fileno()).st_size


# -- public API ----------------------------------------------------------------------------------


def inspect_bundle(path: Path, *, ref: str | None = None) -> BundleInfo:
    """Read what a bundle carries from its headers, without importing anything.

    Reads are bounded (headers, the manifest, the start of the pack); a Keystone bundle's
    member list is checked against its manifest. The pack itself is verified only on import.

    Args:
        path: The bundle file.
        ref: For a plain git bundle with several refs, the one to report.

    Raises:
        keystone.errors.BundleError: not a bundle, truncated, or inconsistent (with the reason).
    """
    path = Path(path)
    with _opened(path) as (f, size):
        return _open_layout(f, size, str(path), ref).info


def import_bundle(
    path: Path, mirror: GitMirror, *, max_bytes: int, ref: str | None = None
) -> BundleInfo:
    """Add a bundle's commits to the mirror and point ``refs/keystone/fetched`` at its tip.

    In order: the headers are read and cross-checked; every prerequisite must already be a
    commit in the mirror; a Keystone bundle's ``repo.bundle`` is hashed against its manifest;
    the pack is then ingested through the mirror's quarantine (checksum, objects,
    connectivity); the tip must be a commit in the mirror. Only then does the ref move. Any
    failure leaves the mirror's refs as they were. Artifacts are not touched: use
    :func:`extract_bundle_artifact`. An annotated tag as the tip is peeled: the returned
    ``revision`` is always a commit.

    Args:
        path: The bundle file (Keystone or plain git bundle).
        mirror: The device's mirror.
        max_bytes: Largest pack accepted.
        ref: For a plain git bundle with several refs, the one to import.

    Raises:
        keystone.errors.BundleError: damaged, truncated, too large, missing a prerequisite, or
            not containing its tip; the message says which.
    """
    path = Path(path)
    where = str(path)
    with _opened(path) as (f, size):
        layout = _open_layout(f, size, where, ref)
        info = layout.info
        repo = layout.repo
        for prerequisite in info.prerequisites:
            if not mirror.has(prerequisite):
                raise BundleError(
                    f"{where}: the bundle needs commit {prerequisite} which this device does "
                    "not have; import a full bundle or one made since a revision the device has"
                )
        if layout.repo_sha256 is not None:
            digest = _hash_section(_Section(f, repo.offset, repo.size))
            if digest != layout.repo_sha256:
                raise BundleError(
                    f"{where}: {REPO_MEMBER} is damaged (sha256 {digest} does not match the "
                    "manifest); copy the bundle again"
                )
        pack_len = repo.size - layout.git.length
        if pack_len > max_bytes:
            raise BundleError(
                f"{where}: the pack is {pack_len} bytes, over the bound of {max_bytes} bytes"
            )
        pack = _Section(f, repo.offset + layout.git.length, pack_len)
        try:
            mirror.ingest_pack(pack.read, max_bytes=max_bytes, what=f"the pack in {where}")
        except PackRejected as exc:
            raise BundleError(
                f"{where}: {exc.reason}; nothing was imported (the device's refs are unchanged); "
                "copy the bundle again, or re-create it"
            ) from exc
        except PackTooLarge as exc:
            raise BundleError(f"{where}: {exc}") from exc
        if pack.remaining:
            raise BundleError(
                f"{where}: {pack.remaining} bytes of junk after the pack; the bundle is "
                "damaged (its objects are complete, but the revision was not taken)"
            )
    if not mirror.has(info.revision):
        raise BundleError(
            f"{where}: the bundle does not contain its tip commit {info.revision} for {info.ref}"
        )
    revision = mirror.resolve(info.revision)
    mirror.set_ref(FETCHED_REF, revision)
    return dataclasses.replace(info, revision=revision)


def extract_bundle_artifact(path: Path, sha256: str, dest: Path) -> None:
    """Copy one artifact out of a Keystone bundle to ``dest``, verifying its sha256 on the way.

    The file appears at ``dest`` (atomically, via a temporary file beside it) only when its
    hash matched.

    Raises:
        keystone.errors.ArtifactIntegrityError: the bytes do not hash to ``sha256``.
        keystone.errors.BundleError: the bundle is damaged or does not carry that artifact.
    """
    path, dest = Path(path), Path(dest)
    where = str(path)
    sha256 = sha256.lower()
    with _opened(path) as (f, size):
        layout = _open_layout(f, size, where)
        member = layout.artifacts.get(sha256)
        if member is None:
            kind = (
                "a plain git bundle carries no artifacts"
                if layout.info.kind == "git"
                else ("it is not in the bundle")
            )
            raise BundleError(f"{where}: cannot extract artifact {sha256}: {kind}")
        section = _Section(f, member.offset, member.size)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                while chunk := section.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if section.remaining:
                raise BundleError(f"{where}: artifact {sha256} is truncated")
            actual = digest.hexdigest()
            if actual != sha256:
                name = layout.info.artifact(sha256)
                raise ArtifactIntegrityError(
                    f"{where}: artifact {sha256} ({name.name if name else '?'}) hashes to "
                    f"{actual}; the bundle is damaged, copy it again"
                )
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def write_git_bundle(
    repo: Path,
    rev: str,
    since: str | None,
    out: BinaryIO,
    *,
    ref: str | None = None,
) -> BundleInfo:
    """Write a standard git bundle (v2) of ``rev`` to ``out``; incremental when ``since`` is set.

    The result passes ``git bundle verify`` and ``git clone`` works from it. The pack holds whole
    objects in a fixed order, so the same commits always give the same bytes. For an
    incremental bundle the prerequisites are the boundary commits (as ``git bundle create
    since..rev`` lists them); objects in their trees are left out.

    Args:
        repo: A repository (a bare mirror or a checkout).
        rev: The commit to carry (a ref name or commit id).
        since: A commit the receiving device already has, or None for a full bundle.
        out: Where to write (a binary stream).
        ref: The ref name recorded in the bundle (default: the ref ``rev`` names, else
            ``refs/heads/main``). For a branch, ``HEAD`` is recorded too so that a clone from
            the bundle checks it out.

    Returns:
        A :class:`BundleInfo` of kind ``"git"`` (``size`` = bytes written).

    Raises:
        keystone.errors.ValidationError: ``rev`` or ``since`` unknown, or nothing new since
            ``since``.
    """
    from dulwich.object_store import MissingObjectFinder
    from dulwich.objects import Commit, ObjectID
    from dulwich.pack import full_unpacked_object, write_pack_data
    from dulwich.refs import Ref, check_ref_format

    with GitMirror(Path(repo), create=False) as mirror:
        named, tip = mirror.resolve_named(rev)
        ref_name = ref or named or "refs/heads/main"
        if not ref_name.startswith("refs/") or not check_ref_format(Ref(ref_name.encode())):
            raise ValidationError(f"{ref_name!r} is not a full ref name (refs/...)", field="ref")
        since_sha = mirror.resolve(since) if since is not None else None
        store = mirror.repo.object_store
        haves = [ObjectID(since_sha.encode())] if since_sha else []
        finder = MissingObjectFinder(store, haves=haves, wants=[ObjectID(tip.encode())])
        keyed: list[tuple[int, bytes]] = []
        commits: dict[bytes, Commit] = {}
        for sha, _hint in finder:
            obj = store[sha]
            keyed.append((_TYPE_ORDER.get(obj.type_num, 9), sha))
            if isinstance(obj, Commit):
                commits[sha] = obj
        if not commits:
            raise ValidationError(
                f"{rev} adds no commit since {since}; the device already has it",
                field="revision",
            )
        boundary = sorted({p for c in commits.values() for p in c.parents if p not in commits})
        ordered = [sha for _order, sha in sorted(keyed)]
        counter = _CountingWriter(out)
        counter.write(_GIT_V2)
        for parent in boundary:
            subject = _subject(store[parent])
            counter.write(b"-" + parent + (b" " + subject if subject else b"") + b"\n")
        counter.write(tip.encode() + b" " + ref_name.encode() + b"\n")
        if ref_name.startswith("refs/heads/"):
            counter.write(tip.encode() + b" HEAD\n")
        counter.write(b"\n")
        write_pack_data(
            counter.write,
            (full_unpacked_object(store[ObjectID(sha)]) for sha in ordered),
            object_format=store.object_format,
            num_records=len(ordered),
            compression_level=6,
        )
        return BundleInfo(
            revision=tip,
            ref=ref_name,
            prerequisites=tuple(p.decode() for p in boundary),
            artifacts=(),
            kind="git",
            size=counter.count,
        )


def create_bundle(
    out: Path,
    repo: Path,
    rev: str,
    since: str | None,
    artifacts: Sequence[tuple[str, Path]],
    progress: Callable[[int, int], None] | None = None,
    *,
    ref: str | None = None,
) -> BundleInfo:
    """Write a Keystone bundle file: ``rev`` of ``repo`` (incremental since ``since``) + artifacts.

    The file is written beside ``out`` and renamed into place when complete. Each artifact is
    hashed while it is copied in; the same inputs always give byte-identical output.

    Args:
        out: The bundle file to create (replaced if it exists).
        repo: The fleet repository (a checkout or a bare repository).
        rev: The commit to carry.
        since: A commit the devices already have, or None for a full bundle.
        artifacts: ``(sha256, file)`` pairs; duplicates by hash are stored once.
        progress: Called as ``progress(bytes_done, bytes_total)`` while writing.
        ref: The ref name to record (see :func:`write_git_bundle`).

    Raises:
        keystone.errors.ArtifactIntegrityError: an artifact file does not hash to its sha256
            (the message names the file); no bundle is left behind.
        keystone.errors.ValidationError: a malformed sha256, a missing file, or a bad ``rev``.
    """
    out = Path(out)
    chosen: dict[str, tuple[str, Path, int]] = {}
    for sha, file in sorted(
        ((s.lower(), Path(p)) for s, p in artifacts), key=lambda t: (t[0], t[1].name, str(t[1]))
    ):
        if not _SHA256.fullmatch(sha):
            raise ValidationError(
                f"{sha!r} is not a sha256 (64 hex digits) for {file}", field="sha256"
            )
        if sha in chosen:
            continue
        try:
            st = os.stat(file)
        except OSError as exc:
            raise ValidationError(
                f"artifact {file}: {exc.strerror or exc}", field="artifacts"
            ) from exc
        if not os.path.isfile(file):
            raise ValidationError(f"artifact {file} is not a regular file", field="artifacts")
        chosen[sha] = (file.name or sha, file, st.st_size)
    entries = [BundleArtifact(sha, size, name) for sha, (name, _f, size) in chosen.items()]

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out.parent) as git_file:
        git_info = write_git_bundle(Path(repo), rev, since, git_file, ref=ref)
        repo_size = git_info.size
        git_file.seek(0)
        repo_sha = _hash_section(_Section(git_file, 0, repo_size))
        manifest = _manifest_bytes(
            git_info.revision, git_info.ref, git_info.prerequisites, repo_size, repo_sha, entries
        )
        total = len(manifest) + repo_size + sum(a.size for a in entries)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                _write_member(f, MANIFEST_MEMBER, io.BytesIO(manifest), len(manifest), advance)
                git_file.seek(0)
                _write_member(f, REPO_MEMBER, git_file, repo_size, advance)
                for artifact in entries:
                    _copy_artifact(f, artifact, chosen[artifact.sha256][1], advance)
                f.write(b"\0" * (2 * _BLOCK))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    _fsync_dir(out.parent)
    return BundleInfo(
        revision=git_info.revision,
        ref=git_info.ref,
        prerequisites=git_info.prerequisites,
        artifacts=tuple(entries),
        kind="keystone",
        size=out.stat().st_size,
    )


# -- helpers -------------------------------------------------------------------------------------


class _CountingWriter:
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.count = 0

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.count += len(data)


def _subject(obj: object) -> bytes:
    message = getattr(obj, "message", b"") or b""
    line = message.split(b"\n", 1)[0].strip()
    return bytes(c for c in line if c >= 0x20)[:200]


def _hash_section(section: _Section) -> str:
    digest = hashlib.sha256()
    while chunk := section.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _write_member(
    f: IO[bytes], name: str, src: IO[bytes], size: int, advance: Callable[[int], None]
) -> None:
    f.write(_tar_header(name, size))
    left = size
    while left:
        chunk = src.read(min(_CHUNK, left))
        if not chunk:
            raise KeystoneError(f"{name} ended {left} bytes early while writing the bundle")
        f.write(chunk)
        left -= len(chunk)
        advance(len(chunk))
    f.write(b"\0" * (-size % _BLOCK))


def _copy_artifact(
    f: IO[bytes], artifact: BundleArtifact, file: Path, advance: Callable[[int], None]
) -> None:
    digest = hashlib.sha256()
    f.write(_tar_header(f"{ARTIFACT_PREFIX}{artifact.sha256}", artifact.size))
    left = artifact.size
    with open(file, "rb") as src:
        while left:
            chunk = src.read(min(_CHUNK, left))
            if not chunk:
                raise ArtifactIntegrityError(
                    f"artifact {file} shrank while it was being bundled; bundle it again"
                )
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
            advance(len(chunk))
        if src.read(1):
            raise ArtifactIntegrityError(
                f"artifact {file} grew while it was being bundled; bundle it again"
            )
    if digest.hexdigest() != artifact.sha256:
        raise ArtifactIntegrityError(
            f"artifact {file} hashes to {digest.hexdigest()}, not {artifact.sha256} as pinned; "
            "fix the recipe's sha256 or use the right file"
        )
    f.write(b"\0" * (-artifact.size % _BLOCK))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

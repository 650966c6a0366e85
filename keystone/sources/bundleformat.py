"""The bundle file format: what a bundle looks like on disk, and reading its headers.

Two kinds of file are accepted:

* A **Keystone bundle** (``kind="keystone"``): an uncompressed POSIX tar archive, so that
  ``tar tvf`` shows what is inside, with exactly these members in this order::

      keystone-bundle.json     manifest (below)
      repo.bundle              a standard git bundle (v2) of the fleet repository
      artifacts/<sha256>       one member per artifact, named by its content hash
      datasets/<name>/<file>   optional: signed dataset manifests and their payloads

  The manifest is JSON with sorted keys::

      {"format": "keystone-bundle", "version": 1,
       "revision": "<commit id>", "ref": "refs/heads/main", "prerequisites": ["<commit id>", ...],
       "repo": {"size": N, "sha256": "<hex>"},
       "artifacts": [{"sha256": "<hex>", "size": N, "name": "api.tar.gz"}, ...],
       "datasets": [{"path": "datasets/cve/cve.manifest.toml", "sha256": "<hex>", "size": N}]}

  ``datasets`` is present only when the bundle carries datasets, so a bundle without them is
  byte for byte what earlier versions wrote; its members follow the artifacts, sorted by path.
  Their sha256 only says the copy is intact: the dataset manager verifies them as a refresh.

  Every tar header has mtime 0, uid/gid 0, no user names and mode 0644; artifacts are stored
  sorted by hash; the git pack holds whole (undeltified) objects in a fixed order, compressed at
  a fixed level. The same commit and artifacts therefore always give the same bytes.

* A **plain git bundle** (``kind="git"``) as ``git bundle create`` writes it (v2 or v3,
  sha1). Its artifacts are then fetched from their URIs by the caller.

Everything here reads headers only, with bounded reads; importing and writing bundles is in
:mod:`keystone.sources.bundle`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from keystone.errors import BundleError
from keystone.limits import BOUNDS, Limits, how_to_raise

FORMAT = "keystone-bundle"
FORMAT_VERSION = 1
MANIFEST_MEMBER = "keystone-bundle.json"
REPO_MEMBER = "repo.bundle"
ARTIFACT_PREFIX = "artifacts/"
DATASET_PREFIX = "datasets/"
IMAGE_PREFIX = "images/"
_DATASET_PATH = re.compile(r"datasets/[a-z0-9][a-z0-9._-]{0,62}/[A-Za-z0-9][A-Za-z0-9._-]{0,200}")

MAX_MANIFEST_BYTES = BOUNDS["max_manifest_bytes"].default  # the default; see keystone.limits
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
class BundleDatasetFile:
    """One file of a dataset carried by a Keystone bundle, stored under its ``path``."""

    path: str  # datasets/<dataset>/<file>
    sha256: str
    size: int

    @property
    def dataset(self) -> str:
        """The dataset's name (the directory under ``datasets/``)."""
        return self.path.split("/")[1]


@dataclass(frozen=True)
class BundleImage:
    """One OCI (or docker) image archive carried by a Keystone bundle, under ``images/<sha256>``.

    ``name`` is the archive's file name when it was bundled (what ``podman save -o`` wrote).
    """

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
        datasets: The dataset files inside (``datasets/<name>/<file>``), sorted by path.
        images: The container image archives inside (``images/<sha256>``), sorted by hash.
    """

    revision: str
    ref: str
    prerequisites: tuple[str, ...]
    artifacts: tuple[BundleArtifact, ...]
    kind: Literal["keystone", "git"]
    size: int
    datasets: tuple[BundleDatasetFile, ...] = ()
    images: tuple[BundleImage, ...] = ()

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


class Section:
    """A read-only window ``[start, start + length)`` of a file, for bounded reads."""

    def __init__(self, f: BinaryIO, start: int, length: int) -> None:
        """Read ``length`` bytes of ``f`` starting at ``start``."""
        self.f, self.start, self.length = f, start, length
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (all that is left when ``n`` < 0); ``b""`` at the end."""
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
        """Read one line, at most ``limit`` bytes."""
        self.f.seek(self.start + self.pos)
        line = self.f.readline(min(limit, self.length - self.pos))
        self.pos += len(line)
        return line

    @property
    def remaining(self) -> int:
        """Bytes not read yet."""
        return self.length - self.pos


def _parse_git_header(section: Section, where: str) -> _GitHeader:
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


def _check_pack_start(section: Section, where: str) -> None:
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
    # lazy: tarfile is only needed to write a bundle; the resident agent never does
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
    datasets: dict[str, _Member] = dataclasses.field(default_factory=dict)
    images: dict[str, _Member] = dataclasses.field(default_factory=dict)


def _manifest_bytes(
    revision: str,
    ref: str,
    prerequisites: Sequence[str],
    repo_size: int,
    repo_sha256: str,
    artifacts: Sequence[BundleArtifact],
    datasets: Sequence[BundleDatasetFile] = (),
    images: Sequence[BundleImage] = (),
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
    if datasets:
        # Only when there are some: a bundle without datasets stays what it always was.
        doc["datasets"] = [{"path": d.path, "sha256": d.sha256, "size": d.size} for d in datasets]
    if images:
        # Likewise: a bundle without container images stays byte for byte what it was.
        doc["images"] = [{"sha256": i.sha256, "size": i.size, "name": i.name} for i in images]
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
        git = _parse_git_header(Section(f, 0, size), where)
        _check_pack_start(Section(f, git.length, size - git.length), where)
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
    limit = Limits.from_env().max_manifest_bytes
    if manifest.size > limit:
        raise BundleError(
            f"{where}: {MANIFEST_MEMBER} is {manifest.size} bytes, over the limit of {limit} "
            f"bytes; nothing was imported; {how_to_raise('max_manifest_bytes')}"
        )
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
    datasets = _parse_datasets(doc, where)
    images = _parse_images(doc, where)
    listed: dict[str, BundleArtifact | BundleDatasetFile | BundleImage] = {
        f"{ARTIFACT_PREFIX}{a.sha256}": a for a in artifacts
    }
    listed.update({d.path: d for d in datasets})
    listed.update({f"{IMAGE_PREFIX}{i.sha256}": i for i in images})
    stored = {m.name: m for m in members[2:]}
    if len(stored) != len(members) - 2 or set(stored) != set(listed):
        extra = sorted(set(stored) - set(listed)) + sorted(set(listed) - set(stored))
        raise BundleError(
            f"{where}: the members stored ({len(stored)}) do not match the manifest "
            f"({len(listed)}): {', '.join(extra[:3]) or 'duplicate members'}"
        )
    for name, artifact in listed.items():
        if stored[name].size != artifact.size:
            raise BundleError(
                f"{where}: {name} is {stored[name].size} bytes but the manifest says "
                f"{artifact.size}"
            )
    git = _parse_git_header(Section(f, repo.offset, repo.size), f"{where}:{REPO_MEMBER}")
    _check_pack_start(
        Section(f, repo.offset + git.length, repo.size - git.length), f"{where}:{REPO_MEMBER}"
    )
    if (ref_name, revision) not in git.references or tuple(prereqs) != git.prerequisites:
        raise BundleError(
            f"{where}: the manifest ({ref_name} at {revision}) does not match {REPO_MEMBER}"
        )
    info = BundleInfo(
        revision, ref_name, tuple(prereqs), tuple(artifacts), "keystone", size, datasets, images
    )
    artifact_members = {a.sha256: stored[f"{ARTIFACT_PREFIX}{a.sha256}"] for a in artifacts}
    dataset_members = {d.path: stored[d.path] for d in datasets}
    image_members = {i.sha256: stored[f"{IMAGE_PREFIX}{i.sha256}"] for i in images}
    return _Layout(info, repo, repo_sha, git, artifact_members, dataset_members, image_members)


def _parse_images(doc: dict[str, object], where: str) -> tuple[BundleImage, ...]:
    """The manifest's ``images`` list (absent: none)."""
    if "images" not in doc:
        return ()
    entries = _manifest_field(doc, "images", list, where)
    assert isinstance(entries, list)
    out: list[BundleImage] = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: {MANIFEST_MEMBER}: malformed image entry")
        sha = _manifest_field(entry, "sha256", str, where)
        size = _manifest_field(entry, "size", int, where)
        name = _manifest_field(entry, "name", str, where)
        assert isinstance(sha, str) and isinstance(size, int) and isinstance(name, str)
        if not _SHA256.fullmatch(sha) or size < 0:
            raise BundleError(f"{where}: {MANIFEST_MEMBER}: malformed image entry {sha[:80]!r}")
        out.append(BundleImage(sha, size, name))
    if len({i.sha256 for i in out}) != len(out):
        raise BundleError(f"{where}: {MANIFEST_MEMBER}: an image is listed twice")
    return tuple(out)


def _parse_datasets(doc: dict[str, object], where: str) -> tuple[BundleDatasetFile, ...]:
    """The manifest's ``datasets`` list (absent: none), each path checked to stay in its place."""
    if "datasets" not in doc:
        return ()
    entries = _manifest_field(doc, "datasets", list, where)
    assert isinstance(entries, list)
    out: list[BundleDatasetFile] = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: {MANIFEST_MEMBER}: malformed dataset entry")
        path = _manifest_field(entry, "path", str, where)
        sha = _manifest_field(entry, "sha256", str, where)
        size = _manifest_field(entry, "size", int, where)
        assert isinstance(path, str) and isinstance(sha, str) and isinstance(size, int)
        if not _DATASET_PATH.fullmatch(path) or ".." in path:
            raise BundleError(
                f"{where}: {MANIFEST_MEMBER}: dataset member {path[:80]!r} is not "
                "datasets/<name>/<file>"
            )
        if not _SHA256.fullmatch(sha) or size < 0:
            raise BundleError(f"{where}: {MANIFEST_MEMBER}: malformed dataset entry {path}")
        out.append(BundleDatasetFile(path, sha, size))
    if len({d.path for d in out}) != len(out):
        raise BundleError(f"{where}: {MANIFEST_MEMBER}: a dataset member is listed twice")
    return tuple(out)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the context manager below
    except OSError as exc:
        raise BundleError(f"cannot open bundle {path}: {exc.strerror or exc}") from exc
    with f:
        yield f, os.fstat(f.fileno()).st_size


def _hash_section(section: Section) -> str:
    digest = hashlib.sha256()
    while chunk := section.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


_Section = Section  # the name the format tests and older callers use

"""Air-gapped bundles: one file carrying a commit of the fleet repository and its artifacts.

The file format (a Keystone bundle, or a plain git bundle) is described and parsed in
:mod:`keystone.sources.bundleformat`; this module opens, imports, extracts and writes bundles.

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
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, BinaryIO

from keystone.errors import ArtifactIntegrityError, BundleError, KeystoneError, ValidationError
from keystone.sources.base import PackTooLarge
from keystone.sources.bundleformat import (
    _BLOCK,
    _CHUNK,
    _DATASET_PATH,
    _GIT_V2,
    _SHA256,
    _TYPE_ORDER,
    ARTIFACT_PREFIX,
    DATASET_PREFIX,
    FORMAT,
    FORMAT_VERSION,
    IMAGE_PREFIX,
    MANIFEST_MEMBER,
    REPO_MEMBER,
    BundleArtifact,
    BundleDatasetFile,
    BundleImage,
    BundleInfo,
    Section,
    _hash_section,
    _Layout,
    _manifest_bytes,
    _open_layout,
    _tar_header,
)
from keystone.sources.bundleformat import _choose_ref as _choose_ref  # re-exported for tests
from keystone.sources.bundleformat import _parse_git_header as _parse_git_header
from keystone.sources.bundleformat import _scan_tar as _scan_tar
from keystone.sources.bundleformat import _Section as _Section
from keystone.sources.git import FETCHED_REF, GitMirror, PackRejected

__all__ = [
    "ARTIFACT_PREFIX",
    "DATASET_PREFIX",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_MEMBER",
    "REPO_MEMBER",
    "BundleArtifact",
    "BundleDatasetFile",
    "BundleInfo",
    "BundleReader",
    "Section",
    "cache_bundle_artifacts",
    "create_bundle",
    "extract_bundle_artifact",
    "extract_bundle_datasets",
    "extract_bundle_images",
    "import_bundle",
    "inspect_bundle",
    "open_bundle",
    "write_git_bundle",
]

# -- reading --------------------------------------------------------------------------------------


class BundleReader:
    """An open bundle file, its headers read and cross-checked: what it carries and where.

    Made by :func:`open_bundle`; use it as a context manager (it holds the file open). Every
    part is handed out as a bounded :class:`Section` of the file, so reading a damaged bundle
    never reads past the part it asked for.

    Attributes:
        path: The bundle file.
        info: What it carries (the manifest of a Keystone bundle, or a git bundle's header).
        size: The file's size in bytes.
    """

    def __init__(self, path: Path, f: BinaryIO, size: int, layout: _Layout) -> None:
        """Wrap an opened file and its layout (see :func:`open_bundle`)."""
        self.path = path
        self.info: BundleInfo = layout.info
        self.size = size
        self._f = f
        self._layout = layout

    @property
    def artifacts(self) -> tuple[BundleArtifact, ...]:
        """The artifacts listed in the manifest (empty for a plain git bundle)."""
        return self.info.artifacts

    @property
    def repo_sha256(self) -> str | None:
        """The sha256 the manifest records for the git bundle (None for a plain git bundle)."""
        return self._layout.repo_sha256

    def git_bundle(self) -> Section:
        """The git bundle inside (for a plain git bundle: the whole file), header included."""
        repo = self._layout.repo
        return Section(self._f, repo.offset, repo.size)

    def pack(self) -> Section:
        """The git pack after the git bundle's header, positioned at ``PACK``."""
        repo, header = self._layout.repo, self._layout.git.length
        return Section(self._f, repo.offset + header, repo.size - header)

    def artifact(self, sha256: str) -> Section | None:
        """The bytes of the artifact with this hash, or None when the bundle does not carry it.

        The bytes are as stored: hash them before trusting them (as
        :func:`extract_bundle_artifact` does).
        """
        member = self._layout.artifacts.get(sha256.lower())
        return None if member is None else Section(self._f, member.offset, member.size)

    def dataset_file(self, path: str) -> Section | None:
        """The bytes of the dataset member ``datasets/<name>/<file>``, or None (as stored)."""
        member = self._layout.datasets.get(path)
        return None if member is None else Section(self._f, member.offset, member.size)

    def image(self, sha256: str) -> Section | None:
        """The bytes of the image archive ``images/<sha256>``, or None (as stored)."""
        member = self._layout.images.get(sha256)
        return Section(self._f, member.offset, member.size) if member else None

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_bundle(path: Path, *, ref: str | None = None) -> BundleReader:
    """Open a bundle file and read its headers (bounded reads; the pack is not checked here).

    Args:
        path: A Keystone bundle or a plain git bundle.
        ref: For a plain git bundle with several refs, the one to take.

    Raises:
        keystone.errors.BundleError: not a bundle, truncated, or inconsistent (with the reason).
    """
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - the reader closes it
    except OSError as exc:
        raise BundleError(f"cannot open bundle {path}: {exc.strerror or exc}") from exc
    try:
        size = os.fstat(f.fileno()).st_size
        return BundleReader(path, f, size, _open_layout(f, size, str(path), ref))
    except BaseException:
        f.close()
        raise


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
    with open_bundle(path, ref=ref) as bundle:
        return bundle.info


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
    with open_bundle(path, ref=ref) as bundle:
        info = bundle.info
        for prerequisite in info.prerequisites:
            if not mirror.has(prerequisite):
                raise BundleError(
                    f"{where}: the bundle needs commit {prerequisite} which this device does "
                    "not have; import a full bundle or one made since a revision the device has"
                )
        if bundle.repo_sha256 is not None:
            digest = _hash_section(bundle.git_bundle())
            if digest != bundle.repo_sha256:
                raise BundleError(
                    f"{where}: {REPO_MEMBER} is damaged (sha256 {digest} does not match the "
                    "manifest); copy the bundle again"
                )
        pack = bundle.pack()
        pack_len = pack.length
        if pack_len > max_bytes:
            raise BundleError(
                f"{where}: the pack is {pack_len} bytes, over the bound of {max_bytes} bytes"
            )
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
    with open_bundle(path) as bundle:
        section = bundle.artifact(sha256)
        if section is None:
            kind = (
                "a plain git bundle carries no artifacts"
                if bundle.info.kind == "git"
                else ("it is not in the bundle")
            )
            raise BundleError(f"{where}: cannot extract artifact {sha256}: {kind}")
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
                name = bundle.info.artifact(sha256)
                raise ArtifactIntegrityError(
                    f"{where}: artifact {sha256} ({name.name if name else '?'}) hashes to "
                    f"{actual}; the bundle is damaged, copy it again"
                )
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def extract_bundle_datasets(path: Path, dest: Path) -> Path | None:
    """Copy a Keystone bundle's dataset members to ``dest/datasets/<name>/<file>``.

    Each is checked against the sha256 the bundle manifest records (an intact copy, nothing
    more: the dataset manager verifies the signed manifests). ``dest`` is replaced. Returns
    ``dest``, or None when the bundle carries no datasets (then ``dest`` is not touched).

    Raises:
        keystone.errors.ArtifactIntegrityError: a member does not hash to its recorded sha256.
        keystone.errors.BundleError: the bundle is damaged.
    """
    path, dest = Path(path), Path(dest)
    where = str(path)
    with open_bundle(path) as bundle:
        files = bundle.info.datasets
        if not files:
            return None
        shutil.rmtree(dest, ignore_errors=True)
        for entry in files:
            section = bundle.dataset_file(entry.path)
            assert section is not None  # the layout lists exactly the manifest's members
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            got = _copy_hashed(section, target)
            if got != entry.sha256:
                shutil.rmtree(dest, ignore_errors=True)
                raise ArtifactIntegrityError(
                    f"{where}: {entry.path} hashes to {got}, not {entry.sha256} "
                    "as the bundle manifest records; the bundle is damaged, copy it again"
                )
    return dest


def _copy_hashed(section: Section, target: Path) -> str:
    """Copy ``section`` to ``target`` in chunks; the sha256 (hex) of what was copied."""
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        while chunk := section.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def extract_bundle_images(path: Path, dest: Path) -> Path | None:
    """Copy a Keystone bundle's container image archives to ``dest/<sha256>.tar``.

    Each is checked against the sha256 the bundle manifest records while it is copied. ``dest``
    is replaced. Returns ``dest``, or None when the bundle carries no images (then ``dest`` is
    not touched).

    Raises:
        keystone.errors.ArtifactIntegrityError: an archive does not hash to its recorded sha256.
        keystone.errors.BundleError: the bundle is damaged.
    """
    path, dest = Path(path), Path(dest)
    with open_bundle(path) as bundle:
        images = bundle.info.images
        if not images:
            return None
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for image in images:
            section = bundle.image(image.sha256)
            assert section is not None  # the layout lists exactly the manifest's members
            target = dest / f"{image.sha256}.tar"
            got = _copy_hashed(section, target)
            if got != image.sha256:
                shutil.rmtree(dest, ignore_errors=True)
                raise ArtifactIntegrityError(
                    f"{path}: {IMAGE_PREFIX}{image.sha256} ({image.name}) hashes to "
                    f"{got}; the bundle is damaged, copy it again"
                )
    return dest


def cache_bundle_artifacts(bundle: Path, shas: Sequence[str], *, artifacts_dir: Path) -> None:
    """Copy a verified revision's bundle artifacts into the artifact cache, all or none.

    Call it only once the revision the bundle brought has been verified. The cache keeps each
    blob as ``<artifacts_dir>/sha256/<sha256>``, read-only. Each missing one is hash-checked
    into a staging directory beside the cache; only when every one matched are they renamed
    into place, so a damaged artifact leaves the cache as it was, not half filled. Blobs the
    cache already has are not copied again.

    Args:
        bundle: The Keystone bundle file (``FetchResult.bundle.path``).
        shas: The artifacts to copy (``FetchResult.bundle.artifacts``).
        artifacts_dir: The artifact cache root (``runtime/artifacts``).

    Raises:
        keystone.errors.ArtifactIntegrityError: an artifact does not hash to its name.
        keystone.errors.BundleError: the bundle is damaged or does not carry one of them.
    """
    root = Path(artifacts_dir)
    cache = root / "sha256"
    missing = [sha for sha in shas if not (cache / sha).exists()]
    if not missing:
        return
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bundle-import-", dir=root))
    try:
        for sha in missing:
            extract_bundle_artifact(bundle, sha, staging / sha)
        for sha in missing:
            os.chmod(staging / sha, 0o444)  # as the cache keeps its blobs: immutable
            os.replace(staging / sha, cache / sha)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
    # lazy: dulwich is heavy; the resident agent imports this module without it
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
    datasets: Sequence[tuple[str, Path]] = (),
    images: Sequence[Path] = (),
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
        datasets: ``(member path, file)`` pairs, each path ``datasets/<name>/<file>``: the
            signed dataset manifests, signatures, certificates and payloads to carry.
        images: container image archives (``podman save``, ``docker save``) to carry as
            ``images/<sha256>``; devices load them into their engine on import.

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
    dataset_files, dataset_sources = _dataset_entries(datasets)
    image_entries, image_sources = _image_entries(images)

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out.parent) as git_file:
        git_info = write_git_bundle(Path(repo), rev, since, git_file, ref=ref)
        repo_size = git_info.size
        git_file.seek(0)
        repo_sha = _hash_section(_Section(git_file, 0, repo_size))
        manifest = _manifest_bytes(
            git_info.revision,
            git_info.ref,
            git_info.prerequisites,
            repo_size,
            repo_sha,
            entries,
            dataset_files,
            image_entries,
        )
        total = (
            len(manifest)
            + repo_size
            + sum(a.size for a in entries)
            + sum(d.size for d in dataset_files)
            + sum(i.size for i in image_entries)
        )
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
                for entry in dataset_files:
                    with open(dataset_sources[entry.path], "rb") as src:
                        _write_member(f, entry.path, src, entry.size, advance)
                for image in image_entries:
                    _copy_artifact(
                        f,
                        BundleArtifact(image.sha256, image.size, image.name),
                        image_sources[image.sha256],
                        advance,
                        prefix=IMAGE_PREFIX,
                    )
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
        datasets=tuple(dataset_files),
        images=tuple(image_entries),
    )


# -- helpers -------------------------------------------------------------------------------------


class _CountingWriter:
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.count = 0

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.count += len(data)


def _dataset_entries(
    datasets: Sequence[tuple[str, Path]],
) -> tuple[list[BundleDatasetFile], dict[str, Path]]:
    """The dataset members to write, sorted by path, each hashed now (the manifest names it)."""
    files: list[BundleDatasetFile] = []
    sources: dict[str, Path] = {}
    for member, file in sorted((m, Path(p)) for m, p in datasets):
        if not _DATASET_PATH.fullmatch(member) or ".." in member:
            raise ValidationError(
                f"{member!r} is not datasets/<name>/<file> (lower-case name, plain file name)",
                field="datasets",
            )
        if member in sources:
            raise ValidationError(f"{member} is given twice", field="datasets")
        if not file.is_file():
            raise ValidationError(f"dataset file {file} is not a regular file", field="datasets")
        digest = hashlib.sha256()
        size = 0
        with open(file, "rb") as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        files.append(BundleDatasetFile(member, digest.hexdigest(), size))
        sources[member] = file
    return files, sources


def _image_entries(images: Sequence[Path]) -> tuple[list[BundleImage], dict[str, Path]]:
    """The image archives to write, by sha256 (sorted; one copy of each), hashed now."""
    found: dict[str, BundleImage] = {}
    sources: dict[str, Path] = {}
    for file in (Path(p) for p in images):
        if not file.is_file():
            raise ValidationError(f"image archive {file} is not a regular file", field="images")
        digest = hashlib.sha256()
        size = 0
        with open(file, "rb") as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        sha = digest.hexdigest()
        if sha not in found:
            found[sha] = BundleImage(sha, size, file.name)
            sources[sha] = file
    return [found[sha] for sha in sorted(found)], sources


def _subject(obj: object) -> bytes:
    message = getattr(obj, "message", b"") or b""
    line = message.split(b"\n", 1)[0].strip()
    return bytes(c for c in line if c >= 0x20)[:200]


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
    f: IO[bytes],
    artifact: BundleArtifact,
    file: Path,
    advance: Callable[[int], None],
    *,
    prefix: str = ARTIFACT_PREFIX,
) -> None:
    digest = hashlib.sha256()
    f.write(_tar_header(f"{prefix}{artifact.sha256}", artifact.size))
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

"""``keystone bundle inspect``: what a bundle carries, and whether its revision verifies."""

from __future__ import annotations

import hashlib
import tempfile
import zlib
from pathlib import Path
from typing import Any

from keystone.env import substitution_env
from keystone.errors import BundleError, KeystoneError
from keystone.sources.bundle import import_bundle, inspect_bundle, open_bundle
from keystone.sources.git import GitMirror
from keystone.sync.resolve import resolve
from keystone.trust import CommitVerifier, TrustPolicy


def inspect(path: Path, *, allowed_signers: Path | None = None) -> dict[str, Any]:
    """Headers, artifacts, and (when its objects are complete) signer and components per label.

    The objects are imported into a throwaway mirror; an incremental bundle's tree can be read
    only when it carries everything the tip needs, otherwise that is said in ``error``.
    """
    info = inspect_bundle(path)
    data: dict[str, Any] = {
        "path": str(path),
        "kind": info.kind,
        "size": info.size,
        "revision": info.revision,
        "ref": info.ref,
        "prerequisites": list(info.prerequisites),
        "artifacts": [{"sha256": a.sha256, "size": a.size, "name": a.name} for a in info.artifacts],
        "components": {},
    }
    if info.datasets:  # only then: the output of a bundle without datasets is as it was
        data["datasets"] = [
            {"path": d.path, "sha256": d.sha256, "size": d.size} for d in info.datasets
        ]
    if info.images:  # likewise for container image archives
        data["images"] = [{"sha256": i.sha256, "size": i.size, "name": i.name} for i in info.images]
    if info.prerequisites:
        # The tree may lean on objects only a device has, but the new commits are in the pack:
        # the tip's signature can be judged here; its plans only on the device.
        data["error"] = (
            "incremental bundle: components per label are resolved on a device that has its "
            "prerequisites"
        )
        if allowed_signers is not None:
            try:
                raw = _tip_commit(path, info.revision)
            except KeystoneError as exc:
                data["error"] = str(exc)
                return data
            if raw is None:
                data["error"] += (
                    "; the tip commit is stored as a delta against a prerequisite, so its "
                    "signature is checked there too"
                )
            else:
                data["signature"] = _signature(raw, info.revision, allowed_signers)
        return data
    with tempfile.TemporaryDirectory(prefix="keystone-inspect-") as tmp:
        mirror = GitMirror(Path(tmp) / "repo")
        try:
            import_bundle(path, mirror, max_bytes=path.stat().st_size + 1)
            raw = mirror.raw_commit(info.revision)
            data["commit_time"] = mirror.commit_time(info.revision)
            if allowed_signers is not None:
                data["signature"] = _signature(raw, info.revision, allowed_signers)
            tree = mirror.file_source(info.revision)
            labels = [name for name, is_dir in tree.listdir("labels") if is_dir]
            for label in ["(default)", *labels]:
                try:
                    plan = resolve(
                        tree,
                        device_id="any-device",
                        labels=[] if label == "(default)" else [label],
                        environ=substitution_env(),
                        revision=info.revision,
                    )
                    data["components"][label] = sorted(plan.components)
                except KeystoneError as exc:
                    data["components"][label] = [f"invalid: {exc}"]
        except KeystoneError as exc:
            data["error"] = str(exc)
        finally:
            mirror.close()
    return data


def _signature(raw: bytes, revision: str, allowed_signers: Path) -> dict[str, Any]:
    v = CommitVerifier(TrustPolicy(allowed_signers)).verify(raw, revision=revision)
    return {
        "ok": v.ok,
        "format": v.format,
        "signer": v.signer,
        "fingerprint": v.fingerprint,
        "reason": v.reason,
    }


_TYPE_NAMES = {1: b"commit", 4: b"tag"}


def _tip_commit(path: Path, revision: str) -> bytes | None:
    """The raw tip commit of a bundle, read from its own pack (no prerequisites needed).

    The pack is read in order until the tip appears (git and Keystone write commits first);
    commits and tags are kept to resolve deltas among them and to peel an annotated tag.

    Returns:
        The commit's bytes, or None when it is a delta against an object outside the pack.

    Raises:
        keystone.errors.BundleError: the pack cannot be read.
    """
    # lazy: dulwich is heavy, and only this path of `bundle inspect` reads a pack itself
    from dulwich.errors import ChecksumMismatch
    from dulwich.pack import OFS_DELTA, REF_DELTA, PackStreamReader, apply_delta

    want = bytes.fromhex(revision)
    with open_bundle(path) as bundle:
        pack = bundle.pack()
        seen: dict[int | bytes, tuple[int, bytes]] = {}  # by pack offset and by binary sha
        try:
            for obj in PackStreamReader(hashlib.sha1, pack.read).read_objects():
                kind, body = obj.pack_type_num, b"".join(obj.decomp_chunks)
                if kind in (OFS_DELTA, REF_DELTA):
                    key = (
                        obj.offset - obj.delta_base
                        if kind == OFS_DELTA
                        and isinstance(obj.offset, int)
                        and isinstance(obj.delta_base, int)
                        else obj.delta_base
                    )
                    base = seen.get(key) if key is not None else None
                    if base is None:
                        continue  # a delta against a tree, a blob or a prerequisite
                    kind, body = base[0], b"".join(apply_delta(base[1], body))
                if kind not in _TYPE_NAMES:
                    continue
                sha = hashlib.sha1(b"%s %d\0%s" % (_TYPE_NAMES[kind], len(body), body)).digest()
                if obj.offset is not None:
                    seen[obj.offset] = (kind, body)
                seen[sha] = (kind, body)
                while want in seen:
                    found_kind, found = seen[want]
                    if found_kind == 1:
                        return found
                    # An annotated tag: its first line is "object <id>"; follow it.
                    want = bytes.fromhex(found.split(b"\n", 1)[0][7:].decode("ascii"))
        except (zlib.error, ChecksumMismatch, ValueError, AssertionError) as exc:
            raise BundleError(f"{path}: the pack cannot be read ({exc}); copy it again") from exc
    return None

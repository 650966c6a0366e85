"""``keystone bundle inspect``: what a bundle carries, and whether its revision verifies."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from keystone.errors import KeystoneError


def inspect(path: Path, *, allowed_signers: Path | None = None) -> dict[str, Any]:
    """Headers, artifacts, and (when its objects are complete) signer and components per label.

    The objects are imported into a throwaway mirror; an incremental bundle's tree can be read
    only when it carries everything the tip needs, otherwise that is said in ``error``.
    """
    from keystone.sources.bundle import import_bundle, inspect_bundle
    from keystone.sources.git import GitMirror

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
    if info.prerequisites:
        data["error"] = (
            "incremental bundle: signer and plans are checked on a device that has its prerequisites"
        )
        return data
    with tempfile.TemporaryDirectory(prefix="keystone-inspect-") as tmp:
        mirror = GitMirror(Path(tmp) / "repo")
        try:
            import_bundle(path, mirror, max_bytes=path.stat().st_size + 1)
            raw = mirror.raw_commit(info.revision)
            data["commit_time"] = mirror.commit_time(info.revision)
            if allowed_signers is not None:
                from keystone.trust import CommitVerifier, TrustPolicy

                v = CommitVerifier(TrustPolicy(allowed_signers)).verify(raw, revision=info.revision)
                data["signature"] = {
                    "ok": v.ok,
                    "format": v.format,
                    "signer": v.signer,
                    "fingerprint": v.fingerprint,
                    "reason": v.reason,
                }
            tree = mirror.file_source(info.revision)
            from keystone.agent import substitution_env
            from keystone.sync.resolve import resolve

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

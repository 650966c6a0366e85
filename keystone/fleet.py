"""Offline tools on a fleet checkout: render a device's plan, diff two revisions, verify a
commit, and build a bundle with what its plans need. No agent is needed; nothing is deployed.

The CLI (``keystone.cli.fleet``, ``verify --rev``) is only the face of these.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keystone.diff import plan_actions
from keystone.env import substitution_env
from keystone.errors import KeystoneError, ValidationError
from keystone.plan import DesiredPlan
from keystone.sources.base import DirectoryReader
from keystone.sources.documents import DocumentFile
from keystone.sources.git import GitMirror
from keystone.sync.resolve import render as render_rows
from keystone.sync.resolve import resolve


@dataclass
class Checkout:
    """A fleet repository on disk (a checkout or a bare repository)."""

    path: Path

    def mirror(self) -> GitMirror:
        """The repository opened read-only as a git mirror."""
        return GitMirror(self.path, create=False)

    def tree(self, rev: str | None) -> tuple[Any, str]:
        """A file reader for ``rev`` (None: the working tree as it is) and a label for it."""
        if rev is None:
            if not self.path.is_dir():
                raise ValidationError(f"{self.path} is not a directory", field="--repo")
            return DirectoryReader(self.path), "working tree"
        m = self.mirror()
        sha = resolve_rev(m, rev)
        return m.file_source(sha), sha

    def documents(self) -> DocumentFile | None:
        """The parsed recipes kept in the repository's git directory (None: not a repository,
        whose error ``tree`` gives)."""
        try:
            git_dir = self.mirror().git_dir
        except KeystoneError:
            return None
        return DocumentFile.load(git_dir)


_SUFFIX = re.compile(r"(~\d*|\^\d*)$")


def resolve_rev(mirror: Any, rev: str) -> str:
    """Resolve a ref or commit with git's ``~N`` / ``^N`` suffixes (``HEAD~1``, ``main^2``)."""
    steps: list[str] = []
    base = rev
    while (m := _SUFFIX.search(base)) and m.start() > 0:
        steps.append(m.group(1))
        base = base[: m.start()]
    sha: str = mirror.resolve(base)
    for step in reversed(steps):
        count = int(step[1:] or 1)
        if step[0] == "~":
            for _ in range(count):
                parents = mirror.parents(sha)
                if not parents:
                    raise ValidationError(f"{rev}: {sha[:12]} has no parent", field="revision")
                sha = parents[0]
        else:
            parents = mirror.parents(sha)
            if count == 0:
                continue
            if len(parents) < count:
                raise ValidationError(
                    f"{rev}: {sha[:12]} has no parent number {count}", field="revision"
                )
            sha = parents[count - 1]
    return sha


def resolve_at(
    repo: Path,
    rev: str | None,
    *,
    device: str,
    labels: Sequence[str],
    cache: dict[Any, Any] | None = None,
    documents: DocumentFile | None = None,
) -> tuple[DesiredPlan, str]:
    """The desired plan of a device at ``rev`` of ``repo`` (``documents``: the recipes parsed
    by an earlier run, :meth:`Checkout.documents`; the caller saves it)."""
    tree, label = Checkout(repo).tree(rev)
    return resolve(
        tree,
        device_id=device,
        labels=labels,
        environ=substitution_env(),
        revision=label if rev else "",
        cache=cache,
        documents=documents,
    ), label


def rollout_at(
    repo: Path, rev: str | None, *, device: str, labels: Sequence[str]
) -> dict[str, Any] | None:
    """The device's wave of ``rev`` and when it opens, from its ``rollout.toml`` (None: none).

    A device's wave depends on the commit id, so the working tree (no commit yet) shows the
    waves' delays after the commit and the wave only for a device pinned by a canary label.
    """
    from keystone.rollout import ROLLOUT_FILE, assign, parse_rollout
    from keystone.windows import describe

    checkout = Checkout(repo)
    tree, label = checkout.tree(rev)
    data = tree.read(ROLLOUT_FILE)
    if data is None:
        return None
    where = ROLLOUT_FILE if rev is None else f"{ROLLOUT_FILE}@{label[:12]}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("not UTF-8 text", file=where) from None
    spec = parse_rollout(text, file=where)
    policy, override = spec.policy_for(labels)
    if rev is None:
        pinned = any(c in labels for c in policy.canary_labels)
        return {
            "wave": 1 if pinned else None,
            "waves": len(policy.waves),
            "fractions": list(policy.waves),
            "delays": list(policy.offsets()),
            "pinned": pinned,
            "halted": policy.halted,
            "label": override,
            "maintenance": policy.maintenance.to_json() if policy.maintenance else None,
        }
    a = assign(
        spec,
        device_id=device,
        labels=labels,
        revision=label,
        commit_time=float(checkout.mirror().commit_time(label)),
    )
    return {
        **a.to_json(),
        "fractions": list(policy.waves),
        "delays": list(policy.offsets()),
        "at_utc": describe(a.at),
    }


def render(repo: Path, rev: str | None, *, device: str, labels: Sequence[str]) -> dict[str, Any]:
    """What a device with these labels would run, with each component's origin (and, when the
    repository has a ``rollout.toml``, the device's wave and when it opens)."""
    docs = Checkout(repo).documents() if rev is not None else None
    try:
        plan, label = resolve_at(repo, rev, device=device, labels=labels, documents=docs)
    finally:
        if docs is not None:
            docs.save()
    rollout = rollout_at(repo, rev, device=device, labels=labels)
    extra = {"rollout": rollout} if rollout is not None else {}
    return {
        "revision": label,
        "device": device,
        "labels": list(labels),
        "plan_files": list(plan.sources),
        "layers": [list(layer) for layer in plan.graph.layers],
        "components": render_rows(plan),
        "warnings": list(plan.warnings),
        "unknown_fields": list(plan.unknown_fields),
        **extra,
    }


def diff(
    repo: Path,
    rev_a: str,
    rev_b: str,
    *,
    device: str,
    labels: Sequence[str],
    graphs: bool = False,
) -> dict[str, Any]:
    """What moving a device from ``rev_a`` to ``rev_b`` would change, and in what order;
    with ``graphs``, also both dependency graphs (``{"from": ..., "to": ...}``, each as
    ``GET /v1/plan/graph`` answers it) for a picture of the change."""
    # Recipes unchanged between the revisions are read and parsed once (keystone.plan.RECIPES),
    # and those an earlier run parsed are not parsed again (keystone.sources.documents).
    docs = Checkout(repo).documents()
    try:
        a, la = resolve_at(repo, rev_a, device=device, labels=labels, documents=docs)
        b, lb = resolve_at(repo, rev_b, device=device, labels=labels, documents=docs)
    finally:
        if docs is not None:
            docs.save()
    changes, actions = plan_actions(a, b)
    out: dict[str, Any] = {
        "from": la,
        "to": lb,
        "changes": changes.to_json(),
        "actions": [x.to_json() for x in actions],
    }
    if graphs:
        out["graphs"] = {"from": a.graph.to_json(), "to": b.graph.to_json()}
    return out


def verify(
    repo: Path,
    rev: str,
    *,
    allowed_signers: Path | None,
    gpg_home: Path | None = None,
    revoked_keys: Path | None = None,
) -> dict[str, Any]:
    """The signature verdict of commit ``rev``, as the agent would judge it."""
    # lazy: the verifier (and cryptography behind it) is for verify, not for diff or render
    from keystone.trust import CommitVerifier, TrustPolicy

    m = Checkout(repo).mirror()
    sha = resolve_rev(m, rev)
    verdict = CommitVerifier(TrustPolicy(allowed_signers, gpg_home, revoked_keys)).verify(
        m.raw_commit(sha), revision=sha
    )
    return {
        "revision": sha,
        "ok": verdict.ok,
        "format": verdict.format,
        "signer": verdict.signer,
        "fingerprint": verdict.fingerprint,
        "reason": verdict.reason,
    }


def _with_plans(repo: Path, rev: str | None, folder: str) -> list[str]:
    """The names under ``folder`` (``labels``, ``devices``) that have a plan of their own."""
    tree, _ = Checkout(repo).tree(rev)
    return [
        name
        for name, is_dir in tree.listdir(folder)
        if is_dir and tree.read(f"{folder}/{name}/plan.toml") is not None
    ]


def all_labels(repo: Path, rev: str | None) -> list[str]:
    """Every label that has a plan in the repository."""
    return _with_plans(repo, rev, "labels")


def all_devices(repo: Path, rev: str | None) -> list[str]:
    """Every device id that has a plan of its own in the repository."""
    return _with_plans(repo, rev, "devices")


def bundle_artifacts(
    repo: Path, rev: str, *, targets: Sequence[tuple[str, Sequence[str]]], work: Path
) -> list[tuple[str, Path, str]]:
    """Every artifact the selected plans need at ``rev``, as ``(sha256, file, name)``.

    Repo-relative artifacts are exported from the commit; remote ones are downloaded (and
    verified against their pinned sha256) into ``work``. Each file is named after its URI's
    last segment (what the bundle's manifest and ``bundle inspect`` show), and each artifact is
    exported or fetched once however many plans use it.
    """
    # lazy: the artifact store (and its HTTP client) is for bundles, not for diff or render
    from keystone.runtime.artifacts import ArtifactPolicy, ArtifactStore, artifact_name

    m = Checkout(repo).mirror()
    sha = resolve_rev(m, rev)
    tree = m.file_source(sha)
    store = ArtifactStore(ArtifactPolicy.from_env(work / "cache", dict(os.environ)))
    seen: dict[str, tuple[str, Path, str]] = {}
    done: set[str] = set()
    for device, labels in targets:
        plan, _ = resolve_at(repo, sha, device=device, labels=labels)
        for comp in plan.components.values():
            for art in comp.recipe.artifacts:
                pinned = (art.sha256 or "").lower()
                if art.uri in done or pinned in seen:
                    continue
                done.add(art.uri)
                dest = Path(tempfile.mkdtemp(dir=work)) / artifact_name(art.uri)
                if "://" not in art.uri:
                    tree.export(art.uri, dest)
                    with dest.open("rb") as f:
                        digest = hashlib.file_digest(f, "sha256").hexdigest()
                    if pinned and pinned != digest:
                        raise ValidationError(
                            f"artifact {art.uri} of {comp.name} hashes to {digest}, the recipe pins {art.sha256}",
                            file=comp.recipe.source,
                            field="artifacts.sha256",
                        )
                    seen.setdefault(digest, (digest, dest, art.uri))
                else:
                    if not pinned:
                        raise ValidationError(
                            f"artifact {art.uri} of {comp.name} has no sha256; a bundle carries only pinned artifacts",
                            file=comp.recipe.source,
                            field="artifacts.sha256",
                        )
                    prepared = store.prepare(art, component=comp.name)
                    # A hard link gives the cached blob its URI's name at no cost.
                    try:
                        os.link(prepared.path, dest)
                    except OSError:
                        shutil.copyfile(prepared.path, dest)
                    seen[pinned] = (pinned, dest, art.uri)
    return sorted(seen.values())


def build_bundle(
    out: Path,
    repo: Path,
    rev: str,
    *,
    since: str | None = None,
    labels: Sequence[str] = (),
    every_label: bool = False,
    devices: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
    datasets: Path | None = None,
    images: Sequence[Path] = (),
) -> dict[str, Any]:
    """Write a bundle of ``rev`` of ``repo`` (incremental ``since`` a commit the devices have)
    with every artifact the plans of the chosen targets need; return what it carries.

    ``datasets`` is a directory of ``<dataset name>/`` directories, each with one signed
    ``*.manifest.toml``, its ``.sig``, an optional ``.crt`` and the payload file; they are
    carried as ``datasets/<name>/<file>`` (checked for shape here, verified on the device).

    The targets are any device, plus any device with ``labels``, plus each of ``devices`` with
    ``labels``; ``every_label`` adds every label and every device that has a plan.

    ``images`` are container image archives (``podman save -o``, ``docker save -o``) carried as
    ``images/<sha256>`` and loaded into the device's engine on import.
    """
    # lazy: the bundle writer is for bundles, not for diff or render
    from keystone.sources.bundle import create_bundle

    sha = resolve_rev(Checkout(repo).mirror(), rev)
    targets: list[tuple[str, list[str]]] = [("any-device", [])]
    if every_label:
        targets += [("any-device", [label]) for label in all_labels(repo, sha)]
        targets += [(d, []) for d in all_devices(repo, sha)]
    elif labels:
        targets.append(("any-device", list(labels)))
    targets += [(d, list(labels)) for d in devices]
    with tempfile.TemporaryDirectory(prefix="keystone-bundle-") as work:
        arts = bundle_artifacts(repo, sha, targets=targets, work=Path(work))
        info = create_bundle(
            out,
            repo,
            sha,
            since,
            [(s, p) for s, p, _ in arts],
            progress=progress,
            datasets=dataset_members(datasets) if datasets is not None else (),
            images=images,
        )
    data: dict[str, Any] = {
        "bundle": str(out),
        "revision": info.revision,
        "ref": info.ref,
        "prerequisites": list(info.prerequisites),
        "artifacts": [{"sha256": a.sha256, "size": a.size, "name": a.name} for a in info.artifacts],
        "size": info.size,
    }
    if info.datasets:  # only then: the output of a bundle without datasets is as it was
        data["datasets"] = [
            {"path": d.path, "sha256": d.sha256, "size": d.size} for d in info.datasets
        ]
    if info.images:  # likewise for container images
        data["images"] = [{"sha256": i.sha256, "size": i.size, "name": i.name} for i in info.images]
    return data


def dataset_members(root: Path) -> list[tuple[str, Path]]:
    """The ``(datasets/<name>/<file>, file)`` pairs of a ``--datasets`` directory.

    Each ``<name>/`` must read as the device will read it (one manifest that parses, its
    payload present; :func:`keystone.datasets.bundle.read_bundle_datasets`); only the manifest,
    its ``.sig``, its ``.crt`` and the payload are taken.

    Raises:
        keystone.errors.ValidationError: not a directory, or a dataset that does not read.
    """
    # lazy: the dataset reader (manifests), only for a bundle that carries datasets
    from keystone.datasets.bundle import read_bundle_datasets

    root = Path(root)
    if not root.is_dir():
        raise ValidationError(f"--datasets {root} is not a directory", field="datasets")
    out: list[tuple[str, Path]] = []
    with tempfile.TemporaryDirectory(prefix="keystone-datasets-") as tmp:
        # The device reads <bundle>/datasets/<name>/: show the reader the same shape.
        (Path(tmp) / "datasets").symlink_to(root.resolve(), target_is_directory=True)
        try:
            entries = list(read_bundle_datasets(Path(tmp)))
        except KeystoneError as exc:
            raise ValidationError(f"--datasets {root}: {exc}", field="datasets") from exc
    for name, _body, _sig, _cert, payload in entries:
        d = root / name
        [manifest] = sorted(d.glob("*.toml"))
        files = [manifest, d / payload.name]
        files += [
            p
            for p in (manifest.with_name(manifest.name + x) for x in (".sig", ".crt"))
            if p.is_file()
        ]
        out += [(f"datasets/{name}/{f.name}", f) for f in dict.fromkeys(files)]
    return out

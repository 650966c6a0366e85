"""Datasets carried in a bundle: manifests, signatures and payload files, verified like a refresh.

Inside a bundle's directory tree::

    datasets/<name>/<anything>.manifest.toml    the signed manifest (exactly one *.toml)
    datasets/<name>/<anything>.manifest.toml.sig
    datasets/<name>/<anything>.manifest.toml.crt   optional: the signer certificate
    datasets/<name>/<file>                      the payload, named as the manifest's uri ends

``<name>`` is the recipe's dataset name. Nothing here is trusted for being in the bundle: each
entry goes through :meth:`keystone.datasets.manager.DatasetManager.import_entries`, which checks
the signature, the anti-replay rule and the payload digest exactly as a refresh does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from keystone import manifest as _manifest
from keystone.datasets.refresh import MAX_CERT_BYTES, MAX_SIGNATURE_BYTES, artifact_name
from keystone.datasets.spec import check_name
from keystone.errors import BundleError

BundleEntry = tuple[str, bytes, bytes | None, bytes | None, Path]
"""``(dataset name, manifest bytes, signature bytes, certificate bytes, payload file)``."""


def _read(path: Path, limit: int) -> bytes | None:
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{path} is larger than {limit} bytes")
    return data


def read_bundle_datasets(root: Path) -> Iterator[BundleEntry]:
    """The dataset entries under ``root/datasets`` (none when the directory is absent).

    Raises:
        BundleError: a dataset directory without exactly one manifest, a manifest that does not
            parse, or a missing payload file.
    """
    base = Path(root) / "datasets"
    if not base.is_dir():
        return
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        why = check_name(d.name)
        if why:
            raise BundleError(f"bundle dataset directory {d.name!r}: {why}")
        manifests = sorted(d.glob("*.toml"))
        if len(manifests) != 1:
            raise BundleError(
                f"bundle dataset {d.name}: expected one *.toml manifest, found {len(manifests)}"
            )
        mpath = manifests[0]
        body = _read(mpath, _manifest.max_manifest_bytes())
        assert body is not None
        try:
            m = _manifest.parse_manifest(body, source=str(mpath))
        except _manifest.ManifestError as exc:
            raise BundleError(f"bundle dataset {d.name}: {exc}") from exc
        payload = d / artifact_name(m.artifact.uri)
        if not payload.is_file():
            raise BundleError(
                f"bundle dataset {d.name}: the payload {payload.name} named by its manifest is "
                "not in the bundle"
            )
        sig = _read(mpath.with_name(mpath.name + ".sig"), MAX_SIGNATURE_BYTES)
        cert = _read(mpath.with_name(mpath.name + ".crt"), MAX_CERT_BYTES)
        yield d.name, body, sig, cert, payload

"""Bundles carrying datasets, in a real agent: made by ``keystone bundle create --datasets``.

The agent's trust bundle comes from ``[trust] trust_bundle`` in agent.toml (no environment). A
bundle brings the fleet revision and a newer, openssl-signed dataset version: the revision
deploys, the component starts on the version fetched from the hub, and the bundle's version is
then activated in place (same pid, SIGHUP). A second bundle whose dataset signature is bad still
applies its revision; the dataset is refused with the reason and the old version stays active.
"""

from __future__ import annotations

import shutil
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keystone import manifest
from keystone.datasets.refresh import artifact_name
from tests.conftest import wait_until
from tests.integration.agent.conftest import make_agent  # noqa: F401 - the fixture
from tests.integration.bundles.conftest import (  # noqa: F401 - the fixture
    BundleFleet,
    as_json,
    bfleet,
    device_config,
    history,
    keystone,
    revision,
)

from .conftest import Hub, Publisher
from .test_agent_datasets import READER, reads

pytestmark = pytest.mark.integration


def app_recipe(tmp_path: Path, hub: Hub, publisher: Publisher) -> str:
    script = tmp_path / "reader.py"
    script.write_text(READER)
    return f"""[metadata]
name = "app"
version = "1.0.0"

[[datasets]]
name = "cve"
manifest = "{hub.url(publisher.manifest_path)}"
cert_uri = "{hub.url("signer.pem")}"
refresh = "1h"

[lifecycle.run.exec]
command = "{sys.executable}"
args = ["{script}", "{tmp_path / "reads.log"}"]

[lifecycle.reload]
signal = "SIGHUP"
grace = "1s"
"""


def dataset_dir(root: Path, publisher: Publisher, day: int, sig: bytes) -> Path:
    """``root/cve/``: the manifest of ``day`` as published, ``sig`` as its .sig, its payload."""
    d = root / "cve"
    d.mkdir(parents=True)
    mpath = publisher.work / f"cve-{day}.manifest.toml"
    shutil.copy(mpath, d / "cve.manifest.toml")
    (d / "cve.manifest.toml.sig").write_bytes(sig)
    (d / "cve.manifest.toml.crt").write_bytes(publisher.pki.cert("signer").read_bytes())
    uri = manifest.parse_manifest(mpath.read_bytes()).artifact.uri
    shutil.copy(publisher.work / f"cve-{day}.tar", d / artifact_name(uri))
    return root


def imported(agent: Any, bundle: Path) -> dict[str, Any]:
    r = agent.cli("bundle", "import", str(bundle), "--json")
    data: dict[str, Any] = as_json(r)
    assert r.returncode == 0, r.stdout + r.stderr
    return data


def test_bundle_datasets_in_a_real_agent(
    make_agent: Any,  # noqa: F811
    bfleet: BundleFleet,  # noqa: F811
    tmp_path: Path,
    hub: Hub,
    publisher: Publisher,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    # The bundles' material: version 2 signed with openssl; version 3 carrying the signature of
    # version 2 (genuine, but not of this manifest).
    publisher.publish(3, text="feed three", published=now - timedelta(minutes=30))
    publisher.publish(2, text="feed two", published=now - timedelta(hours=1), openssl_signer=True)
    sig2 = hub.files[publisher.manifest_path + ".sig"]
    good = dataset_dir(tmp_path / "good", publisher, 2, sig2)
    bad = dataset_dir(tmp_path / "bad", publisher, 3, sig2)
    # The hub serves version 1, older than the bundle's.
    publisher.publish(1, text="feed one", published=now - timedelta(hours=2))

    fleet = bfleet.fleet
    rev1 = fleet.commit(
        {
            "recipes/app.recipe.toml": app_recipe(tmp_path, hub, publisher),
            "plans/default.toml": fleet.plan("app"),
        },
        "app with a dataset",
    )
    bundle = tmp_path / "one.ksb"
    created = as_json(bfleet.create(bundle, "--datasets", str(good)))
    assert sorted(d["path"] for d in created["datasets"]) == [
        "datasets/cve/cve-2026-08-16.tar",
        "datasets/cve/cve.manifest.toml",
        "datasets/cve/cve.manifest.toml.crt",
        "datasets/cve/cve.manifest.toml.sig",
    ]
    r = keystone("bundle", "inspect", str(bundle), cwd=tmp_path)
    assert "dataset:" in r.stdout and "datasets/cve/cve.manifest.toml" in r.stdout, r.stdout

    ca = publisher.pki.cert("ca")
    config = device_config(tmp_path / "agent.toml", bfleet, trust=f'trust_bundle = "{ca}"\n')
    agent = make_agent("--config", str(config), runtime=tmp_path / "runtime").start()

    result = imported(agent, bundle)
    assert result["result"] == "applied" and result["revision"] == rev1, result
    assert result["datasets"] == [{"name": "cve", "result": "updated", "version": "2026-08-16"}]
    agent.wait_states({"app": "healthy"})
    # The bundle's version is in place before the component's first start: an air-gapped
    # device needs no hub for a required dataset (the hub's older version 1 is never taken).
    first = wait_until(lambda: reads(tmp_path)[:1], timeout=20, what="the start read")[0]
    assert first[0] == "start" and first[2] == "feed two", reads(tmp_path)
    status, listed = agent.api("GET", "/v1/datasets")
    assert status == 200 and listed[0]["version"] == "2026-08-16", listed
    assert not (agent.runtime / "bundles" / "datasets").exists()

    # A bad dataset signature: the revision applies, the dataset is refused, version 2 stays.
    rev2 = fleet.commit({"notes.txt": "a change that touches no component\n"}, "notes")
    result = imported(agent, bundle2 := bfleet.bundle(tmp_path / "two.ksb", "--datasets", str(bad)))
    assert bundle2.exists()
    assert result["result"] == "applied" and result["revision"] == rev2, result
    [refused] = result["datasets"]
    assert refused["name"] == "cve" and refused["result"] == "failed"
    assert "signature" in refused["reason"], refused
    assert revision(agent)["applied"] == rev2
    status, listed = agent.api("GET", "/v1/datasets")
    assert listed[0]["version"] == "2026-08-16" and "signature" in listed[0]["lastResult"]
    assert (agent.runtime / "datasets" / "cve" / "current" / "data.txt").read_text().strip() == (
        "feed two"
    )
    assert agent.components()["app"]["pid"] == first[1]
    events = [h for h in history(agent) if h["kind"] in ("dataset", "sync")]
    assert any(h["kind"] == "dataset" and h["result"] == "failed" for h in events), events
    [sync2] = [h for h in events if h["kind"] == "sync" and h["revision"] == rev2]
    assert sync2["result"] == "applied" and sync2["datasets"][0]["result"] == "failed"

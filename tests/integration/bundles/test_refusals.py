"""Bad bundles are refused with a clear reason, and nothing on the device changes.

One device (a real agent with no network source, ``max_age = 720h`` and a 4 MiB bundle bound)
applies a good bundle once; every case then offers it one bad file through
``keystone bundle import`` and checks the answer and the device.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.integration.agent.conftest import AgentProc

from .conftest import (
    BundleFleet,
    as_json,
    bundle_fleet_at,
    cache_blobs,
    device_config,
    revision,
    sha256,
    stop_agents,
)

pytestmark = pytest.mark.integration

LIMIT = 4 << 20


@dataclass
class Device:
    """The shared device and the fleet its bundles come from."""

    fleet: BundleFleet
    agent: AgentProc
    old: str
    good: str
    good_bundle: Path
    tmp: Path

    def state(self, *, cache: bool = True) -> tuple[Any, ...]:
        """What a refused bundle must leave as it was (``cache``: the artifact cache too)."""
        info = revision(self.agent)
        comps = self.agent.components()
        return (
            info["applied"],
            {n: (c["state"], c["pid"], c.get("version")) for n, c in comps.items()},
            cache_blobs(self.agent.runtime) if cache else None,
            sorted(p.name for p in (self.agent.runtime / "components" / "app").iterdir()),
        )

    def new_revision(self, version: str, **kw: Any) -> str:
        """Commit a child of the good revision (not pushed); the work tree returns to it after."""
        rev = self.fleet.commit_app(version, push=False, **kw)
        self.fleet.fleet.reset_hard(self.good)
        return rev


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    tmp = tmp_path_factory.mktemp("device")
    with bundle_fleet_at(tmp) as fleet:
        old = fleet.commit_app("1.0.0")
        good = fleet.commit_app("1.1.0")
        first = fleet.bundle(tmp / "good.ksb")
        cfg = device_config(tmp / "agent.toml", fleet, trust='max_age = "720h"\n')
        agent = AgentProc(
            tmp,
            tmp / "runtime",
            free_port(),
            ["--config", str(cfg)],
            {"KEYSTONE_MAX_BUNDLE_BYTES": str(LIMIT)},
        )
        try:
            agent.start()
            r = agent.cli("bundle", "import", str(first), "--json")
            assert r.returncode == 0 and as_json(r)["result"] == "applied", r.stdout + r.stderr
            agent.wait_states({"app": "healthy"})
            yield Device(fleet, agent, old, good, first, tmp)
        finally:
            stop_agents([agent])


# -- the bad files -------------------------------------------------------------------------------


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]


def _member_offset(bundle: Path, name: str) -> int:
    with tarfile.open(bundle) as tar:
        return tar.getmember(name).offset_data


def truncated(d: Device, out: Path) -> Path:
    data = d.good_bundle.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


def flipped_pack(d: Device, out: Path) -> Path:
    data = d.good_bundle.read_bytes()
    start = _member_offset(d.good_bundle, "repo.bundle")
    pack = data.index(b"PACK", start)
    out.write_bytes(_flip(data, pack + 40))
    return out


def flipped_git_pack(d: Device, out: Path) -> Path:
    rev = d.new_revision("1.2.0")
    d.fleet.fleet.git("branch", "-f", "next", rev)
    made = d.fleet.git_bundle(d.tmp / "next.bundle", "next")
    data = made.read_bytes()
    out.write_bytes(_flip(data, data.index(b"PACK") + 40))
    return out


def unsigned_tip(d: Device, out: Path) -> Path:
    return d.fleet.bundle(out, "--rev", d.new_revision("1.3.0", sign=None))


def stranger_signed(d: Device, out: Path) -> Path:
    return d.fleet.bundle(out, "--rev", d.new_revision("1.3.1", sign="other"))


def older_than_applied(d: Device, out: Path) -> Path:
    return d.fleet.bundle(out, "--rev", d.old)


def stale(d: Device, out: Path) -> Path:
    return d.fleet.bundle(out, "--rev", d.new_revision("1.4.0", date="2001-01-01T00:00:00Z"))


def artifact_bytes_wrong(d: Device, out: Path) -> Path:
    payload = b"new payload 1.5.0\n" * 500
    made = d.fleet.bundle(d.tmp / "art.ksb", "--rev", d.new_revision("1.5.0", payload=payload))
    data = made.read_bytes()
    at = _member_offset(made, f"artifacts/{sha256(payload)}") + 100
    out.write_bytes(_flip(data, at))
    return out


def dotdot_member(d: Device, out: Path) -> Path:
    with tarfile.open(d.good_bundle) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
        for name in ("keystone-bundle.json", "repo.bundle"):
            info = src.getmember(name)
            t.addfile(info, src.extractfile(info))
        evil = tarfile.TarInfo("../../evil.txt")
        evil.size = 5
        t.addfile(evil, io.BytesIO(b"evil\n"))
    return out


def unsafe_archive(d: Device, out: Path) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        for name, body in (("ok.txt", b"fine\n"), ("../escape.txt", b"escaped\n")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            t.addfile(info, io.BytesIO(body))
    archive = gzip.compress(raw.getvalue(), mtime=0)
    d.fleet.add_file("artifacts/app/evil.tar.gz", archive)
    extra = (
        f'\n[[artifacts]]\nuri = "artifacts/app/evil.tar.gz"\nsha256 = "{sha256(archive)}"\n'
        "unpack = true\n"
    )
    return d.fleet.bundle(out, "--rev", d.new_revision("1.6.0", artifacts=extra))


def far_over_the_bound(d: Device, out: Path) -> Path:
    payload = os.urandom(5 * LIMIT)
    return d.fleet.bundle(out, "--rev", d.new_revision("1.7.0", payload=payload))


CASES: dict[str, tuple[Callable[[Device, Path], Path], str]] = {
    "truncated": (truncated, r"truncated"),
    "flipped-byte-in-pack": (flipped_pack, r"repo\.bundle is damaged"),
    "flipped-byte-in-git-pack": (flipped_git_pack, r"nothing was imported"),
    "unsigned-tip": (unsigned_tip, r"(?i)not signed|unsigned|no signature"),
    "stranger-signed-tip": (stranger_signed, r"(?i)allowed|signer|principal"),
    "older-than-applied": (older_than_applied, r"does not descend from the applied revision"),
    "stale-tip": (stale, r"older than max_age"),
    "artifact-bytes-wrong": (artifact_bytes_wrong, r"hashes to [0-9a-f]{64}"),
    "dotdot-member": (dotdot_member, r"do not match the manifest.*\.\./\.\./evil\.txt"),
    "unsafe-archive": (unsafe_archive, r"(?i)\.\./escape\.txt|outside|unsafe"),
    "far-over-the-bound": (far_over_the_bound, r"over the limit of 4194304 bytes"),
}


class TestRefusedBundles:
    @pytest.mark.parametrize("case", list(CASES))
    def test_bad_bundle_is_refused_and_nothing_changes(self, device: Device, case: str) -> None:
        """Each bad bundle is refused (exit 3) with a reason that says what is wrong; the applied
        revision, the running processes, the work dirs and the artifact cache stay as they were."""
        make, reason = CASES[case]
        bad = make(device, device.tmp / f"{case}.ksb")
        # An unsafe archive is found while preparing a verified revision: its verified blobs
        # may stay cached (as after a git sync), but nothing is unpacked.
        cache = case != "unsafe-archive"
        before = device.state(cache=cache)
        r = device.agent.cli("bundle", "import", str(bad), "--json")
        text = r.stdout + r.stderr
        # Over the bound, the API answers 413 before reading the body: a usage error (exit 2).
        assert r.returncode == (2 if case == "far-over-the-bound" else 3), text
        assert re.search(reason, text, re.S), text
        if r.stdout.strip():
            assert as_json(r)["result"] == "refused", text
        assert device.state(cache=cache) == before
        for name in ("evil.txt", "escape.txt"):
            assert not list(device.tmp.rglob(name)), f"{name} was written"

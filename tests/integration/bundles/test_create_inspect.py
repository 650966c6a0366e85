"""``keystone bundle create`` and ``bundle inspect`` on a workstation (no agent involved)."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.integration.sources.gitserver import git_env, run_git

from .conftest import CONFIG_PATH, PAYLOAD_PATH, BundleFleet, as_json, keystone, sha256

pytestmark = pytest.mark.integration


def manifest(bundle: Path) -> dict[str, Any]:
    with tarfile.open(bundle) as tar:
        f = tar.extractfile("keystone-bundle.json")
        assert f is not None
        data: dict[str, Any] = json.loads(f.read())
        return data


def inspect(bfleet: BundleFleet, bundle: Path, *args: str) -> tuple[int, dict[str, Any]]:
    r = keystone("bundle", "inspect", str(bundle), "--json", *args, cwd=bfleet.work)
    return r.returncode, as_json(r)


class TestCreate:
    def test_labels_choose_the_artifacts_and_the_same_inputs_give_the_same_bytes(
        self, bfleet: BundleFleet, tmp_path: Path
    ) -> None:
        """Without labels only the default plan's artifacts are packed, --labels edge adds the
        edge overlay's, --all-labels every plan's; each hash-named and sized, and a second run
        writes identical bytes."""
        bfleet.commit_app("1.0.0")
        rev = bfleet.add_edge_label()
        app = {
            sha256(bfleet.payloads[PAYLOAD_PATH.format(version="1.0.0")]),
            sha256((bfleet.work / CONFIG_PATH).read_bytes()),
        }
        edge = sha256(bfleet.payloads["/files/edge-tool.bin"])
        plain = bfleet.bundle(tmp_path / "a" / "plain.ksb")
        labelled = bfleet.bundle(tmp_path / "a" / "edge.ksb", "--labels", "edge")
        every = bfleet.bundle(tmp_path / "a" / "all.ksb", "--all-labels")
        again = bfleet.bundle(tmp_path / "b" / "all.ksb", "--all-labels")

        assert {a["sha256"] for a in manifest(plain)["artifacts"]} == app
        assert {a["sha256"] for a in manifest(labelled)["artifacts"]} == app | {edge}
        doc = manifest(every)
        assert doc["revision"] == rev and doc["prerequisites"] == []
        names = {a["name"]: a["size"] for a in doc["artifacts"]}
        assert names == {
            "payload.bin": len(bfleet.payloads[PAYLOAD_PATH.format(version="1.0.0")]),
            "config.txt": len((bfleet.work / CONFIG_PATH).read_bytes()),
            "edge-tool.bin": len(bfleet.payloads["/files/edge-tool.bin"]),
        }
        with tarfile.open(every) as tar:
            for a in doc["artifacts"]:
                member = tar.extractfile(f"artifacts/{a['sha256']}")
                assert member is not None
                assert hashlib.sha256(member.read()).hexdigest() == a["sha256"]
        assert again.read_bytes() == every.read_bytes()

    def test_incremental_bundle_passes_git_bundle_verify(
        self, bfleet: BundleFleet, tmp_path: Path
    ) -> None:
        """--since OLD records OLD as the prerequisite; git itself verifies the inner bundle
        against a clone that has OLD, and lists the new tip."""
        old = bfleet.commit_app("1.0.0")
        new = bfleet.commit_app("1.1.0")
        out = tmp_path / "delta.ksb"
        made = bfleet.create(out, "--since", old)
        assert made.returncode == 0, made.stderr
        assert as_json(made)["prerequisites"] == [old]
        with tarfile.open(out) as tar:
            inner = tar.extractfile("repo.bundle")
            assert inner is not None
            (tmp_path / "repo.bundle").write_bytes(inner.read())
        env = git_env(bfleet.home)
        clone = tmp_path / "device-repo"
        run_git("clone", "-q", "--no-checkout", str(bfleet.work), str(clone), env=env)
        run_git("update-ref", "refs/heads/main", old, cwd=clone, env=env)
        run_git("bundle", "verify", "-q", str(tmp_path / "repo.bundle"), cwd=clone, env=env)
        heads = run_git("bundle", "list-heads", str(tmp_path / "repo.bundle"), env=env).decode()
        assert f"{new} refs/heads/main" in heads

    @pytest.mark.parametrize("where", ["repo", "http"])
    def test_artifact_not_matching_its_pin_leaves_no_bundle(
        self, bfleet: BundleFleet, tmp_path: Path, where: str
    ) -> None:
        """An artifact whose bytes do not hash to the recipe's pin stops packing with a reason
        naming the artifact and both hashes; no bundle or temporary file is left behind."""
        bfleet.commit_app("1.0.0")
        if where == "repo":
            bfleet.add_file(CONFIG_PATH, b"edited after pinning\n")
            bfleet.fleet.commit({}, "config drifts from its pin")
        else:
            bfleet.files.put(PAYLOAD_PATH.format(version="1.0.0"), b"swapped on the server\n")
        out = tmp_path / "out" / "fleet.ksb"
        r = bfleet.create(out)
        assert r.returncode == 3, r.stdout + r.stderr
        name = "config.txt" if where == "repo" else "payload.bin"
        assert name in r.stderr and "sha256" in r.stderr
        assert not out.exists()
        assert not out.parent.exists() or not list(out.parent.iterdir())

    def test_progress_bar_on_a_terminal(self, bfleet: BundleFleet, tmp_path: Path) -> None:
        """On a terminal, packing draws a progress bar on stderr that ends at 100%."""
        bfleet.commit_app("1.0.0", payload=os.urandom(3 << 20))
        main, sub = pty.openpty()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "keystone", "bundle", "create", str(tmp_path / "f.ksb")],
                cwd=bfleet.work,
                stdout=subprocess.DEVNULL,
                stderr=sub,
                timeout=120,
                check=False,
            )
            os.close(sub)
            sub = -1
            chunks: list[bytes] = []
            while True:
                try:
                    data = os.read(main, 65536)
                except OSError:  # EIO: the terminal's other side is closed and drained
                    break
                if not data:
                    break
                chunks.append(data)
        finally:
            os.close(main)
            if sub >= 0:
                os.close(sub)
        text = b"".join(chunks).decode(errors="replace")
        assert proc.returncode == 0, text
        assert "100.0%" in text and "[##" in text


class TestInspect:
    def test_keystone_bundle_shows_signer_components_and_artifacts(
        self, bfleet: BundleFleet, tmp_path: Path
    ) -> None:
        """inspect names the revision, the verified signer, the components per label, the
        artifacts with sizes and no prerequisites."""
        bfleet.commit_app("1.0.0")
        rev = bfleet.add_edge_label()
        bundle = bfleet.bundle(tmp_path / "all.ksb", "--all-labels")
        code, info = inspect(bfleet, bundle, "--allowed-signers", str(bfleet.allowed))
        assert code == 0, info
        assert (info["kind"], info["revision"], info["ref"]) == ("keystone", rev, "refs/heads/main")
        assert info["prerequisites"] == []
        assert info["signature"]["ok"] and info["signature"]["signer"] == "ops@example.com"
        assert info["components"] == {"(default)": ["app"], "edge": ["app", "edge-tool"]}
        assert {a["name"]: a["size"] for a in info["artifacts"]} == {
            a["name"]: a["size"] for a in manifest(bundle)["artifacts"]
        }
        human = keystone("bundle", "inspect", str(bundle), cwd=tmp_path)
        assert human.returncode == 0 and "payload.bin" in human.stdout and rev in human.stdout

    def test_bundles_made_by_git_full_incremental_and_tagged(
        self, bfleet: BundleFleet, tmp_path: Path
    ) -> None:
        """For `git bundle create` files, full and incremental (of a branch and of an annotated
        tag), inspect reports the tip, the prerequisites and the verdict on the tip's signature."""
        old = bfleet.commit_app("1.0.0")
        new = bfleet.commit_app("1.1.0")
        bfleet.fleet.git("tag", "-a", "-m", "release", "--no-sign", "v2")
        full = bfleet.git_bundle(tmp_path / "full.bundle", "main")
        inc = bfleet.git_bundle(tmp_path / "inc.bundle", f"{old}..main")
        tag = bfleet.git_bundle(tmp_path / "tag.bundle", f"{old}..v2")
        signers = ("--allowed-signers", str(bfleet.allowed))

        code, info = inspect(bfleet, full, *signers)
        assert code == 0 and info["kind"] == "git" and info["revision"] == new, info
        assert info["prerequisites"] == [] and info["components"] == {"(default)": ["app"]}
        assert info["signature"]["ok"] and info["signature"]["signer"] == "ops@example.com"

        for bundle in (inc, tag):
            code, info = inspect(bfleet, bundle, *signers)
            assert code == 0 and info["prerequisites"] == [old], info
            assert info["signature"]["ok"] and info["signature"]["signer"] == "ops@example.com"
            assert "prerequisites" in info["error"]
        assert inspect(bfleet, inc)[1]["revision"] == new

    def test_untrusted_signer_is_reported_with_exit_3(
        self, bfleet: BundleFleet, tmp_path: Path
    ) -> None:
        """Against an allowed-signers file that lacks the signer, inspect says why and exits 3,
        for a full and for an incremental bundle."""
        old = bfleet.commit_app("1.0.0")
        bfleet.commit_app("1.1.0", sign="other")
        only_ops = ("--allowed-signers", str(bfleet.allowed))
        for bundle in (
            bfleet.bundle(tmp_path / "full.ksb"),
            bfleet.bundle(tmp_path / "inc.ksb", "--since", old),
        ):
            code, info = inspect(bfleet, bundle, *only_ops)
            assert code == 3 and not info["signature"]["ok"], info
            assert "not in allowed signers" in info["signature"]["reason"]

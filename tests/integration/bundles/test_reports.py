"""Reports back on the stick: a real bundle made by ``keystone bundle create`` imported from a
watched directory; the agent writes a signed report beside it that verifies at the office with
the device key, and a tampered report or the wrong key is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from keystone import report
from tests.conftest import wait_until

from .conftest import BundleFleet, device_config, keystone, revision

pytestmark = pytest.mark.integration


def _verify(path: Path, key: str, cwd: Path) -> Any:
    return keystone("report", "verify", str(path), "--device-key", key, cwd=cwd)


class TestReportOnTheStick:
    def test_written_on_import_verified_and_refused_when_changed(
        self, bfleet: BundleFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        """Import from a watched stick writes keystone-report-<device>-<time>.json beside the
        bundle; it verifies by key file and by fingerprint; a changed copy and another
        device's key are refused (exit 3) with the reason."""
        rev = bfleet.commit_app("1.0.0")
        bundle = bfleet.bundle(tmp_path / "fleet.ksb")
        media = tmp_path / "media"
        cfg = device_config(tmp_path / "agent.toml", bfleet, watch=[str(media / "*" / "keystone")])
        agent = make_agent("--config", str(cfg))
        agent.start()

        key = wait_until(
            lambda: revision(agent).get("device_key"), timeout=30, what="the device key"
        )
        pub = agent.runtime / "state" / report.PUB_FILE
        assert key["algorithm"] == "ed25519" and key["fingerprint"].startswith("sha256:")
        assert (agent.runtime / "state" / report.KEY_FILE).stat().st_mode & 0o777 == 0o600
        shown = agent.cli("status", "--revision")
        assert f"device key:       ed25519 {key['fingerprint']}" in shown.stdout

        stick = media / "usb0" / "keystone"
        stick.mkdir(parents=True)
        (stick / "fleet.ksb.part").write_bytes(bundle.read_bytes())
        (stick / "fleet.ksb.part").rename(stick / "fleet.ksb")

        written = wait_until(
            lambda: sorted(stick.glob("keystone-report-*.json")), timeout=60, what="the report"
        )
        assert len(written) == 1 and written[0].name.startswith("keystone-report-dev-1-")
        doc = json.loads(written[0].read_text())
        rep = doc["report"]
        assert rep["device"] == "dev-1" and rep["outcome"] == "applied"
        assert rep["revision"]["applied"] == rev
        assert rep["bundle"]["file"] == "fleet.ksb"
        assert [c["name"] for c in rep["components"]] == ["app"]
        assert any(h.get("kind") == "sync" for h in rep["history"])
        assert doc["signature"]["key"] == key["fingerprint"]

        ok = _verify(written[0], str(pub), tmp_path)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "ok:" in ok.stdout and "dev-1" in ok.stdout
        by_fp = _verify(written[0], key["fingerprint"], tmp_path)
        assert by_fp.returncode == 0, by_fp.stdout + by_fp.stderr

        tampered = tmp_path / "tampered.json"
        doc["report"]["outcome"] = "rolled-back"
        tampered.write_text(json.dumps(doc))
        bad = _verify(tampered, str(pub), tmp_path)
        assert bad.returncode == 3 and "bad signature" in bad.stdout, bad.stdout

        other = report.generate_key(tmp_path / "other-device")
        wrong = _verify(written[0], str(tmp_path / "other-device" / report.PUB_FILE), tmp_path)
        assert wrong.returncode == 3 and "signed by another key" in wrong.stdout, wrong.stdout
        wrong_fp = _verify(written[0], other["fingerprint"], tmp_path)
        assert wrong_fp.returncode == 3

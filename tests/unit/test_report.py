"""Device reports (``keystone.report``): key, canonical form, signature, names, verification;
and the agent's ``StickReporter`` on a stick it cannot write."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from keystone import report
from keystone.ledger import Ledger
from keystone.runtime.process import ProcessRunner
from keystone.state import History
from keystone.stick import StickReporter

REPORT = {"format": report.FORMAT, "device": "dev-1", "outcome": "applied", "n": [1, 2.5]}


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


class TestKey:
    def test_made_once_private_0600(self, state: Path) -> None:
        """The first call makes the pair; the second keeps it; the PEM parses without
        cryptography to the same fingerprint."""
        first = report.generate_key(state)
        again = report.generate_key(state)
        assert first == again
        assert (state / report.KEY_FILE).stat().st_mode & 0o777 == 0o600
        raw = report.raw_public_from_pem((state / report.PUB_FILE).read_text())
        assert report.fingerprint(raw) == first["fingerprint"]
        assert report.public_info(state) == first

    def test_no_key_yet(self, state: Path) -> None:
        assert report.public_info(state) is None

    def test_the_resident_side_stays_light(self) -> None:
        """The agent's modules for reports and drift load no cryptography."""
        code = (
            "import sys, keystone.agent, keystone.report, keystone.stick, keystone.drift;"
            "print([m for m in ('cryptography', 'httpx', 'dulwich') if m in sys.modules])"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "[]"


class TestSignVerify:
    def test_round_trip_by_file_and_fingerprint(self, state: Path, tmp_path: Path) -> None:
        """A signed report verifies with the key file, the fingerprint, or the bare hex."""
        doc = report.sign_report(state, REPORT)
        info = report.public_info(state)
        assert info is not None
        for spec in (
            str(state / report.PUB_FILE),
            info["fingerprint"],
            info["fingerprint"].removeprefix("sha256:").upper(),
        ):
            v = report.verify_document(json.loads(json.dumps(doc)), spec)
            assert v.device == "dev-1" and v.fingerprint == info["fingerprint"]

    @pytest.mark.parametrize(
        ("change", "reason"),
        [
            (lambda d: d["report"].__setitem__("outcome", "failed"), "bad signature"),
            (lambda d: d["report"].__setitem__("extra", 1), "bad signature"),
            (lambda d: d["signature"].__setitem__("value", "!!"), "not base64"),
            (lambda d: d["report"].__setitem__("format", "x/9"), "unknown report format"),
            (lambda d: d["signature"].__setitem__("algorithm", "rsa"), "unsupported signature"),
            (lambda d: d.pop("signature"), "objects are needed"),
            (lambda d: d["signature"].__setitem__("key", "sha256:" + "0" * 64), "names a key"),
        ],
    )
    def test_refused(self, state: Path, change: Any, reason: str) -> None:
        """Each change of a signed report is refused with its reason."""
        doc = report.sign_report(state, REPORT)
        change(doc)
        fp = report.generate_key(state)["fingerprint"]
        with pytest.raises(report.ReportRefused, match=reason):
            report.verify_document(doc, fp)

    def test_another_devices_key(self, state: Path, tmp_path: Path) -> None:
        """A report signed by another device, or carrying another key, is refused."""
        doc = report.sign_report(state, REPORT)
        other = report.generate_key(tmp_path / "other")
        with pytest.raises(report.ReportRefused, match="signed by another key"):
            report.verify_document(doc, str(tmp_path / "other" / report.PUB_FILE))
        with pytest.raises(report.ReportRefused, match="signed by another key"):
            report.verify_document(doc, other["fingerprint"])
        # the other device re-signing the same content under its own key is not this device
        forged = report.sign_report(tmp_path / "other", doc["report"])
        with pytest.raises(report.ReportRefused):
            report.verify_document(forged, report.generate_key(state)["fingerprint"])

    def test_key_spec_that_is_neither(self) -> None:
        with pytest.raises(ValueError, match="neither a public key file nor a fingerprint"):
            report.expected_key("sha256:abc")

    def test_canonical_form(self) -> None:
        """Sorted keys, no whitespace, UTF-8 as is."""
        assert report.canonical({"b": 1, "a": ["é", 2.5]}) == '{"a":["é",2.5],"b":1}'.encode()

    def test_worker_round_trip(self, state: Path) -> None:
        """``python -m keystone.report``: keygen then sign, one JSON request each."""
        for req in ({"op": "keygen"}, {"op": "sign", "report": REPORT}):
            out = subprocess.run(
                [sys.executable, "-m", "keystone.report"],
                input=json.dumps({**req, "state": str(state)}),
                capture_output=True,
                text=True,
                check=True,
            )
            answer = json.loads(out.stdout)
            assert answer["error"] is None
        report.verify_document(answer["document"], report.generate_key(state)["fingerprint"])
        sig = base64.b64decode(answer["document"]["signature"]["value"])
        assert len(sig) == 64


class TestNames:
    def test_many_devices_and_same_second(self, tmp_path: Path) -> None:
        """Names carry the device and the UTC time; a second report in the same second gets a
        suffix; unsafe characters of a device id are replaced."""
        when = 1_800_000_000.0
        docs = {"report": REPORT, "signature": {}}
        a1 = report.write_document(tmp_path, "dev-1", when, docs)
        a2 = report.write_document(tmp_path, "dev-1", when, docs)
        b = report.write_document(tmp_path, "plant 7/line:2", when, docs)
        assert a1.name == "keystone-report-dev-1-20270115T080000Z.json"
        assert a2.name == "keystone-report-dev-1-20270115T080000Z-2.json"
        assert b.name == "keystone-report-plant_7_line_2-20270115T080000Z.json"
        assert not list(tmp_path.glob(".*"))

    def test_unwritable_place_raises_oserror(self, tmp_path: Path) -> None:
        with pytest.raises(OSError):
            report.write_document(tmp_path / "gone", "dev-1", 0.0, {"report": {}})


class TestStickReporter:
    def _node(self, tmp_path: Path) -> Any:
        runtime = tmp_path / "runtime"
        (runtime / "state").mkdir(parents=True)
        return SimpleNamespace(
            runtime=runtime,
            runner=ProcessRunner(),
            deployer=SimpleNamespace(supervisors={}),
            ledger=Ledger(),
            events=History(runtime / "state" / "history.jsonl"),
        )

    def test_writes_beside_the_bundle(self, tmp_path: Path) -> None:
        """The report of an import is signed and lands next to the bundle."""
        node = self._node(tmp_path)
        stick = tmp_path / "stick"
        stick.mkdir()
        reporter = StickReporter(node, device="dev-9")

        async def main() -> Path | None:
            await reporter.ensure_key()
            return await reporter(stick / "fleet.ksb", "ab" * 32, {"result": "applied"})

        path = asyncio.run(main())
        assert path is not None and path.parent == stick
        info = report.public_info(node.runtime / "state")
        assert info is not None
        v = report.verify_file(path, info["fingerprint"])
        assert v.report["bundle"] == {"file": "fleet.ksb", "sha256": "ab" * 32}

    def test_a_stick_it_cannot_write_is_logged_not_fatal(self, tmp_path: Path) -> None:
        """A bundle whose directory is gone (or read-only, or full): None, no exception."""
        node = self._node(tmp_path)
        reporter = StickReporter(node, device="dev-9")
        gone = tmp_path / "pulled" / "fleet.ksb"
        assert asyncio.run(reporter(gone, "cd" * 32, {"result": "applied"})) is None

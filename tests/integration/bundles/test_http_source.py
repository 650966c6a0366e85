"""``[source] type = "http"``: conditional polls, resumed downloads and the size bound."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.integration.agent.conftest import AgentProc

from .conftest import BundleFleet, device_config, revision

pytestmark = pytest.mark.integration

BUNDLE = "/fleet.ksb"
LIMIT = 8 << 20


def sync(agent: AgentProc, *args: str) -> tuple[int, dict[str, Any]]:
    r = agent.cli("sync", "--once", "--json", *args)
    try:
        data: dict[str, Any] = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"no JSON (exit {r.returncode}): {r.stdout}{r.stderr}") from None
    return r.returncode, data


@pytest.fixture
def http_agent(bfleet: BundleFleet, make_agent: Any, tmp_path: Path) -> AgentProc:
    """An agent (not started) whose only source is the bundle URL, bound to 8 MiB; it polls once
    at start, then hourly."""
    cfg = device_config(
        tmp_path / "agent.toml",
        bfleet,
        source=f'type = "http"\nurl = "{bfleet.files.url(BUNDLE)}"\ntimeout = "20s"\n',
    )
    agent: AgentProc = make_agent(
        "--config", str(cfg), env={"KEYSTONE_MAX_BUNDLE_BYTES": str(LIMIT)}
    )
    return agent


def boot(agent: AgentProc) -> dict[str, Any]:
    """Start the agent and return the outcome of its first poll."""
    agent.start()
    last: dict[str, Any] = wait_until(
        lambda: revision(agent)["last_sync"], timeout=60, what="the first poll"
    )
    return last


def publish(bfleet: BundleFleet, tmp_path: Path, version: str, **kw: Any) -> tuple[str, bytes]:
    """Commit ``app`` at ``version``, bundle it and publish the bundle; return (rev, bytes)."""
    rev = bfleet.commit_app(version, **kw)
    data = bfleet.bundle(tmp_path / f"{version}.ksb").read_bytes()
    bfleet.files.put(BUNDLE, data)
    return rev, data


class TestPolling:
    def test_unchanged_bundle_costs_one_conditional_request(
        self, bfleet: BundleFleet, http_agent: AgentProc, tmp_path: Path
    ) -> None:
        """A new bundle is downloaded and applied; the next poll is one request answered 304
        with no body, and the revision shows the bundle URL as its source."""
        rev, data = publish(bfleet, tmp_path, "1.0.0")
        last = boot(http_agent)
        assert last["result"] == "applied" and last["revision"] == rev, last
        http_agent.wait_states({"app": "healthy"})
        first = bfleet.files.requests_for(BUNDLE)
        assert [(s.status, s.sent) for s in first] == [(200, len(data))]

        code, out = sync(http_agent)
        assert code == 0 and out["result"] == "up-to-date", out
        polls = bfleet.files.requests_for(BUNDLE)[len(first) :]
        assert [(s.status, s.sent) for s in polls] == [(304, 0)]
        assert polls[0].headers.get("if-none-match") and polls[0].headers.get("if-modified-since")
        assert "range" not in polls[0].headers
        info = revision(http_agent)
        assert info["applied"] == rev and info["source"] == bfleet.files.url(BUNDLE)

    def test_refused_bundle_is_not_downloaded_again(
        self, bfleet: BundleFleet, http_agent: AgentProc, tmp_path: Path
    ) -> None:
        """An unsigned bundle is refused once; later polls are 304s that neither download nor
        import it again."""
        rev, data = publish(bfleet, tmp_path, "1.0.0", sign=None)
        last = boot(http_agent)
        assert last["result"] == "refused" and last["revision"] == rev, last
        assert "unsigned" in last["error"]
        code, out = sync(http_agent)
        assert code in (0, 3) and out["result"] in ("up-to-date", "known-bad"), out
        statuses = [(s.status, s.sent) for s in bfleet.files.requests_for(BUNDLE)]
        assert statuses == [(200, len(data)), (304, 0)]
        assert revision(http_agent)["applied"] is None

    def test_retry_imports_the_unchanged_bundle_again(
        self, bfleet: BundleFleet, http_agent: AgentProc, tmp_path: Path
    ) -> None:
        """A bundle refused for a signer the device did not trust is applied by ``sync --retry``
        once the trust store admits the signer, without downloading it again."""
        rev, data = publish(bfleet, tmp_path, "1.0.0", sign="other")
        last = boot(http_agent)
        assert last["result"] == "refused" and "not in allowed signers" in last["error"], last
        pub = (bfleet.fleet.tmp / "stranger_key.pub").read_text().split()
        with bfleet.allowed.open("a") as f:
            f.write(f'stranger@example.com namespaces="git" {pub[0]} {pub[1]}\n')
        code, out = sync(http_agent)
        assert code == 3 and out["result"] == "known-bad", out
        code, out = sync(http_agent, "--retry")
        assert code == 0 and out["result"] == "applied" and out["revision"] == rev, out
        assert out["signer"] == "stranger@example.com"
        statuses = [(s.status, s.sent) for s in bfleet.files.requests_for(BUNDLE)]
        assert statuses == [(200, len(data)), (304, 0), (304, 0)]
        http_agent.wait_states({"app": "healthy"})


class TestDownloads:
    def test_server_dying_mid_download_resumes_on_the_next_poll(
        self, bfleet: BundleFleet, http_agent: AgentProc, tmp_path: Path
    ) -> None:
        """A download cut off part way fails as unreachable and nothing is applied; the next poll
        asks only for the missing bytes (Range + If-Range) and applies the bundle."""
        rev, data = publish(bfleet, tmp_path, "2.0.0", payload=os.urandom(3 << 20))
        cut = (1 << 20) + 12345
        bfleet.files.cut_next_body(cut)
        last = boot(http_agent)
        assert last["result"] == "unreachable", last
        assert revision(http_agent)["applied"] is None

        code, out = sync(http_agent)
        assert code == 0 and out["result"] == "applied" and out["revision"] == rev, out
        first, second = bfleet.files.requests_for(BUNDLE)
        assert (first.status, first.sent) == (200, cut)
        assert second.headers["range"] == f"bytes={cut}-"
        assert second.headers["if-range"] and "if-none-match" not in second.headers
        assert (second.status, second.sent) == (206, len(data) - cut)
        http_agent.wait_states({"app": "healthy"})

    def test_bundle_over_the_bound_is_refused_and_not_kept(
        self, bfleet: BundleFleet, http_agent: AgentProc, tmp_path: Path
    ) -> None:
        """A bundle far over KEYSTONE_MAX_BUNDLE_BYTES is refused from its Content-Length, with
        the limit in the reason; nothing is kept on disk or applied."""
        publish(bfleet, tmp_path, "3.0.0", payload=os.urandom(3 * LIMIT))
        last = boot(http_agent)
        assert last["result"] == "refused", last
        assert f"over the limit of {LIMIT}" in last["error"]
        assert revision(http_agent)["applied"] is None
        kept = http_agent.runtime / "bundles" / "http"
        assert not [p for p in kept.iterdir() if p.stat().st_size > LIMIT]

"""The status page in a real headless Chromium against a real agent running a small plan."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent.conftest import AgentProc
from tests.integration.ui.cdp import Browser, wait_for

pytestmark = pytest.mark.integration

NAMES = ("api", "cache", "db", "metrics")
ROWS = (
    "[...document.querySelectorAll('#components tbody tr[data-name]')]"
    ".map(r => [r.dataset.name, r.dataset.state, r.dataset.pid, r.dataset.phase])"
)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def raw(agent: AgentProc, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(agent.addr + path, headers=headers or {})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def login(b: Browser, agent: AgentProc, token: str) -> None:
    b.navigate(agent.addr + "/ui")
    assert b.js("location.pathname") == "/ui/login"
    mark = len(b.events)
    b.js(
        f"document.querySelector('#token').value = {json.dumps(token)};"
        "document.querySelector('#login').click(); true"
    )
    b.wait_event("Page.loadEventFired", since=mark)


def rows(b: Browser) -> dict[str, tuple[str, str, str]]:
    """Component name -> (Go state, pid, phase) as the page shows them."""
    return {n: (s, p, ph) for n, s, p, ph in b.js(ROWS)}


def own_origin(agent: AgentProc, url: str) -> bool:
    return url.startswith(agent.addr + "/") or url.startswith(("data:", "about:"))


class TestRefused:
    def test_nothing_but_the_login_page_without_a_session(
        self, plan_agent: AgentProc, browser: Browser, tmp_path: Path
    ) -> None:
        """Without the token: /ui sends the browser to the login form, a wrong token gets 401
        and no session, and every page file and API call answers 401."""
        agent = plan_agent
        browser.navigate(agent.addr + "/ui/")
        assert browser.js("location.pathname") == "/ui/login"
        assert browser.js("!!document.querySelector('form #token')")
        login(browser, agent, "not-the-token")
        assert browser.js("location.pathname") == "/ui/login"
        assert "Wrong token" in browser.js("document.body.innerText")
        assert browser.js("document.querySelector('#components') === null")
        for path in ("/ui/app.js", "/ui/app.css", "/ui/index.html", "/v1/components"):
            status, _ = raw(agent, path)
            assert status == 401, path
            status, _ = raw(agent, path, {"Cookie": "keystone_session=made-up"})
            assert status == 401, path
        status, _ = raw(agent, "/ui")
        assert status == 303
        assert all(own_origin(agent, u) for u in browser.requests), browser.requests


class TestStatusPage:
    def test_login_components_restart_and_live_state(
        self, plan_agent: AgentProc, browser: Browser, tmp_path: Path
    ) -> None:
        """Log in with the token; the components and their states show; restart (dry run,
        confirm) gives a new pid; a stop made elsewhere shows without a reload; every request
        stayed on the agent's own origin. Screenshots and measurements are saved in tmp_path."""
        agent = plan_agent
        assert agent.proc is not None
        # The agent is healthy (fixture) and nobody has opened the page yet.
        idle_before = rss_kib(agent.proc.pid)

        started = time.monotonic()
        login(browser, agent, agent.token())
        browser.wait_js("document.body.dataset.loaded", what="the page's first poll")
        load_s = time.monotonic() - started
        assert browser.js("location.pathname") == "/ui/"
        nav = browser.js(
            "(() => { const n = performance.getEntriesByType('navigation')[0];"
            " return {load: n.loadEventEnd - n.startTime, ready: +document.body.dataset.loadedAt}; })()"
        )
        before = wait_for(
            lambda: (
                (r := rows(browser))
                and all(r.get(n, ("", "", ""))[::2] == ("running", "healthy") for n in NAMES)
                and r
            ),
            timeout=20,
            what="four healthy rows",
        )
        assert sorted(before) == list(NAMES)
        browser.wait_js(
            "document.querySelector('#graph').complete && document.querySelector('#graph').naturalWidth > 0"
        )
        browser.js("window.__same_page = 1")
        browser.screenshot(tmp_path / "status-page.png")

        # Restart: the dry run is shown first, and nothing happens until confirmed.
        browser.js("document.querySelector('button[data-action=restart][data-name=api]').click()")
        browser.wait_js("document.querySelector('#confirm').open", what="the confirmation")
        dry = json.loads(browser.js("document.querySelector('#confirm-dry').textContent"))
        assert dry == {"stopOrder": [], "startOrder": ["api"]}
        assert agent.components()["api"]["pid"] == int(before["api"][1])
        browser.js("document.querySelector('#confirm-yes').click()")
        browser.wait_js("document.querySelector('#result').open", timeout=60, what="the restart")
        answer = json.loads(browser.js("document.querySelector('#result-body').textContent"))
        assert answer["component"] == "api" and answer["pid"] != int(before["api"][1])
        browser.js("document.querySelector('#result-ok').click()")
        wait_for(
            lambda: rows(browser)["api"][1] == str(answer["pid"]),
            timeout=20,
            what="the new pid on the page",
        )

        # A change made elsewhere (the CLI, the agent itself) shows by polling, no reload.
        status, _ = agent.api("POST", "/v1/components/metrics:stop")
        assert status == 204
        wait_for(
            lambda: rows(browser)["metrics"][0] == "stopped", timeout=20, what="metrics stopped"
        )
        assert browser.js("window.__same_page") == 1

        # Log lines of a component.
        browser.js("document.querySelector('button[data-action=logs][data-name=db]').click()")
        browser.wait_js(
            "(document.querySelector('tr[data-logs=db] pre.stdout') || {}).textContent"
            "?.includes('listening')",
            what="db's log lines",
        )

        # With a browser polling for a while: the agent's RSS.
        polls_seen = len(browser.requests)
        wait_for(lambda: len(browser.requests) >= polls_seen + 20, timeout=30, what="a few polls")
        idle_with_browser = rss_kib(agent.proc.pid)
        browser.screenshot(tmp_path / "status-page-after.png")

        # The SVG graph: well-formed, one node per component, coloured by state.
        status, svg = raw(
            agent, "/v1/plan/graph?format=svg", {"Authorization": f"Bearer {agent.token()}"}
        )
        assert status == 200
        root = ET.fromstring(svg)
        ns = "{http://www.w3.org/2000/svg}"
        nodes = {
            g.get("data-name"): g.get("data-state")
            for g in root.iter(f"{ns}g")
            if g.get("class") == "node"
        }
        assert nodes["metrics"] == "stopped" and nodes["db"] == "healthy"
        (tmp_path / "plan-graph.svg").write_bytes(svg)
        browser.navigate(agent.addr + "/v1/plan/graph?format=svg")
        browser.screenshot(tmp_path / "plan-graph.png", selector="svg")

        assert all(own_origin(agent, u) for u in browser.requests), [
            u for u in browser.requests if not own_origin(agent, u)
        ]
        measures = {
            "agent_rss_idle_kib": idle_before,
            "agent_rss_with_browser_kib": idle_with_browser,
            "page_ready_s": round(load_s, 3),
            "navigation_load_ms": round(nav["load"], 1),
            "first_poll_drawn_ms": nav["ready"],
        }
        (tmp_path / "measurements.json").write_text(json.dumps(measures, indent=1))
        print("status page:", json.dumps(measures))
        if os.environ.get("KEYSTONE_UPDATE_DOCS") == "1":  # refresh the README's pictures
            docs = Path(__file__).resolve().parents[3] / "docs"
            shutil.copy(tmp_path / "status-page-after.png", docs / "status-page.png")
            shutil.copy(tmp_path / "plan-graph.png", docs / "plan-graph.png")
        assert load_s < 10

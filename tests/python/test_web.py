"""The live web view of CONTRACT.md "Observability", seen through a real
(headless) browser against three real raft-zmq processes.

    /tmp/venv/bin/pip install -r tests/python/requirements.txt
    apt-get install -y --no-install-recommends chromium
    RAFT_ZMQ_BIN=target/release/raft-zmq /tmp/venv/bin/python -m pytest -q tests/python/test_web.py

It uses the system Chromium (/usr/bin/chromium), never a browser downloaded
by Playwright. Without it the test is skipped, unless RAFT_ZMQ_REQUIRE_BROWSER
is set, in which case it fails. Every wait has a deadline, and the node
processes are killed in teardown whatever happens. A screenshot of the page is
left in target/test-artifacts/web-view.png, on failure too where possible.
"""

import json
import os
import re
import time
import urllib.error
import urllib.request

import pytest
from playwright.sync_api import expect, sync_playwright

from test_client import DEADLINE_S, REPO, Cluster, free_port

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium hangs on the closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = REPO / "target" / "test-artifacts" / "web-view.png"
PAGE_TIMEOUT_MS = 10_000  # page load, and the page catching up with a settled cluster
FAILOVER_S = 10  # kill -> new leader shown and the dead node marked down


def require_browser():
    if os.path.isfile(CHROMIUM):
        return
    if os.environ.get("RAFT_ZMQ_REQUIRE_BROWSER"):
        pytest.fail(f"{CHROMIUM} not found and RAFT_ZMQ_REQUIRE_BROWSER is set")
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium); set RAFT_ZMQ_REQUIRE_BROWSER to make this a failure")


class WebCluster(Cluster):
    """test_client's cluster, each node also serving HTTP on a port of its own."""

    def __init__(self, tmp):
        super().__init__(tmp)
        config = json.loads(self.config.read_text())
        for node in config["nodes"]:
            node["http"] = f"127.0.0.1:{free_port()}"
        self.config.write_text(json.dumps(config))
        self.http = {node["id"]: f"http://{node['http']}" for node in config["nodes"]}

    def http_status(self, node_id):
        """The node's /status as a dict, or None when it does not answer in time."""
        try:
            with urllib.request.urlopen(f"{self.http[node_id]}/status", timeout=0.5) as reply:
                return json.loads(reply.read())
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def wait_for_http_leader(self):
        """(leader, followers) as seen over HTTP: a leader and the nodes that name it."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            for node_id, proc in enumerate(self.procs):
                assert proc.poll() is None, f"node {node_id} exited with {proc.returncode}; see {self.tmp}"
            statuses = [s for s in (self.http_status(i) for i in self.http) if s]
            for s in statuses:
                followers = [o["id"] for o in statuses if o["id"] != s["id"] and o.get("leader") == s["id"]]
                if s.get("role") == "leader" and followers:
                    return s["id"], followers
            assert time.monotonic() < deadline, f"no leader on /status within {DEADLINE_S} s; last: {statuses}"
            time.sleep(0.1)


@pytest.fixture
def web_cluster(tmp_path):
    require_browser()
    c = WebCluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def card(page, node_id):
    return page.locator(f'[data-node-id="{node_id}"]')


def wait_until_page_shows_leader(c, page):
    """(leader, viewer): the page, served by the follower `viewer`, shows the
    leader the nodes agree on. A loaded machine may see an early leader
    deposed, so the leader is asked again (bounded) rather than assumed."""
    deadline = time.monotonic() + DEADLINE_S
    viewer = None
    while True:
        leader, followers = c.wait_for_http_leader()
        if viewer in (None, leader):
            viewer = followers[0]
            page.goto(f"{c.http[viewer]}/", timeout=PAGE_TIMEOUT_MS)
        try:
            expect(page.locator("#leader")).to_have_text(str(leader), timeout=PAGE_TIMEOUT_MS)
            expect(card(page, leader)).to_have_attribute("data-role", "leader", timeout=PAGE_TIMEOUT_MS)
            return leader, viewer
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def test_web_view_follows_a_failover(web_cluster):
    c = web_cluster
    c.wait_for_http_leader()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page_errors = []

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        page = None
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda err: page_errors.append(str(err)))
            leader, _viewer = wait_until_page_shows_leader(c, page)
            for node_id in c.http:
                expect(card(page, node_id)).to_have_count(1, timeout=PAGE_TIMEOUT_MS)

            c.procs[leader].kill()  # SIGKILL
            killed_at = time.monotonic()

            def left_ms():
                return max(1, int((killed_at + FAILOVER_S - time.monotonic()) * 1000))

            # Any leader id but the killed one ("none" does not match).
            other = re.compile(rf"^\s*(?!{leader}\s*$)\d+\s*$")
            expect(page.locator("#leader")).to_have_text(other, timeout=left_ms())
            expect(card(page, leader)).to_have_attribute("data-role", "down", timeout=left_ms())
            expect(card(page, leader)).to_contain_text("down", timeout=left_ms())
            new_leader = int(page.locator("#leader").text_content().strip())
            assert new_leader in c.http and new_leader != leader
            expect(card(page, new_leader)).to_have_attribute("data-role", "leader", timeout=left_ms())
            assert not page_errors, f"JavaScript errors on the page: {page_errors}"
        finally:
            if page is not None:
                try:
                    page.screenshot(path=str(SCREENSHOT), full_page=True, timeout=5_000)
                except Exception as err:  # best effort: never hide the real failure
                    print(f"no screenshot: {err}")
            browser.close()

"""The web console in a real browser: Debian's Chromium, driven headless through
chromedriver's W3C WebDriver HTTP API, against a running configuration server with a
real vault, real jobs and the folder target.

An operator signs in, enables replication of web01 from the items page and watches it
go from enabling to protected, runs a drill of its latest point from the item's page
and watches the job's steps (the restore waits for a vault lock the test holds, so the
running step is seen for sure), cleans the drill up with a note, then fails web01 over
and commits, typing its name to confirm each. axe-core, injected
through WebDriver, finds no serious or critical violation on any page.

With SITERECOVERY_CONSOLE_SCREENSHOTS=<folder> the main pages are saved there as PNG at
1366x768 (docs/console/ holds the ones the README shows).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import pytest_asyncio

from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiClient
from tests.backends import missing_backend
from tests.helpers import REPO, Daemon, make_vault, open_vault, write_full_point
from tests.sitehelpers import (
    AgentSite,
    add_machine,
    add_procserver,
    next_job,
    report_point,
    step,
    wait_job,
)
from vault.locks import Lock, try_acquire
from vault.regkey import make_key
from vault.repo import Vault

pytestmark = pytest.mark.asyncio(loop_scope="module")

T = TypeVar("T")
TAB = "\ue004"  # the WebDriver key code of Tab
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C web element identifier
DISK = 8 << 20
WAIT = 60.0  # seconds for anything the browser should come to show
POLL = 0.2  # seconds between two looks at the page while waiting for it to change
AXE_DEFAULT = REPO / ".cache" / "axe" / "node_modules" / "axe-core" / "axe.min.js"
PAGES = ["/console/", "/console/items/web01", "/console/alerts", "/console/jobs",
         "/console/procservers", "/console/plans", "/console/groups"]


class WebDriverError(Exception):
    pass


class Browser:
    """One chromedriver session (W3C WebDriver over HTTP)."""

    def __init__(self, http: aiohttp.ClientSession, driver: str, session: str) -> None:
        self.http, self.base = http, f"{driver}/session/{session}"

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, self.base + path, json=body) as r:
            doc = await r.json(content_type=None)
        if r.status != 200:
            raise WebDriverError(f"{method} {path}: {r.status} {doc}")
        return doc["value"]

    async def go(self, url: str) -> None:
        await self.call("POST", "/url", {"url": url})

    async def url(self) -> str:
        return str(await self.call("GET", "/url"))

    async def find(self, css: str) -> str:
        return str((await self.call("POST", "/element", {"using": "css selector",
                                                         "value": css}))[ELEMENT])

    async def text(self, css: str) -> str:
        return str(await self.call("GET", f"/element/{await self.find(css)}/text"))

    async def type(self, css: str, text: str) -> None:
        await self.call("POST", f"/element/{await self.find(css)}/value", {"text": text})

    async def click(self, css: str) -> None:
        await self.call("POST", f"/element/{await self.find(css)}/click", {})

    async def submit(self, css: str) -> str:
        """Click ``css`` (a form's button) and wait for the next page; its URL."""
        # the focus in a form holds the page's self-refresh (static/refresh.js) off
        await self.script("document.querySelector(arguments[0]).focus();"
                          "window.consoleOldPage = true;", css)
        await self.call("POST", f"/element/{await self.find(css)}/click", {})

        async def loaded() -> str | None:
            try:
                new = await self.script("return !window.consoleOldPage "
                                        "&& document.readyState === 'complete'")
            except WebDriverError:  # between two documents
                return None
            return await self.url() if new else None
        return await until(loaded, f"the page after clicking {css}")

    async def script(self, source: str, *args: Any) -> Any:
        return await self.call("POST", "/execute/sync", {"script": source, "args": list(args)})

    async def screenshot(self, name: str) -> None:
        folder = os.environ.get("SITERECOVERY_CONSOLE_SCREENSHOTS")
        if folder:
            png = base64.b64decode(await self.call("GET", "/screenshot"))
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / f"{name}.png").write_bytes(png)

    async def shows(self, css: str, wanted: str) -> str:
        """The text of ``css`` once it contains ``wanted`` (the pages reload themselves)."""
        async def look() -> str | None:
            try:
                text = await self.text(css)
            except WebDriverError:  # between two loads of the page
                return None
            return text if wanted in text else None
        return await until(look, f"{css} to show {wanted!r}")


async def until(check: Callable[[], Awaitable[T | None]], what: str) -> T:
    """``check()``'s first answer that is not None, looking every POLL seconds."""
    deadline = time.monotonic() + WAIT
    while (got := await check()) is None:
        assert time.monotonic() < deadline, f"waited {WAIT} s for {what}"
        await asyncio.sleep(POLL)
    return got


@dataclass
class Site:
    cs: ConfigServer
    api: ApiClient
    vault: Vault
    agent: AgentSite
    tmp: Path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    """A configuration server with a registered vault, a process server and web01 in the
    inventory with an enrolled agent; replication is not enabled yet."""
    tmp: Path = tmp_path_factory.mktemp("console-browser")
    cs = ConfigServer(ConfigServerConfig(
        data_dir=str(tmp / "cs"), listen_port=0, site_port=0,
        database_url=f"sqlite+aiosqlite:///{tmp / 'catalog.db'}"))
    await cs.start()
    try:
        async with ApiClient(cs.url, cs.admin_token) as api:
            url, key = await make_vault(tmp)
            vault = await open_vault(tmp / "vault", key)
            try:
                await api.post("/api/v1/registration", {
                    "key": json.dumps(make_key(vault, url, time.time())),
                    "vault_key_file": str(key)})
                await add_procserver(cs.url, cs.internal_token)
                await add_machine(api, "web01", disks=("sda",))
                agent = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, "web01",
                                               cs.passphrase, tmp / "agent")
                yield Site(cs, api, vault, agent, tmp)
            finally:
                await vault.close()
    finally:
        await cs.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Browser]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        missing_backend("chromium and chromedriver", "tests/run.sh installs Debian's "
                        "chromium and chromium-driver")
    assert chromium is not None and driver is not None
    profile = tmp_path_factory.mktemp("chromium")
    proc = await asyncio.create_subprocess_exec(
        driver, "--port=0", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(WAIT):  # "... started successfully on port N."
            while b"started successfully" not in (line := await proc.stdout.readline()):
                assert line, "chromedriver exited before it listened"
        port = int(line.rstrip().rstrip(b".").rsplit(b" ", 1)[1])
        drain = asyncio.get_running_loop().create_task(_drain(proc.stdout))
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
            async with http.post(f"{base}/session", json={"capabilities": {"alwaysMatch": {
                    "browserName": "chrome", "goog:chromeOptions": {
                        "binary": chromium,
                        "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                 "--disable-dev-shm-usage", "--window-size=1366,768",
                                 f"--user-data-dir={profile}"]}}}}) as r:
                doc = await r.json(content_type=None)
                assert r.status == 200, doc
            b = Browser(http, base, doc["value"]["sessionId"])
            try:
                await b.call("POST", "/window/rect", {"width": 1366, "height": 768})
                yield b
            finally:
                await b.call("DELETE", "")
    finally:
        proc.terminate()
        await proc.wait()
        if "drain" in locals():
            await drain


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def _axe(b: Browser) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page the browser shows."""
    path = Path(os.environ.get("SITERECOVERY_AXE", str(AXE_DEFAULT)))
    if not path.is_file():
        missing_backend("axe-core", "tests/run.sh installs axe-core@4.10.3 into .cache/axe")
    await b.script(path.read_text() + "\n;return true;")
    found: list[dict[str, Any]] = await b.call("POST", "/execute/async", {"args": [], "script": (
        "const done = arguments[arguments.length - 1];"
        "axe.run(document).then(r => done(r.violations"
        ".filter(v => v.impact === 'serious' || v.impact === 'critical')"
        ".map(v => ({id: v.id, impact: v.impact, help: v.help,"
        "            nodes: v.nodes.map(n => n.target.join(' '))}))),"
        "e => done([{id: 'axe-error', impact: 'critical', help: String(e), nodes: []}]));")})
    return found


def _ext4(tmp: Path) -> bytes:
    """A whole-disk ext4 with a file, which the drill's check finds clean."""
    if shutil.which("mkfs.ext4") is None or os.geteuid() != 0:
        missing_backend("mkfs.ext4 as root", "run the suite as root (tests/run.sh)")
    content, img = tmp / "content", tmp / "disk.img"
    (content / "etc").mkdir(parents=True)
    (content / "etc" / "hostname").write_text("web01\n")
    with open(img, "wb") as f:
        f.truncate(DISK)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(content), str(img)],
                   check=True)
    return img.read_bytes()


async def test_sign_in_enable_drill_clean_up_fail_over_and_commit(site: Site,
                                                                  browser: Browser) -> None:
    b, cs, api = browser, site.cs, site.api
    await b.go(f"{cs.url}/console/")  # no session: the sign-in page
    assert (await b.url()).startswith(f"{cs.url}/console/signin?next=")
    assert "api-token" in await b.text("main")
    await b.screenshot("signin")
    await b.type("#token", cs.admin_token)
    assert await b.submit("form.signin button") == f"{cs.url}/console/"

    # enable replication of web01 from the items page; watch it get protected
    assert await b.submit("form[action='/console/enable'] button") == \
        f"{cs.url}/console/items/web01"
    assert "enabling" in await b.text("#item-state")
    enable = await next_job(api, "web01", "enable_protection")
    async with site.agent:
        assert (await site.agent.heartbeat("2.0.0"))[0] == 200
        assert (await site.agent.progress({"sda": 100}))[0] == 200
    # an hour of earlier points, in the catalog only (the RPO chart's history; one gap
    # of 20 min is over the default policy's 15 min threshold)
    start = time.time() - 3600
    for i, offset in enumerate((0, 300, 600, 900, 2100, 2400, 2700, 3000, 3300)):
        created = dt.datetime.fromtimestamp(start + offset, dt.UTC).isoformat()
        await report_point(cs.url, cs.internal_token, "web01", f"{i:064x}", created,
                           "app" if i % 4 == 0 else "crash")
    disk = _ext4(site.tmp)
    point = await write_full_point(site.vault, disk, machine="web01", cycle="c1")
    await report_point(cs.url, cs.internal_token, "web01", point.id, point.created,
                       point.consistency)
    assert (await wait_job(api, enable["id"]))["state"] == "succeeded"
    await b.shows("#item-state", "protected")  # the page reloaded itself
    assert point.id[:12] in await b.text("main")
    await b.go(f"{cs.url}/console/")
    row = await b.text("tbody tr")
    assert "web01" in row and "protected" in row and point.id[:12] in row

    # a drill of the latest point, chosen on the item's page; the restore waits for a
    # vault lock held here, so the page shows the job running, then done
    got = await try_acquire(site.vault, "exclusive", "test: a prune")
    assert isinstance(got, Lock)
    try:
        await b.go(f"{cs.url}/console/items/web01")
        assert await _axe(b) == []  # with the forms of a protected item
        await b.screenshot("item")
        url = await b.submit("form[action$='/test-failover'] button")
        jid = url.rsplit("/", 1)[1]
        assert url == f"{cs.url}/console/jobs/{jid}"
        await wait_job(api, jid, lambda j: "after a prune" in step(j, "restore")["message"])
        await b.shows("#step-restore", "after a prune")
        assert "succeeded" in await b.text("#step-select_point")
        assert "running" in await b.text("#job-state")
        await b.screenshot("job-running")
    finally:
        await got.release()
    job = await wait_job(api, jid)
    assert job["state"] == "succeeded", job
    await b.shows("#job-state", "succeeded")
    for s in job["steps"]:
        assert "succeeded" in await b.text(f"#step-{s['name']}")
    await b.screenshot("job")

    # clean the drill up with a note, from the item's page
    await b.go(f"{cs.url}/console/items/web01")
    assert "test failover done" in await b.text("#item-state")
    assert await _axe(b) == []  # with the cleanup form
    await b.type("#cleanup-notes", "web01 came up; <b>app</b> checked")
    cleanup = (await b.submit("form[action$='/cleanup-test-failover'] button")
               ).rsplit("/", 1)[1]
    assert (await wait_job(api, cleanup))["state"] == "succeeded"
    await b.go(f"{cs.url}/console/items/web01")
    assert "protected" in await b.text("#item-state")
    assert "Notes: web01 came up; <b>app</b> checked" in await b.text("main")  # as text
    item = await api.get("/api/v1/items/web01")
    assert item["last_drill"]["notes"] == "web01 came up; <b>app</b> checked"
    assert item["last_drill"]["job"] == jid
    # the point's verification shows on the item's row and in its points
    verify = (await api.post("/api/v1/verify", {"machine": "web01"}))["job"]
    assert (await wait_job(api, verify["id"]))["state"] == "succeeded"
    await b.go(f"{cs.url}/console/")
    row = await b.text("tbody tr")
    assert "succeeded" in row and "verified" in row  # the last drill (RTO) and verification
    await b.screenshot("items")
    await b.go(f"{cs.url}/console/items/web01")
    assert "verified" in await b.text(f"#point-{point.id}")
    assert point.id[:12] in await b.text("#item-verification")
    assert "never" in await b.text(f"#point-{0:064x}")  # in the catalog only
    await b.go(f"{cs.url}/console/items/web01")

    # failover and commit: each goes ahead only with the item's name typed
    await b.type("#fo-confirm", "web0")
    assert await b.submit("form[action$='/failover'] button") == \
        f"{cs.url}/console/items/web01/failover"
    assert "type the item's name" in await b.text("[role=alert]")
    assert await _axe(b) == []  # with an error shown
    assert (await api.get("/api/v1/items/web01"))["state"] == "protected"
    await b.type("#fo-confirm", "web01")
    failover = (await b.submit("form[action$='/failover'] button")).rsplit("/", 1)[1]
    assert (await wait_job(api, failover))["state"] == "succeeded"
    await b.go(f"{cs.url}/console/items/web01")
    assert "failed over" in await b.text("#item-state")
    assert await _axe(b) == []  # with the change of point and commit forms
    await b.type("#commit-confirm", "web01")
    commit = (await b.submit("form[action$='/commit'] button")).rsplit("/", 1)[1]
    assert (await wait_job(api, commit))["state"] == "succeeded"
    await b.shows("#job-state", "succeeded")
    await b.go(f"{cs.url}/console/items/web01")
    assert "committed" in await b.text("#item-state")
    assert "No recovery point yet" in await b.text("main")


async def test_every_page_passes_axe_core(site: Site, browser: Browser) -> None:
    """Every page, with something on it: an alert (the process server's cache is nearly
    full), jobs, an item with points, a plan and a group."""
    b, cs = browser, site.cs
    async with ApiClient(cs.url, cs.internal_token) as internal:
        await internal.post("/api/v1/internal/procservers/heartbeat", {
            "name": "ps1", "address": "127.0.0.1:9443", "version": "test",
            "cache_bytes": 41 << 30, "cache_free_ratio": 0.2, "backlog_bytes": 3 << 30,
            "backlog_seconds": 600, "throughput_bps": 48 << 20, "sessions": 1})
    assert (await site.api.get("/api/v1/events", active=True))["events"]
    # a recovery plan and a consistency group of web01 (committed by now: their pages
    # offer the forms of re-protect and failback)
    await site.api.post("/api/v1/plans", {"name": "dr", "groups": [
        {"items": ["web01"], "pre_action": "open the firewall"}]})
    await site.api.post("/api/v1/groups", {"name": "erp", "members": ["web01"]})
    # a job that waits at the plan's manual action: its page offers to confirm or cancel
    waiting = (await site.api.post("/api/v1/plans/dr/reprotect", {}))["job"]
    await wait_job(site.api, waiting["id"], lambda j: j["state"] == "waiting")
    for page in ["/console/signin", *PAGES, "/console/plans/dr", "/console/groups/erp", *(
            [f"/console/jobs/{j['id']}" for j in (await site.api.get(
                "/api/v1/jobs", limit=1))["jobs"]]), f"/console/jobs/{waiting['id']}"]:
        await b.go(cs.url + page)
        violations = await _axe(b)
        assert violations == [], (page, violations)
        title = await b.script("return document.title")
        assert "siterecovery" in title, page
    assert await b.text("form[action$='/cancel'] button") == "Cancel the job"
    url = await b.submit("form[action$='/cancel'] button")
    assert url == f"{cs.url}/console/jobs/{waiting['id']}"
    assert (await site.api.get(f"/api/v1/jobs/{waiting['id']}"))["state"] == "cancelled"
    assert await b.text("#job-state") == "cancelled"
    # no job of the plan runs now: its page offers to change and to delete it
    await b.go(cs.url + "/console/plans/dr")
    assert await b.text("#edit-h") == "Change the plan"
    assert await _axe(b) == []
    # the keyboard: Tab reaches the skip link, then the navigation, each with a visible
    # focus ring (and the skip link comes into view)
    await b.go(cs.url + "/console/")
    for expected in ("Skip to content", "Replicated items", "Alerts"):
        await b.call("POST", "/actions", {"actions": [{"type": "key", "id": "kbd", "actions": [
            {"type": "keyDown", "value": TAB}, {"type": "keyUp", "value": TAB}]}]})
        focused = await b.script(
            "const a = document.activeElement, s = getComputedStyle(a),"
            " r = a.getBoundingClientRect();"
            "return {text: a.textContent.trim(), outline: s.outlineStyle,"
            " width: parseFloat(s.outlineWidth), left: r.left, top: r.top};")
        assert focused["text"] == expected, focused
        assert focused["outline"] != "none" and focused["width"] >= 2, focused
        assert focused["left"] >= 0 and focused["top"] >= 0, focused
    await b.go(cs.url + "/console/")
    assert "1 active alert(s), 1 critical" in await b.text("#summary")
    # the self-refresh can be paused (WCAG 2.2.1), and stays paused in the tab
    await b.go(cs.url + "/console/jobs")
    assert "refreshes every" in await b.text("#refresh-status")
    await b.click("#refresh-toggle")
    assert await b.text("#refresh-status") == "Auto-refresh is paused."
    await b.go(cs.url + "/console/alerts")
    assert await b.text("#refresh-status") == "Auto-refresh is paused."
    assert await b.script("return document.getElementById('refresh-toggle')"
                          ".getAttribute('aria-pressed')") == "true"
    await b.click("#refresh-toggle")
    assert "refreshes every" in await b.text("#refresh-status")
    for name, page in (("alerts", "/console/alerts"),
                       ("procservers", "/console/procservers"), ("jobs", "/console/jobs")):
        await b.go(cs.url + page)
        await b.screenshot(name)


async def test_the_console_of_a_running_serve(browser: Browser,
                                              tmp_path_factory: pytest.TempPathFactory
                                              ) -> None:
    """``siterecovery serve`` (a subprocess on uvloop) serves the console and names it in
    its banner; neither the token nor the session id reaches its output."""
    b = browser
    data = tmp_path_factory.mktemp("serve")
    d = Daemon(["serve", "--data-dir", str(data), "--admin-port", "0", "--site-port", "0",
                "--listen", "127.0.0.1:0", "--metrics-port", "0"], "procserver_started")
    await d.start()
    try:
        [started] = d.events("configserver_started")
        url = f"http://127.0.0.1:{started['port']}"
        token = Path(str(started["token_file"])).read_text().strip()
        before = {c["name"] for c in await b.call("GET", "/cookie")}
        await b.go(f"{url}/console/procservers")
        await b.type("#token", token)
        assert await b.submit("form.signin button") == f"{url}/console/procservers"
        await b.shows("main", "127.0.0.1:")  # its process server, once it heartbeats
        # a cookie of its own, named after its port: another console's session stays
        name = f"siterecovery_console_{started['port']}"
        assert {c["name"] for c in await b.call("GET", "/cookie")} == before | {name}
        session = (await b.call("GET", f"/cookie/{name}"))["value"]
        await b.submit("form.signout button")
        assert (await b.url()).startswith(f"{url}/console/signin")
    finally:
        assert await d.stop() == 0
    output = "".join(d.lines)
    assert f"web console      {url}/console/" in output
    assert d.events("console_signed_in") and d.events("console_signed_out")
    assert token not in output and session not in output

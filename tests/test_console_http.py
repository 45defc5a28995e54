"""The web console's security over real HTTP, against a running configuration server:
no page or action without a session, the CSRF token on every form, the session cookie's
flags, the security headers, and the admin token never in a URL or a log line.

One server serves the whole module (SQLite: the console reads through the API's own
handlers, which the API tests run on both catalogs); each test signs in afresh.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from configserver.config import ConfigServerConfig
from configserver.console.chart import rpo_chart
from configserver.console.pages import POINTS_SHOWN
from configserver.console.sessions import SessionStore
from configserver.jobs import ACTIVE
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiClient
from tests.sitehelpers import (
    add_machine,
    add_procserver,
    sqlite_configserver,
    step_running,
    wait_job,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

PAGES = ["/console/", "/console/alerts", "/console/jobs", "/console/procservers",
         "/console/items/web01", "/console/jobs/0123456789abcdef", "/console/no/such/page"]
ACTIONS = ["/console/items/web01/test-failover", "/console/items/web01/cleanup-test-failover",
           "/console/items/web01/failover", "/console/items/web01/commit",
           "/console/items/web01/resync", "/console/items/web01/disable", "/console/enable",
           "/console/jobs/0123456789abcdef/cancel", "/console/signout"]
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cs(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ConfigServer]:
    d: Path = tmp_path_factory.mktemp("console-http")
    async with sqlite_configserver(d) as server:
        async with ApiClient(server.url, server.admin_token) as api:
            await add_machine(api, "web01", disks=("sda",))
        yield server


def _browser() -> aiohttp.ClientSession:
    # unsafe: keep cookies of an IP host (127.0.0.1), as a browser does
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def _sign_in(http: aiohttp.ClientSession, cs: ConfigServer) -> str:
    """Sign in; the CSRF token of the new session (from the items page's forms)."""
    async with http.post(f"{cs.url}/console/signin", data={"token": cs.admin_token},
                         allow_redirects=False) as r:
        assert r.status == 303, await r.text()
    async with http.get(f"{cs.url}/console/") as r:
        assert r.status == 200
        m = CSRF.search(await r.text())
    assert m is not None
    return m.group(1)


async def _item_exists(cs: ConfigServer) -> bool:
    async with ApiClient(cs.url, cs.admin_token) as api:
        return bool((await api.get("/api/v1/items"))["items"])


async def test_no_page_or_action_without_a_session(cs: ConfigServer) -> None:
    for cookie in ({}, {f"siterecovery_console_{cs.port}": "not-a-session"}):
        async with aiohttp.ClientSession(cookies=cookie) as http:
            for page in PAGES:
                async with http.get(cs.url + page, allow_redirects=False) as r:
                    assert r.status == 303, (page, r.status)
                    assert r.headers["Location"] == f"/console/signin?next={page}"
            for action in ACTIONS:
                async with http.post(cs.url + action, allow_redirects=False,
                                     data={"machine": "web01", "confirm": "web01"}) as r:
                    assert r.status == 403, (action, r.status)
                    assert "not signed in" in await r.text()
    assert not await _item_exists(cs)  # the refused enable changed nothing


async def test_the_session_cookie_and_where_sign_in_leads(cs: ConfigServer) -> None:
    async with _browser() as http:
        async with http.get(f"{cs.url}/console/signin") as r:
            page = await r.text()
        assert 'type="password"' in page and 'method="post"' in page
        async with http.post(f"{cs.url}/console/signin", allow_redirects=False,
                             data={"token": cs.admin_token, "next": "/console/jobs"}) as r:
            assert r.status == 303 and r.headers["Location"] == "/console/jobs"
            [cookie] = r.headers.getall("Set-Cookie")
        attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert attrs == {"httponly", "path", "samesite"}  # no Secure: plain loopback HTTP
        assert "Path=/" in cookie and "SameSite=Strict" in cookie
        assert cookie.startswith(f"siterecovery_console_{cs.port}=")  # per port
        async with http.get(f"{cs.url}/console/jobs", allow_redirects=False) as r:
            assert r.status == 200
        async with http.get(f"{cs.url}/console", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/console/"
        async with http.get(f"{cs.url}/console/nope", allow_redirects=False) as r:
            assert r.status == 404 and "has no page /console/nope" in await r.text()
        # never to another site after sign-in
        for where in ("https://evil.example/", "//evil.example/", "/console//evil.example",
                      "/console/../api/v1/items", "/console/%2e%2e/api/v1/items",
                      "/console/signin"):
            async with http.post(f"{cs.url}/console/signin", allow_redirects=False,
                                 data={"token": cs.admin_token, "next": where}) as r:
                assert r.headers["Location"] == "/console/", where


async def test_a_wrong_token_gets_no_session(cs: ConfigServer) -> None:
    async with _browser() as http:
        for token in ("", "wrong", cs.admin_token[:-1], cs.admin_token + "x"):
            async with http.post(f"{cs.url}/console/signin", data={"token": token},
                                 allow_redirects=False) as r:
                assert r.status == 401, token
                assert "Set-Cookie" not in r.headers
                assert "wrong token" in await r.text()
        async with http.get(f"{cs.url}/console/", allow_redirects=False) as r:
            assert r.status == 303


async def test_every_form_needs_its_sessions_csrf_token(cs: ConfigServer) -> None:
    async with _browser() as other:
        theirs = await _sign_in(other, cs)
    async with _browser() as http:
        mine = await _sign_in(http, cs)
        assert theirs != mine
        for csrf in (None, "", "x" * len(mine), theirs):
            form = {"machine": "web01"} | ({} if csrf is None else {"csrf": csrf})
            for action in ("/console/enable", "/console/signout"):
                async with http.post(cs.url + action, data=form,
                                     allow_redirects=False) as r:
                    assert r.status == 403, (action, csrf)
                    assert "security token" in await r.text()
        assert not await _item_exists(cs)
        # a form from another site is refused even with the right token
        for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Sec-Fetch-Site": "same-site", "Origin": "null"}):
            async with http.post(f"{cs.url}/console/enable", allow_redirects=False,
                                 data={"machine": "web01", "csrf": mine},
                                 headers=headers) as r:
                assert r.status == 403, headers
                assert "from another site" in await r.text()
        assert not await _item_exists(cs)
        # the right token: replication of web01 is enabled, and the session can sign out
        async with http.post(f"{cs.url}/console/enable", allow_redirects=False,
                             data={"machine": "web01", "policy": "default",
                                   "csrf": mine}) as r:
            assert r.status == 303 and r.headers["Location"] == "/console/items/web01"
        assert await _item_exists(cs)
        # a destructive action without the item's name typed changes nothing
        async with http.post(f"{cs.url}/console/items/web01/disable", allow_redirects=False,
                             data={"csrf": mine, "confirm": "web0"}) as r:
            assert r.status == 422 and "in the confirmation box" in await r.text()
        async with ApiClient(cs.url, cs.admin_token) as api:
            assert (await api.get("/api/v1/items/web01"))["state"] != "disabling"
        async with http.post(f"{cs.url}/console/signout", data={"csrf": mine},
                             allow_redirects=False) as r:
            assert r.status == 303
        async with http.get(f"{cs.url}/console/", allow_redirects=False) as r:
            assert r.status == 303  # the session is gone on the server too


async def test_security_headers_on_every_page_and_no_inline_code(cs: ConfigServer) -> None:
    async with _browser() as http:
        await _sign_in(http, cs)
        for page in ["/console/signin", *PAGES, "/console/static/console.css",
                     "/console/static/refresh.js"]:
            async with http.get(cs.url + page, allow_redirects=False) as r:
                assert r.status in (200, 404), page
                h = r.headers
                csp = h["Content-Security-Policy"]
                assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
                assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
                assert h["X-Content-Type-Options"] == "nosniff"
                assert h["Referrer-Policy"] == "no-referrer"
                assert h["Cache-Control"] == "no-store"
                body = await r.text()
            if "/static/" in page:
                assert r.headers["Content-Type"] in ("text/css", "text/javascript",
                                                     "application/javascript"), page
                continue
            assert r.headers["Content-Type"].startswith("text/html")
            # scripts only from files of the console's own (no inline code, no handlers)
            assert re.findall(r"<script[^>]*>", body) in (
                [], ['<script src="/console/static/refresh.js" defer>']), page
            assert not re.search(r"<script[^>]*>\s*[^<\s]", body), page
            assert not re.search(r"\son[a-z]+=", body), page
            assert " style=" not in body and "<style" not in body, page
            assert re.search(r'<html lang="en">', body)


async def test_the_token_is_never_in_a_url_or_a_log(cs: ConfigServer) -> None:
    seen: list[str] = []
    with capture_logs() as logs:
        async with _browser() as http:
            async with http.post(f"{cs.url}/console/signin", data={"token": "wrong"}) as r:
                seen.append(str(r.url))
            async with http.post(f"{cs.url}/console/signin",
                                 data={"token": cs.admin_token}) as r:
                seen += [str(h.url) for h in r.history] + [str(r.url)]
                seen += [h.headers.get("Location", "") for h in r.history]
                page = await r.text()
            session = next(c.value for c in http.cookie_jar)
            for path in PAGES:
                async with http.get(cs.url + path) as r:
                    seen.append(str(r.url))
                    page += await r.text()
    events = [e["event"] for e in logs]
    assert "console_signed_in" in events and "console_signin_refused" in events
    logged = repr(logs)
    for secret in (cs.admin_token, session):
        assert secret not in logged
        assert not any(secret in u for u in seen), seen
    assert cs.admin_token not in page  # nor in any page


async def test_sessions_expire_when_idle_or_old_and_are_bounded() -> None:
    now = [1000.0]
    store = SessionStore(lambda: now[0], idle=60, lifetime=300, limit=3)
    s = store.create()
    now[0] += 59
    assert store.get(s.id) is s  # seen: the idle time restarts
    now[0] += 59
    assert store.get(s.id) is s
    now[0] += 61
    assert store.get(s.id) is None and len(store) == 0
    s = store.create()
    for _ in range(6):  # used every 50 s, still ends 300 s after sign-in
        now[0] += 50
        assert store.get(s.id) is s
    now[0] += 1
    assert store.get(s.id) is None
    made = [store.create() for _ in range(4)]
    assert len(store) == 3 and store.get(made[0].id) is None  # the oldest sign-in went
    assert all(store.get(m.id) is m for m in made[1:])
    store.end(made[1].id)
    assert store.get(made[1].id) is None
    assert store.get(None) is None and store.get("") is None


async def test_logs_of_a_refused_action_name_no_secret(cs: ConfigServer) -> None:
    """A refusal is logged (path, reason, client) with neither the form nor the cookie."""
    with capture_logs() as logs:
        async with _browser() as http:
            csrf = await _sign_in(http, cs)
            async with http.post(f"{cs.url}/console/items/web01/commit",
                                 data={"csrf": csrf + "x"}) as r:
                assert r.status == 403
    refused = [e for e in logs
                                     if e["event"] == "console_request_refused"]
    assert refused and refused[0]["path"] == "/console/items/web01/commit"
    assert csrf not in repr(logs)


async def test_the_rpo_chart_has_a_bar_per_gap_between_points_and_one_for_now() -> None:
    def doc(t: float) -> dict[str, str]:
        return {"created": dt.datetime.fromtimestamp(t, dt.UTC).isoformat()}

    t0 = 1_800_000_000.0
    assert rpo_chart([], t0, 900) is None
    # points 5 min apart, one gap of 20 min; now 2 min after the last
    times = [t0, t0 + 300, t0 + 600, t0 + 1800, t0 + 2100]
    chart = rpo_chart([doc(t) for t in reversed(times)], t0 + 2220, 900)
    assert chart is not None
    assert [b.seconds for b in chart.bars] == [300, 300, 1200, 300, 120]
    assert [b.over for b in chart.bars] == [False, False, True, False, False]
    assert [b.now for b in chart.bars] == [False] * 4 + [True]
    assert chart.worst == 1200 and chart.over == 1
    tallest = max(chart.bars, key=lambda b: b.height)
    assert tallest.seconds == 1200 and tallest.y >= 0
    assert chart.threshold_y is not None and tallest.y < chart.threshold_y < 64
    many = rpo_chart([doc(t0 + 60 * i) for i in range(100)], t0 + 6000, None)
    assert many is not None and len(many.bars) == 30 and many.threshold_y is None


async def test_wrong_tokens_are_throttled_per_client(tmp_path: Path) -> None:
    """Ten wrong tokens from an address: the next attempts are refused for a while, the
    right token included (its own server: the module's keeps its counts clean)."""
    server = ConfigServer(ConfigServerConfig(
        data_dir=str(tmp_path / "cs"), listen_port=0, site_port=-1,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"))
    await server.start()
    try:
        async with _browser() as http:
            for _ in range(10):
                async with http.post(f"{server.url}/console/signin",
                                     data={"token": "guess"}) as r:
                    assert r.status == 401
            async with http.post(f"{server.url}/console/signin", allow_redirects=False,
                                 data={"token": server.admin_token}) as r:
                assert r.status == 429 and int(r.headers["Retry-After"]) > 0
                assert "too many wrong tokens" in await r.text()
                assert "Set-Cookie" not in r.headers
    finally:
        await server.stop()


async def test_an_oversized_form_is_refused(cs: ConfigServer) -> None:
    async with _browser() as http:
        csrf = await _sign_in(http, cs)
        async with http.post(f"{cs.url}/console/items/web01/cleanup-test-failover",
                             data={"csrf": csrf, "notes": "x" * (80 << 10)}) as r:
            assert r.status == 413


async def test_an_items_page_lists_its_newest_points_only(cs: ConfigServer) -> None:
    async with ApiClient(cs.url, cs.admin_token) as api:
        await add_machine(api, "db01", disks=("sda",))
        await api.post("/api/v1/replication/enable", {"machine": "db01"})
    async with ApiClient(cs.url, cs.internal_token) as internal:
        for i in range(POINTS_SHOWN + 1):
            created = dt.datetime.fromtimestamp(1_800_000_000 + 60 * i, dt.UTC).isoformat()
            await internal.post("/api/v1/internal/points", {
                "id": f"{i:064x}", "machine": "db01", "created": created,
                "consistency": "crash"})
    async with _browser() as http:
        await _sign_in(http, cs)
        async with http.get(f"{cs.url}/console/items/db01") as r:
            page = await r.text()
    rows = re.findall(r'<tr id="point-([0-9a-f]{64})">', page)
    assert rows == [f"{i:064x}" for i in range(POINTS_SHOWN, 0, -1)]  # the oldest left out
    assert f"The newest {POINTS_SHOWN} of {POINTS_SHOWN + 1} points" in page


async def test_a_job_is_cancelled_from_its_page(cs: ConfigServer) -> None:
    await add_procserver(cs.url, cs.internal_token)
    async with ApiClient(cs.url, cs.admin_token) as api:
        await add_machine(api, "app01", disks=("sda",))
        await api.post("/api/v1/replication/enable", {"machine": "app01"})
        (job,) = (await api.get("/api/v1/jobs", target="app01", active=True))["jobs"]
        # Enable protection waits for the machine's agent, which never checks in here.
        await wait_job(api, job["id"], step_running("prepare_agent"))
        assert job["cancellable"]
        action = f"/console/jobs/{job['id']}/cancel"
        async with _browser() as http:
            csrf = await _sign_in(http, cs)
            async with http.get(f"{cs.url}/console/jobs/{job['id']}") as r:
                forms = [f for f in re.findall(r"<form.*?</form>", await r.text(), re.S)
                         if f'action="{action}"' in f]
            assert len(forms) == 1 and f'name="csrf" value="{csrf}"' in forms[0]
            async with http.post(cs.url + action, data={}, allow_redirects=False) as r:
                assert r.status == 403 and "security token" in await r.text()
            assert (await api.get(f"/api/v1/jobs/{job['id']}"))["state"] in ACTIVE
            async with http.post(cs.url + action, data={"csrf": csrf},
                                 allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == \
                    f"/console/jobs/{job['id']}"
            done = await api.get(f"/api/v1/jobs/{job['id']}")
            assert done["state"] == "cancelled"
            assert (await api.get("/api/v1/items/app01"))["state"] == "enable_failed"
            async with http.get(f"{cs.url}/console/jobs/{job['id']}") as r:
                assert action not in await r.text()  # nothing left to cancel
            async with http.post(cs.url + action, data={"csrf": csrf}) as r:
                page = await r.text()
                assert r.status == 409 and 'role="alert"' in page
                assert f"job {job['id']} already ended (cancelled)" in page
            async with http.post(f"{cs.url}/console/jobs/0123456789abcdef/cancel",
                                 data={"csrf": csrf}) as r:
                assert r.status == 404 and "no job with id" in await r.text()

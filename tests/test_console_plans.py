"""The console's recovery-plan and consistency-group pages over real HTTP, against a
running configuration server: the pages need a session; every form carries the session's
CSRF token, and a post without it (or from another site) is refused and changes nothing;
a drill started from a plan's page queues the plan job the REST call queues, the page
shows it and confirms its manual action; a destructive verb needs the name typed; a
refusal shows the API's message and hint; a group's page shows its group points' states
and drills to a complete one; plans and groups are created from their pages, a plan's
description and items changed and a group's members added and removed on its page, and
each deleted from its page with its name typed (a refusal keeps what was typed and
changes nothing).

One server serves the module (SQLite, as tests/test_console_http.py); the items are put
in their states in the catalog, as tests/test_group_failover.py does, so no disk or
agent is needed: the tests look at what the forms queue, not at the recoveries.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from configserver.server import ConfigServer
from siterecovery.apiclient import ApiClient
from tests.sitehelpers import add_procserver, seed_items, sqlite_configserver, step, wait_job
from tests.test_console_http import _browser, _sign_in

pytestmark = pytest.mark.asyncio(loop_scope="module")

STATES = {"db01": "protected", "web01": "protected", "app02": "protected",
          "bad01": "failed_over", "app01": "protected", "db02": "protected",
          "half1": "failed_over", "half2": "protected"}
PLAN_VERBS = ("test-failover", "cleanup-test-failover", "failover", "commit", "reprotect",
              "failback", "resume")
GROUP_VERBS = PLAN_VERBS[:-1]
PAGES = ["/console/plans", "/console/plans/dr", "/console/groups", "/console/groups/erp"]
FORM = re.compile(r"<form\b[^>]*>.*?</form>", re.S)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cs(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ConfigServer]:
    """Plans dr (db01 | web01, a manual action first), mixed (app02, bad01 failed
    over) and half (half1 failed over | half2: a failover that stopped after its first
    group); group erp (app01, db02) with a complete, a pending and a failed group point."""
    d: Path = tmp_path_factory.mktemp("console-plans")
    async with sqlite_configserver(d) as server:
        await add_procserver(server.url, server.internal_token)
        async with ApiClient(server.url, server.admin_token) as api:
            await seed_items(server, api, STATES, "192.0.2.7")
            await api.post("/api/v1/plans", {"name": "dr", "description": "the shop", "groups": [
                {"name": "data", "items": ["db01"], "pre_action": "open the firewall"},
                {"name": "front", "items": ["web01"]}]})
            await api.post("/api/v1/plans", {"name": "mixed", "groups": [
                {"items": ["app02", "bad01"]}]})
            await api.post("/api/v1/plans", {"name": "half", "groups": [
                {"name": "data", "items": ["half1"]}, {"name": "front", "items": ["half2"]}]})
            await api.post("/api/v1/groups", {"name": "erp", "members": ["app01", "db02"]})
        yield server


async def _group_point(cs: ConfigServer, created: float, state: str = "released",
                       catalogued: tuple[str, ...] = ("app01", "db02")) -> str:
    """A group point of erp as its process server reports it, with the members'
    points of its cycles in the catalog for ``catalogued``; its id."""
    gp, cycles = uuid.uuid4().hex, {m: uuid.uuid4().hex for m in ("app01", "db02")}
    async with ApiClient(cs.url, cs.internal_token) as internal:
        for m in catalogued:
            await internal.post("/api/v1/internal/points", {
                "id": uuid.uuid4().hex * 2, "machine": m, "consistency": "crash",
                "created": f"2027-01-15T08:00:{int(created) % 60:02d}Z", "cycle": cycles[m]})
        await internal.post("/api/v1/internal/group-points", {
            "id": gp, "group": "erp", "created": created, "state": state,
            "members": cycles, **({"error": "db02 did not arrive"} if state == "failed"
                                  else {})})
    return gp


async def _jobs(cs: ConfigServer, target: str) -> list[dict[str, Any]]:
    async with ApiClient(cs.url, cs.admin_token) as api:
        jobs: list[dict[str, Any]] = (await api.get("/api/v1/jobs", limit=1000))["jobs"]
    return [j for j in jobs if j["target"] == target]  # (the filter takes machine names)


async def _page(http: aiohttp.ClientSession, cs: ConfigServer, path: str) -> str:
    async with http.get(cs.url + path, allow_redirects=False) as r:
        assert r.status == 200, (path, r.status)
        return await r.text()


def _forms(page: str) -> dict[str, str]:
    """The page's forms by action."""
    out = {}
    for form in FORM.findall(page):
        action = re.search(r'action="([^"]+)"', form)
        assert action is not None, form
        out[action.group(1)] = form
    return out


async def test_no_page_or_action_without_a_session(cs: ConfigServer) -> None:
    async with aiohttp.ClientSession() as http:
        for page in PAGES:
            async with http.get(cs.url + page, allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == \
                    f"/console/signin?next={page}", page
        for action in ([f"/console/plans/dr/{v}" for v in PLAN_VERBS]
                       + [f"/console/groups/erp/{v}" for v in GROUP_VERBS]):
            async with http.post(cs.url + action, allow_redirects=False,
                                 data={"confirm": "dr"}) as r:
                assert r.status == 403 and "not signed in" in await r.text(), action
    assert await _jobs(cs, "plan:dr") == [] and await _jobs(cs, "group:erp") == []


async def test_every_form_needs_the_sessions_csrf_token(cs: ConfigServer) -> None:
    async with _browser() as other:
        theirs = await _sign_in(other, cs)
    async with _browser() as http:
        mine = await _sign_in(http, cs)
        page = await _page(http, cs, "/console/groups/erp")  # no group point yet
        assert "need a complete group point: none yet" in page
        assert "/console/groups/erp/test-failover" not in page
        await _group_point(cs, 1.8e9)
        for page in PAGES:  # navigation to both, and each form with this session's token
            body = await _page(http, cs, page)
            assert 'href="/console/plans"' in body and 'href="/console/groups"' in body
            for action, form in _forms(body).items():
                assert f'name="csrf" value="{mine}"' in form, (page, action)
        forms = _forms(await _page(http, cs, "/console/plans/dr"))
        assert {"/console/plans/dr/test-failover", "/console/plans/dr/failover"} <= set(forms)
        forms = _forms(await _page(http, cs, "/console/groups/erp"))
        assert {"/console/groups/erp/test-failover", "/console/groups/erp/failover"} <= set(
            forms)
        for action in ([f"/console/plans/dr/{v}" for v in PLAN_VERBS]
                       + [f"/console/groups/erp/{v}" for v in GROUP_VERBS]):
            for csrf in (None, "", "x" * len(mine), theirs):
                data = {"confirm": "dr", "notes": "n"} | ({} if csrf is None
                                                         else {"csrf": csrf})
                async with http.post(cs.url + action, data=data,
                                     allow_redirects=False) as r:
                    assert r.status == 403 and "security token" in await r.text(), action
            for headers in ({"Origin": "https://evil.example"},
                            {"Sec-Fetch-Site": "cross-site"}):
                async with http.post(cs.url + action, data={"csrf": mine, "confirm": "dr"},
                                     headers=headers, allow_redirects=False) as r:
                    assert r.status == 403 and "from another site" in await r.text()
    assert await _jobs(cs, "plan:dr") == [] and await _jobs(cs, "group:erp") == []


async def test_a_destructive_verb_needs_the_name_typed(cs: ConfigServer) -> None:
    async with _browser() as http:
        csrf = await _sign_in(http, cs)
        for path, name in (("/console/plans/dr", "dr"), ("/console/groups/erp", "erp")):
            for verb in ("failover", "commit", "failback"):
                for typed in (None, "", name[:-1], name.upper(), "mixed"):
                    form = {"csrf": csrf} | ({} if typed is None else {"confirm": typed})
                    async with http.post(f"{cs.url}{path}/{verb}", data=form,
                                         allow_redirects=False) as r:
                        assert r.status == 422, (path, verb, typed)
                        assert f"type the name, {name}, in the confirmation box" in \
                            await r.text()
    assert await _jobs(cs, "plan:dr") == [] and await _jobs(cs, "group:erp") == []
    async with ApiClient(cs.url, cs.admin_token) as api:
        for m in ("db01", "web01", "app01", "db02"):
            assert (await api.get(f"/api/v1/items/{m}"))["state"] == "protected", m


async def test_a_refusal_shows_the_apis_message_and_hint(cs: ConfigServer) -> None:
    async with _browser() as http:
        csrf = await _sign_in(http, cs)
        page = await _page(http, cs, "/console/plans/mixed")
        assert "failed over" in page.replace("_", " ")  # bad01's state is shown
        assert "/console/plans/mixed/test-failover" not in page  # not offered in it
        async with http.post(f"{cs.url}/console/plans/mixed/test-failover",
                             data={"csrf": csrf, "point": "latest-processed"}) as r:
            assert r.status == 409
            text = await r.text()
        assert "cannot test failover plan &#39;mixed&#39;: bad01: failed_over" in text
        assert "fix or wait for those items" in text  # the hint
        assert 'role="alert"' in text and "Plan mixed" in text
        # a point no plan can take, a group point that is not an id: refused up front
        async with http.post(f"{cs.url}/console/plans/dr/test-failover",
                             data={"csrf": csrf, "point": "f" * 64}) as r:
            assert r.status == 422 and "choose the point from the list" in await r.text()
        async with http.post(f"{cs.url}/console/groups/erp/test-failover",
                             data={"csrf": csrf, "group_point": "../x"}) as r:
            assert r.status == 422 and "is not a group point" in await r.text()
        for missing in ("/console/plans/nope", "/console/groups/nope"):
            async with http.get(cs.url + missing) as r:
                assert r.status == 404 and "siterecovery" in await r.text()
        async with http.post(f"{cs.url}/console/plans/nope/reprotect",
                             data={"csrf": csrf}) as r:
            assert r.status == 404 and "no recovery plan named" in await r.text()
    assert await _jobs(cs, "plan:mixed") == [] and await _jobs(cs, "plan:dr") == []


async def test_a_plan_drill_from_its_page_is_the_rest_job_and_is_confirmed_there(
        cs: ConfigServer) -> None:
    async with _browser() as http:
        csrf = await _sign_in(http, cs)
        async with http.post(f"{cs.url}/console/plans/dr/test-failover",
                             allow_redirects=False,
                             data={"csrf": csrf, "point": "latest-app-consistent"}) as r:
            assert r.status == 303 and r.headers["Location"] == "/console/plans/dr"
        [job] = await _jobs(cs, "plan:dr")
        assert job["kind"] == "plan_test_failover"  # the job POST /plans/dr/test-failover
        async with ApiClient(cs.url, cs.admin_token) as api:
            job = await wait_job(api, job["id"], lambda j: j["state"] == "waiting")
            shown = await api.get("/api/v1/plans/dr")
        assert shown["last_job"]["id"] == job["id"]
        assert [s["name"] for s in job["steps"]][:3] == ["g1_pre_action", "g1_start",
                                                         "item_db01"]
        page = await _page(http, cs, "/console/plans/dr")
        assert f'/console/jobs/{job["id"]}' in page
        forms = _forms(page)
        assert set(forms) == {"/console/plans/dr/resume", "/console/signout"}  # no verb
        assert "open the firewall" in forms["/console/plans/dr/resume"]
        assert f'name="job" value="{job["id"]}"' in forms["/console/plans/dr/resume"]
        forms = _forms(await _page(http, cs, f'/console/jobs/{job["id"]}'))
        assert f'name="csrf" value="{csrf}"' in forms["/console/plans/dr/resume"]
        listed = await _page(http, cs, "/console/plans")
        assert job["id"][:12] in listed and "waiting" in listed
        # a second drill while it waits: the API's refusal, on the page
        async with http.post(f"{cs.url}/console/plans/dr/test-failover",
                             data={"csrf": csrf}) as r:
            assert r.status == 409 and "a job of plan &#39;dr&#39; is running" in \
                await r.text()
        # confirming another plan's job, or none, changes nothing
        for name, jid in (("mixed", job["id"]), ("dr", "0" * 32)):
            async with http.post(f"{cs.url}/console/plans/{name}/resume",
                                 data={"csrf": csrf, "job": jid}) as r:
                assert r.status == 404, name
        async with http.post(f"{cs.url}/console/plans/dr/resume", allow_redirects=False,
                             data={"csrf": csrf, "job": job["id"],
                                   "notes": "firewall open"}) as r:
            assert r.status == 303 and r.headers["Location"] == "/console/plans/dr"
    async with ApiClient(cs.url, cs.admin_token) as api:
        job = await wait_job(api, job["id"],
                             lambda j: step(j, "g1_pre_action")["state"] == "succeeded")
    assert job["state"] != "waiting"


async def test_a_group_page_shows_its_points_and_drills_to_a_complete_one(
        cs: ConfigServer) -> None:
    complete = await _group_point(cs, 1.8e9 + 60)
    pending = await _group_point(cs, 1.8e9 + 120, catalogued=("app01",))
    failed = await _group_point(cs, 1.8e9 + 180, state="failed", catalogued=())
    async with _browser() as http:
        csrf = await _sign_in(http, cs)
        page = await _page(http, cs, "/console/groups/erp")
        for gp, state in ((complete, "complete"), (pending, "pending"), (failed, "failed")):
            row = re.search(rf'<tr id="gp-{gp}">.*?</tr>', page, re.S)
            assert row is not None and f"state-{state}" in row.group(0), state
        choice = _forms(page)["/console/groups/erp/test-failover"]
        offered = re.findall(r'<option value="([0-9a-f]{32})"', choice)
        assert offered[0] == complete and pending not in offered and failed not in offered
        assert "db02 did not arrive" in page
        assert "state-failed" in await _page(http, cs, "/console/groups")  # the newest
        async with http.post(f"{cs.url}/console/groups/erp/test-failover",
                             data={"csrf": csrf, "group_point": pending}) as r:
            assert r.status == 409 and "not in the catalog yet" in await r.text()
        assert await _jobs(cs, "group:erp") == []
        async with http.post(f"{cs.url}/console/groups/erp/test-failover",
                             allow_redirects=False,
                             data={"csrf": csrf, "group_point": complete}) as r:
            assert r.status == 303 and r.headers["Location"] == "/console/groups/erp"
        [job] = await _jobs(cs, "group:erp")
        assert job["kind"] == "plan_test_failover"
        assert [s["name"] for s in job["steps"]] == ["g1_start", "item_app01", "item_db02"]
        page = await _page(http, cs, "/console/groups/erp")
        assert f'/console/jobs/{job["id"]}' in page
        assert "/console/groups/erp/test-failover" not in page  # not while its job runs


async def test_a_plan_partly_failed_over_offers_only_what_its_plan_layer_takes(
        cs: ConfigServer) -> None:
    """half1 failed over, half2 not (the plan's failover stopped after its first group):
    the page names the items in each state and offers the failover run again, which
    passes half1 by; not commit, re-protect or failback (the plan layer refuses them
    until every item is failed over: a failback would find half2 never failed over), and
    it says why."""
    async with _browser() as http:
        csrf = await _sign_in(http, cs)
        page = await _page(http, cs, "/console/plans/half")
        forms = _forms(page)
        assert set(forms) == {"/console/plans/half/failover", "/console/plans/half/edit",
                              "/console/plans/half/delete", "/console/signout"}
        failover = forms["/console/plans/half/failover"]
        assert "Finish the failover" in failover
        assert "For half2 only; passed by, done already: half1: failed_over." in failover
        states = re.search(r'<p id="item-states">(.*?)</p>', page, re.S)
        assert states is not None
        assert "different states:</strong> failed over: half1; protected: half2." in \
            states.group(1)
        why = dict(re.findall(r'<li id="withheld-([a-z-]+)">(.*?)</li>', page, re.S))
        assert set(why) == {"test-failover", "commit", "reprotect", "failback"}, why
        assert "it needs every item in failed_over — refused by half2: protected; it " \
               "would take half1." in why["commit"]
        assert "refused by half2: protected, not failed over (nothing to fail back)" in \
            why["failback"]
        # what the page does not offer, the plan layer refuses, changing nothing
        for verb in ("test-failover", "commit", "reprotect", "failback"):
            async with http.post(f"{cs.url}/console/plans/half/{verb}",
                                 data={"csrf": csrf, "confirm": "half"}) as r:
                assert r.status == 409, verb
                assert f"cannot {verb.replace('-', ' ')} plan &#39;half&#39;" in \
                    await r.text()
        assert await _jobs(cs, "plan:half") == []
        # what it offers, the plan layer takes: the failover run again passes half1 by
        async with http.post(f"{cs.url}/console/plans/half/failover", allow_redirects=False,
                             data={"csrf": csrf, "confirm": "half"}) as r:
            assert r.status == 303, await r.text()
    [job] = await _jobs(cs, "plan:half")
    assert job["kind"] == "plan_failover"
    async with ApiClient(cs.url, cs.admin_token) as api:
        job = await wait_job(api, job["id"])  # half2's failover fails: no vault here
        assert (await api.get("/api/v1/items/half1"))["state"] == "failed_over"
    assert step(job, "item_half1")["message"] == \
        "half1 passed by: it is failed_over already"


async def _refused_forms(http: aiohttp.ClientSession, cs: ConfigServer, action: str,
                         csrf: str, cases: tuple[tuple[dict[str, str], int, str], ...]
                         ) -> None:
    """Each form refused with its status and message, shown with what was typed."""
    for fields, status, says in cases:
        async with http.post(cs.url + action, data={"csrf": csrf, **fields}) as r:
            page = await r.text()
        assert r.status == status, (fields, r.status)
        assert 'role="alert"' in page and says in page, (fields, page[:2000])
        assert all(f'value="{v}"' in page or f">{v}</textarea>" in page
                   for k, v in fields.items() if k != "groups" or v.strip()), fields


async def test_a_plan_is_created_from_the_plans_page(cs: ConfigServer) -> None:
    async with ApiClient(cs.url, cs.admin_token) as api:
        before = [p["name"] for p in (await api.get("/api/v1/plans"))["plans"]]
    async with _browser() as http:
        csrf = await _sign_in(http, cs)
        (form,) = [f for a, f in _forms(await _page(http, cs, "/console/plans")).items()
                   if a == "/console/plans"]
        assert f'name="csrf" value="{csrf}"' in form
        async with http.post(f"{cs.url}/console/plans", allow_redirects=False,
                             data={"name": "new", "groups": "app02"}) as r:
            assert r.status == 403  # no session token: refused
        await _refused_forms(http, cs, "/console/plans", csrf, (
            ({"name": "bad name", "groups": "app02"}, 422, "name: &#39;bad name&#39;"),
            ({"name": "new", "groups": " \n "}, 422, "groups: [] should be non-empty"),
            ({"name": "new", "groups": "nosuch01"}, 422, "nosuch01 is not replicated"),
            ({"name": "new", "groups": "app02\napp02"}, 422, "in plan &#39;new&#39; twice"),
            ({"name": "dr", "groups": "app02"}, 409, "named &#39;dr&#39; exists")))
        async with ApiClient(cs.url, cs.admin_token) as api:
            assert [p["name"] for p in (await api.get("/api/v1/plans"))["plans"]] == before
        async with http.post(f"{cs.url}/console/plans", allow_redirects=False, data={
                "csrf": csrf, "name": "new", "groups": "app02, half2\n  db02 \n",
                "description": "two tiers"}) as r:
            assert r.status == 303 and r.headers["Location"] == "/console/plans/new"
    async with ApiClient(cs.url, cs.admin_token) as api:
        plan = await api.get("/api/v1/plans/new")
        assert [g["items"] for g in plan["groups"]] == [["app02", "half2"], ["db02"]]
        assert plan["description"] == "two tiers"
        await api.delete("/api/v1/plans/new")


async def test_a_group_is_created_from_the_groups_page(cs: ConfigServer) -> None:
    async with ApiClient(cs.url, cs.admin_token) as api:
        before = [g["name"] for g in (await api.get("/api/v1/groups"))["groups"]]
    async with _browser() as http:
        csrf = await _sign_in(http, cs)
        forms = _forms(await _page(http, cs, "/console/groups"))
        assert f'name="csrf" value="{csrf}"' in forms["/console/groups"]
        async with http.post(f"{cs.url}/console/groups", allow_redirects=False,
                             data={"name": "shop", "members": "db01"}) as r:
            assert r.status == 403  # no session token: refused
        await _refused_forms(http, cs, "/console/groups", csrf, (
            ({"name": "bad name", "members": "db01"}, 422, "name: &#39;bad name&#39;"),
            ({"name": "shop", "members": " , "}, 422, "members: [] should be non-empty"),
            ({"name": "shop", "members": "db01 nosuch01"}, 422,
             "no machine named &#39;nosuch01&#39;"),
            ({"name": "shop", "members": "db01,app01"}, 409,
             "machine &#39;app01&#39; is in consistency group &#39;erp&#39;"),
            ({"name": "erp", "members": "db01"}, 409, "named &#39;erp&#39; exists")))
        async with ApiClient(cs.url, cs.admin_token) as api:
            assert [g["name"] for g in (await api.get("/api/v1/groups"))["groups"]] == before
        async with http.post(f"{cs.url}/console/groups", allow_redirects=False, data={
                "csrf": csrf, "name": "shop", "members": "db01, web01"}) as r:
            assert r.status == 303 and r.headers["Location"] == "/console/groups/shop"
    async with ApiClient(cs.url, cs.admin_token) as api:
        assert (await api.get("/api/v1/groups/shop"))["members"] == ["db01", "web01"]
        await api.delete("/api/v1/groups/shop")


async def test_a_groups_members_are_added_and_removed_from_its_page(cs: ConfigServer) -> None:
    async def members() -> list[str]:
        async with ApiClient(cs.url, cs.admin_token) as api:
            got: list[str] = (await api.get("/api/v1/groups/erp"))["members"]
        return got

    add, remove = "/console/groups/erp/members/add", "/console/groups/erp/members/remove"
    async with ApiClient(cs.url, cs.admin_token) as api:  # the drill of an earlier test
        for job in await _jobs(cs, "group:erp"):  # (members change with no job of it)
            await wait_job(api, job["id"])
    async with _browser() as http:
        csrf = await _sign_in(http, cs)
        forms = _forms(await _page(http, cs, "/console/groups/erp"))
        assert {add, remove} <= set(forms)
        assert all(f'name="csrf" value="{csrf}"' in forms[a] for a in (add, remove))
        assert '<option>app01</option>' in forms[remove]
        for action, data in ((add, {"machines": "db01"}), (remove, {"machine": "app01"})):
            async with http.post(cs.url + action, data=data, allow_redirects=False) as r:
                assert r.status == 403  # no session token: refused
        await _refused_forms(http, cs, add, csrf, (
            ({"machines": " , "}, 422, "machines: [] should be non-empty"),
            ({"machines": "db01 nosuch01"}, 422, "no machine named &#39;nosuch01&#39;")))
        async with http.post(cs.url + remove, data={"csrf": csrf, "machine": "web01"}) as r:
            assert r.status == 404
            assert "machine &#39;web01&#39; is not in consistency group &#39;erp&#39;" in \
                await r.text()
        assert await members() == ["app01", "db02"]  # the refusals changed nothing

        async with http.post(cs.url + add, allow_redirects=False,
                             data={"csrf": csrf, "machines": "db01, web01"}) as r:
            assert r.status == 303 and r.headers["Location"] == "/console/groups/erp"
        assert await members() == ["app01", "db01", "db02", "web01"]
        for machine, left in (("db01", ["app01", "db02", "web01"]), ("web01", ["app01", "db02"])):
            async with http.post(cs.url + remove, allow_redirects=False,
                                 data={"csrf": csrf, "machine": machine}) as r:
                assert r.status == 303 and r.headers["Location"] == "/console/groups/erp"
            assert await members() == left


async def test_a_plan_and_a_group_are_deleted_from_their_pages_with_the_name_typed(
        cs: ConfigServer) -> None:
    async with ApiClient(cs.url, cs.admin_token) as api:
        await api.post("/api/v1/plans", {"name": "old", "groups": [{"items": ["app02"]}]})
        await api.post("/api/v1/groups", {"name": "gone", "members": ["db01"]})
        busy = (await api.post("/api/v1/plans/dr/test-failover", {}))["job"]  # waits
    try:
        async with _browser() as http:
            csrf = await _sign_in(http, cs)
            # (no delete form on a plan while a job of it runs: a post is refused)
            assert "/console/plans/dr/delete" not in _forms(
                await _page(http, cs, "/console/plans/dr"))
            for kind, name in (("plans", "old"), ("groups", "gone"), ("plans", "dr")):
                action = f"/console/{kind}/{name}/delete"
                if name != "dr":
                    assert f'name="csrf" value="{csrf}"' in _forms(
                        await _page(http, cs, f"/console/{kind}/{name}"))[action]
                async with http.post(cs.url + action, data={"confirm": name},
                                     allow_redirects=False) as r:
                    assert r.status == 403  # no session token: refused
                for typed in ("", name.upper()):
                    async with http.post(cs.url + action,
                                         data={"csrf": csrf, "confirm": typed}) as r:
                        assert r.status == 422 and "type the name" in await r.text()
            async with http.post(cs.url + "/console/plans/dr/delete",
                                 data={"csrf": csrf, "confirm": "dr"}) as r:
                assert r.status == 409 and "a job of plan &#39;dr&#39; is running" in \
                    await r.text()
            async with ApiClient(cs.url, cs.admin_token) as api:  # the refusals: nothing
                assert {"old", "dr"} <= {p["name"] for p in (await api.get(
                    "/api/v1/plans"))["plans"]}
                assert "gone" in {g["name"] for g in (await api.get("/api/v1/groups"))[
                    "groups"]}
            for kind, name in (("plans", "old"), ("groups", "gone")):
                async with http.post(f"{cs.url}/console/{kind}/{name}/delete",
                                     allow_redirects=False,
                                     data={"csrf": csrf, "confirm": name}) as r:
                    assert r.status == 303 and r.headers["Location"] == f"/console/{kind}"
                async with http.get(f"{cs.url}/console/{kind}/{name}") as r:
                    assert r.status == 404
    finally:
        async with ApiClient(cs.url, cs.admin_token) as api:
            await api.post(f"/api/v1/jobs/{busy['id']}/cancel")
    async with ApiClient(cs.url, cs.admin_token) as api:
        assert (await api.get("/api/v1/items/db01"))["state"] == "protected"


async def test_a_plans_description_and_items_are_changed_from_its_page(cs: ConfigServer
                                                                       ) -> None:
    async with ApiClient(cs.url, cs.admin_token) as api:
        await api.post("/api/v1/plans", {"name": "edit", "description": "first", "groups": [
            {"name": "data", "items": ["app02"], "pre_action": "stop the batch"},
            {"name": "front", "items": ["half2"]}]})
        before = await api.get("/api/v1/plans/edit")
    action = "/console/plans/edit/edit"
    try:
        async with _browser() as http:
            csrf = await _sign_in(http, cs)
            form = _forms(await _page(http, cs, "/console/plans/edit"))[action]
            assert f'name="csrf" value="{csrf}"' in form
            assert 'value="first"' in form and ">app02\nhalf2</textarea>" in form
            async with http.post(cs.url + action, data={"groups": "app02"},
                                 allow_redirects=False) as r:
                assert r.status == 403  # no session token: refused
            await _refused_forms(http, cs, action, csrf, (
                ({"groups": " \n "}, 422, "groups: [] should be non-empty"),
                ({"groups": "app02\nnosuch01"}, 422, "nosuch01 is not replicated"),
                ({"groups": "app02\napp02"}, 422, "in plan &#39;edit&#39; twice"),
                ({"groups": "app02", "description": "x" * 1001}, 422, "description: ")))
            async with ApiClient(cs.url, cs.admin_token) as api:
                assert await api.get("/api/v1/plans/edit") == before  # nothing changed
            async with http.post(cs.url + action, allow_redirects=False, data={
                    "csrf": csrf, "description": "second",
                    "groups": "app02, db01\nhalf2\n\n web01 "}) as r:
                assert r.status == 303 and r.headers["Location"] == "/console/plans/edit"
            async with ApiClient(cs.url, cs.admin_token) as api:
                plan = await api.get("/api/v1/plans/edit")
            assert plan["description"] == "second"
            assert [(g["name"], g["items"], g["pre_action"]) for g in plan["groups"]] == [
                ("data", ["app02", "db01"], "stop the batch"), ("front", ["half2"], None),
                ("group3", ["web01"], None)]
            async with http.post(cs.url + action, allow_redirects=False, data={
                    "csrf": csrf, "description": "", "groups": "half2"}) as r:
                assert r.status == 303
            async with ApiClient(cs.url, cs.admin_token) as api:
                plan = await api.get("/api/v1/plans/edit")
            assert plan["description"] == ""
            assert [(g["name"], g["items"], g["pre_action"]) for g in plan["groups"]] == [
                ("data", ["half2"], "stop the batch")]
    finally:
        async with ApiClient(cs.url, cs.admin_token) as api:
            await api.delete("/api/v1/plans/edit")

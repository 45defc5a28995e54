"""Scheduled prune (#17): the Prune the vault job through the real configuration server
on a real vault — it forgets only what no policy keeps, collects the garbage, and every
point kept still restores byte-exact."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from configserver.gcjob import schedule_once
from siterecovery.apiclient import ApiClient
from tests.csclock import Clock, clocked_configserver
from tests.helpers import make_vault, open_vault, restore_all, write_full_point
from tests.sitehelpers import wait_job
from vault import names
from vault.check import check_vault
from vault.keyslots import KeyMaterial, read_keyfile
from vault.regkey import make_key
from vault.store.local import LocalStore

DISK = 1 << 20


async def test_prune_job_keeps_what_the_policies_keep_and_collects_the_rest(
        tmp_path: Path, catalog_url: str) -> None:
    url, key = await make_vault(tmp_path)
    vault = await open_vault(tmp_path / "vault", key)
    data = [os.urandom(DISK) for _ in range(3)]
    points = [await write_full_point(vault, d, machine="m1", cycle=f"c{i}")
              for i, d in enumerate(data)]
    want = {p.id: await restore_all(vault, p, tmp_path / "want") for p in points}
    packs_before = [b.name async for b in vault.store.list(names.PACKS)]
    clock = Clock()  # real time until registered, then moved by hand
    async with clocked_configserver(tmp_path / "cs", catalog_url, clock) as cs, \
            ApiClient(cs.url, cs.admin_token) as api:
        assert await schedule_once(cs.services, 24) is None  # no vault yet
        await api.post("/api/v1/registration", {
            "key": json.dumps(make_key(vault, url, time.time())), "vault_key_file": str(key)})
        # 30 hours on, but a policy keeps 48 hours: nothing is forgotten.
        clock.now = time.time() + 30 * 3600
        await api.post("/api/v1/policies", {"name": "long", "retention_hours": 48})
        job = await schedule_once(cs.services, 24)
        assert job is not None
        done = await wait_job(api, job.id)
        assert done["state"] == "succeeded", done
        assert "forgot 0 point(s), kept 3" in done["steps"][0]["message"], done
        assert len(await vault.list_points()) == 3
        assert await schedule_once(cs.services, 24) is None  # not due again yet

        # That policy gone, the longest retention is the default's 24 hours: only the
        # newest point stays, the others' packs are deleted.
        await api.delete("/api/v1/policies/long")
        done = await wait_job(api, (await api.post("/api/v1/prune", {}))["job"]["id"])
        assert done["state"] == "succeeded", done
        assert "forgot 2 point(s), kept 1" in done["steps"][0]["message"], done
    left = await vault.list_points()
    assert [p.id for p in left] == [points[-1].id]
    assert await restore_all(vault, left[0], tmp_path / "got") == want[points[-1].id]
    packs_after = [b.name async for b in vault.store.list(names.PACKS)]
    assert len(packs_after) < len(packs_before)
    await vault.close()
    report = await check_vault(LocalStore(tmp_path / "vault"),
                               KeyMaterial(keyfile=read_keyfile(key)), read_data=True)
    assert not report.problems, report.problems

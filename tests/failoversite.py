"""A protected machine for the failover tests: web01 with whole-disk ext4 points in a
real vault, protected through the configuration server's real jobs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from siterecovery.apiclient import ApiClient
from tests.backends import missing_backend
from tests.helpers import make_vault, open_vault, write_full_point
from tests.sitehelpers import (
    AgentSite,
    add_machine,
    add_procserver,
    next_job,
    report_point,
    wait_job,
)
from vault.point import Point
from vault.regkey import make_key
from vault.repo import Vault

DISK = (8 << 20) + 5120  # a short last block (disks are whole 512-byte sectors)


def disk_data(seed: int) -> bytes:
    return os.urandom(DISK // 2) + bytes(DISK - DISK // 2 - 100) + bytes([seed]) * 100


def ext4_disk(tmp: Path, seed: int, *, damaged: bool = False) -> bytes:
    """A whole-disk ext4 with a few files (mkfs.ext4 -d); ``damaged``: its inode table
    overwritten, which e2fsck -fn reports."""
    for tool in ("mkfs.ext4", "e2fsck", "dumpe2fs", "losetup"):
        if shutil.which(tool) is None:
            missing_backend(tool, "tests/run.sh installs e2fsprogs and util-linux")
    if os.geteuid() != 0:
        missing_backend("root (read-only loop devices for e2fsck)", "run the suite as root")
    content, img = tmp / f"content{seed}", tmp / f"disk{seed}.img"
    (content / "etc").mkdir(parents=True)
    (content / "etc" / "hostname").write_text(f"web01-{seed}\n")
    with open(img, "wb") as f:
        f.truncate(DISK)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(content), str(img)],
                   check=True)
    if damaged:
        dump = subprocess.run(["dumpe2fs", str(img)], capture_output=True, text=True,
                              check=True).stdout
        m = re.search(r"Inode table at (\d+)-", dump)
        assert m is not None
        with open(img, "r+b") as f:
            f.seek(int(m.group(1)) * 4096)
            f.write(b"\xa5" * 8 * 4096)
    return img.read_bytes()


async def register(api: ApiClient, tmp: Path) -> Vault:
    url, key = await make_vault(tmp)
    vault = await open_vault(tmp / "vault", key)
    await api.post("/api/v1/registration", {
        "key": json.dumps(make_key(vault, url, time.time())), "vault_key_file": str(key)})
    return vault


async def protect(api: ApiClient, url: str, site_url: str, internal: str, ca: Path,
                   passphrase: str, tmp: Path, vault: Vault) -> tuple[list[Point],
                                                                       dict[str, bytes]]:
    """web01 protected through the real jobs, with two full points of one disk (sda)."""
    await add_procserver(url, internal)
    await add_machine(api, "web01", disks=("sda",))
    agent = await AgentSite.enroll(site_url, ca, "web01", passphrase, tmp / "agent")
    jid = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]["id"]
    async with agent:
        assert (await agent.heartbeat("2.0.0"))[0] == 200
        assert (await agent.progress({"sda": 100}))[0] == 200
    points, data = [], {}
    for i in range(2):
        d = ext4_disk(tmp, i)
        p = await write_full_point(vault, d, machine="web01", cycle=f"c{i}")
        await report_point(url, internal, "web01", p.id, p.created, p.consistency)
        points.append(p)
        data[p.id] = d
    assert (await wait_job(api, jid))["state"] == "succeeded"
    fin = await wait_job(api, (await next_job(api, "web01", "finalize_protection"))["id"])
    assert fin["state"] == "succeeded"
    assert (await api.get("/api/v1/items/web01"))["state"] == "protected"
    return points, data


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

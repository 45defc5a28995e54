"""RTO of a drill: protect a bootable disk, then time ``failover test`` → booted on libvirt.

Setup (the harness of ``tests/test_drill_libvirt.py``): the cached bootable Linux disk of
``tests/bootdisk.py`` is protected through the real path — Mobility agent → mutual TLS →
process server → fsynced cache → local-folder vault, its points reported to a
configuration server's catalog — in two cycles, each after a file was changed through
the disk's mounted filesystem. The configuration server has a libvirt target on a real
``libvirtd`` (started here if none answers).

Measured, one VM boot:

- ``siterecovery failover test web01 --wait --json`` run as a command: the time from the
  command's start to the proof of boot on the VM's serial console, split into the job's
  own steps from their stored timestamps (prerequisites, select the point, restore from
  the vault, check the disks — partition table and ``e2fsck -fn`` —, create the domain,
  boot), and the job's recorded RTO (job start → booted).
- Peers in the same run, on the same point and image: ``siterecovery restore`` of the
  point into a folder (a fresh process, vault and key only), ``cp --reflink=auto
  --sparse=always`` and ``qemu-img convert -O raw`` of the raw source image (what copying
  the bytes costs), and ``e2fsck -fn`` of the source's partition on a loop device (the
  floor of the checks). Ratios: each job step over its peer.

With ``--instant``, in the same run: the same drill with ``failover test --instant``
(the machine boots on its disk served over NBD from the vault; command → booted, the
share of the point's data local at boot, then the hydration and the pivot onto the local
image), and both drills again on a 16 GiB disk (``--big-gib``): the boot disk at its
start and ``--big-data-mib`` of random data spread over the rest (holes between),
protected in one cycle. Target: the instant RTO independent of the disk's size.

Whether the VM ran under KVM or QEMU's emulation (TCG) is reported: ``targets.kvm``
decides, as the libvirt target does. Needs root (loop devices, ``qemu:///system``),
libvirt, QEMU, e2fsprogs, fdisk (and nbdfuse, /dev/fuse for ``--instant``). Not a test:
nothing here runs under pytest.

Run: ``.venv/bin/python benchmarks/bench_rto.py [--instant] [--json] [--json-out FILE]
[--keep]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the boot disk and libvirtd come from the tests' helpers
    sys.path.insert(0, str(REPO))

from bench_e2e import quiet_logs, say, tool_version  # noqa: E402

from configserver import db  # noqa: E402
from configserver.config import ConfigServerConfig  # noqa: E402
from configserver.server import ConfigServer  # noqa: E402
from procserver.server import ProcServer  # noqa: E402
from siterecovery.apiclient import ApiClient  # noqa: E402
from targets.kvm import probe_kvm  # noqa: E402
from tests.bootdisk import MARKER, PART_START, bootdisk, missing_tools  # noqa: E402
from tests.helpers import (  # noqa: E402
    agent_config,
    make_agent,
    make_pki,
    make_vault,
    open_vault,
    proc_config,
    running_procserver,
    sha256,
)
from tests.libvirtd import libvirtd_running  # noqa: E402
from tests.sitehelpers import AgentSite, add_machine, next_job, wait_job  # noqa: E402
from vault.regkey import make_key  # noqa: E402

MACHINE, VM = "web01", "sr-bench-rto-web01"
BIG = "web02"  # the 16 GiB disk's machine (--instant)
DRILL_SUBNET = "10.217.0.0/24"  # neither the tests' drill subnets nor libvirt's default
JOB_STEPS = ("prerequisites", "select_point", "restore", "verify", "create", "boot")
INSTANT_STEPS = ("prerequisites", "select_point", "create", "verify", "boot")
TOOLS = ("losetup", "mount", "umount", "e2fsck", "virsh", "libvirtd", "virtlogd",
         "qemu-system-x86_64", "qemu-img")
DRILL_BOUND = 900.0  # seconds for the drill under emulation: a bound, not a measure


def preflight() -> list[str]:
    """What is missing to run this benchmark, each with what to do."""
    problems = []
    if os.geteuid() != 0:
        problems.append("root is needed (loop devices, libvirtd on qemu:///system)")
    missing = [t for t in TOOLS if shutil.which(t) is None] + missing_tools()
    if missing:
        problems.append(f"missing {', '.join(missing)}: tests/run.sh installs them "
                        "(libvirt-daemon-system, qemu-system-x86, qemu-utils, e2fsprogs, "
                        "fdisk)")
    return problems


def run(*argv: str | Path) -> str:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: exit {res.returncode}\n"
                           f"{res.stdout}{res.stderr}")
    return res.stdout


async def timed_cmd(*argv: str | Path) -> tuple[float, str]:
    """Run a command to completion (the servers keep running); its seconds and stdout."""
    t = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: exit {proc.returncode}\n"
                           f"{out.decode(errors='replace')}{err.decode(errors='replace')}")
    return seconds, out.decode()


def write_token(image: Path, token: str, mnt: Path) -> None:
    """Change the disk the way its machine would: through its mounted filesystem."""
    mnt.mkdir(exist_ok=True)
    run("mount", "-o", f"loop,offset={PART_START * 512}", image, mnt)
    try:
        (mnt / "etc" / "siterecovery-drill").write_text(token + "\n")
    finally:
        run("umount", mnt)  # the loop device goes with it (autoclear)


def traversable(work: Path) -> None:
    """The emulator runs as libvirt-qemu: it must reach the images under ``work``."""
    work.chmod(0o711)
    for p in work.parents:
        if p.stat().st_mode & 0o001 == 0:
            raise SystemExit(f"bench_rto: {p} is not searchable by other users, so QEMU "
                             f"(libvirt-qemu) cannot reach images under it; hint: pass "
                             f"--work on /tmp or another world-searchable path")


async def protect(cs: ConfigServer, api: ApiClient, stack: AsyncExitStack, work: Path,
                  disk: Path) -> tuple[ProcServer, list[str], str, Path, Any]:
    """A process server on a new vault (running until ``stack`` closes), ``MACHINE``
    protected in two cycles; the server, the points, the vault URL and key file, the
    process server's PKI."""
    url, key = await make_vault(work)
    vault = await open_vault(work / "vault", key)
    try:
        await api.post("/api/v1/registration", {
            "key": json.dumps(make_key(vault, url, time.time())), "vault_key_file": str(key)})
    finally:
        await vault.close()
    pki = make_pki(work / "pki")
    cfg = proc_config(work, pki, url, key, configserver_url=cs.url,
                      configserver_token_file=str(cs.cfg.internal_token_path), name="ps1",
                      heartbeat_interval_seconds=3600, segment_bytes=1 << 20,
                      cache_quota_bytes=256 << 20)
    ps = await stack.enter_async_context(running_procserver(cfg))
    async with asyncio.timeout(60), cs.changed:  # registered by its first heartbeat
        while "ps1" not in {p["name"] for p in (await api.get("/api/v1/procservers"))[
                "procservers"]}:
            await cs.changed.wait()

    points = await protect_machine(cs, api, ps, pki, work, MACHINE, disk, cycles=2)
    return ps, points, url, key, pki


async def protect_machine(cs: ConfigServer, api: ApiClient, ps: ProcServer, pki: Any,
                          work: Path, machine: str, disk: Path, *, cycles: int) -> list[str]:
    """``machine`` (its disk sda: ``disk``) protected through ``ps`` in ``cycles``
    cycles, a file of the boot partition changed before each; its points."""
    await add_machine(api, machine, disks=("sda",))
    await api.patch(f"/api/v1/machines/{machine}", {"process_server": "ps1"})
    enable = (await api.post("/api/v1/replication/enable", {"machine": machine}))["job"]
    site = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, machine, cs.passphrase,
                                  work / f"agent-site-{machine}")
    async with site:
        await site.heartbeat("2.0.0")
        await site.progress({"sda": 100})
    agent = make_agent(agent_config(work, pki, machine, ps.port, {"sda": disk}))
    points = []
    try:
        for i in range(cycles):
            write_token(disk, f"bench-{i}-{uuid.uuid4().hex[:12]}", work / "mnt")
            r = await agent.replicate_once()
            points.append(await ps.wait_point(r.cycle, timeout=1800))
    finally:
        agent.close()
    async with asyncio.timeout(60), cs.changed:
        while points[-1] not in {p["id"] for p in (await api.get(
                "/api/v1/points", machine=machine))["points"]}:
            await cs.changed.wait()
    assert (await wait_job(api, enable["id"]))["state"] == "succeeded"
    fin = await wait_job(api, (await next_job(api, machine, "finalize_protection"))["id"])
    if fin["state"] != "succeeded":
        raise RuntimeError(f"protection did not finish: {fin}")
    return points


async def job_row(cs: ConfigServer, jid: str) -> tuple[float, float, list[dict[str, Any]]]:
    """The job's creation, start and steps as stored (UNIX seconds; the API rounds them
    to whole seconds)."""
    async with cs.sessionmaker() as s:
        job = await s.get(db.Job, jid)
        assert job is not None and job.started is not None
        return float(job.created), float(job.started), list(job.steps)


async def drill(cs: ConfigServer, api: ApiClient, res: dict[str, Any], *,
                machine: str = MACHINE, instant: bool = False, key: str = "drill") -> str:
    """``failover test [--instant]`` as a command, timed, into ``res[key]``; the job's
    id."""
    await api.call("PATCH", f"/api/v1/items/{machine}/recovery", {
        "target": "libvirt", "vm_name": f"sr-bench-rto-{machine}", "memory_mib": 256,
        "boot_marker": MARKER}, {})
    say(f"drill: siterecovery failover test {machine} --wait{' --instant' * instant} "
        "(one VM boot)")
    t0 = time.time()
    seconds, out = await asyncio.wait_for(timed_cmd(
        sys.executable, "-m", "siterecovery", "failover", "test", machine, "--wait", "--json",
        *(["--instant"] if instant else []),
        "--api", cs.url, "--token-file", cs.cfg.token_path), DRILL_BOUND)
    job = json.loads(out)
    if job["state"] != "succeeded":
        raise RuntimeError(f"the drill failed: {job.get('error')}\n{json.dumps(job, indent=1)}")
    created, started, steps = await job_row(cs, job["id"])
    item = await api.get(f"/api/v1/items/{machine}")
    rec = item["last_drill"]
    booted_at = started + float(rec["rto_seconds"])
    by_name = {s["name"]: s for s in steps}
    res[key] = {
        "job": job["id"], "point": rec["point"],
        "command_to_booted_s": round(booted_at - t0, 3),
        "command_to_exit_s": round(seconds, 3),
        "command_to_job_queued_s": round(created - t0, 3),
        "job_queued_to_started_s": round(started - created, 3),
        "job_rto_s": float(rec["rto_seconds"]),
        "steps_s": {n: round(float(by_name[n]["ended"]) - float(by_name[n]["started"]), 3)
                    for n in (INSTANT_STEPS if instant else JOB_STEPS)},
        "boot_proof_s": float(rec["boot"]["seconds"]),
        "boot_matched": rec["boot"]["matched"],
        "checks": {d: [(c["fs"], c["status"]) for c in v["checks"]]
                   for d, v in rec["checks"].items()},
    }
    if instant:
        hyd = by_name["hydrate"]
        res[key].update(
            local_at_boot_percent=rec["local_at_boot_percent"],
            hydrate_and_pivot_s=round(float(hyd["ended"]) - float(hyd["started"]), 3),
            hydrate_message=hyd["message"],
            command_to_pivoted_s=round(float(hyd["ended"]) - t0, 3))
    say(f"  booted {res[key]['command_to_booted_s']:.1f} s after the command")
    return str(job["id"])


async def cleanup(api: ApiClient, machine: str = MACHINE) -> None:
    jid = (await api.post(f"/api/v1/items/{machine}/cleanup-test-failover",
                          {"notes": "bench_rto: booted, timed"}))["job"]["id"]
    done = await wait_job(api, jid, timeout=300)
    if done["state"] != "succeeded":
        raise RuntimeError(f"cleanup failed: {done}")


async def peers(work: Path, disk: Path, url: str, key: Path, point: str,
                res: dict[str, Any]) -> None:
    """The same work done by plain tools on the same point and image."""
    out = work / "restore-cli"
    say("peers: siterecovery restore, cp, qemu-img convert, e2fsck")
    p: dict[str, float] = {}
    p["siterecovery_startup_s"], _ = await timed_cmd(sys.executable, "-m", "siterecovery",
                                                     "--help")
    p["siterecovery_restore_s"], _ = await timed_cmd(
        sys.executable, "-m", "siterecovery", "restore", "--vault", url, "--key-file", key,
        "--machine", MACHINE, "--point", point, "--out", out)
    res["verified"] = sha256(out / "sda.img") == sha256(disk)
    p["cp_s"], _ = await timed_cmd("cp", "--reflink=auto", "--sparse=always", disk,
                                   work / "cp.img")
    p["qemu_img_convert_s"], _ = await timed_cmd("qemu-img", "convert", "-O", "raw", disk,
                                                 work / "convert.img")
    dev = run("losetup", "--find", "--show", "--read-only", "--offset",
              str(PART_START * 512), disk).strip()
    try:
        p["e2fsck_s"], _ = await timed_cmd("e2fsck", "-fn", dev)
    finally:
        run("losetup", "--detach", dev)
    res["peers"] = {k: round(v, 3) for k, v in p.items()}


def ratios(res: dict[str, Any]) -> dict[str, float]:
    st, p = res["drill"]["steps_s"], res["peers"]
    r = {"restore_step_over_cp": st["restore"] / p["cp_s"],
         "restore_step_over_qemu_img_convert": st["restore"] / p["qemu_img_convert_s"],
         "restore_cli_over_restore_step": p["siterecovery_restore_s"] / st["restore"],
         "verify_step_over_e2fsck": st["verify"] / p["e2fsck_s"],
         "boot_share_of_rto": st["boot"] / res["drill"]["command_to_booted_s"]}
    return {k: round(v, 2) for k, v in r.items()}


def big_disk(path: Path, gib: int, data_mib: int) -> None:
    """A ``gib`` GiB disk: the boot disk at its start, then ``data_mib`` MiB of random
    data in equal runs spread over the rest, holes between."""
    shutil.copyfile(bootdisk(), path)
    size = gib << 30
    runs = 16
    run_bytes = (data_mib << 20) // runs
    with open(path, "r+b") as f:
        f.truncate(size)
        start = 256 << 20
        stride = (size - start) // runs
        for i in range(runs):
            f.seek(start + i * stride)
            f.write(os.urandom(run_bytes))


async def big(cs: ConfigServer, api: ApiClient, ps: ProcServer, pki: Any, work: Path,
              res: dict[str, Any], gib: int, data_mib: int) -> None:
    disk = work / "web02-sda.img"
    say(f"a {gib} GiB disk with {data_mib} MiB of data: protected in one cycle")
    big_disk(disk, gib, data_mib)
    t = time.perf_counter()
    await protect_machine(cs, api, ps, pki, work, BIG, disk, cycles=1)
    res["meta"]["big_disk"] = {"bytes": gib << 30, "data_bytes": data_mib << 20,
                               "protect_s": round(time.perf_counter() - t, 3)}
    disk.unlink()  # the vault holds it now: room for the restore and the copies
    for instant, key in ((False, "big_drill"), (True, "big_instant")):
        try:
            await drill(cs, api, res, machine=BIG, instant=instant, key=key)
        finally:
            await cleanup(api, BIG)


async def bench(work: Path, *, instant: bool = False, big_gib: int = 16,
                big_data_mib: int = 1024) -> dict[str, Any]:
    kvm = probe_kvm()
    res: dict[str, Any] = {"meta": {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ"), "cpus": os.cpu_count(),
        "python": platform.python_version(), "machine": MACHINE, "vm_memory_mib": 256,
        "accel": "kvm" if kvm.usable else "qemu (emulated, TCG)", "kvm_probe": kvm.reason,
        "qemu": tool_version(["qemu-system-x86_64", "--version"]),
        "libvirt": tool_version(["virsh", "--version"])}}
    say("the cached boot disk (built on first use)")
    disk = work / "web01-sda.img"
    shutil.copyfile(bootdisk(), disk)
    res["meta"]["disk_bytes"] = disk.stat().st_size
    images = work / "libvirt-images"
    images.mkdir()
    images.chmod(0o711)
    with libvirtd_running() as uri:
        cs = ConfigServer(ConfigServerConfig(
            data_dir=str(work / "cs"), listen_port=0, site_port=0,
            database_url=f"sqlite+aiosqlite:///{work / 'catalog.db'}", libvirt_uri=uri,
            libvirt_image_dir=str(images), libvirt_drill_subnet=DRILL_SUBNET))
        await cs.start()
        try:
            async with AsyncExitStack() as stack, ApiClient(cs.url, cs.admin_token) as api:
                say("protecting the boot disk: two cycles, a file changed before each")
                ps, points, url, key, pki = await protect(cs, api, stack, work, disk)
                try:
                    await drill(cs, api, res)
                finally:
                    await cleanup(api)
                if res["drill"]["point"] != points[-1]:
                    raise RuntimeError(f"the drill used {res['drill']['point']}, not the "
                                       f"newest point {points[-1]}")
                if instant:
                    try:
                        await drill(cs, api, res, instant=True, key="instant")
                    finally:
                        await cleanup(api)
                await peers(work, disk, url, key, points[-1], res)
                if instant and big_gib:
                    await big(cs, api, ps, pki, work, res, big_gib, big_data_mib)
        finally:
            await cs.stop()
    res["ratios"] = ratios(res)
    if instant:
        res["ratios"]["instant_over_restored_rto"] = round(
            res["instant"]["command_to_booted_s"] / res["drill"]["command_to_booted_s"], 2)
        if "big_instant" in res:
            res["ratios"]["instant_big_over_small"] = round(
                res["big_instant"]["command_to_booted_s"]
                / res["instant"]["command_to_booted_s"], 2)
    return res


def render(res: dict[str, Any]) -> str:
    m, d, p, r = res["meta"], res["drill"], res["peers"], res["ratios"]
    lines = [
        f"siterecovery RTO benchmark — {m['date']}, {m['cpus']} CPUs, "
        f"{m['disk_bytes'] >> 20} MiB boot disk, VM {m['vm_memory_mib']} MiB, "
        f"accel: {m['accel']}",
        f"  ({m['kvm_probe']}; {m['qemu']}; libvirt {m['libvirt']})", "",
        f"failover test → booted: {d['command_to_booted_s']:.2f} s "
        f"(command exited after {d['command_to_exit_s']:.2f} s; job RTO "
        f"{d['job_rto_s']:.2f} s)",
        f"  {'command → job queued':<24} {d['command_to_job_queued_s']:>8.2f} s "
        "(the CLI's start-up and its request)",
        f"  {'queued → started':<24} {d['job_queued_to_started_s']:>8.2f} s"]
    for n in JOB_STEPS:
        lines.append(f"  {n:<24} {d['steps_s'][n]:>8.2f} s")
    lines += [f"  checks: {d['checks']}; proof: {d['boot_matched']!r}", "",
              "peers on the same point / image:",
              f"  {'siterecovery restore':<24} {p['siterecovery_restore_s']:>8.2f} s "
              "(a fresh process: vault + key)",
              f"  {'siterecovery --help':<24} {p['siterecovery_startup_s']:>8.2f} s "
              "(the command's start-up alone)",
              f"  {'cp --reflink=auto':<24} {p['cp_s']:>8.2f} s",
              f"  {'qemu-img convert -O raw':<24} {p['qemu_img_convert_s']:>8.2f} s",
              f"  {'e2fsck -fn (loop)':<24} {p['e2fsck_s']:>8.2f} s", "",
              "ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()),
              f"restore verified by sha256 against the source: "
              f"{'OK' if res['verified'] else 'MISMATCH'}"]
    for key, title in (("instant", f"{m['disk_bytes'] >> 20} MiB boot disk, --instant"),
                       ("big_drill", "big disk, restored"),
                       ("big_instant", "big disk, --instant")):
        if key in res:
            lines += ["", *_drill_lines(res[key], title)]
    if "big_disk" in m:
        b = m["big_disk"]
        lines.append(f"big disk: {b['bytes'] >> 30} GiB, {b['data_bytes'] >> 20} MiB of data, "
                     f"protected in {b['protect_s']:.1f} s")
    return "\n".join(lines)


def _drill_lines(d: dict[str, Any], title: str) -> list[str]:
    out = [f"failover test ({title}) → booted: {d['command_to_booted_s']:.2f} s (job RTO "
           f"{d['job_rto_s']:.2f} s)"]
    out += [f"  {n:<24} {v:>8.2f} s" for n, v in d["steps_s"].items()]
    if "local_at_boot_percent" in d:
        out += [f"  local at boot: {d['local_at_boot_percent']} % of the point's data; "
                f"hydrate + pivot {d['hydrate_and_pivot_s']:.2f} s; command → pivoted "
                f"{d['command_to_pivoted_s']:.2f} s",
                f"  {d['hydrate_message']}"]
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="RTO of a drill on libvirt: protect the cached bootable disk through "
                    "agent → process server → vault, run 'siterecovery failover test', and "
                    "time command → booted split into the job's steps, with restore, cp, "
                    "qemu-img and e2fsck on the same point as peers. One VM boot; needs "
                    "root, libvirt and QEMU.")
    ap.add_argument("--work", metavar="DIR", default=tempfile.gettempdir(),
                    help="a new folder is made under DIR for the run (default: %(default)s; "
                         "QEMU must be able to reach it)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--json-out", metavar="FILE", help="also write the JSON results to FILE")
    ap.add_argument("--keep", action="store_true", help="keep the run's folder afterwards")
    ap.add_argument("--instant", action="store_true",
                    help="also drill with --instant, and both ways on a big disk")
    ap.add_argument("--big-gib", type=int, default=16, metavar="GIB",
                    help="with --instant: the big disk's size (0: no big disk; default "
                         "%(default)s)")
    ap.add_argument("--big-data-mib", type=int, default=1024, metavar="MIB",
                    help="with --instant: random data on the big disk (default %(default)s)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if problems := preflight():
        print("bench_rto: cannot run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    quiet_logs()
    work = Path(tempfile.mkdtemp(prefix="sr-bench-rto-", dir=args.work))
    try:
        traversable(work)
        res = uvloop.run(bench(work, instant=args.instant, big_gib=args.big_gib,
                               big_data_mib=args.big_data_mib))  # the daemons' event loop
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    doc = json.dumps(res, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(doc + "\n")
    print(doc if args.json else render(res))
    return 0 if res["verified"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""One install request, run over SSH: the steps of procserver/installreq.py's requests.

``run_request`` walks the request's steps in order (``prerequisites``, then ``install``,
``enroll``, ``start`` — or ``uninstall``), reports each as it ends through ``report``
and stops at the first failure, or when the answer to a report says the request ended
(its job was cancelled or failed on the configuration server). Nothing here knows the
configuration server: ``report`` and ``sign`` are passed in.

Idempotent by construction, so a request can run again after a restart: install.sh does
nothing for the version already installed, enrollment is skipped where the key,
certificate and config are there, and a unit that runs and whose files did not change
is left alone.
"""

from __future__ import annotations

import asyncio
import json
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from procserver import pushinstall
from procserver.sshprereq import PrerequisiteFailed, Probe, SshTarget, check_target, connect

# A step's report: (step, state, message, extra fields) -> whether to go on.
Report = Callable[[str, str, str, dict[str, Any]], Awaitable[bool]]
NEED_BYTES_MIN = 64 * 2**20


class RequestStopped(Exception):
    """The configuration server said the request ended; nothing more is done."""


@dataclass(frozen=True)
class BundleFile:
    path: Path
    manifest: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> BundleFile:
        """The bundle and its MANIFEST.json; ``OSError``/``ValueError`` if unusable."""
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name.endswith("/MANIFEST.json") and member.name.count("/") == 1:
                    f = tar.extractfile(member)
                    if f is not None:
                        return cls(path, json.loads(f.read()))
        raise ValueError(f"{path} holds no MANIFEST.json: not an agent bundle")


def target_of(req: dict[str, Any]) -> SshTarget:
    p, account = req["params"], req["account"]
    return SshTarget(str(p["host"]), username=account["username"], port=int(p["port"]),
                     password=account["secret"] if account["kind"] == "password" else "",
                     private_key=account["secret"] if account["kind"] == "ssh-key" else "",
                     known_host_key=str(p.get("host_key") or ""))


def inventory_check(params: dict[str, Any]) -> Callable[[dict[str, str], str], str | None]:
    """The machine's OS as read on it must be the one in the inventory (the support
    matrix itself is judged by the configuration server on the prerequisites report)."""
    def check(release: dict[str, str], kernel: str) -> str | None:
        name, version = str(params.get("os_name") or ""), str(params.get("os_version") or "")
        have_name, have_version = release.get("ID", ""), release.get("VERSION_ID", "")
        if name and have_name.lower() != name.lower():
            return (f"the inventory says {name} {version}: update it (siterecovery machine "
                    "update --os-name --os-version)")
        if version and have_version.split(".")[0] != version.split(".")[0]:
            return (f"the inventory says {name} {version}, the machine runs {have_version}: "
                    "update it (siterecovery machine update --os-version)")
        return None
    return check


async def run_request(req: dict[str, Any], bundle: BundleFile | None, report: Report,
                      sign: pushinstall.Signer, *, bundle_path: Path) -> None:
    """Run ``req`` (a claimed request with its account) to its end, reporting each step;
    ``RequestStopped`` when a step failed or the request ended meanwhile."""
    action, machine = req["action"], req["machine"]
    t = target_of(req)
    reported: list[str] = []

    async def step(name: str, state: str, message: str, **extra: Any) -> None:
        reported.append(name)
        if not await report(name, state, message, extra) or state == "failed":
            raise RequestStopped(name)

    if action != "uninstall" and bundle is None:
        await step("prerequisites", "failed",
                   f"this process server has no agent bundle at {bundle_path}\nhint: build "
                   f"it there: siterecovery agent bundle --output {bundle_path}")
    try:
        try:
            probe = await check_target(
                t, bundle_target=(bundle.manifest["target"] if bundle else
                                  {"python": ">=3.11", "python_exact": False,
                                   "machine": "x86_64"}),
                need_bytes=0 if action == "uninstall" or bundle is None else max(
                    NEED_BYTES_MIN, 4 * bundle.path.stat().st_size),
                os_check=inventory_check(req["params"]))
        except PrerequisiteFailed as e:
            await step("prerequisites", "failed", str(e))
            return
        await step("prerequisites", "succeeded", _passed(probe), host_key=probe.host_key,
                   facts={"os_name": probe.os_release.get("ID", ""),
                          "os_version": probe.os_release.get("VERSION_ID", ""),
                          "kernel": probe.kernel})
        key = asyncssh.import_public_key(probe.host_key)
        async with await connect(t, key) as conn:
            if action == "uninstall":
                await _uninstall(conn, probe, t, step)
            else:
                assert bundle is not None
                await _install(conn, req, probe, t, bundle, step, sign)
    except (OSError, asyncssh.Error, PrerequisiteFailed) as e:
        failed = next((n for n in req["steps"] if n not in reported), req["steps"][-1])
        await step(failed, "failed", f"the SSH session with {machine} failed: {e}")


def _passed(p: Probe) -> str:
    return "; ".join(f"{name}: {detail}" for name, detail in p.passed)


async def _install(conn: asyncssh.SSHClientConnection, req: dict[str, Any], p: Probe,
                   t: SshTarget, bundle: BundleFile, step: Any,
                   sign: pushinstall.Signer) -> None:
    action, machine, params = req["action"], req["machine"], req["params"]
    version = bundle.manifest["agent_version"]
    have = await pushinstall.installed_version(conn)
    if action == "install" and have and have != version:
        await step("install", "failed", f"agent {have} is installed on {machine}, this "
                   f"process server has {version}\nhint: upgrade it: siterecovery machine "
                   f"upgrade {machine}")
    if action == "upgrade" and not have:
        await step("install", "failed", f"no agent is installed on {machine}\nhint: "
                   f"install it: siterecovery machine install {machine}")
    try:
        done = await pushinstall.install(conn, bundle.path, sudo=p.sudo, python=p.python,
                                         password=t.password)
    except pushinstall.InstallFailed as e:
        await step("install", "failed", str(e))
        return
    changed = "already installed" not in done.output
    await step("install", "succeeded", (f"{have} -> " if have and have != version else "")
               + done.output.replace("\n", "; "), version=done.version or version)
    if await pushinstall.enrolled(conn, sudo=p.sudo, password=t.password):
        await step("enroll", "succeeded", "already enrolled: its key, certificate and "
                   "config are kept")
    else:
        try:
            config = await pushinstall.enroll(
                conn, machine=machine, sign=sign, server=params["server"],
                site_url=params["site_url"], disks=[(n, d) for n, d in params["disks"]],
                sudo=p.sudo, password=t.password)
        except pushinstall.InstallFailed as e:
            await step("enroll", "failed", str(e))
            return
        changed = True
        await step("enroll", "succeeded", f"key made on {machine}, certificate signed by "
                   f"the configuration server's CA; config {config}")
    try:
        started = await pushinstall.start(conn, sudo=p.sudo, password=t.password,
                                          restart=changed)
    except pushinstall.InstallFailed as e:
        await step("start", "failed", str(e))
        return
    await step("start", "succeeded", started.how, how=started.how,
               running_before=started.running_before)


async def _uninstall(conn: asyncssh.SSHClientConnection, p: Probe, t: SshTarget,
                     step: Any) -> None:
    paths = await pushinstall.listed(conn)
    if not paths:
        await step("uninstall", "succeeded", "no agent installed: nothing to remove")
        return
    await pushinstall.stop_manual(conn, sudo=p.sudo, password=t.password)
    try:
        await pushinstall.uninstall(conn, sudo=p.sudo, password=t.password)
    except pushinstall.InstallFailed as e:
        await step("uninstall", "failed", str(e))
        return
    left = await pushinstall.leftovers(conn, paths)
    if left:
        await step("uninstall", "failed", f"still there after uninstall.sh: "
                   f"{', '.join(left)}")
        return
    await step("uninstall", "succeeded", f"removed {len(paths)} path(s), each checked gone: "
               f"{', '.join(paths)}")


async def read_bundle(path: Path) -> BundleFile | None:
    try:
        return await asyncio.to_thread(BundleFile.read, path)
    except (OSError, ValueError, tarfile.TarError):
        return None

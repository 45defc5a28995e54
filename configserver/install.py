"""Push install of the Mobility agent, the configuration server's side: queueing the jobs
(configserver/installjob.py) and the request channel to the process servers.

The channel is the ``install_requests`` table, one row per job, and four internal calls
(configserver/api_install.py) a process server makes with the internal token:

1. **poll** its requests (``pending``, or ``claimed`` by it: a restarted process server
   runs again what it had claimed; the install is idempotent) — a long poll;
2. **claim** one: it moves to ``claimed`` and the answer carries the account's secret,
   opened from its seal for that answer only (never stored in the request, never logged);
3. **report** each step as it ends (``succeeded``/``failed``, with its message); the answer
   says whether the request goes on (a job cancelled or failed meanwhile ends it). The
   prerequisites report carries the host key the machine presented: with none recorded
   it is recorded now (trust on first use), and the OS it read is judged against the
   support matrix here, before anything is copied;
4. **sign** the certificate request the agent made on the machine (its key never leaves
   it) with the CA, for that machine only.

Host keys: a machine's key is recorded on first use, or given by the operator (an
OpenSSH known_hosts file); the process server pins the install's connection to it, so a
changed key refuses the install with both fingerprints before any credential is sent.
"""

from __future__ import annotations

import base64
import hashlib
import socket
from collections.abc import Mapping
from typing import Any

import asyncssh
import structlog
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from configserver import certs, db, sealed, support
from configserver.agentversion import older
from configserver.core import Core
from configserver.errors import Conflict, InvalidRequest, ItemStateError, NotFound
from configserver.jobdefs import JobKind, active_kinds, new_job
from configserver.models import InstallRequest

log = structlog.get_logger("configserver.install")

ACTIONS = ("install", "upgrade", "uninstall")
REMOTE_STEPS: dict[str, tuple[str, ...]] = {
    "install": ("prerequisites", "install", "enroll", "start"),
    "upgrade": ("prerequisites", "install", "enroll", "start"),
    "uninstall": ("prerequisites", "uninstall"),
}
STEP_TITLES = {
    "prerequisites": "Prerequisites on the machine",
    "install": "Copy and install the agent bundle",
    "enroll": "Enroll the agent (its key made on the machine)",
    "start": "Start the agent",
    "uninstall": "Remove the agent and everything it installed",
}
OPEN = ("pending", "claimed")
DEFAULT_SITE_PORT = 9441


def fingerprint(key_line: str) -> str:
    """SHA256:… of an OpenSSH public key line, as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def key_from_known_hosts(text: str, name: str, ip: str, port: int = 22) -> str:
    """The host key an OpenSSH known_hosts text gives for the machine (by its name or
    address, hashed entries included); ``InvalidRequest`` if it gives none or several."""
    try:
        known = asyncssh.import_known_hosts(text)
    except (ValueError, asyncssh.KeyImportError) as e:
        raise InvalidRequest("bad_known_hosts", f"the known_hosts text does not parse: {e}",
                             "give an OpenSSH known_hosts file (ssh-keyscan HOST)") from None
    keys: dict[str, str] = {}
    for host in (name, ip):
        found = known.match(host, ip, port)[0]
        for k in found:
            line = k.export_public_key("openssh").decode().split()
            keys[line[1]] = f"{line[0]} {line[1]}"
    if len(keys) != 1:
        raise InvalidRequest(
            "bad_known_hosts", f"the known_hosts text has {len(keys)} host keys for "
            f"{name} ({ip}); one is needed",
            f"give exactly one of its keys, e.g. 'ssh-keyscan -t ed25519 {ip}' checked "
            "against the machine's console")
    return next(iter(keys.values()))


def site_url(core_cfg: Any) -> str:
    """The configuration server's site listener as a protected machine reaches it (the
    first of ``site_names``, else ``site_host``)."""
    host = (list(core_cfg.site_names) or [core_cfg.site_host])[0]
    if host in ("0.0.0.0", "::"):
        host = socket.getfqdn()
    port = core_cfg.site_port if core_cfg.site_port > 0 else DEFAULT_SITE_PORT
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


async def queue(core: Core, kinds: Mapping[str, JobKind], action: str, name: str,
                body: dict[str, Any], default_site_url: str) -> db.Job:
    """Queue ``action`` of machine ``name``'s agent; the job. ``body``: known_hosts,
    forget_host_key, server, site_url, heartbeat_timeout_seconds."""
    now = core.clock()
    async with core.sessionmaker() as s:
        m = await s.get(db.Machine, name)
        if m is None:
            raise NotFound("machine_not_found", f"no machine named {name!r}",
                           "add it first: siterecovery machine add")
        if m.os_type != "linux":
            raise InvalidRequest("unsupported_os", support.WINDOWS_NOTE
                                 if m.os_type == "windows" else
                                 f"machine {name!r} runs {m.os_type}; the agent installs on "
                                 "Linux only", "protect Linux machines only for now")
        if not m.account:
            raise Conflict("no_account", f"machine {name!r} has no push-install account",
                           f"add one (siterecovery account add) and give it: siterecovery "
                           f"machine update {name} --account NAME")
        active = await active_kinds(s, name)
        if active:
            raise ItemStateError("job_running", f"{name!r} has a job running or queued "
                                 f"({', '.join(active)})",
                                 f"wait for it: siterecovery jobs list --target {name}")
        params: dict[str, Any] = {"action": action,
                                  "site_url": body.get("site_url") or default_site_url}
        for k in ("server", "heartbeat_timeout_seconds", "forget_host_key"):
            if body.get(k):
                params[k] = body[k]
        if body.get("known_hosts"):
            params["host_key"] = key_from_known_hosts(body["known_hosts"], name, m.ip)
        job = new_job(kinds[f"agent_{action}"], name, params, now)
        s.add(job)
        await s.commit()
    log.info("agent_push_requested", action=action, machine=name, job=job.id)
    return job


def new_request(job_id: str, action: str, m: db.Machine, ps: db.ProcessServer,
                params: dict[str, Any], now: float) -> InstallRequest:
    """The request for job ``job_id`` (no secret in it: the claim answer carries that)."""
    doc = {"host": m.ip, "port": m.ssh_port or 22, "account": m.account,
           "host_key": m.host_key or "", "server": params.get("server") or ps.address,
           "site_url": params["site_url"], "os_name": m.os_name, "os_version": m.os_version,
           "disks": [[str(d["name"]), str(d["path"])] for d in m.disks or []]}
    return InstallRequest(job_id=job_id, machine=m.name, action=action, procserver=ps.name,
                          params=doc, state="pending", steps={}, error=None, created=now,
                          claimed=None, updated=now)


async def push_action(s: AsyncSession, m: db.Machine, now: float) -> str | None:
    """What Enable protection pushes to machine ``m`` (which has an account): ``install``
    when no agent of it checked in with a certificate it still holds, ``upgrade`` when its
    agent is older than its process server, None when it runs the right version."""
    rows = (await s.execute(select(db.Certificate).where(
        db.Certificate.subject == m.name, db.Certificate.kind == "agent"))).scalars().all()
    if m.last_contact is None or all(certs.trusted(r, m, now) is not None for r in rows):
        return "install"
    ps = await s.get(db.ProcessServer, m.process_server) if m.process_server else None
    if ps is not None and m.agent_version and ps.version and older(m.agent_version,
                                                                    ps.version):
        return "upgrade"
    return None


async def request_for_job(core: Core, job_id: str, action: str, name: str,
                          params: dict[str, Any]) -> InstallRequest:
    """The install request of job ``job_id`` (written now if it has none) for machine
    ``name``'s process server: how a job other than agent_install/upgrade (Enable
    protection) pushes the agent. It is that job's own request, so the job running on the
    machine does not refuse it; ``InvalidRequest`` when the machine lacks what a push
    needs (its account, its process server)."""
    async with core.sessionmaker() as s:
        r = await s.get(InstallRequest, job_id)
        if r is not None:
            return r
        m = await s.get(db.Machine, name)
        if m is None:
            raise NotFound("machine_not_found", f"no machine named {name!r}")
        if not m.account or await s.get(db.Account, m.account) is None:
            raise InvalidRequest("no_account", f"machine {name!r} has no push-install "
                                 f"account (or its account {m.account!r} no longer exists)",
                                 f"give it one: siterecovery machine update {name} "
                                 "--account NAME")
        ps = await s.get(db.ProcessServer, m.process_server) if m.process_server else None
        if ps is None:
            raise InvalidRequest("procserver_not_found", f"machine {name!r} has no "
                                 "registered process server",
                                 f"assign one: siterecovery machine update {name} "
                                 "--process-server NAME")
        r = new_request(job_id, action, m, ps, params, core.clock())
        s.add(r)
        await s.commit()
    await core.notify()
    log.info("agent_push_requested", action=action, machine=name, job=job_id)
    return r


async def revoke_agent_certs(core: Core, name: str) -> list[str]:
    """Revoke every agent certificate of machine ``name`` not revoked yet (valid or
    superseded): its agent was uninstalled. The serials revoked; process servers drop them
    with their next trust list, the site listener at once."""
    now = core.clock()
    async with core.sessionmaker() as s:
        rows = (await s.execute(select(db.Certificate).where(
            db.Certificate.subject == name, db.Certificate.kind == "agent",
            or_(db.Certificate.revoked_at.is_(None), db.Certificate.revoked_at > now))
            .order_by(db.Certificate.serial).with_for_update())).scalars().all()
        serials = [r.serial for r in rows]
        for r in rows:
            r.revoked_at = now
        await s.commit()
    for serial in serials:
        log.warning("certificate_revoked", serial=serial, subject=name, kind="agent",
                    by="agent_uninstall")
    if serials:
        await core.notify()
    return serials


def request_doc(r: InstallRequest) -> dict[str, Any]:
    return {"id": r.job_id, "machine": r.machine, "action": r.action, "state": r.state,
            "steps": list(REMOTE_STEPS[r.action]), "params": dict(r.params)}


async def pending(core: Core, procserver: str) -> list[dict[str, Any]]:
    """The requests ``procserver`` is to run (pending, or claimed by it); ``NotFound`` for
    a name that never heartbeated."""
    async with core.sessionmaker() as s:
        if await s.get(db.ProcessServer, procserver) is None:
            raise NotFound("procserver_not_found", f"no process server named {procserver!r}",
                           "a process server registers with its first heartbeat: is its "
                           "name the one it heartbeats with?")
        rows = (await s.execute(select(InstallRequest).where(
            InstallRequest.procserver == procserver, InstallRequest.state.in_(OPEN))
            .order_by(InstallRequest.job_id))).scalars().all()
    return [request_doc(r) for r in rows]


async def _open_request(s: Any, job_id: str, procserver: str) -> InstallRequest:
    r: InstallRequest | None = await s.get(InstallRequest, job_id, with_for_update=True)
    if r is None or r.procserver != procserver:
        raise NotFound("install_request_not_found",
                       f"no install request {job_id!r} for process server {procserver!r}")
    return r


async def claim(core: Core, job_id: str, procserver: str, key_path: Any) -> dict[str, Any]:
    """Claim request ``job_id`` for ``procserver``; the request with the account and its
    secret. ``ItemStateError`` if it already ended; a secret that cannot be opened fails
    it (the job says why)."""
    async with core.sessionmaker() as s:
        r = await _open_request(s, job_id, procserver)
        if r.state not in OPEN:
            raise ItemStateError("install_request_ended", f"install request {job_id} "
                                 f"already ended ({r.state})")
        account = await s.get(db.Account, str(r.params["account"]))
        try:
            if account is None:
                raise sealed.SecretError("account_not_found", "the machine's account "
                                         f"{r.params['account']!r} no longer exists")
            secret = await sealed.open_secret(core, key_path, account.name)
        except sealed.SecretError as e:
            r.state, r.error, r.updated = "failed", f"{e.message} ({e.hint})", core.clock()
            await s.commit()
            await core.notify()
            raise ItemStateError("install_request_ended", r.error) from None
        r.state, r.claimed, r.updated = "claimed", core.clock(), core.clock()
        doc = request_doc(r)
        await s.commit()
    await core.notify()
    log.info("agent_push_claimed", job=job_id, machine=doc["machine"], procserver=procserver)
    doc["account"] = {"username": account.username, "kind": account.kind,
                      "secret": secret.decode()}
    return doc


def _os_refusal(facts: dict[str, Any]) -> str | None:
    try:
        support.check("linux", facts.get("os_name"), facts.get("os_version"),
                      facts.get("kernel") or None)
    except (support.Unsupported, support.BadKernel) as e:
        return (f"os: the machine runs {facts.get('os_name')} {facts.get('os_version')} "
                f"(kernel {facts.get('kernel')}): {e}\nhint: protect machines of the support "
                "matrix only ('siterecovery machine support-matrix')")
    return None


async def report(core: Core, job_id: str, procserver: str, body: dict[str, Any]
                 ) -> dict[str, Any]:
    """Record one step's end; ``{"state", "error"}``: ``claimed`` (or ``done`` after the
    last step) means go on, anything else stop."""
    step, state = body["step"], body["state"]
    message = str(body.get("message") or "")
    now = core.clock()
    async with core.sessionmaker() as s:
        r = await _open_request(s, job_id, procserver)
        if r.state != "claimed":
            return {"state": r.state, "error": r.error}
        if step not in REMOTE_STEPS[r.action]:
            raise InvalidRequest("unknown_step", f"{r.action} has no step {step!r}")
        if state == "succeeded" and step == "prerequisites":
            why = _os_refusal(body.get("facts") or {})
            if why is not None:
                state, message = "failed", why
            elif body.get("host_key"):
                message = await _record_key(s, r, str(body["host_key"]), message, now)
        entry: dict[str, Any] = {"state": state, "message": message, "at": now}
        entry.update({k: body[k] for k in ("how", "running_before", "version") if k in body})
        r.steps = {**dict(r.steps or {}), step: entry}
        if state == "failed":
            r.state, r.error = "failed", message
        elif step == REMOTE_STEPS[r.action][-1]:
            r.state = "done"
        r.updated = now
        await s.commit()
        out = {"state": r.state, "error": r.error}
    await core.notify()
    (log.info if state == "succeeded" else log.warning)(
        "agent_push_step", job=job_id, machine=r.machine, step=step, state=state)
    return out


async def _record_key(s: Any, r: InstallRequest, key: str, message: str, now: float) -> str:
    m = await s.get(db.Machine, r.machine, with_for_update=True)
    if m is None:
        return message
    if m.host_key is None:
        m.host_key, m.host_key_source, m.host_key_recorded = key, "tofu", now
        log.info("host_key_recorded", machine=m.name, fingerprint=fingerprint(key),
                 source="tofu")
        return f"{message}; host key {fingerprint(key)} recorded (trust on first use)"
    return message


async def sign(core: Core, ca: Any, job_id: str, procserver: str, csr: str,
               days: float) -> dict[str, str]:
    """The CA's certificate for the request's machine over the CSR made on the machine."""
    async with core.sessionmaker() as s:
        r = await _open_request(s, job_id, procserver)
        if r.state != "claimed" or r.action == "uninstall":
            raise ItemStateError("install_request_ended",
                                 f"install request {job_id} is {r.state} ({r.action}): "
                                 "nothing to sign")
        machine = r.machine
    try:
        issued = ca.sign_client_csr(machine, csr.encode(), days, now=core.clock())
    except ValueError as e:
        raise InvalidRequest("bad_csr", f"the certificate request is refused: {e}",
                             "the agent makes it: siterecovery-agent csr") from None
    await certs.record(core, issued, "agent")
    log.info("agent_certificate_issued", machine=machine, serial=issued.serial,
             by="push_install", job=job_id)
    return {"cert": issued.cert_pem.decode(), "ca": ca.cert_pem.decode(),
            "serial": issued.serial}


async def host_key_doc(core: Core, name: str) -> dict[str, Any]:
    async with core.sessionmaker() as s:
        m = await s.get(db.Machine, name)
    if m is None:
        raise NotFound("machine_not_found", f"no machine named {name!r}",
                       "list them: siterecovery machine list")
    return {"machine": name, "host_key": m.host_key,
            "fingerprint": fingerprint(m.host_key) if m.host_key else None,
            "source": m.host_key_source, "recorded": m.host_key_recorded}

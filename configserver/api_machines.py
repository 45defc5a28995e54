"""Routes: machines (the inventory of what can be protected) and the support matrix.

A machine is added by name, IP and OS; it is checked against the support matrix
(``configserver/support.py``) and may name its disks, the process server that
receives its data and the push-install account. ``enabled: false`` makes the
configuration server and process servers refuse its certificate (peer.py).
Deleting a machine is refused while it has a replicated item (disable
replication first); a deleted machine's certificates are revoked, so a machine
added again later under the same name must enroll again.
"""

from __future__ import annotations

import ipaddress
import posixpath
from typing import Any

import structlog
from aiohttp import web
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from common.names import DISK_PATTERN
from configserver import db, groups, support
from configserver.groupmodels import GroupMember
from configserver.rest import (
    NAME,
    ApiError,
    Call,
    Route,
    array,
    iso,
    not_found,
    nullable,
    obj,
    reply,
)

log = structlog.get_logger("configserver.machines")

MAX_DISK_BYTES = 64 << 40  # what the process server accepts per disk
DISK_NAME = {"type": "string", "pattern": DISK_PATTERN}
DISK = obj({"name": DISK_NAME,
            "path": {"type": "string", "minLength": 1, "maxLength": 4096,
                     "description": "absolute path of the block device or image file"},
            "size_bytes": {"type": "integer", "minimum": 1, "maximum": MAX_DISK_BYTES}},
           ["name", "path"])
DISKS = {**array(DISK), "maxItems": 64}
IP = {"type": "string", "minLength": 2, "maxLength": 64,
      "description": "IPv4 or IPv6 address"}
SSH_PORT = {"type": "integer", "minimum": 1, "maximum": 65535,
            "description": "the port of the machine's sshd, for push installs (22)"}
REF = nullable({**NAME})
OS_FIELDS: dict[str, dict[str, Any]] = {
    "os_name": {"type": "string", "minLength": 1, "maxLength": 64,
                "description": "ID from /etc/os-release: ubuntu, debian, rhel, rocky, "
                               "almalinux, centos, ol"},
    "os_version": {"type": "string", "minLength": 1, "maxLength": 32,
                   "description": "VERSION_ID from /etc/os-release"},
    "kernel": nullable({"type": "string", "maxLength": 64,
                        "description": "uname -r (optional)"}),
}
CREATE = obj({"name": NAME, "ip": IP, "ssh_port": SSH_PORT,
              "os_type": {"enum": ["linux", "windows"]},
              **OS_FIELDS, "disks": DISKS, "process_server": REF, "account": REF},
             ["name", "ip", "os_type"])
UPDATE = {**obj({"enabled": {"type": "boolean"}, "ip": IP, "ssh_port": SSH_PORT,
                 **OS_FIELDS, "disks": DISKS,
                 "process_server": REF, "account": REF}), "minProperties": 1}
DISK_OUT = obj({"name": {"type": "string"}, "path": {"type": "string"},
                "size_bytes": nullable({"type": "integer"})}, ["name", "path", "size_bytes"])
MACHINE = obj({
    "name": {"type": "string"}, "ip": {"type": "string"}, "ssh_port": {"type": "integer"},
    "os_type": {"type": "string"}, "os_name": {"type": "string"}, "os_version": {"type": "string"},
    "kernel": nullable({"type": "string"}), "disks": array(DISK_OUT),
    "process_server": nullable({"type": "string"}), "account": nullable({"type": "string"}),
    "enabled": {"type": "boolean"}, "created": {"type": "string"},
    "last_contact": nullable({"type": "string"}),
    "agent_version": nullable({"type": "string"}),
    "host_id": nullable({"type": "string", "description": (
        "the SMBIOS UUID its agent reports (the original machine's: a failover's "
        "recovered copy reports another and is told apart)")}),
    "replication": nullable({"type": "string",
                             "description": "the replicated item's state, if protected"}),
}, ["name", "ip", "ssh_port", "os_type", "os_name", "os_version", "kernel", "disks",
    "process_server",
    "account", "enabled", "created", "last_contact", "agent_version", "host_id",
    "replication"])
MATRIX = obj({
    "os_types": array(obj({"os_type": {"type": "string"}, "supported": {"type": "boolean"},
                           "note": {"type": "string"}}, ["os_type", "supported", "note"])),
    "distributions": array(obj({
        "os_name": {"type": "string"}, "display_name": {"type": "string"},
        "aliases": array({"type": "string"}),
        "versions": array(obj({"os_version": {"type": "string"},
                               "min_kernel": {"type": "string"}},
                              ["os_version", "min_kernel"]))},
        ["os_name", "display_name", "aliases", "versions"]))},
    ["os_types", "distributions"])


def _ip(value: str) -> str:
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise ApiError(422, "invalid_ip", f"ip {value!r} is not an IPv4 or IPv6 address",
                       "e.g. 10.0.0.5 or fd00::5") from None
    if addr.is_unspecified or addr.is_multicast:
        raise ApiError(422, "invalid_ip", f"ip {value!r} is not a machine's address "
                       "(unspecified or multicast)", "give the address the machine answers on")
    return str(addr)


def _disks(disks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out, names, paths = [], set(), set()
    for d in disks:
        name, path = d["name"], d["path"]
        if name in names:
            raise ApiError(422, "invalid_disks", f"disk name {name!r} is given twice",
                           "every disk of a machine needs its own name")
        if not path.startswith("/") or path.startswith("//") or path == "/" \
                or posixpath.normpath(path) != path or any(ord(c) < 32 for c in path):
            raise ApiError(422, "invalid_disks", f"disk {name!r}: path {path!r} is not a "
                           "normalized absolute path", "e.g. /dev/sdb or /var/lib/images/"
                           "disk0.img")
        try:
            path.encode()
        except UnicodeEncodeError:
            raise ApiError(422, "invalid_disks", f"disk {name!r}: the path is not valid "
                           "Unicode text", "send it as UTF-8") from None
        if path in paths:
            raise ApiError(422, "invalid_disks", f"disk {name!r}: path {path!r} is given "
                           "for two disks", "each disk is a different device or file")
        names.add(name)
        paths.add(path)
        out.append({"name": name, "path": path, "size_bytes": d.get("size_bytes")})
    return out


def _os(os_type: str, os_name: str | None, os_version: str | None,
        kernel: str | None) -> tuple[str, str]:
    try:
        return support.check(os_type, os_name, os_version, kernel)
    except support.BadKernel as e:
        raise ApiError(422, "invalid_kernel", str(e), "or leave the kernel out") from None
    except support.Unsupported as e:
        raise ApiError(422, "unsupported_os", str(e), support.summary()) from None


async def _check_refs(s: Any, process_server: str | None, account: str | None) -> None:
    """The process server and account a machine names must exist (rows locked for share,
    so they cannot be deleted before this transaction commits)."""
    if process_server is not None:
        found = (await s.execute(select(db.ProcessServer.name)
                                 .where(db.ProcessServer.name == process_server)
                                 .with_for_update(read=True))).first()
        if found is None:
            raise ApiError(422, "unknown_process_server",
                           f"no process server named {process_server!r}",
                           "process servers appear once they heartbeat; list them: "
                           "siterecovery procserver list")
    if account is not None:
        found = (await s.execute(select(db.Account.name).where(db.Account.name == account)
                                 .with_for_update(read=True))).first()
        if found is None:
            raise ApiError(422, "unknown_account", f"no account named {account!r}",
                           "add it first: siterecovery account add NAME --username USER "
                           "--password-file FILE | --ssh-key-file FILE")


def _doc(m: db.Machine, replication: str | None) -> dict[str, Any]:
    return {"name": m.name, "ip": m.ip, "ssh_port": m.ssh_port or 22, "os_type": m.os_type,
            "os_name": m.os_name,
            "os_version": m.os_version, "kernel": m.kernel or None,
            "disks": [{"name": d["name"], "path": d["path"],
                       "size_bytes": d.get("size_bytes")} for d in m.disks],
            "process_server": m.process_server, "account": m.account,
            "enabled": bool(m.enabled), "created": iso(m.created),
            "last_contact": iso(m.last_contact), "agent_version": m.agent_version or None,
            "host_id": m.host_id, "replication": replication}


async def _state(s: Any, name: str) -> str | None:
    item = await s.get(db.ReplicatedItem, name)
    return None if item is None else str(item.state)


async def add_machine(call: Call) -> web.Response:
    b: dict[str, Any] = call.body
    name = b["name"]
    os_name, os_version = _os(b["os_type"], b.get("os_name"), b.get("os_version"),
                              b.get("kernel"))
    ip, disks = _ip(b["ip"]), _disks(b.get("disks", []))
    exists = ApiError(409, "machine_exists", f"a machine named {name!r} already exists",
                      f"change it with 'siterecovery machine update {name}' or remove it first")
    async with call.services.sessionmaker() as s:
        if await s.get(db.Machine, name) is not None:
            raise exists
        await _check_refs(s, b.get("process_server"), b.get("account"))
        m = db.Machine(name=name, ip=ip, ssh_port=b.get("ssh_port", 22),
                       os_type=b["os_type"], os_name=os_name,
                       os_version=os_version, kernel=b.get("kernel") or "", disks=disks,
                       process_server=b.get("process_server"), account=b.get("account"),
                       enabled=True, created=call.services.clock(), last_contact=None,
                       agent_version="")
        s.add(m)
        try:
            await s.commit()
        except IntegrityError:
            raise exists from None
    log.info("machine_added", machine=name, ip=ip, os=f"{os_name} {os_version}",
             disks=len(disks))
    return reply(_doc(m, None), 201)


async def list_machines(call: Call) -> web.Response:
    async with call.services.sessionmaker() as s:
        rows = (await s.execute(select(db.Machine).order_by(db.Machine.name))).scalars().all()
        states = {str(machine): str(state) for machine, state in (await s.execute(
            select(db.ReplicatedItem.machine, db.ReplicatedItem.state))).all()}
    return reply({"machines": [_doc(m, states.get(m.name)) for m in rows]})


async def show_machine(call: Call) -> web.Response:
    name = call.params["name"]
    async with call.services.sessionmaker() as s:
        m = await s.get(db.Machine, name)
        if m is None:
            raise not_found("machine", name, "list them: siterecovery machine list")
        return reply(_doc(m, await _state(s, name)))


async def update_machine(call: Call) -> web.Response:
    name = call.params["name"]
    b: dict[str, Any] = call.body
    async with call.services.sessionmaker() as s:
        m = await s.get(db.Machine, name, with_for_update=True)
        if m is None:
            raise not_found("machine", name, "list them: siterecovery machine list")
        if {"os_name", "os_version", "kernel"} & b.keys():
            kernel = b.get("kernel", m.kernel or None)
            m.os_name, m.os_version = _os(m.os_type, b.get("os_name", m.os_name),
                                          b.get("os_version", m.os_version), kernel)
            m.kernel = kernel or ""
        if "ip" in b:
            m.ip = _ip(b["ip"])
        if "ssh_port" in b:
            m.ssh_port = b["ssh_port"]
        if "disks" in b:
            m.disks = _disks(b["disks"])
        refs = {k: b[k] for k in ("process_server", "account") if k in b}
        await _check_refs(s, refs.get("process_server"), refs.get("account"))
        if "process_server" in refs and refs["process_server"] != m.process_server:
            await groups.check_move(s, name, refs["process_server"])
        for k, v in refs.items():
            setattr(m, k, v)
        if "enabled" in b:
            m.enabled = b["enabled"]
        await s.commit()
        state = await _state(s, name)
    changed = sorted(b)
    log.info("machine_updated", machine=name, changed=changed,
             **({"enabled": b["enabled"]} if "enabled" in b else {}))
    await call.services.notify()  # a disabled machine's agent is refused from now on
    return reply(_doc(m, state))


async def remove_machine(call: Call) -> web.Response:
    name = call.params["name"]
    async with call.services.sessionmaker() as s:
        m = await s.get(db.Machine, name, with_for_update=True)
        if m is None:
            raise not_found("machine", name, "list them: siterecovery machine list")
        state = await _state(s, name)
        if state is not None:
            raise ApiError(409, "machine_protected", f"machine {name!r} is protected "
                           f"(replication {state}); its replicated item would be orphaned",
                           f"disable replication first: siterecovery replication disable "
                           f"{name}")
        member = await s.get(GroupMember, name)
        if member is not None:
            raise ApiError(409, "machine_in_group", f"machine {name!r} is in consistency "
                           f"group {member.group_name!r}; its members would wait for it",
                           f"remove it there first: siterecovery group remove "
                           f"{member.group_name} {name}")
        await s.delete(m)
        revoked = (await s.execute(
            update(db.Certificate)
            .where(db.Certificate.subject == name, db.Certificate.kind == "agent",
                   db.Certificate.revoked_at.is_(None))
            .values(revoked_at=call.services.clock()))).rowcount  # type: ignore[attr-defined]
        await s.commit()
    log.info("machine_removed", machine=name, certificates_revoked=revoked)
    await call.services.notify()
    return reply({"deleted": name})


async def support_matrix(call: Call) -> web.Response:
    return reply(support.matrix())


_NAME_PARAM = {"name": NAME}
ROUTES = [
    Route("POST", "/api/v1/machines", add_machine, "Add a machine to the inventory",
          "machines", body=CREATE, responses={201: MACHINE},
          description="Checked against the support matrix (422 unsupported_os, e.g. for "
                      "Windows; 422 invalid_kernel), as the body schema's second part "
                      "states; os_name is also accepted in other letter case; the process "
                      "server and account must exist (404).",
          rules=support.request_rules(),
          refusals=("ip is not a unicast IPv4 or IPv6 address (invalid_ip)",
                    "a disk path is not a normalized absolute path, or two disks share a "
                    "name or a path (invalid_disks)")),
    Route("GET", "/api/v1/machines", list_machines, "List machines", "machines",
          responses={200: obj({"machines": array(MACHINE)}, ["machines"])}),
    Route("GET", "/api/v1/machines/{name}", show_machine, "Show a machine", "machines",
          params=_NAME_PARAM, responses={200: MACHINE}),
    Route("PATCH", "/api/v1/machines/{name}", update_machine,
          "Enable/disable a machine or change its IP, OS, disks, process server or account",
          "machines", params=_NAME_PARAM, body=UPDATE, responses={200: MACHINE},
          description="enabled=false makes the configuration server and process servers "
                      "refuse the machine's certificate. disks replaces the whole list. A "
                      "member of a consistency group cannot move away from the other "
                      "members' process server (409 group_process_servers_differ).",
          refusals=("the machine's OS fields, with those not given taken from the stored "
                    "machine, are outside the support matrix (unsupported_os, "
                    "invalid_kernel; see POST /api/v1/machines)",
                    "ip or disks as POST /api/v1/machines refuses them")),
    Route("DELETE", "/api/v1/machines/{name}", remove_machine, "Remove a machine",
          "machines", params=_NAME_PARAM,
          responses={200: obj({"deleted": {"type": "string"}}, ["deleted"])},
          description="Refused (409 machine_protected) while the machine has a replicated "
                      "item, and (409 machine_in_group) while it is in a consistency group. "
                      "Its agent certificates are revoked."),
    Route("GET", "/api/v1/support-matrix", support_matrix,
          "The operating systems machines may run", "machines", responses={200: MATRIX}),
]

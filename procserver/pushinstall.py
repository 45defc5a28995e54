"""Push install of the agent bundle over an SSH connection whose prerequisites passed.

``install`` copies the bundle over SFTP into a private upload directory in /var/tmp,
unpacks it there and runs its ``install.sh`` as root (directly, or through the sudo
prefix ``sshprereq`` found), with the interpreter the prerequisites chose; the upload
directory is removed whatever happens. ``install.sh`` itself checks the interpreter and
every file's checksum before it changes anything, is idempotent (the same version:
nothing changes) and lists what it installed in PREFIX/INSTALLED. ``uninstall`` runs
PREFIX/uninstall.sh, which removes exactly that list.

``enroll`` then has the installed agent make its key on the machine and print a
certificate request, passes it to ``sign`` (the CA, on the configuration server's
side), writes the certificate and the CA next to the key and has the agent write its
own mobility.toml; those files and the state directory join PREFIX/INSTALLED.

``installed_version``, ``enrolled``, ``start`` and ``listed``/``leftovers`` are what
the process server's install requests (procserver/installreqsteps.py) verify with, so a
re-run on an installed machine changes nothing, and an uninstall is checked path by path.
A re-install over another version (an upgrade) keeps the lines a push install added to
PREFIX/INSTALLED (config, certificates, state), so uninstall still removes them.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncssh

DEFAULT_PREFIX = "/opt/siterecovery-agent"
UPLOADS = "/var/tmp/siterecovery-agent.????????"  # mktemp's uploads


class InstallFailed(Exception):
    """The install or removal on the machine failed; ``str(e)`` has its script's words."""


@dataclass(frozen=True)
class Installed:
    version: str
    prefix: str
    output: str  # install.sh's report, for the job's step message


def _as_root(sudo: str, command: str) -> str:
    return f"{sudo} sh -c {shlex.quote(command)}" if sudo else command


async def install(conn: asyncssh.SSHClientConnection, bundle: Path, *, sudo: str,
                  python: str, password: str = "") -> Installed:
    """Install ``bundle`` (a file written by ``siterecovery agent bundle``) on the machine
    behind ``conn``; ``InstallFailed`` names what went wrong (the script refuses before
    changing anything when the interpreter or a checksum does not fit)."""
    stdin = password + "\n" if sudo.startswith("sudo -S") else None
    before = await listed(conn, DEFAULT_PREFIX)
    # An upload a process server killed mid-install left behind (one install per machine
    # at a time: no other is using it).
    await conn.run(_as_root(sudo, f"rm -rf {UPLOADS}"), input=stdin, check=False)
    made = await conn.run("mktemp -d /var/tmp/siterecovery-agent.XXXXXXXX", check=False)
    upload = str(made.stdout).strip()
    if made.exit_status != 0 or not upload.startswith("/var/tmp/"):
        raise InstallFailed(f"cannot make an upload directory in /var/tmp: "
                            f"{str(made.stderr).strip()}")
    try:
        remote = f"{upload}/{bundle.name}"
        try:
            async with conn.start_sftp_client() as sftp:
                await sftp.put(str(bundle), remote)
        except (asyncssh.Error, OSError) as e:
            raise InstallFailed(f"copying the bundle over SFTP failed: {e}") from None
        q = shlex.quote
        script = (f"cd {q(upload)} && tar xzf {q(bundle.name)} && "
                  f"./siterecovery-agent-*/install.sh --python {q(python)}")
        r = await conn.run(_as_root(sudo, script), input=stdin, check=False)
        out, err = str(r.stdout).strip(), str(r.stderr).strip()
        if r.exit_status != 0:
            raise InstallFailed(f"install.sh failed (exit {r.exit_status}): {err or out}")
    finally:
        await conn.run(_as_root(sudo, f"rm -rf {shlex.quote(upload)}"), input=stdin,
                       check=False)
    version = prefix = ""
    for line in out.splitlines():
        words = line.split()
        if "siterecovery agent" in line and " in " in line:
            version = words[words.index("agent") + 1]
            prefix = words[words.index("in") + 1]
    prefix = prefix or DEFAULT_PREFIX
    lost = [p for p in before if p not in await listed(conn, prefix)]
    if lost:  # install.sh wrote a new INSTALLED: what a push install added goes back in
        q = shlex.quote
        r = await conn.run(_as_root(sudo, f"cat >> {q(prefix)}/INSTALLED"),
                           input=(stdin or "") + "".join(f"{p}\n" for p in lost), check=False)
        if r.exit_status != 0:
            raise InstallFailed(f"cannot update {prefix}/INSTALLED: {str(r.stderr).strip()}")
    return Installed(version, prefix, out)


async def installed_version(conn: asyncssh.SSHClientConnection,
                            prefix: str = DEFAULT_PREFIX) -> str:
    """The version of the agent installed in ``prefix`` ("" if none)."""
    r = await conn.run(f"cat {shlex.quote(prefix)}/MANIFEST.json", check=False)
    if r.exit_status != 0:
        return ""
    try:
        return str(json.loads(str(r.stdout))["agent_version"])
    except (ValueError, KeyError, TypeError):
        return ""


async def listed(conn: asyncssh.SSHClientConnection, prefix: str = DEFAULT_PREFIX
                 ) -> list[str]:
    """What PREFIX/INSTALLED lists (empty if nothing is installed)."""
    r = await conn.run(f"cat {shlex.quote(prefix)}/INSTALLED", check=False)
    return [p for p in str(r.stdout).splitlines() if p.strip()] if r.exit_status == 0 else []


async def leftovers(conn: asyncssh.SSHClientConnection, paths: list[str]) -> list[str]:
    """Those of ``paths`` that still exist on the machine."""
    if not paths:
        return []
    q = " ".join(shlex.quote(p) for p in paths)
    r = await conn.run(f"for p in {q}; do if [ -e \"$p\" ] || [ -L \"$p\" ]; then "
                       "echo \"$p\"; fi; done", check=False)
    return [p for p in str(r.stdout).splitlines() if p]


async def enrolled(conn: asyncssh.SSHClientConnection, *, sudo: str, password: str = "",
                   conf_dir: str = "/etc/siterecovery") -> bool:
    """Whether the agent's key, certificate, CA and config are all there (not empty)."""
    d = shlex.quote(conf_dir)
    test = " && ".join(f"test -s {d}/{f}" for f in ("agent.key", "agent.pem", "ca.pem",
                                                    "mobility.toml"))
    stdin = password + "\n" if sudo.startswith("sudo -S") else None
    return (await conn.run(_as_root(sudo, test), input=stdin, check=False)).exit_status == 0


UNIT = "siterecovery-agent.service"
CONFIG = "/etc/siterecovery/mobility.toml"


@dataclass(frozen=True)
class Started:
    systemd: bool
    running_before: bool  # it ran already and was left alone
    how: str  # for the operator: how it runs, or the command that starts it


def _agent_pattern(prefix: str) -> str:
    """pgrep's pattern for the agent's process (the launcher runs PREFIX/bin/../agent.py);
    the bracket keeps it from matching the shell that runs pgrep."""
    path = prefix.replace(".", "\\.")
    return f"[{path[0]}]{path[1:]}/(bin/\\.\\./)?agent\\.py run"


async def start(conn: asyncssh.SSHClientConnection, *, sudo: str, password: str = "",
                prefix: str = DEFAULT_PREFIX, restart: bool) -> Started:
    """Enable and start the unit where the machine runs systemd (restarted when
    ``restart``: new program files or config); elsewhere say how to start it."""
    stdin = password + "\n" if sudo.startswith("sudo -S") else None
    script = (f"if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then "
              f"systemctl daemon-reload && systemctl enable {UNIT} >/dev/null 2>&1 || exit 1; "
              f"if [ {int(restart)} = 0 ] && systemctl is-active -q {UNIT}; then echo running; "
              f"else systemctl restart {UNIT} && echo started; fi; "
              f"else if pgrep -f {shlex.quote(_agent_pattern(prefix))} >/dev/null; then "
              "echo manual-running; else echo manual; fi; fi")
    r = await conn.run(_as_root(sudo, script), input=stdin, check=False)
    out = str(r.stdout).strip().splitlines()[-1:] or [""]
    if r.exit_status != 0:
        raise InstallFailed(f"systemctl could not start {UNIT} (exit {r.exit_status}): "
                            f"{str(r.stderr).strip()}; see 'journalctl -u {UNIT}'")
    command = f"{prefix}/bin/siterecovery-agent run --config {CONFIG}"
    if out[0] in ("running", "started"):
        return Started(True, out[0] == "running", f"systemd unit {UNIT} enabled and "
                       + ("running (nothing changed)" if out[0] == "running" else "started"))
    if out[0] == "manual-running" and not restart:
        return Started(False, True, f"no systemd on the machine; the agent runs ({command})")
    return Started(False, False, "the machine does not run systemd: start the agent with "
                   f"'{command}' from its init system"
                   + (" (restart it: its files changed)" if out[0] == "manual-running"
                      else ""))


async def stop_manual(conn: asyncssh.SSHClientConnection, *, sudo: str, password: str = "",
                      prefix: str = DEFAULT_PREFIX) -> None:
    """Stop an agent started by hand (no systemd) before its files go."""
    stdin = password + "\n" if sudo.startswith("sudo -S") else None
    pattern = shlex.quote(_agent_pattern(prefix))
    await conn.run(_as_root(sudo, f"pids=$(pgrep -f {pattern}) && kill $pids; true"),
                   input=stdin, check=False)


async def uninstall(conn: asyncssh.SSHClientConnection, *, sudo: str, password: str = "",
                    prefix: str = DEFAULT_PREFIX) -> str:
    """Remove the agent and everything its install listed; a machine without it is
    already done (returns what happened)."""
    stdin = password + "\n" if sudo.startswith("sudo -S") else None
    script = f"{shlex.quote(prefix)}/uninstall.sh"
    r = await conn.run(_as_root(sudo, f"if [ -x {script} ]; then {script}; "
                                      "else echo 'siterecovery agent not installed'; fi"),
                       input=stdin, check=False)
    if r.exit_status != 0:
        raise InstallFailed(f"uninstall.sh failed (exit {r.exit_status}): "
                            f"{str(r.stderr).strip() or str(r.stdout).strip()}")
    return str(r.stdout).strip()


# The CA's side of enrollment: a CSR (PEM) in, (certificate PEM, CA certificate PEM) out.
Signer = Callable[[bytes], Awaitable[tuple[bytes, bytes]]]


async def enroll(conn: asyncssh.SSHClientConnection, *, machine: str, sign: Signer,
                 server: str, site_url: str, disks: list[tuple[str, str]], sudo: str,
                 password: str = "", prefix: str = DEFAULT_PREFIX,
                 conf_dir: str = "/etc/siterecovery",
                 state_dir: str = "/var/lib/siterecovery-mobility") -> str:
    """Enroll the installed agent of ``machine`` (its key made there, never sent) and write
    its config; return the config's path. ``InstallFailed`` names the step that failed."""
    pw = password + "\n" if sudo.startswith("sudo -S") else ""
    q = shlex.quote
    agent, d = f"{q(prefix)}/bin/siterecovery-agent", q(conf_dir)

    async def root(command: str, data: str = "") -> str:
        r = await conn.run(_as_root(sudo, command), input=(pw + data) or None, check=False)
        if r.exit_status != 0:
            raise InstallFailed(f"{command.split()[0]} on {machine} failed "
                                f"(exit {r.exit_status}): {str(r.stderr).strip()}")
        return str(r.stdout)

    fresh = (await conn.run(_as_root(sudo, f"test -d {d}"), input=pw or None,
                            check=False)).exit_status != 0
    # Listed before they are made, so an enrollment cut short (a process server killed)
    # leaves nothing uninstall would miss; a run again adds no line twice.
    paths = [f"{conf_dir}/{f}" for f in ("agent.key", "agent.pem", "ca.pem", "mobility.toml")]
    paths += [state_dir] + ([conf_dir] if fresh else [])
    have = await listed(conn, prefix)
    if new := [p for p in paths if p not in have]:
        await root(f"cat >> {q(prefix)}/INSTALLED", "".join(f"{p}\n" for p in new))
    csr = await root(f"{agent} csr --dir {d} --machine {q(machine)}")
    cert, ca = await sign(csr.encode())
    for name, pem in (("agent.pem", cert), ("ca.pem", ca)):
        await root(f"umask 022 && cat > {d}/.{name}.tmp && mv {d}/.{name}.tmp {d}/{name}",
                   pem.decode())
    disk_args = " ".join(f"--disk {q(f'{n}={p}')}" for n, p in disks)
    config = (await root(f"{agent} configure --dir {d} --machine {q(machine)} "
                         f"--server {q(server)} --site {q(site_url)} "
                         f"--state-dir {q(state_dir)} {disk_args}")).strip()
    return config

"""``virsh`` as an asyncio subprocess: one place that runs it and turns failures into
``TargetError``s. virsh rather than libvirt-python: no compiled binding to build, and the
commands it runs are the ones an operator would type to look at the same objects."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile

from common.subproc import communicate
from targets.base import TargetError

# Every virsh command here returns at once (block jobs are started and then polled), so
# one that has not answered in this long is a libvirtd that no longer answers: the job
# fails with that said instead of waiting for ever.
VIRSH_TIMEOUT = 300.0

# libvirt's messages when the object a command names is not there (an idempotent
# cleanup treats these as done)
_MISSING = re.compile(r"not found|failed to get (domain|network)|no domain with|"
                      r"no network with|is not running|not active|"
                      r"no static host definition|couldn't locate a matching dhcp host",
                      re.IGNORECASE)


class VirshError(TargetError):
    def __init__(self, argv: list[str], rc: int, output: str) -> None:
        super().__init__("libvirt", f"virsh {' '.join(argv)} failed ({rc}): {output.strip()}",
                         "check that libvirtd runs and the URI is right "
                         "(virsh -c URI list --all)")
        self.output = output

    @property
    def missing(self) -> bool:
        """The command failed because its object does not exist (or is not running)."""
        return bool(_MISSING.search(self.output))


class Virsh:
    def __init__(self, uri: str, timeout: float = VIRSH_TIMEOUT) -> None:
        self.uri, self.timeout = uri, timeout

    async def __call__(self, *argv: str) -> str:
        """Run ``virsh -c URI ARGV``; its stdout, or ``VirshError`` with its stderr."""
        try:
            proc = await asyncio.create_subprocess_exec(
                "virsh", "-q", "-c", self.uri, *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except FileNotFoundError as e:
            raise TargetError("libvirt", "virsh is not installed",
                              "install libvirt-clients") from e
        try:
            out, err = await communicate(proc, self.timeout)
        except TimeoutError:
            raise TargetError(
                "libvirt", f"virsh {' '.join(argv[:2])} got no answer from {self.uri} "
                f"within {self.timeout:g}s", "check that libvirtd answers "
                f"(virsh -c {self.uri} list --all; systemctl status libvirtd)") from None
        assert proc.returncode is not None
        if proc.returncode != 0:
            raise VirshError(list(argv), proc.returncode, err.decode(errors="replace"))
        return out.decode(errors="replace")

    async def define(self, command: str, xml: str) -> str:
        """``virsh define`` / ``net-define`` of ``xml``."""
        return await self.with_xml(xml, command)

    async def with_xml(self, xml: str, *argv: str) -> str:
        """``virsh ARGV FILE``, ``FILE`` holding ``xml``: a private file, not
        ``/dev/stdin``, which virsh cannot open when the event loop's pipes are socket
        pairs (uvloop's, which the daemons run on)."""
        with tempfile.TemporaryDirectory(prefix="siterecovery-virsh-") as tmp:
            path = os.path.join(tmp, "definition.xml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(xml)
            return await self(*argv, path)

    async def exists(self, kind: str, name: str) -> bool:
        """Whether the ``kind`` ("domain" or "network") called ``name`` is defined."""
        try:
            await self("domuuid" if kind == "domain" else "net-uuid", name)
        except VirshError as e:
            if e.missing:
                return False
            raise
        return True

    async def gone(self, *argv: str) -> None:
        """Run a removing command; its object being already gone is success."""
        try:
            await self(*argv)
        except VirshError as e:
            if not e.missing:
                raise

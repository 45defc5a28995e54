"""The libvirt target's networks: the isolated drill network, made on demand and removed
once no machine uses it, and static IPs as DHCP host reservations."""

from __future__ import annotations

import asyncio
import ipaddress
import re

from targets.base import RecoverySpec, Refusal
from targets.domainxml import (
    dhcp_host_xml,
    isolated_network_xml,
    network_connections,
    network_subnets,
)
from targets.virsh import Virsh


class LibvirtNetworks:
    """The drill network ``drill_network`` (bridge ``drill_bridge``, ``drill_subnet``:
    no ``<forward>``, so no route out) and reservations on any network of ``virsh``."""

    def __init__(self, virsh: Virsh, drill_network: str, drill_bridge: str,
                 drill_subnet: ipaddress.IPv4Network) -> None:
        self.virsh = virsh
        self.drill_network, self.drill_bridge = drill_network, drill_bridge
        self.drill_subnet = drill_subnet
        self._lock = asyncio.Lock()  # one create/remove of the drill network at a time

    def network_for(self, spec: RecoverySpec, default: str) -> str:
        return self.drill_network if spec.drill else spec.network or default

    def reserves(self, spec: RecoverySpec) -> bool:
        """Whether ``spec``'s static IP becomes a reservation (a drill's only when it is
        inside the drill subnet: a production address is not used there)."""
        return spec.ip is not None and (
            not spec.drill or ipaddress.IPv4Address(spec.ip) in self.drill_subnet)

    async def check(self, spec: RecoverySpec, default: str) -> list[Refusal]:
        """The IP's form and, for a failover, that its network exists and holds the IP."""
        ip = None
        if spec.ip is not None:
            try:
                ip = ipaddress.IPv4Address(spec.ip)
            except ValueError:
                return [Refusal("ip", f"{spec.ip!r}: an IPv4 address, or none for DHCP")]
        if spec.drill:
            return []  # the drill network is made on demand; a production IP is not used
        net = spec.network or default
        if not await self.virsh.exists("network", net):
            names = (await self.virsh("net-list", "--all", "--name")).split()
            return [Refusal("network", f"{net!r} is not a network on {self.virsh.uri}; "
                                       f"there: {', '.join(names) or 'none'}")]
        if ip is not None:
            subnets = network_subnets(await self.virsh("net-dumpxml", net))
            if not any(ip in s for s in subnets):
                return [Refusal("ip", f"{ip} is outside network {net!r} "
                                      f"({', '.join(map(str, subnets)) or 'no IPv4'})")]
        return []

    async def ensure_drill(self) -> None:
        async with self._lock:
            if not await self.virsh.exists("network", self.drill_network):
                xml = isolated_network_xml(self.drill_network, self.drill_bridge,
                                           self.drill_subnet)
                await self.virsh.define("net-define", xml)
            info = await self.virsh("net-info", self.drill_network)
            if re.search(r"Active:\s+no", info):
                await self.virsh("net-start", self.drill_network)

    async def remove_drill_if_unused(self, net: str) -> None:
        async with self._lock:
            if not await self.virsh.exists("network", net):
                return
            if network_connections(await self.virsh("net-dumpxml", net)) > 0:
                return  # another drill's machine runs on it; its cleanup removes it
            await self.virsh.gone("net-destroy", net)
            await self.virsh.gone("net-undefine", net)

    async def reserve(self, network: str, mac: str, ip: str, name: str) -> None:
        await self.virsh("net-update", network, "add", "ip-dhcp-host",
                         dhcp_host_xml(mac, ip, name), *await self._update_flags(network))

    async def unreserve(self, net: str, mac: str, ip: str, name: str) -> None:
        if not await self.virsh.exists("network", net):
            return
        await self.virsh.gone("net-update", net, "delete", "ip-dhcp-host",
                              dhcp_host_xml(mac, ip, name), *await self._update_flags(net))

    async def _update_flags(self, network: str) -> list[str]:
        """net-update's flags: the running network (--live) and its stored definition
        (--config), each where it exists (a transient network has no definition)."""
        info = await self.virsh("net-info", network)
        return [flag for flag, field in (("--live", "Active"), ("--config", "Persistent"))
                if re.search(rf"{field}:\s+yes", info)]

"""Recovery settings of a replicated item ("compute and network"): defaults, changes through
the REST API and the CLI (SQLite and PostgreSQL), and every refusal naming the setting and
the values allowed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from configserver.errors import InvalidRequest
from configserver.recovery import RecoverySettings, apply
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.helpers import run_cli
from tests.sitehelpers import add_machine, add_procserver

DEFAULTS = {"target": "folder", "vm_name": "web01", "cpus": 1, "memory_mib": 1024,
            "azure_size": None, "network": None, "drill_network": None, "ip": None,
            "mac": None, "boot_marker": None, "firmware": "bios", "disks": []}


async def _item(cs: ConfigServer, api: ApiClient, name: str = "web01") -> None:
    await add_procserver(cs.url, cs.internal_token)
    await add_machine(api, name)
    await api.post("/api/v1/replication/enable", {"machine": name})


async def test_defaults_change_and_reset(cs: ConfigServer, api: ApiClient) -> None:
    await _item(cs, api)
    assert (await api.get("/api/v1/items/web01"))["recovery"] == DEFAULTS
    change = {"target": "libvirt", "vm_name": "web01-dr", "cpus": 4, "memory_mib": 8192,
              "network": "prod-net", "drill_network": "drill-net", "ip": "192.0.2.50/24",
              "mac": "52-54-00-AA-BB-01", "boot_marker": "web01 login:", "firmware": "uefi",
              "disks": ["sdb", "sda"], "azure_size": "Standard_D2s_v5"}
    doc = await api.call("PATCH", "/api/v1/items/web01/recovery", change, {})
    want = {**change, "mac": "52:54:00:aa:bb:01"}  # normalised
    assert doc["recovery"] == want
    assert (await api.get("/api/v1/items/web01"))["recovery"] == want  # stored
    # null: back to the default; settings not named stay
    doc = await api.call("PATCH", "/api/v1/items/web01/recovery",
                         {"ip": None, "cpus": None, "disks": None, "vm_name": None}, {})
    assert doc["recovery"] == {**want, "ip": None, "cpus": 1, "disks": [], "vm_name": "web01"}
    doc = await api.call("PATCH", "/api/v1/items/web01/recovery", {"ip": "dhcp"}, {})
    assert doc["recovery"]["ip"] is None


@pytest.mark.parametrize(("change", "setting", "allowed"), [
    ({"target": "vmware"}, "target", "folder | libvirt | azure"),
    ({"cpus": 0}, "cpus", "from 1 to 128"),
    ({"cpus": True}, "cpus", "from 1 to 128"),
    ({"memory_mib": 64}, "memory_mib", "from 128 to"),
    ({"firmware": "efi"}, "firmware", "bios | uefi"),
    ({"ip": "300.1.1.1"}, "ip", "an IPv4 or IPv6 address"),
    ({"mac": "01:00:5e:00:00:01"}, "mac", "unicast MAC address"),
    ({"mac": "nonsense"}, "mac", "unicast MAC address"),
    ({"disks": ["sdz"]}, "disks", "disks of the machine: sda, sdb"),
    ({"disks": ["sda", "sda"]}, "disks", "distinct disk names"),
    ({"vm_name": "bad name"}, "vm_name", "a name of 1-63 letters"),
    ({"network": "-x"}, "network", "a name of 1-63 letters"),
    ({"boot_marker": ""}, "boot_marker", "printable characters"),
    ({"azure_size": "D2s"}, "azure_size", "Standard_D2s_v5"),
])
async def test_each_refusal_names_the_setting_and_what_is_allowed(
        cs: ConfigServer, api: ApiClient, change: dict[str, Any], setting: str,
        allowed: str) -> None:
    await _item(cs, api)
    with pytest.raises(ApiCallError) as e:
        await api.call("PATCH", "/api/v1/items/web01/recovery", change, {})
    assert e.value.status == 422 and e.value.api_code == "recovery_setting_invalid"
    assert f"recovery setting {setting}:" in e.value.message and allowed in e.value.message
    assert (await api.get("/api/v1/items/web01"))["recovery"] == DEFAULTS  # nothing written


async def test_unknown_item_and_unknown_setting(cs: ConfigServer, api: ApiClient) -> None:
    with pytest.raises(ApiCallError) as e:
        await api.call("PATCH", "/api/v1/items/nope/recovery", {"cpus": 2}, {})
    assert e.value.status == 404 and e.value.api_code == "item_not_found"
    await _item(cs, api)
    with pytest.raises(ApiCallError) as e:
        await api.call("PATCH", "/api/v1/items/web01/recovery", {"colour": "red"}, {})
    assert e.value.status in (400, 422)


def test_settings_round_trip_through_what_the_catalog_keeps() -> None:
    s = apply(RecoverySettings(), {"cpus": 2, "disks": ["sdb"], "ip": "2001:db8::5"},
              ["sda", "sdb"])
    assert s.changed() == {"cpus": 2, "disks": ["sdb"], "ip": "2001:db8::5"}
    assert RecoverySettings.stored(json.loads(json.dumps(s.changed()))) == s
    spec = s.spec("web01", "p1", drill=True)
    assert (spec.vm_name, spec.cpus, spec.network, spec.point, spec.drill) == (
        "web01", 2, None, "p1", True)
    nets = apply(s, {"network": "prod", "drill_network": "iso"}, [])
    assert nets.spec("m", "p", drill=True).network == "iso"  # a drill never on production
    assert nets.spec("m", "p", drill=False).network == "prod"
    assert nets.spec("m", "p", drill=True, network="other").network == "other"
    with pytest.raises(InvalidRequest, match="recovery setting colour"):
        apply(s, {"colour": 1}, [])


async def test_cli_settings_show_and_change(cs: ConfigServer, api: ApiClient) -> None:
    await _item(cs, api)
    api_args = ["--api", cs.url, "--token-file", str(cs.cfg.token_path)]
    r = await asyncio.to_thread(run_cli, "failover", "settings", "web01", "--cpus", "2",
                                "--memory-mib", "2048", "--ip", "192.0.2.9", "--disks", "sda",
                                "--json", *api_args)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["recovery"] == {**DEFAULTS, "cpus": 2, "memory_mib": 2048,
                                                "ip": "192.0.2.9", "disks": ["sda"]}
    r = await asyncio.to_thread(run_cli, "failover", "settings", "web01", *api_args)
    assert r.returncode == 0, r.stderr
    assert "cpus: 2" in r.stdout and "ip: 192.0.2.9" in r.stdout
    r = await asyncio.to_thread(run_cli, "failover", "settings", "web01", "--firmware", "efi",
                                *api_args)
    assert r.returncode == 2 and "recovery setting firmware" in r.stderr
    assert "bios | uefi" in r.stderr


async def test_cli_items_update_changes_the_recovery_settings(
        cs: ConfigServer, api: ApiClient) -> None:
    await _item(cs, api)
    api_args = ["--api", cs.url, "--token-file", str(cs.cfg.token_path)]
    r = await asyncio.to_thread(run_cli, "items", "update", "web01", "--vm-name", "web01-dr",
                                "--cpus", "4", "--json", *api_args)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["recovery"] == {**DEFAULTS, "vm_name": "web01-dr", "cpus": 4}
    r = await asyncio.to_thread(run_cli, "items", "show", "web01", *api_args)
    assert r.returncode == 0, r.stderr
    shown = r.stdout.splitlines()
    assert "recovery settings:" in shown, r.stdout
    assert {"  VM name:          web01-dr", "  CPUs:             4",
            "  memory:           1024 MiB", "  IP:               DHCP"} <= set(shown), r.stdout
    r = await asyncio.to_thread(run_cli, "items", "update", "web01", "--reset", "cpus",
                                *api_args)
    assert r.returncode == 0, r.stderr
    assert (await api.get("/api/v1/items/web01"))["recovery"]["cpus"] == DEFAULTS["cpus"]
    r = await asyncio.to_thread(run_cli, "items", "update", "web01", *api_args)
    assert r.returncode == 2 and "nothing to change" in r.stderr
    r = await asyncio.to_thread(run_cli, "items", "update", "web01", "--memory-mib", "1",
                                *api_args)
    assert r.returncode == 2 and "memory_mib" in r.stderr
    assert (await api.get("/api/v1/items/web01"))["recovery"]["vm_name"] == "web01-dr"

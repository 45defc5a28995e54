"""Which machine a check-in comes from (configserver/hostroles.py), every case of what the
original and the caller report. The wiring through settings, heartbeats, progress and
renewal is tried on real agents in tests/test_reprotect_agent.py."""

from __future__ import annotations

import pytest

from configserver import db
from configserver.hostroles import ORIGINAL, RECOVERED, note_recovered, role
from configserver.items import FAILOVER_STATES, ItemState

HOST_A = "0c1e5a4b-7d3e-4f6a-9b2c-1d2e3f4a5b6c"
HOST_B = "5f0e9d8c-7b6a-4c3d-8e2f-0a1b2c3d4e5f"
OUTSIDE = [s for s in ItemState if s not in FAILOVER_STATES]


def _machine(host_id: str | None) -> db.Machine:
    return db.Machine(name="web01", ip="10.0.0.1", os_type="linux", created=0.0,
                      host_id=host_id)


def _item(state: str, failover: dict[str, object] | None = None) -> db.ReplicatedItem:
    return db.ReplicatedItem(machine="web01", policy="default", state=state, created=0.0,
                             updated=0.0, failover=failover)


@pytest.mark.parametrize("state", FAILOVER_STATES)
@pytest.mark.parametrize(("original", "caller", "want"), [
    (HOST_A, HOST_A, ORIGINAL),
    (HOST_A, HOST_B, RECOVERED),  # another host
    (None, HOST_B, RECOVERED),  # the original never reported one: it does not start now
    (HOST_A, None, RECOVERED),  # the original always reported its own
    (None, None, ORIGINAL),  # nothing tells them apart
])
def test_while_failed_over_only_the_originals_host_is_the_original(
        state: str, original: str | None, caller: str | None, want: str) -> None:
    assert role(_machine(original), _item(state), caller) == want


@pytest.mark.parametrize("state", OUTSIDE)
@pytest.mark.parametrize(("original", "caller"), [
    (HOST_A, HOST_A), (HOST_A, HOST_B), (None, HOST_B), (HOST_A, None), (None, None)])
def test_outside_a_failover_every_check_in_is_the_originals(
        state: str, original: str | None, caller: str | None) -> None:
    # Another host id there is the machine moved (note_original records it, with an event).
    assert role(_machine(original), _item(state), caller) == ORIGINAL
    assert role(_machine(original), None, caller) == ORIGINAL


@pytest.mark.parametrize("state", OUTSIDE)
def test_a_host_a_failover_recovered_stays_the_recovered_machines(state: str) -> None:
    item = _item(state, {"recovered_hosts": [HOST_B]})
    assert role(_machine(HOST_A), item, HOST_B) == RECOVERED
    assert role(_machine(HOST_A), item, HOST_A) == ORIGINAL
    assert role(_machine(HOST_A), item, None) == ORIGINAL


def test_a_recovered_agent_without_a_host_id_is_noted_but_no_host_is_remembered() -> None:
    item = _item(ItemState.FAILED_OVER, {"point": "p1", "recovered_hosts": [HOST_B]})
    note_recovered(item, None, 100.0, agent_version="1.0")
    assert item.failover is not None
    assert item.failover["recovered_agent"] == {"host_id": None, "last_contact": 100.0,
                                                "agent_version": "1.0"}
    assert item.failover["recovered_hosts"] == [HOST_B]
    assert item.failover["point"] == "p1"
    note_recovered(item, HOST_A, 101.0)
    assert item.failover["recovered_hosts"] == [HOST_B, HOST_A]
    assert item.failover["recovered_agent"]["host_id"] == HOST_A

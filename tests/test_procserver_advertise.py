"""``advertise_address``: the address a process server tells machines to connect to when
it is not where it listens (NAT, a forwarded port, a name for a listener on all
addresses). The end-to-end use is tests/test_machine_install_vm.py, where machines reach
the process server through QEMU's user-mode network."""

from __future__ import annotations

import pytest

from procserver.config import ProcServerConfig
from procserver.reporter import Identity


def _cfg(**kw: object) -> ProcServerConfig:
    return ProcServerConfig(data_dir="/nonexistent", vault_url="file:///nonexistent",
                            vault_key_file="k", tls_cert="c", tls_key="k", tls_ca="a",
                            **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("good", ["ps1.example.net:9443", "10.0.2.2:40659",
                                  "[fd00::7]:9443"])
def test_a_host_and_port_is_accepted_and_said_as_given(good: str) -> None:
    _cfg(advertise_address=good).validate()
    assert Identity("ps1", "127.0.0.1", lambda: 9443, good).address() == good


@pytest.mark.parametrize("bad", ["ps1.example.net", "ps1:0", "ps1:65536", ":9443",
                                 "fd00::7:9443", "[fd00::7:9443", "ps 1:9443", "ps1:x"])
def test_anything_else_is_refused_naming_the_setting(bad: str) -> None:
    with pytest.raises(ValueError, match=r"advertise_address .* is not HOST:PORT"):
        _cfg(advertise_address=bad).validate()


def test_without_it_the_listener_is_the_address() -> None:
    _cfg().validate()
    assert Identity("ps1", "10.1.2.3", lambda: 9443).address() == "10.1.2.3:9443"

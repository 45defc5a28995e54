"""mobility.toml as the agent writes it (enrollment) and updates it (renewal): the update
changes the managed keys and nothing else, on odd files too, or refuses and leaves the
file as it was."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mobility.agentfile import AgentFileError, render, set_keys, update
from mobility.config import MobilityConfig
from mobility.enroll import write_agent
from siterecovery.tomlconfig import from_mapping, load

NEW = {"tls_cert": "/etc/mobility/agent-0123abcd.pem",
       "tls_key": "/etc/mobility/agent-0123abcd.key"}


def _config_text(machine: str = "web01",
                 disks: tuple[tuple[str, str], ...] = (("sda", "/dev/sda"),)) -> str:
    return render(machine=machine, server_host="10.0.0.9", server_port=9443,
                  site_url="https://cs:9441", tls_ca="/etc/mobility/ca.pem",
                  tls_cert="/etc/mobility/agent.pem", tls_key="/etc/mobility/agent.key",
                  state_dir="/var/lib/mobility", disks=list(disks))


def _changed_only(before: str, after: str, values: dict[str, str]) -> None:
    assert tomllib.loads(after) == {**tomllib.loads(before), **values}


def test_a_rendered_config_loads_with_odd_names_and_paths() -> None:
    disks = (("sda", '/dev/disk/by-id/a "quoted" \\ path\x7f'), ("data", "/srv/données😀.img"))
    text = _config_text(machine='we"b\\01', disks=disks)
    cfg = from_mapping(MobilityConfig, tomllib.loads(text), "mobility.toml")
    assert cfg.machine == 'we"b\\01'
    assert cfg.disks == [{"name": n, "path": p} for n, p in disks]


def test_write_agent_writes_the_files_the_config_names(tmp_path: Path) -> None:
    out = tmp_path / "agent"
    issued = {"ca": "CA PEM\n", "cert": "CERT PEM\n", "key": "KEY PEM\n"}
    cfg_path = write_agent(out, issued, machine="web01", server_host="10.0.0.9",
                           server_port=9443, disks=[("sda", "/dev/sda")],
                           site_url="https://cs:9441")
    cfg = load(MobilityConfig, cfg_path)
    assert Path(cfg.tls_ca).read_text() == "CA PEM\n"
    assert Path(cfg.tls_cert).read_text() == "CERT PEM\n"
    assert Path(cfg.tls_key).read_text() == "KEY PEM\n"
    assert Path(cfg.tls_key).stat().st_mode & 0o777 == 0o600
    assert (out.stat().st_mode & 0o777) == 0o700
    assert (cfg.server_host, cfg.server_port, cfg.site_url) == ("10.0.0.9", 9443,
                                                                "https://cs:9441")
    assert cfg.state_dir == str((out / "state").resolve())
    assert sorted(os.listdir(out)) == ["agent.key", "agent.pem", "ca.pem", "mobility.toml"]


def test_the_update_changes_the_keys_and_keeps_everything_else() -> None:
    before = _config_text()
    after = set_keys(before, NEW, "mobility.toml")
    _changed_only(before, after, NEW)
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True)
               if a != b]
    assert [b for _, b in changed] == [f'tls_cert = "{NEW["tls_cert"]}"',
                                       f'tls_key = "{NEW["tls_key"]}"']


ODD = {
    "a key-like line inside a multi-line string comes first": (
        'pre_script = """\ntls_cert = "not this one"\ntls_key = "nor this"\n"""\n'),
    "the same inside a literal multi-line string": (
        "post_script = '''\ntls_cert = 'not this one'\n'''\n"),
    "a trailing comment and odd spacing": (
        '   tls_cert   =   "/old.pem"   # the agent\'s certificate\n'
        'tls_key="/old.key"#no spaces\n'),
    "quoted keys": ('"tls_cert" = "/old.pem"\n\'tls_key\' = \'/old.key\'\n'),
}


@pytest.mark.parametrize("case", sorted(ODD))
def test_odd_files_are_updated_exactly(case: str) -> None:
    text = ODD[case]
    if "tls_cert" not in tomllib.loads(text):  # the real keys come after the string
        text += 'tls_cert = "/old.pem"\ntls_key = "/old.key"\n'
    text = 'machine = "web01"\n' + text + 'disks = [ { name = "sda", path = "/dev/sda" } ]\n'
    after = set_keys(text, NEW, "mobility.toml")
    _changed_only(text, after, NEW)


def test_crlf_line_endings_stay(tmp_path: Path) -> None:
    before = _config_text().replace("\n", "\r\n")
    p = tmp_path / "mobility.toml"
    p.write_bytes(before.encode())
    update(p, NEW)
    after = p.read_bytes().decode()
    _changed_only(before, after, NEW)
    assert after.count("\r\n") == after.count("\n") == before.count("\n")


REFUSED = {
    "no tls_cert at all": ('machine = "web01"\ntls_key = "/old.key"\n',
                           "has no 'tls_cert = ...' line to point at /etc/mobility/agent-"),
    "tls_cert only inside a table": ('tls_key = "/k"\n[extra]\ntls_cert = "/old.pem"\n',
                                     "has no 'tls_cert = ...' line"),
    "a value on several lines": ('tls_cert = """\n/old.pem"""\ntls_key = "/k"\n',
                                 "has no 'tls_cert = ...' line"),
    "a dotted key": ('tls_cert.path = "/old.pem"\ntls_key = "/k"\n',
                     "has no 'tls_cert = ...' line"),
    "not TOML": ('tls_cert = "/old.pem\ntls_key = "/k"\n', "is not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_cannot_be_updated_safely_is_refused_and_left_alone(case: str,
                                                                  tmp_path: Path) -> None:
    text, message = REFUSED[case]
    p = tmp_path / "mobility.toml"
    p.write_text(text)
    p.chmod(0o640)
    with pytest.raises(AgentFileError) as e:
        update(p, NEW)
    assert str(e.value).startswith(str(p)) and message in str(e.value)
    assert p.read_text() == text and p.stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["mobility.toml"]  # no temporary file left behind


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "mobility.toml"
    raw = b'tls_cert = "/\xff.pem"\ntls_key = "/k"\n'
    p.write_bytes(raw)
    with pytest.raises(AgentFileError, match="not UTF-8"):
        update(p, NEW)
    assert p.read_bytes() == raw


@given(cert=st.text(st.characters(codec="utf-8")), key=st.text(st.characters(codec="utf-8")))
def test_any_value_round_trips(cert: str, key: str) -> None:
    before = _config_text()
    after = set_keys(before, {"tls_cert": cert, "tls_key": key}, "mobility.toml")
    _changed_only(before, after, {"tls_cert": cert, "tls_key": key})

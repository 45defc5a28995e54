"""The agent's ``mobility.toml``: written whole at enrollment, and the keys the agent
manages itself (``tls_cert``, ``tls_key`` after a renewal) updated in place.

Why an in-place line update and not a rewrite of the whole file from the typed
config: the file is the operator's (comments, snapshot scripts, limits they added);
re-serialising it would drop all of that. The update replaces the one line that sets
the key and then *proves* the result: it parses the new text and requires it to be
the old document with exactly the managed keys changed. A line that only looks like
the key (inside a multi-line string, say) fails that proof and the next candidate is
tried; when no line passes, nothing is written and ``AgentFileError`` says so. The
file is replaced with ``atomic_write``: whole or not at all.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.fs import atomic_write


class AgentFileError(Exception):
    """mobility.toml cannot be updated as asked; the file was left as it was."""


# Not json.dumps: JSON leaves DEL unescaped and writes characters beyond the BMP as
# surrogate pairs, both of which TOML refuses.
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
            "\f": "\\f", "\r": "\\r"}


def toml_str(s: str) -> str:
    """``s`` as a TOML basic string."""
    return '"' + "".join(
        _ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
        for c in s) + '"'


def render(*, machine: str, server_host: str, server_port: int, site_url: str, tls_ca: str,
           tls_cert: str, tls_key: str, state_dir: str, disks: list[tuple[str, str]]) -> str:
    """The text of a new mobility.toml; ``disks`` are (name, path) pairs."""
    disk_lines = "\n".join(f"  {{ name = {toml_str(name)}, path = {toml_str(path)} }},"
                           for name, path in disks)
    return f"""# siterecovery Mobility agent — written by 'siterecovery mobility enroll'
machine = {toml_str(machine)}
server_host = {toml_str(server_host)}
server_port = {server_port}
# The configuration server's site listener: settings, heartbeats and progress ("": none).
site_url = {toml_str(site_url)}
tls_ca = {toml_str(tls_ca)}
tls_cert = {toml_str(tls_cert)}
tls_key = {toml_str(tls_key)}
state_dir = {toml_str(state_dir)}
interval_seconds = 30.0
# none: live reads, points labelled 'inconsistent'; fsfreeze: crash-consistent;
# lvm: LVM snapshots of the disks (logical volumes); script: app-consistent with
# pre_script/post_script.
snapshot = "none"
disks = [
{disk_lines}
]
"""


def _parse(text: str) -> dict[str, Any] | None:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None


def set_keys(text: str, values: Mapping[str, str], where: str) -> str:
    """``text`` with each top-level key of ``values`` set to its string value; every
    other key, comment and line as it was (a trailing comment on a replaced line goes).

    Raises ``AgentFileError`` (naming ``where``) when ``text`` is not TOML, or a key is
    not set on a line of its own that can be replaced without changing anything else."""
    doc = _parse(text)
    if doc is None:
        raise AgentFileError(f"{where} is not valid TOML; not changed")
    for key, value in values.items():
        want = {**doc, key: value}
        k = re.escape(key)
        line_re = re.compile(rf"[ \t]*(?:{k}|\"{k}\"|'{k}')[ \t]*=")
        lines = text.split("\n")  # TOML lines end in LF or CRLF, nothing else
        for i, line in enumerate(lines):
            if not line_re.match(line):
                continue
            cr = "\r" if line.endswith("\r") else ""
            candidate = "\n".join([*lines[:i], f"{key} = {toml_str(value)}{cr}",
                                   *lines[i + 1:]])
            if key in doc and _parse(candidate) == want:
                text, doc = candidate, want
                break
        else:
            raise AgentFileError(f"{where} has no '{key} = ...' line to point at {value}")
    return text


def update(path: Path, values: Mapping[str, str]) -> None:
    """Set the keys ``values`` in the mobility.toml at ``path`` (see ``set_keys``) and
    replace the file atomically; on ``AgentFileError`` the file is unchanged."""
    # Bytes, not read_text(): its newline translation would turn CRLF lines into LF.
    try:
        text = path.read_bytes().decode()
    except UnicodeDecodeError:
        raise AgentFileError(f"{path} is not valid TOML (not UTF-8); not changed") from None
    atomic_write(path, set_keys(text, values, str(path)))

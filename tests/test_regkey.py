"""The registration key file format (vault/regkey.py) on its own: what parses, what is
refused and why, and that the MAC binds every field to the vault key."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest

from vault.regkey import FORMAT, VALID_DAYS, MalformedKey, mac, parse_key

MASTER = secrets.token_bytes(32)


def _key(**change: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "format": FORMAT, "version": 1, "key_id": "0123456789abcdef", "vault_id": "a" * 32,
        "vault_url": "file:///srv/vault", "issued": "2026-01-31T12:00:00Z",
        "expires": "2026-02-05T12:00:00Z"}
    fields["mac"] = mac(MASTER, fields)
    fields.update(change)
    return fields


def test_a_key_parses_and_authenticates_with_its_vault_key_only() -> None:
    key = parse_key(json.dumps(_key()))
    assert (key.key_id, key.vault_id, key.vault_url) == ("0123456789abcdef", "a" * 32,
                                                          "file:///srv/vault")
    assert key.expires - key.issued == VALID_DAYS * 86400
    assert key.authentic(MASTER)
    assert not key.authentic(secrets.token_bytes(32))


def test_a_changed_field_no_longer_authenticates() -> None:
    changed = parse_key(json.dumps(_key(vault_url="file:///elsewhere")))
    assert not changed.authentic(MASTER)


@pytest.mark.parametrize("text,says", [
    ("not json", "it is not JSON"),
    (json.dumps(_key(format="other")), "'format' must be"),
    (json.dumps(_key(version=2)), "version 2 is not 1"),
    (json.dumps({**_key(), "extra": 1}), "exactly the fields"),
    (json.dumps(_key(key_id="XYZ")), "'key_id' must be 16 lowercase hex digits"),
    (json.dumps(_key(vault_url="")), "'vault_url' must be a store URL"),
    (json.dumps(_key(issued="yesterday")), "'issued' must be a UTC time"),
    (json.dumps(_key(expires="2026-02-31T12:00:00Z")), "'expires' is not a valid time"),
    (json.dumps(_key(expires="2026-02-05T12:00:01Z")), f"within {VALID_DAYS} days"),
    (json.dumps(_key(expires="2026-01-31T12:00:00Z")), "expire after it was issued"),
    ("x" * ((16 << 10) + 1), "larger than"),
])
def test_malformed_keys_say_which_rule_they_break(text: str, says: str) -> None:
    with pytest.raises(MalformedKey, match=says.replace("(", r"\(")):
        parse_key(text)

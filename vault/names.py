"""Object names in the vault. Random 256-bit names reveal nothing about content.

Layout::

    config                    sealed vault config (format version, block size)
    keys/<16 hex>             key slots (plaintext JSON, master key wrapped)
    packs/<2 hex>/<64 hex>    packs of sealed blocks, with a sealed trailer
    index/<64 hex>            sealed index: block id -> (pack, offset, length)
    maps/<64 hex>             sealed block maps (full or delta) of one disk
    points/<64 hex>           sealed recovery-point manifests
    locks/<64 hex>            sealed lock objects (shared: writers; exclusive: prune)
"""

from __future__ import annotations

import secrets

CONFIG = "config"
KEYS = "keys/"
PACKS = "packs/"
INDEX = "index/"
MAPS = "maps/"
POINTS = "points/"
LOCKS = "locks/"


def random_id() -> str:
    return secrets.token_hex(32)


def pack_name(pack_id: str) -> str:
    return f"{PACKS}{pack_id[:2]}/{pack_id}"


def pack_id_of(name: str) -> str:
    return name.rsplit("/", 1)[-1]

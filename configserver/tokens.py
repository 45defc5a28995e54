"""Bearer tokens kept in 0600 files, created at first start."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from common.tomlconfig import ConfigError


def load_or_create(path: Path) -> str:
    """The token in ``path``; a new one written there (0600) if the file is absent or empty.
    A file that is not text is a ``ConfigError`` naming it: it is never overwritten."""
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a token file (it is not text); move it away and "
                          "a new token is written at the next start") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def matches(header: str | None, token: str) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), token.encode())

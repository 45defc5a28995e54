"""Where an embedded installation keeps everything unless told otherwise."""

from __future__ import annotations

import os


def default_data_dir() -> str:
    """``/var/lib/siterecovery`` for root, else ``$XDG_DATA_HOME/siterecovery``
    (``~/.local/share/siterecovery``)."""
    if os.geteuid() == 0:
        return "/var/lib/siterecovery"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "siterecovery")

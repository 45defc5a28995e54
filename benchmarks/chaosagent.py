"""One round of the managed agent for ``chaos.py``, in its own process (so it can be
killed with ``kill -9``): the settings from the configuration server, a heartbeat, one
replication cycle with its progress reports, as ``mobility run`` does each round.

The agent's settings name the process server's own port; the round keeps mobility.toml's
(the chaos proxy in front of it), so that connection resets reach the agent. When the
configuration server is away the agent replicates on mobility.toml, as ``mobility run``
does. Prints the acknowledged cycle as JSON; exit 3 when the settings said not to
replicate.

Run: ``.venv/bin/python benchmarks/chaosagent.py MOBILITY_TOML``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys

import structlog

from mobility.config import MobilityConfig
from mobility.daemon import ManagedAgent
from mobility.siteclient import Settings, SiteClient
from siterecovery.tomlconfig import load


class ProxiedAgent(ManagedAgent):
    """A managed agent that reaches its process server through mobility.toml's address."""

    async def refresh(self) -> Settings | None:
        s = await super().refresh()
        self.agent.cfg = dataclasses.replace(self.agent.cfg, server_host=self.cfg.server_host,
                                             server_port=self.cfg.server_port)
        return s


async def one_round(config: str) -> int:
    cfg = load(MobilityConfig, config)
    async with SiteClient(cfg.site_url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key) as site:
        managed = ProxiedAgent(cfg, site)
        try:
            ran = await managed.round()
        finally:
            managed.close()
    if not ran or managed.last is None:
        return 3
    print(json.dumps(dataclasses.asdict(managed.last)), flush=True)
    return 0


if __name__ == "__main__":
    structlog.configure(  # warnings to stderr; stdout carries the result alone
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    sys.exit(asyncio.run(one_round(sys.argv[1])))

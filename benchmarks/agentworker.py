"""The Mobility agent in a process of its own, for ``bench_e2e.py``: a cycle per request.

On a protected machine the agent is a daemon of its own (``siterecovery-agent run``),
started once, replicating every interval: not the process of the servers, and not a
fresh interpreter per cycle. This worker is that daemon with the interval replaced by
the benchmark's word: it loads mobility.toml and builds the agent once, prints
``ready``, then for every line on stdin runs one cycle and prints it (``CycleResult``
as one JSON line on stdout). End of stdin ends it. Logs (warnings) go to stderr.

Run: ``.venv/bin/python benchmarks/agentworker.py MOBILITY_TOML``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys

import structlog
import uvloop

from common.gcsettle import settle_startup_heap
from mobility.agent import Agent
from mobility.config import MobilityConfig
from siterecovery.tomlconfig import load


async def serve(config: str) -> int:
    agent = Agent(load(MobilityConfig, config))
    settle_startup_heap()  # as the agent's daemon does once it has started
    loop = asyncio.get_running_loop()
    print("ready", flush=True)  # imported and built: what a daemon did before its cycles
    try:
        while await loop.run_in_executor(None, sys.stdin.readline):
            r = await agent.replicate_once()
            print(json.dumps(dataclasses.asdict(r)), flush=True)
    finally:
        agent.close()
    return 0


if __name__ == "__main__":
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    sys.exit(uvloop.run(serve(sys.argv[1])))

"""A daemon's start-up objects leave the garbage collector's full collections
(common/gcsettle.py): a full collection then walks only what the daemon's work
allocated, not the ~10^5 objects its start left."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, configserver_daemon

# A process that imported and built what a process server does at start (in a
# subprocess: freezing is for the whole process, never pytest's own).
PROBE = """
import gc, json
import procserver.server, configserver.server
from common.gcsettle import settle_startup_heap
before = len(gc.get_objects())
frozen = settle_startup_heap()
print(json.dumps({"before": before, "frozen": frozen, "after": len(gc.get_objects())}))
"""


def test_settling_freezes_start_up_objects_out_of_full_collections() -> None:
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                       text=True, timeout=120, check=True)
    counts = json.loads(r.stdout)
    assert counts["before"] > 50_000  # what every full collection walked until now
    assert counts["frozen"] > 50_000
    # What a full collection walks now: only what was allocated since.
    assert counts["after"] < 1_000


async def test_the_configuration_server_daemon_settles_its_heap_once_started(
        tmp_path: Path) -> None:
    cs = configserver_daemon(tmp_path)
    await cs.start()
    try:
        [ev] = await cs.wait_events("startup_heap_settled", 1, timeout=60)
        assert int(str(ev["frozen_objects"])) > 50_000
    finally:
        assert await cs.stop() == 0

"""Every job kind a configuration server runs: one explicit list, given to the
``JobEngine`` and to the jobs API (titles, the ``kind`` filter) by the daemon."""

from __future__ import annotations

from collections.abc import Mapping

from configserver import replication
from configserver.jobdefs import JobKind, by_name

KINDS: Mapping[str, JobKind] = by_name(replication.KINDS)

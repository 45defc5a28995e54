"""``Services``: what the API handlers of one configuration server work with.

Built once by the daemon (``configserver/server.py``) and handed to the REST layer; a
handler reaches the catalog, clock, notifier and metrics (``Core``), the CA, the job
engine and its slice of the configuration through it — never the server object.
Domain modules take the ``Core`` (a ``Services`` is one) and the few extra pieces they
need as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from configserver.agentwatch import AgentWatch
from configserver.alerts import AlertBook
from configserver.ca import CertificateAuthority
from configserver.config import ConfigServerConfig
from configserver.core import Core
from configserver.enrollment import Throttle
from configserver.jobs import JobEngine


@dataclass(frozen=True)
class Services(Core):
    cfg: ConfigServerConfig
    ca: CertificateAuthority
    jobs: JobEngine
    alert_book: AlertBook
    throttle: Throttle  # wrong enrollment passphrases, per client address
    admin_token: str = field(repr=False)
    internal_token: str = field(repr=False)
    passphrase: str = field(repr=False)  # the agents' enrollment passphrase
    agent_watch: AgentWatch = field(default_factory=AgentWatch)  # agents' long polls

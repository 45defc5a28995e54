"""The web console: server-rendered pages on the admin listener, under ``/console/``.

Operators sign in with the admin token and get a session; the pages show what the REST
API shows (items, recovery points, alerts, jobs, process servers) and the forms call
the same domain functions as its handlers. ``app.py`` holds sign-in, sessions, CSRF and
the security headers; ``pages.py`` the pages; ``actions.py`` the forms' actions;
``planpages.py`` and ``planactions.py`` those of recovery plans and consistency groups.
"""

from __future__ import annotations

from aiohttp import web

from configserver.console import actions, pages, planactions, planpages
from configserver.console import app as _app
from configserver.services import Services

__all__ = ["mount"]


def mount(parent: web.Application, services: Services) -> None:
    """Serve the console under ``/console/`` of ``parent``, the admin listener's app."""
    _app.mount(parent, services, [*pages.ROUTES, *actions.ROUTES, *planpages.ROUTES,
                                 *planactions.ROUTES])

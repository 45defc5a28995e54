"""Every route of the configuration server, gathered from one module per concept."""

from __future__ import annotations

from configserver import (
    api_accounts,
    api_agent,
    api_certs,
    api_core,
    api_events,
    api_failback,
    api_failover,
    api_groups,
    api_install,
    api_items,
    api_jobs,
    api_machines,
    api_notify,
    api_plans,
    api_points,
    api_policies,
    api_procservers,
    api_prune,
    api_registration,
    api_verify,
)
from configserver.rest import Route

MODULES = (api_core, api_registration, api_certs, api_procservers, api_policies, api_machines,
           api_accounts, api_items, api_failover, api_jobs, api_points, api_agent, api_events,
           api_notify, api_verify, api_prune, api_install, api_plans, api_failback,
           api_groups)


def all_routes() -> list[Route]:
    routes: list[Route] = []
    for m in MODULES:
        routes.extend(m.ROUTES)
    return routes

"""The console's aiohttp application: sign-in, sessions, CSRF and the security headers.

Every page and action needs a session: a GET without one is sent to the sign-in page, a
POST without one (or without its session's CSRF token, or from another origin) is refused
with 403. Sign-in takes the admin token in a POST form body — never in a URL — and
answers with the session cookie (HttpOnly, SameSite=Strict, Path=/, Secure over TLS).
Neither the token nor a session id is ever logged.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import jinja2
import structlog
from aiohttp import web

from configserver.console.render import STATIC, environment, html
from configserver.console.sessions import Session, SessionStore, same_secret
from configserver.enrollment import Throttle
from configserver.services import Services

log = structlog.get_logger("configserver.console")

PREFIX = "/console"
# The session cookie's name ends with the port the browser reached the console on:
# browsers keep cookies per host, not per port, and an operator may reach the consoles of
# two sites through two tunnels on one host (localhost:9440, localhost:19440).
COOKIE = "siterecovery_console"
# No inline script or style anywhere: the pages load /console/static/console.css only.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "form-action 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'")
PUBLIC = ("/console/signin", "/console/static/")
MAX_FORM_BYTES = 64 << 10  # a form's body (a chunked one: the admin app's 1 MiB cap)
# Where sign-in may lead: a console path (no '//', backslash or percent-encoding).
NEXT = re.compile(r"/console/[A-Za-z0-9._~/-]*(?:\?[A-Za-z0-9._~=&-]*)?")


@dataclass(frozen=True)
class Console:
    """What the console's handlers use."""

    services: Services
    sessions: SessionStore
    throttle: Throttle  # wrong tokens, per client address
    templates: jinja2.Environment

    def page(self, request: web.Request, template: str, status: int = 200,
             **context: Any) -> web.Response:
        session = session_of(request)
        return html(self.templates, template, status, csrf=session.csrf if session else "",
                    signed_in=session is not None, path=request.path, **context)


CONSOLE = web.AppKey("console", Console)


def console_of(request: web.Request) -> Console:
    return request.config_dict[CONSOLE]


def cookie_name(request: web.Request) -> str:
    port = request.url.port
    return COOKIE if port is None else f"{COOKIE}_{port}"


def session_of(request: web.Request) -> Session | None:
    """The request's live session, from its cookie (the guard lets only requests with one
    through to pages and actions)."""
    return console_of(request).sessions.get(request.cookies.get(cookie_name(request)))


def _same_origin(request: web.Request) -> bool:
    """A POST must come from this listener's own pages: defence in depth behind the
    SameSite cookie and the CSRF token, and the guard of the sign-in form. Browsers say
    where a request comes from in Sec-Fetch-Site; Origin is "null" under the pages'
    Referrer-Policy: no-referrer, so only another origin named in it is refused."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin", "null")
    return origin in ("null", f"{request.scheme}://{request.host}")


def see_other(location: str) -> web.Response:
    """A 303 to ``location`` (returned, not raised: the API's error layer stays out)."""
    return web.Response(status=303, headers={"Location": location})


def refused(request: web.Request, why: str) -> web.Response:
    log.warning("console_request_refused", path=request.path, reason=why,
                client=request.remote)
    return console_of(request).page(request, "refused.html", 403, why=why)


@web.middleware
async def guard(request: web.Request,
                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                ) -> web.StreamResponse:
    console = console_of(request)
    if request.path == PREFIX:  # the sub-application's own root
        return see_other(f"{PREFIX}/")
    post = request.method == "POST"
    if post and not _same_origin(request):
        return refused(request, "the form was sent from another site")
    if post and (request.content_length or 0) > MAX_FORM_BYTES:
        return console.page(request, "refused.html", 413,
                            why=f"the form is larger than {MAX_FORM_BYTES >> 10} KiB")
    if request.path.startswith(PUBLIC):
        return await handler(request)
    session = session_of(request)
    if session is None:
        if post:
            return refused(request, "you are not signed in, or your session ended")
        return see_other(f"{PREFIX}/signin?next={quote(request.path_qs, safe='/')}")
    if post:
        given = (await request.post()).get("csrf")  # the form is read once, then cached
        if not same_secret(given if isinstance(given, str) else None, session.csrf):
            return refused(request, "the form's security token is missing or out of date")
    try:
        return await handler(request)
    except web.HTTPNotFound:  # no such console page
        return console.page(request, "missing.html", 404, title="Not found",
                            message=f"the console has no page {request.path}",
                            hint="use the links above")


async def security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    h = response.headers
    h["Content-Security-Policy"] = CSP
    h["X-Content-Type-Options"] = "nosniff"
    h["Referrer-Policy"] = "no-referrer"
    h["X-Frame-Options"] = "DENY"
    h.setdefault("Cache-Control", "no-store")


def _next(value: object) -> str:
    """Where to go after sign-in: a console path only (never another site)."""
    if isinstance(value, str) and NEXT.fullmatch(value) and "//" not in value \
            and not {".", ".."} & set(value.split("?")[0].split("/")) \
            and not value.startswith(f"{PREFIX}/signin"):
        return value
    return f"{PREFIX}/"


async def signin_form(request: web.Request) -> web.Response:
    console = console_of(request)
    return console.page(request, "signin.html", next=_next(request.query.get("next")),
                        error="", token_file=str(console.services.cfg.token_path))


async def signin(request: web.Request) -> web.StreamResponse:
    console = console_of(request)
    form = await request.post()
    addr, now = request.remote or "?", console.services.clock()
    wait = console.throttle.retry_after(addr, now)
    target = _next(form.get("next"))
    token = form.get("token")
    if wait or not same_secret(token if isinstance(token, str) else None,
                               console.services.admin_token):
        if not wait:
            console.throttle.failed(addr, now)
        log.warning("console_signin_refused", client=addr, throttled=bool(wait))
        error = (f"too many wrong tokens: try again in {wait:.0f} s" if wait
                 else "wrong token: paste the whole content of the api-token file")
        resp = console.page(request, "signin.html", 429 if wait else 401, next=target,
                            error=error, token_file=str(console.services.cfg.token_path))
        if wait:
            resp.headers["Retry-After"] = str(int(wait))
        return resp
    console.throttle.succeeded(addr)
    session = console.sessions.create()
    log.info("console_signed_in", client=addr)
    resp = see_other(target)
    resp.set_cookie(cookie_name(request), session.id, path="/", httponly=True, samesite="Strict",
                    secure=request.secure)
    return resp


async def signout(request: web.Request) -> web.StreamResponse:
    session = session_of(request)
    if session is not None:
        console_of(request).sessions.end(session.id)
    log.info("console_signed_out", client=request.remote)
    resp = see_other(f"{PREFIX}/signin")
    resp.del_cookie(cookie_name(request), path="/")
    return resp


def make_app(console: Console, routes: list[web.RouteDef]) -> web.Application:
    app = web.Application(middlewares=[guard])
    app[CONSOLE] = console
    app.on_response_prepare.append(security_headers)
    app.router.add_get("/signin", signin_form)
    app.router.add_post("/signin", signin)
    app.router.add_post("/signout", signout)
    app.router.add_static("/static", STATIC, append_version=False)
    app.router.add_routes(routes)
    return app


def mount(parent: web.Application, services: Services, routes: list[web.RouteDef]) -> None:
    """Serve the console under ``/console/`` of ``parent`` (the admin listener)."""
    console = Console(services, SessionStore(services.clock), Throttle(limit=10),
                      environment())
    parent.add_subapp(PREFIX, make_app(console, routes))

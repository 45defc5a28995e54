"""A small declarative REST layer: one ``Route`` describes a handler, its auth, its
request schema and its responses; the same description validates requests and
produces the OpenAPI 3.1 document, so the two cannot drift apart.

Handlers take a ``Call`` (validated body, query and path parameters, and the server's
``Services``) and return ``reply(data, status)``; they raise ``ApiError``, and the domain
code they call raises ``DomainError``s (``configserver/errors.py``), which this layer
alone maps to HTTP statuses (``STATUS``). Either gives a consistent error body::

    {"error": {"code": "policy_not_found", "message": "...", "hint": "..."}}
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web
from jsonschema import Draft202012Validator

from configserver.errors import (
    Conflict,
    DomainError,
    InvalidRequest,
    NotFound,
    Refused,
    TooManyAttempts,
    Unauthenticated,
    Unavailable,
)
from configserver.schema import ERROR_SCHEMA, NAME, array, iso, nullable, obj
from configserver.services import Services
from configserver.tokens import matches

__all__ = ["AUTHS", "ERROR_SCHEMA", "NAME", "STATUS", "ApiError", "Call", "Handler", "Route",
           "RouteTable", "array", "error_response", "iso", "not_found", "nullable", "obj",
           "parse_body", "reply", "status_of"]

log = structlog.get_logger("configserver.api")

# Who may call a route:
#   admin     the operator's bearer token (admin listener, loopback only)
#   internal  process servers' bearer token
#   agent     a protected machine's client certificate (site listener, mutual TLS)
#   none      anyone (health, metrics, the OpenAPI document, enrollment by passphrase)
AUTHS = ("admin", "internal", "agent", "none")
# Strict-Transport-Security on the site listener: one year (what browsers' preload lists ask).
HSTS = "max-age=31536000"
# The HTTP status of each kind of domain error (a subclass answers as its base).
STATUS: tuple[tuple[type[DomainError], int], ...] = (
    (NotFound, 404), (Conflict, 409), (InvalidRequest, 422), (Unauthenticated, 401),
    (Refused, 403), (TooManyAttempts, 429), (Unavailable, 503))


def status_of(e: DomainError) -> int:
    return next((status for cls, status in STATUS if isinstance(e, cls)), 500)


class ApiError(Exception):
    """An HTTP-level refusal raised by a handler (auth, request syntax, ...)."""

    def __init__(self, status: int, code: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.hint = status, code, message, hint


def not_found(what: str, name: str, hint: str = "") -> ApiError:
    return ApiError(404, f"{what.replace(' ', '_')}_not_found", f"no {what} named {name!r}",
                    hint)


def reply(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, default=str))


def error_response(status: int, code: str, message: str, hint: str = "") -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, "hint": hint}},
                             status=status)


# How deeply a request body may nest. Every document of the API is a few levels deep;
# the cap keeps recursive code (the JSON decoder, schema validation, handlers) far from
# Python's recursion limit, whatever a client sends.
MAX_JSON_DEPTH = 32


def json_depth_exceeds(doc: Any, limit: int) -> bool:
    """Whether ``doc`` nests containers more than ``limit`` deep (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Iterable[Any] = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_body(raw: bytes) -> Any:
    """A request body as JSON (empty: None); ``ApiError`` 400 ``bad_json`` for anything else:
    not UTF-8, not JSON, or nested deeper than ``MAX_JSON_DEPTH``."""
    too_deep = ApiError(400, "bad_json", f"the request body nests JSON arrays or objects "
                        f"more than {MAX_JSON_DEPTH} levels deep",
                        "send the document the operation's schema describes (/openapi.json)")
    try:
        body = json.loads(raw or b"null")
    except RecursionError:  # the C decoder recurses once per level
        raise too_deep from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_json", "the request body is not JSON",
                       "send Content-Type: application/json") from None
    if json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise too_deep
    return body


@dataclass
class Call:
    request: web.Request
    services: Services
    body: Any
    query: dict[str, Any]
    params: dict[str, str]
    peer: str | None = None  # a verified agent certificate's machine name


Handler = Callable[[Call], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # OpenAPI style: /api/v1/policies/{name}
    handler: Handler
    summary: str
    tag: str
    auth: str = "admin"
    body: dict[str, Any] | None = None
    query: dict[str, dict[str, Any]] = field(default_factory=dict)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    responses: dict[int, dict[str, Any] | None] = field(default_factory=lambda: {200: None})
    description: str = ""
    listeners: tuple[str, ...] = ("admin",)  # admin (loopback) and/or site (mutual TLS)
    # Rules on the body that the handler checks itself, to answer with its own error code
    # and hint (``unsupported_os``, ``invalid_secret``): JSON schema, documented in the
    # OpenAPI body (``allOf``) but not applied by the generic validation here.
    rules: dict[str, Any] | None = None
    # Rules no schema can state (comparisons between fields, what a key file must hold):
    # answered 422; listed in the operation's description and as ``x-refusals``.
    refusals: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        assert self.auth in AUTHS, self.auth
        for p in self.params:
            assert "{" + p + "}" in self.path, (self.path, p)


def _coerce(value: str, schema: dict[str, Any]) -> Any:
    t = schema.get("type")
    if t == "integer":
        return int(value)
    if t == "number":
        return float(value)
    if t == "boolean":
        if value not in ("true", "false"):
            raise ValueError(value)
        return value == "true"
    return value


class RouteTable:
    """Builds the aiohttp application for one listener and its OpenAPI document."""

    def __init__(self, services: Services, routes: Iterable[Route], listener: str) -> None:
        self.services = services
        self.listener = listener
        self.routes = [r for r in routes if listener in r.listeners]
        self._validators: dict[int, Draft202012Validator] = {}
        self._path_patterns = [
            (r, re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(r.path))))
            for r in self.routes]
        for r in self.routes:
            if r.body is not None:
                Draft202012Validator.check_schema(r.body)
                self._validators[id(r)] = Draft202012Validator(r.body)
            if r.rules is not None:
                Draft202012Validator.check_schema(r.rules)

    def app(self, peer_of: Callable[[web.Request], Awaitable[str | None]] | None = None
            ) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=1 << 20)
        app.on_response_prepare.append(self._security_headers)
        for r in self.routes:
            app.router.add_route(r.method, r.path, self._wrap(r, peer_of))
        if self.listener == "admin":
            app.router.add_get("/openapi.json", self._openapi)
        return app

    async def _security_headers(self, _request: web.Request,
                                response: web.StreamResponse) -> None:
        """Every answer: never cached (tokens, certificates and secrets pass through here),
        never content-sniffed; on the TLS site listener also HSTS, which a browser honours
        only over HTTPS (RFC 6797), so the plain loopback admin listener does not send it."""
        headers = response.headers
        headers.setdefault("Cache-Control", "no-store")
        headers.setdefault("X-Content-Type-Options", "nosniff")
        if self.listener == "site":
            headers.setdefault("Strict-Transport-Security", HSTS)

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            return error_response(e.status, e.code, e.message, e.hint)
        except DomainError as e:
            return error_response(status_of(e), e.code, e.message, e.hint)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            code = (e.reason or "error").lower().replace(" ", "_")
            hint = "see /openapi.json for the routes and methods" if e.status in (404, 405) \
                else ""
            resp = error_response(e.status, code, e.text or e.reason or code, hint)
            if e.status == 405:  # names the methods the path has (RFC 9110 §15.5.6)
                # routes outside the table (/openapi.json, the console): aiohttp's list
                allowed = self.allowed_methods(request.path) or sorted(
                    getattr(e, "allowed_methods", ()))
                resp.headers["Allow"] = ", ".join(allowed)
            return resp
        except Exception as e:
            log.exception("api_internal_error", path=request.path, method=request.method)
            return error_response(500, "internal_error", f"{type(e).__name__}: {e}",
                                  "see the configuration server's log")

    def allowed_methods(self, path: str) -> list[str]:
        """The methods this listener serves for a concrete ``path``: those of the routes
        whose template matches it with path parameters their schemas accept (aiohttp's
        own list would also name ``GET /certificates/{serial}`` for
        ``/certificates/agent``, where that GET can only answer 404)."""
        methods: set[str] = set()
        for r, pattern in self._path_patterns:
            m = pattern.fullmatch(path)
            if m is not None and all(
                    not any(Draft202012Validator(schema).iter_errors(m.group(name)))
                    for name, schema in r.params.items()):
                methods.add(r.method)
        return sorted(methods)

    def _wrap(self, route: Route,
              peer_of: Callable[[web.Request], Awaitable[str | None]] | None) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            peer = await self._authorize(route, request, peer_of)
            params = dict(request.match_info)
            for name, schema in route.params.items():
                errs = list(Draft202012Validator(schema).iter_errors(params.get(name, "")))
                if errs:
                    # /certificates/agent is not a serial: a path served by other methods
                    allowed = self.allowed_methods(request.path)
                    if allowed:
                        raise web.HTTPMethodNotAllowed(request.method, allowed)
                    raise ApiError(404, "not_found", f"no such {name}: {params.get(name)!r}",
                                   f"{name} must match {schema.get('pattern', 'its schema')}")
            query: dict[str, Any] = {}
            for name, schema in route.query.items():
                if name not in request.query:
                    continue
                raw = request.query.getall(name)
                try:
                    if len(raw) != 1:
                        raise ValueError("given more than once")
                    value = _coerce(raw[0], schema)
                except ValueError:
                    raise ApiError(400, "bad_query", f"query parameter {name}={raw!r} is not "
                                   f"a valid {schema.get('type', 'value')}") from None
                errs = list(Draft202012Validator(schema).iter_errors(value))
                if errs:
                    raise ApiError(400, "bad_query", f"query parameter {name}: "
                                   f"{errs[0].message}")
                query[name] = value
            body: Any = None
            if route.body is not None:
                body = parse_body(await request.read())
                errs = sorted(self._validators[id(route)].iter_errors(body),
                              key=lambda e: list(e.path))
                if errs:
                    where = "/".join(str(p) for p in errs[0].path) or "body"
                    raise ApiError(422, "invalid_request", f"{where}: {errs[0].message}",
                                   f"see the {route.method} {route.path} schema in "
                                   "/openapi.json")
            return await route.handler(Call(request, self.services, body, query, params, peer))

        handle.__name__ = route.handler.__name__
        return handle

    async def _authorize(self, route: Route, request: web.Request,
                         peer_of: Callable[[web.Request], Awaitable[str | None]] | None
                         ) -> str | None:
        if route.auth == "none":
            return None
        if route.auth == "agent":
            peer = await peer_of(request) if peer_of is not None else None
            if peer is None:
                raise ApiError(401, "unauthorized", "a valid, unrevoked machine certificate "
                               "is required", "enroll the machine: siterecovery mobility "
                               "enroll")
            return peer
        svc = self.services
        token = svc.admin_token if route.auth == "admin" else svc.internal_token
        if not matches(request.headers.get("Authorization"), token):
            where = svc.cfg.token_path if route.auth == "admin" else svc.cfg.internal_token_path
            raise ApiError(401, "unauthorized", "missing or wrong bearer token",
                           f"send 'Authorization: Bearer <token>' from {where}")
        return None

    async def _openapi(self, _r: web.Request) -> web.Response:
        return web.json_response(self.openapi())

    def openapi(self) -> dict[str, Any]:
        try:
            version = importlib.metadata.version("siterecovery")
        except importlib.metadata.PackageNotFoundError:  # running from a source tree
            version = "0+unknown"

        paths: dict[str, dict[str, Any]] = {}
        for r in self.routes:
            op: dict[str, Any] = {
                "operationId": r.handler.__name__, "summary": r.summary, "tags": [r.tag],
                "responses": {
                    str(code): ({"description": "OK" if code < 300 else "error",
                                 "content": {"application/json": {"schema": schema}}}
                                if schema is not None else {"description": "OK"})
                    for code, schema in r.responses.items()},
            }
            op["responses"]["default"] = {
                "description": "an error",
                "content": {"application/json": {"schema": {"$ref":
                                                            "#/components/schemas/Error"}}}}
            description = r.description
            if r.refusals:
                description += ("\n\n" if description else "") + "Refused with 422 when: " + \
                    "; ".join(r.refusals) + "."
                op["x-refusals"] = list(r.refusals)
            if description:
                op["description"] = description
            if r.auth in ("admin", "internal"):
                op["security"] = [{r.auth + "Token": []}]
            else:
                op["security"] = []
            parameters = [{"name": n, "in": "path", "required": True, "schema": s}
                          for n, s in r.params.items()]
            parameters += [{"name": n, "in": "query", "required": False, "schema": s}
                           for n, s in r.query.items()]
            if parameters:
                op["parameters"] = parameters
            if r.body is not None:
                body = r.body if r.rules is None else {"allOf": [r.body, r.rules]}
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": body}}}
            paths.setdefault(r.path, {})[r.method.lower()] = op
        return {
            "openapi": "3.1.0",
            "info": {"title": "siterecovery configuration server", "version": version,
                     "description": "Admin API (127.0.0.1 only). Errors are "
                                    "{\"error\": {\"code\", \"message\", \"hint\"}}."},
            "paths": paths,
            "components": {
                "schemas": {"Error": ERROR_SCHEMA},
                "securitySchemes": {
                    "adminToken": {"type": "http", "scheme": "bearer",
                                   "description": "the api-token file (0600)"},
                    "internalToken": {"type": "http", "scheme": "bearer",
                                      "description": "the internal-token file, for process "
                                                     "servers"}}},
        }

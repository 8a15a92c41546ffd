"""The HTTP API (`sparkrec serve`): FastAPI routes over the snapshot the loader holds.

Reads never touch a table: a request takes the current snapshot (`state.State`)
and answers from memory, so its latency is the framework's plus a hash lookup.
Every route a client controls is bounded (n, key length, body size, events per
call) and refused with a JSON error naming the field; an unexpected failure is
logged and answered 500 without detail, which the fuzzing tests hold at zero.
Customer keys are pseudonymised exactly as ingest does before any lookup, and
never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparkrec import __version__
from sparkrec.core import pseudonyms
from sparkrec.core.config import Config
from sparkrec.core.errors import ConfigError
from sparkrec.serve import events as events_
from sparkrec.serve import live
from sparkrec.serve import search as search_
from sparkrec.serve.state import State

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ApiError(Exception):
    """A refusal with its status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, where: list[Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.where = status, code, message, where


def load_token(cfg: Config) -> str | None:
    """The bearer token from `serve.token_file`, else the `serve.token_env` variable; None: no auth.

    Raises:
        ConfigError: the file cannot be read or is empty, or no token is set and the host is not loopback.
    """
    s = cfg.serve
    token = None
    if s.token_file:
        path = Path(s.token_file).expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"config key 'serve.token_file': cannot read the token from {path}: {exc.strerror or exc}") from None
        if not token:
            raise ConfigError(f"config key 'serve.token_file': {path} is empty")
    else:
        token = os.environ.get(s.token_env, "").strip() or None
    if token is None and not is_loopback(s.host):
        raise ConfigError(f"serve.host is {s.host!r} but no token is set ({s.token_env} or serve.token_file): "
                          "without a token the server binds 127.0.0.1 only")
    return token


def token_ok(authorization: str, token: str | None) -> bool:
    """Whether an Authorization header carries the bearer token (compared in constant time); True without one."""
    if token is None:
        return True
    scheme, _, value = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Metrics:
    """The server's Prometheus series, in a registry of its own (one per app: tests build many)."""

    def __init__(self, state: State) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("sparkrec_request_seconds", "Request latency by route", ["route", "status"],
                                 registry=self.registry, buckets=LATENCY_BUCKETS)
        self.customers = Gauge("sparkrec_customers_held", "Customers whose published lists are held", registry=self.registry)
        self.items = Gauge("sparkrec_catalogue_items", "Items in the held catalogue", registry=self.registry)
        self.model = Gauge("sparkrec_model_info", "The model served (value 1)", ["model_version", "run_id"],
                           registry=self.registry)
        self.age = Gauge("sparkrec_snapshot_age_seconds", "Seconds since the held lists were loaded", registry=self.registry)
        self.events = Counter("sparkrec_events_accepted", "Events accepted by POST /v1/events", registry=self.registry)
        self.lag = Histogram("sparkrec_event_to_list_seconds", "From an event's arrival at the source (its Kafka "
                             "timestamp or file time) to its customer's list recomputed", registry=self.registry,
                             buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
        self.folded = Gauge("sparkrec_live_events_total", "Events read from the source and folded in", registry=self.registry)
        self.rejected = Gauge("sparkrec_live_events_rejected_total", "Events the row rules refused", ["reason"],
                              registry=self.registry)
        self.live_customers = Gauge("sparkrec_live_customers", "Customers with events since the snapshot's horizon",
                                    registry=self.registry)
        self.state = state
        state.live.observe = self.lag.observe

    def render(self) -> bytes:
        snap = self.state.snapshot
        if snap is not None:
            self.customers.set(snap.customers)
            self.items.set(len(snap.plan.catalogue.item_idx))
            self.model.clear()
            self.model.labels(snap.model_version, snap.run_id).set(1)
            self.age.set(time.monotonic() - snap.loaded_at)
        live = self.state.live
        self.folded.set(live.applied)
        self.live_customers.set(len(live.events))
        for reason, count in list(live.rejected.items()):
            self.rejected.labels(reason).set(count)
        return generate_latest(self.registry)


def fast_json(body: dict[str, Any]) -> Response:
    """A read's answer serialised once by orjson: FastAPI's generic encoder walks every value first, and with the
    standard library's dumps that was a third of a read's cost (bench/RESULTS.md, "The server")."""
    return Response(orjson.dumps(body, option=orjson.OPT_UTC_Z), media_type="application/json")


def error_body(code: str, message: str, where: list[Any] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if where is not None:
        err["where"] = where
    return {"error": err}


class BodyLimit:
    """Refuses a request body over `limit` bytes (413) before the route reads it, declared or streamed."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD"):  # the reads: nothing to count
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")

        def too_big():
            return JSONResponse(error_body("body_too_large", f"the request body is over serve.max_body_bytes="
                                           f"{self.limit} bytes"), status_code=413)

        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big()(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooBig()
            return message

        try:
            return await self.app(scope, limited, send)
        except _TooBig:
            return await too_big()(scope, receive, send)


class _TooBig(Exception):
    pass


class FastReads:
    """A valid, authorised read of a customer's list answered without FastAPI's per-request machinery.

    The declared route stays the API's definition (its schema, its validation, its errors): any request
    this does not accept as it is (a bad or missing parameter, no token, nothing loaded, an unknown
    category) falls through to it. What a valid read costs is then the lookup and the JSON, about half
    of what the framework spent around them (bench/RESULTS.md, "The server").
    """

    PATH = re.compile(r"^/v1/users/([^/]+)/recommendations$")

    def __init__(self, app, answer, route, token: str | None, limits, state: State) -> None:
        self.app, self.answer, self.route, self.token, self.limits, self.state = app, answer, route, token, limits, state

    def accepted(self, scope) -> tuple[str, int | None, str | None] | None:
        m = self.PATH.match(scope["path"])
        if m is None or scope["method"] != "GET" or self.state.snapshot is None:
            return None
        customer = m.group(1)
        if not 1 <= len(customer) <= self.limits.max_key_length:
            return None
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = dict(query)
        if len(given) != len(query) or set(given) - {"n", "category"}:
            return None
        n = given.get("n")
        if n is not None and not (n.isascii() and n.isdigit() and 1 <= int(n) <= self.limits.max_n):
            return None
        category = given.get("category")
        if category is not None and not (1 <= len(category) <= self.limits.max_key_length
                                         and category in self.state.snapshot.category_codes):
            return None
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
        if not token_ok(auth, self.token):
            return None
        return customer, int(n) if n is not None else None, category

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            got = self.accepted(scope)
            if got is not None:
                scope["route"] = self.route  # the metrics label it as the route it stands for
                return await self.answer(*got)(scope, receive, send)
        return await self.app(scope, receive, send)


class Timed:
    """Each request's latency into the route's histogram, as plain ASGI.

    Starlette's `@app.middleware("http")` re-streams every response, so its headers and body leave in two
    writes; with the client's delayed ACK that cost 35-40 ms a request (bench/RESULTS.md, "The server").
    """

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            self.metrics.latency.labels(route.path if route is not None else "unmatched", str(status[0])).observe(
                time.perf_counter() - started)


def create_app(cfg: Config, state: State | None = None, *, start_loader: bool = True, token: str | None = None,
               secret: bytes | None = None) -> FastAPI:
    """The API over `state` (default: a new one, loaded at start and refreshed in the background).

    Args:
        token: the bearer token every /v1 route and /metrics require (None: no auth; `load_token` decides).
        secret: the pseudonym secret when `privacy.pseudonymize_user_ids` is on (read from the config if None).
    """
    if cfg.privacy.pseudonymize_user_ids and secret is None:
        secret = pseudonyms.load_secret(cfg.privacy)
    state = state or State(cfg, secret)
    sink_holder: dict[str, events_.Sink] = {}
    metrics = Metrics(state)
    limits = cfg.serve

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if start_loader:
            state.start()
        yield
        state.stop()
        if "sink" in sink_holder:
            sink_holder["sink"].close()

    app = FastAPI(title="sparkrec", version=__version__, lifespan=lifespan,
                  description="Recommendations, similar items and events over the tables sparkrec publishes.")
    app.state.sparkrec = state

    async def authorised(request: Request) -> None:
        check(request)

    def stored_key(customer: str) -> str:
        key = pseudonyms.lookup_key(customer)
        return pseudonyms.pseudonym(secret, key) if secret is not None else key

    def snapshot():
        snap = state.snapshot
        if snap is None:
            raise ApiError(503, "not_ready", state.problem or "no published lists loaded yet")
        return snap

    def names(snap, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            r["name"] = snap.names.get(r["item_id"])

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(error_body(exc.code, exc.message, exc.where), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": [], "msg": "invalid request"}
        where = [p for p in first.get("loc", []) if p != "body"] or None
        field = ".".join(str(p) for p in first.get("loc", []))
        return JSONResponse(error_body("invalid", f"{field}: {first.get('msg')}", where), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body("http_error", str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception):
        log.exception("serve: %s %s failed", req.method, req.scope.get("route").path if req.scope.get("route") else "?")
        return JSONResponse(error_body("internal", "the server failed to answer; see its log"), status_code=500)


    def key():  # a fresh parameter per route: FastAPI binds a Path() to the route that declares it
        return PathParam(min_length=1, max_length=limits.max_key_length)

    def n_items():
        return Query(default=None, ge=1, le=limits.max_n, description=f"How many items (default recommend.n, at most {limits.max_n}).")

    def check(request: Request) -> None:  # the reads check inline: FastAPI's dependency machinery costs a read 10%
        if not token_ok(request.headers.get("authorization", ""), token):
            raise ApiError(401, "unauthorized", "a valid bearer token is required")

    @app.get("/v1/users/{customer}/recommendations", openapi_extra={"security": [{"bearer": []}]},
             summary="A customer's list; a customer the model never saw gets the cold-start list")
    async def recommendations(request: Request, customer: str = key(), n: int | None = n_items(),
                              category: str | None = Query(default=None, min_length=1, max_length=limits.max_key_length,
                                                           description="Only items of this category (scored for it)")) -> Response:
        check(request)
        return user_list(customer, n, category)

    def user_list(customer: str, n: int | None, category: str | None) -> Response:
        snap = snapshot()
        want = n or snap.plan.n
        key = stored_key(customer)
        as_of = None
        fresh = state.live.get(key)
        if category is not None:
            if category not in snap.category_codes:
                raise ApiError(422, "unknown_category", "no item of the published catalogue is in this category",
                               ["query", "category"])
            rows, as_of, kind = live.category_list(key, state.live.events_of(key), snap, cfg, category, want)
            names(snap, rows)
            return fast_json({"customer": customer, "list": kind, "category": category, "model_version": snap.model_version,
                              "run_id": snap.run_id, "generated_at": snap.generated_at, "as_of": as_of, "items": rows})
        if fresh is not None and fresh[2] == snap.run_id:
            rows, as_of, kind = [dict(r) for r in fresh[0][:want]], fresh[1], "live"
        elif (rows := snap.lists.get(key, want)) is not None:
            kind = "published"
            as_of = snap.newest_event(key)
        else:
            rows, kind = [dict(r) for r in snap.cold[:want]], "cold_start"
        names(snap, rows)
        return fast_json({"customer": customer, "list": kind, "model_version": snap.model_version, "run_id": snap.run_id,
                          "generated_at": snap.generated_at, "as_of": as_of, "items": rows})

    @app.get("/v1/items/{item}/similar", openapi_extra={"security": [{"bearer": []}]},
             summary="Items most like this one (cosine over the model's item factors)")
    async def similar(request: Request, item: str = key(), n: int | None = n_items()) -> Response:
        check(request)
        snap = snapshot()
        want = n or snap.plan.n
        rows = snap.similar.get(item.strip(), want)
        if rows is None:
            if item.strip() not in snap.names:
                raise ApiError(404, "unknown_item", "the item is not in the published catalogue", ["path", "item"])
            rows = []
        names_rows = [{"item_id": r["similar_item_id"], "rank": r["rank"], "score": r["score"]} for r in rows]
        names(snap, names_rows)
        return fast_json({"item": item, "model_version": snap.model_version, "run_id": snap.run_id, "items": names_rows})

    def searchable(request: Request, q: str):
        """The snapshot a search or a suggestion reads, once the token, the index and the query's words are checked."""
        check(request)
        snap = snapshot()
        if snap.searchable is None:
            raise ApiError(503, "search_unavailable", snap.search_problem or "no search index loaded")
        if not q.strip():
            raise ApiError(422, "invalid", "q: the query has no words", ["query", "q"])
        return snap

    def searcher(snap, customer: str | None) -> tuple[dict[str, Any] | None, Any]:
        """The searching customer's row with their live events folded in, and their newest event (Nones: anyone)."""
        if customer is None:
            return None, None
        key = stored_key(customer)
        return live.row_for(key, state.live.events_of(key), snap, cfg)

    @app.get("/v1/search", openapi_extra={"security": [{"bearer": []}]},
             summary="Catalogue items matching the words of q, ordered for the customer (their live model score)")
    async def search(request: Request,
                     q: str = Query(min_length=1, max_length=cfg.search.max_query_length,
                                    description="Words to find (searched as plain words: no query syntax)"),
                     customer: str | None = Query(default=None, min_length=1, max_length=limits.max_key_length,
                                                  description="Order the results for this customer (default: for anyone)"),
                     n: int | None = n_items(),
                     category: str | None = Query(default=None, min_length=1, max_length=limits.max_key_length,
                                                  description="Only items of this category")) -> Response:
        snap = searchable(request, q)
        if category is not None and category not in snap.category_codes:
            raise ApiError(422, "unknown_category", "no item of the published catalogue is in this category",
                           ["query", "category"])
        row, as_of = searcher(snap, customer)
        items, personal = search_.answer(snap, cfg, q, n or snap.plan.n, category, row)
        return fast_json({"query": q, "customer": customer, "category": category, "personalized": personal,
                          "as_of": as_of, "model_version": snap.model_version, "run_id": snap.run_id, "items": items})

    @app.get("/v1/suggest", openapi_extra={"security": [{"bearer": []}]},
             summary="While q is typed: queries completing its last word, and the best items, ordered for the customer")
    async def suggest(request: Request,
                      q: str = Query(min_length=1, max_length=cfg.search.max_query_length,
                                     description="What has been typed so far (its last word is taken as unfinished)"),
                      customer: str | None = Query(default=None, min_length=1, max_length=limits.max_key_length,
                                                   description="Order the suggestions for this customer (default: for anyone)"),
                      n: int = Query(default=5, ge=1, le=min(20, limits.max_n),
                                     description=f"How many completions and how many items (default 5, at most {min(20, limits.max_n)})")
                      ) -> Response:
        snap = searchable(request, q)
        row, as_of = searcher(snap, customer)
        words, items, personal = search_.suggest(snap, cfg, q, n, row)
        return fast_json({"query": q, "customer": customer, "personalized": personal, "as_of": as_of,
                          "completions": words, "items": items, "model_version": snap.model_version,
                          "run_id": snap.run_id})

    @app.post("/v1/events", status_code=202, dependencies=[Depends(authorised)],
              summary="One event or a list, in the stream's message shape; sent on to the stream's source")
    async def post_events(body: dict[str, Any] | list[Any] = Body(
            description="One event, or a list of them: objects with the input's column names (source.columns)",
            examples=[{"user_id": "12345", "item_id": "85123A", "event_type": "purchase", "timestamp": "2026-12-06T10:00:00Z"}],
    )) -> dict[str, Any]:
        batch = body if isinstance(body, list) else [body]
        if not batch:
            raise ApiError(422, "invalid", "no events in the body")
        if len(batch) > limits.max_events_per_call:
            raise ApiError(413, "too_many_events", f"{len(batch)} events; at most serve.max_events_per_call="
                           f"{limits.max_events_per_call} per call")
        try:
            accepted = events_.check(batch, cfg)
        except events_.EventError as exc:
            raise ApiError(422, "invalid_event", exc.message, ["body", *exc.where]) from None
        sink = sink_holder.get("sink")
        if sink is None:
            sink = sink_holder.setdefault("sink", events_.Sink(cfg))
        try:
            sink.send(accepted)
        except (OSError, RuntimeError) as exc:
            log.error("serve: events not delivered to %s: %s", sink.target, exc)
            raise ApiError(503, "events_not_delivered", f"the events could not be handed on to {sink.target}; "
                           "nothing was accepted, send them again") from None
        metrics.events.inc(len(accepted))
        return {"accepted": len(accepted)}

    page = (Path(__file__).with_name("shop.html").read_text(encoding="utf-8")
            .replace("/*SPARKREC_SHAPE*/null", json.dumps(events_.shape(cfg)).replace("</", "<\\/")))

    @app.get("/", include_in_schema=False)
    async def shop_page() -> HTMLResponse:
        """A small shop over the API: a customer's list, search, and view/buy buttons that post events."""
        return HTMLResponse(page)

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", summary="Lists are loaded (or why not)")
    async def readyz() -> JSONResponse:
        snap = state.snapshot
        feed = state.feed
        degraded = feed is not None and not feed.connected
        body: dict[str, Any] = {"ready": snap is not None,
                                "status": "not_ready" if snap is None else "degraded" if degraded else "ok"}
        if snap is not None:
            body.update(run_id=snap.run_id, model_version=snap.model_version, customers=snap.customers,
                        versions=snap.versions, load_seconds=round(snap.load_seconds, 3),
                        live_customers=len(state.live.events), events_folded=state.live.applied,
                        search="ok" if snap.searchable is not None else f"unavailable: {snap.search_problem}")
        problems = [p for p in (state.problem, getattr(feed, "problem", None) if degraded else None) if p]
        if problems:
            body["problem"] = "; ".join(problems)
        # Degraded still answers 200: the lists held are served; only the newest events wait for the source.
        return JSONResponse(body, status_code=200 if snap is not None else 503)

    @app.get("/metrics", dependencies=[Depends(authorised)], summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    route = next(r for r in app.routes if getattr(r, "path", None) == "/v1/users/{customer}/recommendations")
    app.add_middleware(FastReads, answer=user_list, route=route, token=token, limits=limits, state=state)
    app.add_middleware(Timed, metrics=metrics)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)  # added last: outermost, before any route reads
    return app

"""What an operations team needs from ``serve``: liveness, readiness, Prometheus metrics, request ids.

    GET /healthz        the process answers (liveness: restart it when this fails)
    GET /readyz         FHIR servers, PACS and (with the Celery engine) the broker reachable: 200, or 503 naming
                        each one that is not (readiness: send it no traffic meanwhile)
    GET /metrics        Prometheus text format
    GET /openapi.json   the HTTP surface as OpenAPI 3 (:mod:`service.openapi`)

:class:`RequestMetrics` wraps the whole WSGI application: it gives each request an id (``X-Request-ID``, see
:mod:`service.logs`), counts requests by route template and status, and times CDS hook calls. It is on the hook
path, so it does only what is cheap there: a context variable, a clock read, one counter and one histogram
update; label values are route templates and known service ids, never a raw path. Job counts and the queue depth
are read only when Prometheus scrapes (:class:`JobsCollector`).
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cds.services import SERVICES
from pipeline.celery_engine import EngineSettings, broker_problem, queue_depth
from pipeline.jobs import JobState, LeasedJobStore
from service.logs import current_request_id

ROUTE_KEY = "imaging_cds.route"
HOOK_KEY = "imaging_cds.hook"
EXTENSION_KEY = "imaging_cds.operations"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
READY_CACHE_S = 2.0
CHECK_TIMEOUT_S = 2.0

HTTP_REQUESTS = Counter(
    "imaging_cds_http_requests_total", "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)  # fmt: skip
HOOK_SECONDS = Histogram(
    "imaging_cds_cds_hook_seconds",
    "Seconds to answer a CDS hook call (authentication, prefetch, cards), by CDS service id.",
    ["service"],
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)
HOOK_ROUTE = "/cds-services/<service_id>"


class RequestMetrics:
    """WSGI middleware: request id, request counts by route, CDS hook latency (see the module docstring)."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        offered = environ.get("HTTP_X_REQUEST_ID", "")
        request_id = offered if _REQUEST_ID.match(offered) else uuid.uuid4().hex
        token = current_request_id.set(request_id)
        started = time.perf_counter()
        status_seen = ["500"]

        def recording_start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status_seen[0] = status[:3]
            headers.append(("X-Request-ID", request_id))
            return start_response(status, headers, exc_info)

        try:
            return self.app(environ, recording_start_response)
        finally:
            current_request_id.reset(token)
            route = environ.get(ROUTE_KEY, "unmatched")
            HTTP_REQUESTS.labels(route, environ.get("REQUEST_METHOD", "?"), status_seen[0]).inc()
            hook = environ.get(HOOK_KEY)
            if hook is not None:
                HOOK_SECONDS.labels(hook).observe(time.perf_counter() - started)


def label_routes(app: Flask) -> None:
    """Have ``app`` note each request's route template (and CDS service id) for :class:`RequestMetrics`."""

    @app.before_request
    def note_route() -> None:
        rule = request.url_rule
        if rule is None:
            return
        route = f"{request.script_root}{rule.rule}"
        request.environ[ROUTE_KEY] = route
        if route == HOOK_ROUTE and request.method == "POST":
            service_id = (request.view_args or {}).get("service_id")
            if service_id in SERVICES:
                request.environ[HOOK_KEY] = service_id


class JobsCollector(Collector):
    """Jobs by state (from the job stores) and the broker's queue depth, read when Prometheus scrapes."""

    def __init__(self, stores: Callable[[], Sequence[LeasedJobStore]], engine: EngineSettings | None) -> None:
        self._stores = stores
        self._engine = engine

    def collect(self) -> Iterable[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("imaging_cds_jobs", "Jobs in the job store(s), by state.", labels=["state"])
        totals = dict.fromkeys(JobState, 0)
        for store in self._stores():
            for state, count in store.counts().items():
                totals[state] += count
        for state, count in totals.items():
            jobs.add_metric([state.value], count)
        yield jobs
        if self._engine is not None:
            up = GaugeMetricFamily("imaging_cds_broker_up", "1 when the job broker answered this scrape.")
            try:
                depth = queue_depth(self._engine)
            except Exception:  # the broker is away: say so rather than fail the scrape
                up.add_metric([], 0)
            else:
                up.add_metric([], 1)
                queued = GaugeMetricFamily(
                    "imaging_cds_queue_depth", "Analysis messages waiting in the broker for a worker."
                )
                queued.add_metric([], depth)
                yield queued
            yield up


@dataclass
class Dependencies:
    """The servers ``serve`` needs, probed by ``/readyz``: FHIR bases, DICOMweb bases, the broker."""

    fhir_bases: tuple[str, ...]
    dicomweb_bases: tuple[str, ...]
    engine: EngineSettings | None
    _cached: tuple[float, dict[str, str]] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def problems(self) -> dict[str, str]:
        """What each dependency answered: ``"ok"`` or why it is not usable; cached for a moment, so a probe storm
        does not become a storm on the EHR."""
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < READY_CACHE_S:
                return self._cached[1]
        checks: dict[str, tuple[Callable[..., str | None], tuple[Any, ...]]] = {}
        for base in self.fhir_bases:
            checks[f"fhir {base}"] = (_http_problem, (f"{base.rstrip('/')}/metadata", "FHIR server"))
        for base in self.dicomweb_bases:
            checks[f"pacs {base}"] = (_http_problem, (f"{base.rstrip('/')}/studies?limit=1", "PACS"))
        if self.engine is not None:
            checks["broker"] = (broker_problem, (self.engine,))
        with ThreadPoolExecutor(max_workers=max(1, len(checks))) as pool:
            futures = {name: pool.submit(check, *args) for name, (check, args) in checks.items()}
            results = {name: future.result() or "ok" for name, future in futures.items()}
        with self._lock:
            self._cached = (time.monotonic(), results)
        return results


def _http_problem(url: str, what: str) -> str | None:
    """``None`` when ``url`` answers below 500 (a 401 still means the server is there), else why not."""
    try:
        response = requests.get(url, timeout=CHECK_TIMEOUT_S, allow_redirects=False)
    except requests.RequestException as exc:
        return f"{what} did not answer ({type(exc).__name__})"
    if response.status_code >= 500:
        return f"{what} answered HTTP {response.status_code}"
    return None


@dataclass
class Operations:
    """What the operations endpoints read: the dependencies to probe, the metrics, the OpenAPI document."""

    dependencies: Dependencies
    registry: CollectorRegistry
    openapi: dict[str, Any]


def operations_blueprint() -> Blueprint:
    bp = Blueprint("operations", __name__)

    def ops() -> Operations:
        found: Operations = current_app.extensions[EXTENSION_KEY]
        return found

    @bp.get("/healthz")
    def healthz() -> Any:
        return jsonify({"status": "alive"})

    @bp.get("/readyz")
    def readyz() -> Any:
        checks = ops().dependencies.problems()
        ready = all(result == "ok" for result in checks.values())
        not_ready = sorted(name for name, result in checks.items() if result != "ok")
        body: dict[str, Any] = {"status": "ready" if ready else "not ready", "checks": checks}
        if not ready:
            body["notReady"] = not_ready
        return jsonify(body), 200 if ready else 503

    @bp.get("/metrics")
    def metrics() -> Any:
        payload = generate_latest(REGISTRY) + generate_latest(ops().registry)
        return Response(payload, mimetype="text/plain; version=0.0.4; charset=utf-8")

    @bp.get("/openapi.json")
    def openapi() -> Any:
        return jsonify(ops().openapi)

    return bp


def install_operations(
    app: Flask,
    *,
    dependencies: Dependencies,
    stores: Callable[[], Sequence[LeasedJobStore]],
    openapi: dict[str, Any],
) -> None:
    """Serve the operations endpoints from ``app`` (the root application of ``serve``)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(JobsCollector(stores, dependencies.engine))
    app.extensions[EXTENSION_KEY] = Operations(dependencies=dependencies, registry=registry, openapi=openapi)
    app.register_blueprint(operations_blueprint())

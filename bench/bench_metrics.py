"""Benchmark: what ``serve``'s request metrics cost on each request (the CDS hook path among them), in one run.

The same trivial Flask JSON endpoint is called in-process through its WSGI interface, bare and wrapped as ``serve``
wraps every application (:class:`service.observability.RequestMetrics` with :func:`label_routes`: request id,
route template, counter, hook-latency histogram), in alternating rounds. Prints the median time per request of
each and the added microseconds, to set against a hook's own time (``bench/bench_cds.py``: milliseconds).

Run: .venv/bin/python bench/bench_metrics.py [--requests 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from flask import Flask, jsonify
from werkzeug.test import EnvironBuilder

from service.observability import RequestMetrics, label_routes


def _app(wrapped: bool) -> Any:
    app = Flask(__name__)

    @app.post("/cds-services/<service_id>")
    def hook(service_id: str) -> Any:
        return jsonify({"cards": []})

    if not wrapped:
        return app.wsgi_app
    label_routes(app)
    return RequestMetrics(app.wsgi_app)


def _per_request_us(application: Any, count: int) -> float:
    environ = EnvironBuilder(path="/cds-services/imaging-ai-patient-view", method="POST", json={}).get_environ()

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        return None

    start = time.perf_counter()
    for _ in range(count):
        body = application(dict(environ), start_response)
        for _chunk in body:
            pass
        getattr(body, "close", lambda: None)()
    return (time.perf_counter() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    bare, wrapped = _app(False), _app(True)
    _per_request_us(bare, 2000), _per_request_us(wrapped, 2000)  # warm-up
    times: dict[str, list[float]] = {"bare": [], "with metrics": []}
    for _ in range(args.rounds):
        times["bare"].append(_per_request_us(bare, args.requests))
        times["with metrics"].append(_per_request_us(wrapped, args.requests))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:<14} {value:7.1f} us per request (median of {args.rounds} rounds of {args.requests})")
    added = medians["with metrics"] - medians["bare"]
    print(f"added by the metrics: {added:.1f} us per request ({medians['with metrics'] / medians['bare']:.2f}x)")


if __name__ == "__main__":
    main()

"""Benchmark: the same N analyses of the shared chest CT through the embedded runner and through Celery with one
and with two worker processes, in one run, against the same local FHIR server, Orthanc and Redis.

Each engine analyses its own N copies of the chest CT (distinct studies, so each analysis writes a new report, as
in production), submitted at once, after one warm-up job (analyzer loaded). Prints, per engine:

* wall time for the N jobs and throughput (jobs per minute);
* run time per job (claim to outcome recorded) and wait (submit to start): p50 and p99;
* the engine's overhead: Celery with one worker against the embedded runner with one thread, for the same N
  jobs (goal <= 1.1x); and the throughput of two workers against one (on a 2-core machine the ceiling is near 2x);
* the pickup latency of an idle worker (submit to start of one job at a time), p50 and p99.

``ct-emphysema`` is numpy/scipy work (no network weights), single-threaded in each engine, so one analysis per
process gets the same CPU on every engine.

Run: .venv/bin/python bench/bench_jobs.py [--jobs 8] [--pickups 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import requests

from core.allowlist import AllowList
from devtools.demo import SAMPLE_CHEST_CT, LoadedStudy, load_sample_study
from devtools.servers import fhir_server, orthanc_server, redis_server
from devtools.workers import worker_node, write_settings
from fhir_adapters.client import FhirClient
from pipeline.handler import ANALYZE_STUDY, StudyAnalysisHandler, analysis_params
from pipeline.jobs import EmbeddedJobRunner, JobRecord, JobRunner, JobState, SqliteJobStore
from service.settings import load_settings
from service.web import celery_runner

ANALYZER = "ct-emphysema"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_batch(runner: JobRunner, studies: list[LoadedStudy]) -> tuple[float, list[JobRecord]]:
    """Submit one job per study at once; wall seconds until the last is done, and the records."""
    start = time.perf_counter()
    ids = [runner.submit(ANALYZE_STUDY, analysis_params(s.imaging_study, [ANALYZER])).id for s in studies]
    records = [runner.wait(job_id, timeout=900) for job_id in ids]
    wall = time.perf_counter() - start
    failed = [r for r in records if r.state is not JobState.DONE]
    assert not failed, [r.error for r in failed]
    return wall, records


def describe(name: str, wall: float, records: list[JobRecord]) -> dict[str, float]:
    waits = [(r.started_at - r.created_at).total_seconds() for r in records if r.started_at]
    runs = [(r.finished_at - r.started_at).total_seconds() for r in records if r.started_at and r.finished_at]
    figures = {
        "wall": wall,
        "per_minute": 60 * len(records) / wall,
        "run_p50": statistics.median(runs),
        "wait_p50": statistics.median(waits),
        "wait_p99": _percentile(waits, 99),
    }
    print(
        f"{name:<22} {len(records)} jobs in {wall:6.2f} s  {figures['per_minute']:6.1f} jobs/min  "
        f"run p50 {figures['run_p50']:.2f} s  wait p50 {figures['wait_p50']:.2f} s  p99 {figures['wait_p99']:.2f} s"
    )
    return figures


def pickups(runner: JobRunner, studies: list[LoadedStudy]) -> list[float]:
    """Submit to start of one job at a time on an idle engine."""
    waits = []
    for study in studies:
        record = runner.wait(runner.submit(ANALYZE_STUDY, analysis_params(study.imaging_study, [ANALYZER])).id, 300)
        assert record.state is JobState.DONE and record.started_at is not None, record.error
        waits.append((record.started_at - record.created_at).total_seconds())
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8, help="analyses per engine (default 8)")
    parser.add_argument("--pickups", type=int, default=10, help="single jobs for the idle pickup latency")
    args = parser.parse_args()
    with ExitStack() as stack:
        fhir = stack.enter_context(fhir_server())
        orthanc = stack.enter_context(orthanc_server())
        redis = stack.enter_context(redis_server())
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-jobs-")))
        client = FhirClient(fhir.base_url, session=requests.Session())
        needed = 3 * (args.jobs + 1) + 2 * args.pickups
        print(f"loading {needed} copies of the chest CT ({SAMPLE_CHEST_CT.name}) as distinct studies...")
        copies = [load_sample_study(client, orthanc, SAMPLE_CHEST_CT, copy=8000 + n) for n in range(needed)]

        def take(count: int) -> list[LoadedStudy]:
            taken = copies[:count]
            del copies[:count]
            return taken

        handler = StudyAnalysisHandler(
            client_for=lambda params: client, dicomweb_allow_list=AllowList.of([orthanc.dicomweb_url])
        )
        store = SqliteJobStore(root / "embedded.sqlite")
        with EmbeddedJobRunner(store, {ANALYZE_STUDY: handler}, max_workers=1) as embedded:
            run_batch(embedded, take(1))  # warm-up: the analyzer is loaded
            embedded_figures = describe("embedded, 1 thread", *run_batch(embedded, take(args.jobs)))

        settings = write_settings(
            root, broker_url=redis.url, fhir_base=fhir.base_url, dicomweb=orthanc.dicomweb_url, log_format="text"
        )
        runner = celery_runner(load_settings(settings))
        with worker_node(settings, "bench-1", concurrency=1) as _:
            run_batch(runner, take(1))
            one = describe("celery, 1 worker", *run_batch(runner, take(args.jobs)))
            idle = pickups(runner, take(args.pickups))
            with worker_node(settings, "bench-2", concurrency=1) as _:
                run_batch(runner, take(2))  # warm-up: both workers have loaded the analyzer
                two = describe("celery, 2 workers", *run_batch(runner, take(args.jobs)))
        print()
        print(f"engine overhead, 1 worker / embedded (wall, same N): {one['wall'] / embedded_figures['wall']:.2f}x")
        print(f"throughput, 2 workers / 1 worker:                     {two['per_minute'] / one['per_minute']:.2f}x")
        print(
            f"idle pickup (submit -> start, one job at a time, n={len(idle)}): "
            f"p50 {statistics.median(idle) * 1000:.0f} ms, p99 {_percentile(idle, 99) * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()

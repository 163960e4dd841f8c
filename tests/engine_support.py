"""Test support for the job engine: real ``imaging-cds worker`` processes (Celery, prefork) on a real Redis.

A worker node is started exactly as an administrator starts one (``python -m imaging_cds.cli worker --config``);
the helpers find its child processes and kill them by process id, as the OOM killer or an operator would, and
count what the EHR holds by searching it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devtools.workers import write_settings as write_deployment_settings
from fhir_adapters.client import FhirClient
from pipeline.jobs import JobRecord, JobState, SqliteJobStore

FAST_ENGINE = {
    # Short leases and sweeps so that a lost worker is noticed in seconds, not the production half-minute.
    "lease_s": 1.5,
    "sweep_interval_s": 0.5,
    "requeue_after_s": 2.0,
    "retry_backoff_s": 0.5,
    "max_attempts": 4,
    "soft_time_limit_s": 120,
    "hard_time_limit_s": 150,
}


def write_settings(root: Path, *, jobs: dict[str, Any] | None = None, **kwargs: Any) -> Path:
    """Deployment settings for a test engine: fast leases and sweeps (see ``FAST_ENGINE``)."""
    return write_deployment_settings(root, jobs={**FAST_ENGINE, **(jobs or {})}, **kwargs)


def pid_of(record: JobRecord) -> int | None:
    """The process id of the worker child that holds a job (``host:pid:attempt``)."""
    if record.worker is None:
        return None
    return int(record.worker.split(":")[1])


def wait_for(
    store: SqliteJobStore, job_ids: list[str], timeout: float, *, during: Callable[[], None] | None = None
) -> list[JobRecord]:
    """Poll the shared store until every job has finished (calling ``during`` on each round); their records."""
    deadline = time.monotonic() + timeout
    while True:
        records = [store.get(job_id) for job_id in job_ids]
        assert all(r is not None for r in records)
        if all(r.state.finished for r in records if r is not None):
            return [r for r in records if r is not None]
        if time.monotonic() > deadline:
            states = {r.id: (r.state.value, r.attempts, r.step) for r in records if r is not None}
            raise AssertionError(f"jobs not finished after {timeout} s: {states}")
        if during is not None:
            during()
        time.sleep(0.02)


def running_with_step(store: SqliteJobStore, job_ids: list[str], step_prefix: str) -> list[JobRecord]:
    records = [store.get(job_id) for job_id in job_ids]
    return [r for r in records if r is not None and r.state is JobState.RUNNING and r.step.startswith(step_prefix)]


def written_for(client: FhirClient, patient: str) -> dict[str, int]:
    """How many of each resource an analysis writes the EHR holds for ``patient``: a duplicate shows as a count
    above one analysis' worth."""
    return {
        kind: len(list(client.search(kind, [("subject", patient)])))
        for kind in ("DiagnosticReport", "Observation", "Media")
    }

"""The job layer's Prometheus metrics, counted where the work happens (the web process with the embedded
runner, each worker process with the Celery engine; a worker serves its own ``/metrics``, see
``imaging-cds worker --metrics-port``).

Labels are bounded sets (analyzer names, job kinds, states, claim outcomes): never an id, a study or a URL.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ANALYSIS_SECONDS = Histogram(
    "imaging_cds_analysis_seconds",
    "Wall-clock seconds of one analysis filed in the EHR (read study, fetch images, analyse, write), by analyzer.",
    ["analyzer"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200),
)
JOBS_FINISHED = Counter(
    "imaging_cds_jobs_finished_total", "Jobs that ended, by kind and final state (done or failed).", ["kind", "state"]
)
JOB_ATTEMPTS = Counter(
    "imaging_cds_job_deliveries_total",
    "Job messages a worker received, by what it did: claimed (ran it), held (another worker runs it), finished "
    "(already over), missing, gave-up (failed after its last lost attempt), retry-scheduled.",
    ["outcome"],
)

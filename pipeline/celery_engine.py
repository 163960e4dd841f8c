"""Analyses on Celery workers with a Redis broker: the distributed :class:`~pipeline.jobs.JobRunner`.

Three roles, each in its own process:

* :class:`CeleryJobRunner`, in the web process: ``submit`` writes the job record, then publishes the job id to
  the broker. It never runs a handler, so a huge or hostile study cannot stall a CDS hook or a page.
* :class:`JobWorker`, in each worker child process (``imaging-cds worker``): takes the job (a *claim*), renews its
  lease while the handler runs, and records the outcome.
* :class:`Sweeper`, in each worker's main process: publishes again what the broker may have lost.

The job store (:class:`~pipeline.jobs.LeasedJobStore`: the SQLite file every process of a deployment opens) is
the truth about a job; a broker message only says "job <id> may be run now". That is what makes the engine
*effectively once*:

* Late acknowledgement (``task_acks_late`` with ``task_reject_on_worker_lost``): a message is acknowledged only
  when its task returns, so a worker killed mid-analysis leaves the message to be delivered again.
* A delivery runs the handler only if its claim succeeds. A claim counts the attempt and starts a lease that the
  worker renews every ``lease_s / 3``; while the lease is live every other delivery of the job is dropped, so a
  job never runs twice at once. When the worker dies, its lease lapses and the sweeper publishes the job again.
* What a handler writes to the EHR is idempotent (conditional creates on deterministic identifiers, a
  deterministic Provenance id; see :mod:`fhir_adapters.builders`), so an attempt that wrote its report and died
  before recording it is followed by one that finds the report there: the EHR ends with exactly one report.
* After ``max_attempts`` attempts a job is ``failed`` with the error that stopped it (or ``WorkerLost`` when every
  attempt's worker died): never retried forever. Only transient errors are retried (a FHIR server or PACS that
  answered 5xx, timed out or could not be reached), after ``retry_backoff_s``, doubling.

Limits: ``soft_time_limit_s`` raises inside the analysis (the job fails, saying so); ``hard_time_limit_s`` kills
the child process if that did not stop it; a child whose memory passed ``max_memory_per_child_mb`` after a task is
replaced by a fresh one. The broker's visibility timeout is set above the hard limit, so a running task is never
handed to a second worker while its first is alive.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery, Task, bootsteps
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from core.errors import ConfigurationError, ImagingCdsError, PacsError
from core.options import look_up_option
from pipeline.jobs import (
    ClaimOutcome,
    JobHandler,
    JobRecord,
    LeasedJobStore,
    ProgressReporter,
    check_params,
    error_summary,
    internal_error_summary,
    log_unexpected_failure,
    plain_result,
    running_job,
    stored_job,
)
from pipeline.telemetry import JOB_ATTEMPTS, JOBS_FINISHED

log = logging.getLogger(__name__)

RUN_JOB_TASK = "imaging_cds.run_job"
_WAIT_POLL_S = 0.2


@dataclass(frozen=True)
class EngineSettings:
    """How the Celery engine runs analyses; every limit has a default that is safe for a chest CT on one core.

    * ``broker_url``: the Redis broker, ``redis://host:port/db`` (``rediss://`` for TLS).
    * ``queue``: the queue the web process publishes to and the workers consume.
    * ``concurrency``: analyses one worker runs at once (child processes).
    * ``soft_time_limit_s`` / ``hard_time_limit_s``: an analysis is stopped (and its job failed) after the soft
      limit; its process is killed after the hard one, should the soft stop not work (a stuck native call).
    * ``max_memory_per_child_mb``: a worker child that has grown beyond this after an analysis is replaced.
    * ``max_attempts``: attempts per job in all (a worker lost, or a transient failure), then ``failed``.
    * ``retry_backoff_s``: wait before the second attempt after a transient failure; doubles with each attempt.
    * ``lease_s``: how long a running job is held without a heartbeat before another worker may take it over.
    * ``sweep_interval_s`` / ``requeue_after_s``: how often each worker looks for jobs whose message the broker
      may have lost, and how long a queued job waits before it is published again while the queue is empty.
    * ``publish_timeout_s``: how long submitting waits for the broker before leaving the job to the sweeper.
    """

    broker_url: str
    queue: str = "imaging-cds-analyses"
    concurrency: int = 1
    soft_time_limit_s: float = 900.0
    hard_time_limit_s: float = 960.0
    max_memory_per_child_mb: int = 4096
    max_attempts: int = 3
    retry_backoff_s: float = 30.0
    lease_s: float = 30.0
    sweep_interval_s: float = 10.0
    requeue_after_s: float = 300.0
    publish_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.broker_url.startswith(("redis://", "rediss://")):
            raise ConfigurationError(
                f"jobs.broker_url must be a Redis URL (redis://host:port/db), not {self.broker_url.split('@')[-1]!r}.",
                remedy="Point jobs.broker_url at the Redis server the workers use.",
            )
        positive = {
            "concurrency": self.concurrency,
            "soft_time_limit_s": self.soft_time_limit_s,
            "max_memory_per_child_mb": self.max_memory_per_child_mb,
            "max_attempts": self.max_attempts,
            "lease_s": self.lease_s,
            "sweep_interval_s": self.sweep_interval_s,
            "requeue_after_s": self.requeue_after_s,
            "publish_timeout_s": self.publish_timeout_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ConfigurationError(f"jobs.{name} must be greater than 0, not {value!r}.")
        if self.retry_backoff_s < 0:
            raise ConfigurationError(f"jobs.retry_backoff_s must not be negative, not {self.retry_backoff_s!r}.")
        if self.hard_time_limit_s <= self.soft_time_limit_s:
            raise ConfigurationError(
                "jobs.hard_time_limit_s must be greater than jobs.soft_time_limit_s.",
                remedy="The hard limit kills what the soft limit could not stop; give it a minute more.",
            )

    @property
    def heartbeat_s(self) -> float:
        """How often a running job's lease is renewed: three chances before it lapses."""
        return self.lease_s / 3

    @property
    def visibility_timeout_s(self) -> float:
        """How long Redis keeps an unacknowledged message to itself: beyond the hard limit, so a task still
        running is never handed to a second worker; a worker that died is noticed sooner, by its lease."""
        return self.hard_time_limit_s + self.lease_s + 60.0


def make_celery_app(settings: EngineSettings) -> Celery:
    """The Celery application for ``settings`` (no task registered: see :func:`register_worker`)."""
    app = Celery("imaging_cds", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # the job store holds outcomes; no result backend
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_soft_time_limit=settings.soft_time_limit_s,
        task_time_limit=settings.hard_time_limit_s,
        worker_prefetch_multiplier=1,  # analyses are long: a worker holds only what it runs
        worker_max_memory_per_child=settings.max_memory_per_child_mb * 1024,  # KiB
        worker_proc_alive_timeout=120.0,  # a child imports the analysis stack before it takes work
        worker_hijack_root_logger=False,  # the deployment's logging settings apply (JSON or text)
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_connection_timeout=settings.publish_timeout_s,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_timeout": max(5.0, settings.publish_timeout_s),
            "socket_connect_timeout": settings.publish_timeout_s,
        },
        task_publish_retry=False,  # a job not published now is published by a sweeper; never stall the caller
    )
    return app


def publish(app: Celery, settings: EngineSettings, job_id: str, *, countdown: float | None = None) -> None:
    """Hand "run job ``job_id``" to the broker (``countdown``: not before that many seconds)."""
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=settings.queue, countdown=countdown, task_id=None)


def _redis(settings: EngineSettings) -> Any:
    import redis

    return redis.Redis.from_url(
        settings.broker_url,
        socket_timeout=settings.publish_timeout_s,
        socket_connect_timeout=settings.publish_timeout_s,
    )


# kombu's Redis transport keeps a queue as one list per priority step; messages without a priority go to the first.
_PRIORITY_STEPS = (0, 3, 6, 9)
_PRIORITY_SEPARATOR = "\x06\x16"


def queue_depth(settings: EngineSettings, client: Any | None = None) -> int:
    """Messages waiting in the broker for a worker (not those a worker holds)."""
    redis_client = client or _redis(settings)
    keys = [settings.queue, *(f"{settings.queue}{_PRIORITY_SEPARATOR}{p}" for p in _PRIORITY_STEPS[1:])]
    pipe = redis_client.pipeline(transaction=False)
    for key in keys:
        pipe.llen(key)
    return int(sum(pipe.execute()))


def broker_problem(settings: EngineSettings) -> str | None:
    """Why the broker cannot be used now (``None`` when it answers a PING)."""
    try:
        _redis(settings).ping()
    except Exception as exc:  # any failure means "not reachable"; name its type only (no credentials in URLs)
        return f"Redis broker did not answer ({type(exc).__name__})"
    return None


# ---------------------------------------------------------------------------------------------- the web side


class CeleryJobRunner:
    """The :class:`~pipeline.jobs.JobRunner` of a deployment whose analyses run on Celery workers.

    ``kinds`` are the job kinds the workers run. A job whose message could not be published (the broker is down)
    stays ``queued`` and is published by the first worker's sweeper that can reach the broker: submitting never
    fails, and never waits longer than ``publish_timeout_s``, because the broker is away.
    """

    def __init__(self, store: LeasedJobStore, app: Celery, settings: EngineSettings, *, kinds: tuple[str, ...]) -> None:
        self._store = store
        self._app = app
        self._settings = settings
        self._kinds = {kind: kind for kind in kinds}
        self._closed = False

    @property
    def store(self) -> LeasedJobStore:
        return self._store

    def submit(self, kind: str, params: Mapping[str, Any], *, dedupe_key: str | None = None) -> JobRecord:
        look_up_option(
            kind, self._kinds, what="job kind", remedy=f"Job kinds the workers run: {', '.join(self._kinds)}."
        )
        plain = check_params(params)
        if self._closed:
            raise ConfigurationError("The job runner is shut down.", remedy="Submit jobs before shutdown().")
        record, created = self._store.create(kind, plain, dedupe_key=dedupe_key)
        if created:
            try:
                publish(self._app, self._settings, record.id)
            except Exception as exc:  # the broker is unreachable: the sweeper publishes it later
                log.warning(
                    "Job %s queued but not yet published (%s); a worker will pick it up", record.id, type(exc).__name__
                )
            else:
                self._store.mark_published(record.id)
        return record

    def get(self, job_id: str) -> JobRecord:
        return stored_job(self._store, job_id)

    def wait(self, job_id: str, timeout: float) -> JobRecord:
        deadline = time.monotonic() + timeout
        while True:
            record = self.get(job_id)
            remaining = deadline - time.monotonic()
            if record.state.finished or remaining <= 0:
                return record
            time.sleep(min(remaining, _WAIT_POLL_S))

    def shutdown(self, *, wait: bool = True) -> None:
        """Stop taking jobs; queued jobs stay queued for the workers."""
        self._closed = True


# ---------------------------------------------------------------------------------------------- the worker side


def is_transient(exc: ImagingCdsError) -> bool:
    """Whether the same job may succeed later: the FHIR server or the PACS failed or could not be reached."""
    return isinstance(exc, PacsError) or bool(getattr(exc, "retryable", False))


def time_limit_error_summary(seconds: float) -> dict[str, str]:
    return {
        "type": "TimeLimitExceeded",
        "message": f"The analysis was stopped after {seconds:g} s, the time limit of an analysis on this service.",
        "remedy": "Check the study's size; an administrator can raise jobs.soft_time_limit_s and "
        "jobs.hard_time_limit_s in the settings.",
    }


def _with_attempts(summary: dict[str, Any], attempts: int) -> dict[str, Any]:
    if attempts > 1:
        summary["message"] = f"{summary['message']} (attempt {attempts}; not tried again)"
    return summary


class _Heartbeat:
    """Renews a claim's lease on a thread while the handler runs (the handler may hold the GIL in numpy for a
    while; a third of the lease is the margin)."""

    def __init__(self, store: LeasedJobStore, job_id: str, worker: str, every_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(store, job_id, worker, every_s), name="imaging-cds-lease", daemon=True
        )

    def _run(self, store: LeasedJobStore, job_id: str, worker: str, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                if not store.heartbeat(job_id, worker):
                    return  # the job moved on (finished, or taken over after a stall)
            except Exception as exc:  # a busy store: the next beat tries again
                log.warning("Job %s: lease not renewed (%s)", job_id, type(exc).__name__)

    @contextmanager
    def running(self) -> Iterator[None]:
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join(timeout=5)


class _DeadlineReporter(ProgressReporter):
    """A progress reporter that also enforces the soft time limit at each step boundary.

    Celery delivers the soft limit as a signal whose exception is raised wherever the child happens to be; when
    that is a ``__del__`` or a weakref callback Python swallows it ("Exception ignored in ...") and the analysis
    runs on. Checking the clock at each reported step stops it at the next one at the latest (before the write).
    """

    def __init__(self, store: LeasedJobStore, job_id: str, limit_s: float) -> None:
        super().__init__(store, job_id)
        self._limit_s = limit_s
        self._deadline = time.monotonic() + limit_s

    def __call__(self, progress: float, step: str) -> None:
        if time.monotonic() > self._deadline:
            raise SoftTimeLimitExceeded(f"soft time limit ({self._limit_s:g} s) exceeded")
        super().__call__(progress, step)


def _raised_by_the_time_limit(exc: BaseException) -> bool:
    """Whether ``exc`` wraps the soft time limit: the signal's exception can land inside a reader that turns any
    failure into its own error (a DICOM instance being decoded becomes "not a readable DICOM file")."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, SoftTimeLimitExceeded):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


class JobWorker:
    """Runs the jobs this worker process is handed: claim, heartbeat, handler, outcome (see the module docstring)."""

    def __init__(
        self,
        store: LeasedJobStore,
        handlers: Mapping[str, JobHandler],
        settings: EngineSettings,
        publisher: Callable[[str, float], None],
    ) -> None:
        self.store = store
        self._handlers = dict(handlers)
        self._settings = settings
        self._publish = publisher
        self._name = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, job_id: str) -> ClaimOutcome:
        worker = f"{self._name}:{secrets.token_hex(3)}"
        claim = self.store.claim(
            job_id, worker, lease_s=self._settings.lease_s, max_attempts=self._settings.max_attempts
        )
        JOB_ATTEMPTS.labels(claim.outcome.value).inc()
        if claim.outcome is ClaimOutcome.GAVE_UP:
            assert claim.record is not None
            log.warning("Job %s failed: its worker was lost on each of %d attempts", job_id, claim.record.attempts)
            JOBS_FINISHED.labels(claim.record.kind, "failed").inc()
        if claim.outcome is not ClaimOutcome.CLAIMED:
            log.info("Job %s not run by this delivery: %s", job_id, claim.outcome.value)
            return claim.outcome
        record = claim.record
        assert record is not None
        with running_job(job_id), _Heartbeat(self.store, job_id, worker, self._settings.heartbeat_s).running():
            self._run_claimed(record, worker)
        return claim.outcome

    def _run_claimed(self, record: JobRecord, worker: str) -> None:
        job_id, kind = record.id, record.kind
        log.info("Job %s (%s) started, attempt %d", job_id, kind, record.attempts)
        try:
            handler = look_up_option(kind, self._handlers, what="job kind")
            report = _DeadlineReporter(self.store, job_id, self._settings.soft_time_limit_s)
            summary = plain_result(handler(record.params, report))
        except SoftTimeLimitExceeded:
            self._stopped_at_the_time_limit(record)
        except ImagingCdsError as exc:
            if _raised_by_the_time_limit(exc):
                self._stopped_at_the_time_limit(record)
            elif is_transient(exc) and record.attempts < self._settings.max_attempts:
                self._retry_later(record, worker, exc)
            else:
                log.info("Job %s (%s) failed: %s", job_id, kind, type(exc).__name__)
                self._finish_failed(record, _with_attempts(error_summary(exc), record.attempts))
        except Exception as exc:
            log_unexpected_failure(job_id, kind, exc)
            self._finish_failed(record, internal_error_summary(job_id))
        else:
            if self.store.mark_done(job_id, summary):
                JOBS_FINISHED.labels(kind, "done").inc()
            log.info("Job %s (%s) done", job_id, kind)

    def _finish_failed(self, record: JobRecord, error: dict[str, Any]) -> None:
        if self.store.mark_failed(record.id, error):
            JOBS_FINISHED.labels(record.kind, "failed").inc()

    def _stopped_at_the_time_limit(self, record: JobRecord) -> None:
        log.warning("Job %s (%s) stopped at the soft time limit", record.id, record.kind)
        self._finish_failed(record, time_limit_error_summary(self._settings.soft_time_limit_s))

    def _retry_later(self, record: JobRecord, worker: str, exc: ImagingCdsError) -> None:
        delay = self._settings.retry_backoff_s * 2 ** (record.attempts - 1)
        due = datetime.now(UTC) + timedelta(seconds=delay)
        step = f"waiting {delay:g} s to try again after {type(exc).__name__} (attempt {record.attempts})"
        log.info("Job %s (%s): %s", record.id, record.kind, step)
        if not self.store.requeue(record.id, worker, step, publish_at=due):
            return  # taken over meanwhile
        JOB_ATTEMPTS.labels("retry-scheduled").inc()
        try:
            self._publish(record.id, delay)
        except Exception as exc2:  # published again by a sweeper once the broker is back
            log.warning("Job %s: retry not published (%s)", record.id, type(exc2).__name__)
            self.store.mark_published(record.id, datetime.now(UTC) - timedelta(days=1))

    def fail_timed_out(self, job_id: str) -> None:
        """The hard time limit killed the job's process (called in the worker's main process)."""
        record = self.store.get(job_id)
        if record is not None and self.store.mark_failed(
            job_id, time_limit_error_summary(self._settings.hard_time_limit_s)
        ):
            JOBS_FINISHED.labels(record.kind, "failed").inc()


class Sweeper:
    """Publishes again the jobs whose message the broker may have lost (see
    :meth:`~pipeline.jobs.LeasedJobStore.due_for_publishing`): a Redis restarted without persistence, a worker
    machine that died holding a message, a submit that found the broker down. Every worker runs one; a job
    published twice is run once (the claim), and the store stamps what it hands out, so sweepers do not repeat
    each other within an interval."""

    def __init__(
        self, store: LeasedJobStore, settings: EngineSettings, publisher: Callable[[str, float], None]
    ) -> None:
        self._store = store
        self._settings = settings
        self._publish = publisher
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep_once(self) -> tuple[str, ...]:
        try:
            empty = queue_depth(self._settings) == 0
        except Exception as exc:
            log.warning("Sweeper: the broker is not reachable (%s)", type(exc).__name__)
            return ()
        due = self._store.due_for_publishing(
            lease_s=self._settings.lease_s, requeue_after_s=self._settings.requeue_after_s, queue_empty=empty
        )
        for job_id in due:
            try:
                self._publish(job_id, 0.0)
            except Exception as exc:
                log.warning("Sweeper: job %s not published (%s)", job_id, type(exc).__name__)
                self._store.mark_published(job_id, datetime.now(UTC) - timedelta(days=1))
        if due:
            log.info("Sweeper published %d job(s) again: %s", len(due), ", ".join(due))
        return due

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="imaging-cds-sweeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._settings.sweep_interval_s):
            try:
                self.sweep_once()
            except Exception as exc:  # keep sweeping; a locked store or a broker hiccup passes
                log.warning("Sweeper: sweep failed (%s)", type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


WorkerFactory = Callable[[], tuple[LeasedJobStore, Mapping[str, JobHandler]]]
"""Builds, in the process that calls it, the store and the handlers a worker runs jobs with."""


def register_worker(app: Celery, settings: EngineSettings, factory: WorkerFactory) -> Callable[[], JobWorker]:
    """Register the job task and the sweeper on ``app`` for a worker node; returns the per-process worker getter.

    ``factory`` runs once in each process that needs it (each pool child, and the main process for the sweeper
    and for hard time limits): SQLite connections and loaded models must not cross ``fork``.
    """
    built: dict[int, JobWorker] = {}  # by process id; a parent's entry is left alone in a forked child
    lock = threading.Lock()

    def publisher(job_id: str, countdown: float) -> None:
        publish(app, settings, job_id, countdown=countdown or None)

    def job_worker() -> JobWorker:
        pid = os.getpid()
        with lock:
            if pid not in built:
                store, handlers = factory()
                built[pid] = JobWorker(store, handlers, settings, publisher)
            return built[pid]

    class RunJob(Task):
        name = RUN_JOB_TASK
        acks_late = True
        reject_on_worker_lost = True
        typing = False

        def run(self, job_id: str) -> str:
            return job_worker().run(job_id).value

        def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
            if isinstance(exc, TimeLimitExceeded) and args:  # the hard limit killed the child (main process)
                job_worker().fail_timed_out(str(args[0]))

    app.register_task(RunJob())

    class SweeperStep(bootsteps.StartStopStep):
        """Runs the :class:`Sweeper` in the worker's main process once the pool is up."""

        requires = ("celery.worker.components:Pool",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.sweeper: Sweeper | None = None

        def start(self, parent: Any) -> None:
            self.sweeper = Sweeper(job_worker().store, settings, publisher)
            self.sweeper.sweep_once()  # what waited for a worker while none ran
            self.sweeper.start()

        def stop(self, parent: Any) -> None:
            if self.sweeper is not None:
                self.sweeper.stop()

    app.steps["worker"].add(SweeperStep)
    return job_worker

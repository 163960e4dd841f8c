"""``imaging-cds worker``: a Celery worker node that runs the analyses ``serve`` queues (see
:mod:`pipeline.celery_engine` for how a job is run effectively once).

A worker reads the same settings file as ``serve`` and shares its ``data_dir``: the job store
(``data_dir/jobs.sqlite``) and the clinician app's session store, from which an app analysis gets the launching
clinician's token (:class:`smart_launch.launch_clients.LaunchClients`; the job's params carry only a reference
to the launch). Order-sign analyses run with the deployment's SMART Backend Services client (``backend``).

The worker is a Celery prefork node: ``concurrency`` child processes, each analysing one study at a time with its
share of the CPU (torch threads = cores / concurrency), each replaced once it outgrows the memory ceiling. With
``metrics_port`` the node serves Prometheus metrics gathered from all its children (analysis duration by analyzer,
jobs finished, deliveries by outcome); ``PROMETHEUS_MULTIPROC_DIR`` must then be set before this module is
imported, which ``imaging-cds worker`` does.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

from core.errors import ConfigurationError
from pipeline.celery_engine import make_celery_app, register_worker
from pipeline.handler import ANALYZE_STUDY, StudyAnalysisHandler
from pipeline.jobs import JobHandler, LeasedJobStore, SqliteJobStore
from service.logs import configure_logging
from service.settings import Settings
from service.web import backend_client, deployment_audit, job_store_path, require_state_key, smart_app_config

log = logging.getLogger(__name__)


def worker_handlers(settings: Settings) -> dict[str, JobHandler]:
    """The handlers a worker runs, by job kind: the one analysis handler, with the client each job needs."""
    require_state_key(settings)
    audit = deployment_audit(settings)  # a worker's accesses are recorded in the deployment's outbox too
    backend = backend_client(settings, audit) if settings.backend is not None else None
    launches = None
    if settings.smart_clients:
        from smart_launch.launch_clients import LaunchClients, open_session_store

        config = smart_app_config(settings, audit)
        launches = LaunchClients(config, open_session_store(config))

    def client_for(params: Mapping[str, Any]) -> Any:
        if params.get("launch_ref"):  # submitted by the clinician app: the launching clinician's session
            if launches is None:
                raise ConfigurationError(
                    "An analysis from the clinician app reached a worker whose settings have no smart_clients.",
                    remedy="Start the worker with the same settings file as serve.",
                )
            return launches.client_for_job(params)
        if backend is None:
            raise ConfigurationError(
                "A background analysis reached a worker whose settings have no backend client.",
                remedy="Start the worker with the same settings file as serve.",
            )
        return backend

    handler = StudyAnalysisHandler(
        client_for=client_for,
        dicomweb_allow_list=settings.dicomweb_allow,
        card_base_url=settings.base_url,
        limits=settings.limits,
        write_settings=settings.fhir_write,
    )
    return {ANALYZE_STUDY: handler}


def _limit_torch_threads(concurrency: int) -> None:
    """Give each child its share of the cores (torch would otherwise use them all, in every child)."""
    share = max(1, (os.cpu_count() or 1) // concurrency)
    try:
        import torch
    except ImportError:  # an installation without torch runs no torch analyzer either
        return
    torch.set_num_threads(share)


def _import_analysis_stack() -> None:
    """Import the pipeline and the analyzers' code before the pool forks: a child replaced after a crash or at
    the memory ceiling then starts in milliseconds instead of importing torch again (seconds)."""
    import pipeline.analysis  # noqa: F401
    from models.registry import import_builtin_modules

    import_builtin_modules()


def _serve_metrics(port: int) -> None:
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, addr="127.0.0.1", registry=registry)


def run_worker(
    settings: Settings,
    *,
    concurrency: int | None = None,
    node_name: str | None = None,
    metrics_port: int | None = None,
) -> None:
    """Run a worker node until it is stopped (SIGTERM: finish the running analyses, then exit)."""
    engine = settings.jobs
    if engine is None:
        raise ConfigurationError(
            "The settings name no job broker, so there is nothing for a worker to run.",
            remedy="Add jobs: {broker_url: redis://host:6379/0} to the settings file that serve uses.",
        )
    if settings.backend is None and not settings.smart_clients:
        raise ConfigurationError(
            "The settings have neither a backend client nor smart_clients: a worker could not reach any EHR.",
            remedy="Start the worker with the same settings file as serve.",
        )
    children = concurrency or engine.concurrency
    configure_logging(settings.log_format, settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)

    from celery import signals

    def build() -> tuple[LeasedJobStore, dict[str, JobHandler]]:
        return SqliteJobStore(job_store_path(settings)), worker_handlers(settings)

    app = make_celery_app(engine)
    job_worker = register_worker(app, engine, build)
    _import_analysis_stack()

    def child_ready(**_: Any) -> None:
        configure_logging(settings.log_format, settings.log_level)
        _limit_torch_threads(children)
        job_worker()  # open the store and import the analysis stack now, not in the first job's time

    signals.worker_process_init.connect(child_ready, weak=False)
    signals.setup_logging.connect(lambda **_: None, weak=False)  # keep the deployment's logging, not Celery's
    if metrics_port:
        _serve_metrics(metrics_port)
    name = node_name or f"imaging-cds-{os.getpid()}@{socket.gethostname()}"
    log.info("Worker %s: %d child process(es) on queue %s", name, children, engine.queue)
    app.worker_main(
        [
            "worker",
            f"--concurrency={children}",
            f"--queues={engine.queue}",
            "--pool=prefork",
            f"--hostname={name}",
            f"--loglevel={settings.log_level}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )

"""Test support for the job engine: real ``imaging-cds worker`` processes (Celery, prefork) on a real Redis.

A worker node is started exactly as an administrator starts one (``python -m imaging_cds.cli worker --config``);
the helpers find its child processes and kill them by process id, as the OOM killer or an operator would, and
count what the EHR holds by searching it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhir_adapters.client import FhirClient
from pipeline.jobs import JobRecord, JobState, SqliteJobStore

PROJECT_ROOT = Path(__file__).resolve().parent.parent
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


def write_settings(
    root: Path,
    *,
    broker_url: str,
    fhir_base: str,
    dicomweb: str,
    jobs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    backend_timeout_s: float = 30.0,
) -> Path:
    """A deployment settings file for ``serve`` and its workers (open FHIR server: ``backend.auth: none``)."""
    settings = {
        "public_base_url": "http://127.0.0.1:9",
        "data_dir": str(root / "data"),
        "dicomweb_allow": [dicomweb],
        "backend": {"fhir_base": fhir_base, "auth": "none", "timeout_s": backend_timeout_s},
        "jobs": {"broker_url": broker_url, **FAST_ENGINE, **(jobs or {})},
        "logging": {"format": "json", "level": "INFO"},
        **(extra or {}),
    }
    path = root / "settings.json"
    path.write_text(json.dumps(settings, indent=2))
    return path


@dataclass
class WorkerNode:
    """A running ``imaging-cds worker``: its main process and the log it writes."""

    process: subprocess.Popen[bytes]
    log: Path

    def children(self) -> list[int]:
        """The pool's child processes (those that run analyses)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    found.append(int(entry.name))
        return found

    def kill(self) -> None:
        """SIGKILL the node: the main process and each of its children, by process id."""
        pids = self.children()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        for pid in pids:
            _kill(pid)

    def stop(self) -> None:
        children = self.children()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for pid in children:
            _kill(pid)


def _kill(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextmanager
def worker_node(settings: Path, name: str, *, concurrency: int = 1, timeout: float = 120.0) -> Iterator[WorkerNode]:
    """Start ``imaging-cds worker`` and wait until it consumes (its log says ready); stop it on exit."""
    log = settings.parent / f"worker-{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "imaging_cds.cli", "worker", "--config", str(settings),
                "--concurrency", str(concurrency), "--name", f"{name}@test",
            ],
            stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
        )  # fmt: skip
    node = WorkerNode(process, log)
    try:
        deadline = time.monotonic() + timeout
        while f"{name}@test ready" not in log.read_text(errors="replace"):
            assert process.poll() is None, f"worker {name} exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"worker {name} did not start:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield node
    finally:
        node.kill()  # the graceful path waits for the broker and the sweeper; a test has no use for it


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

"""The job layer: an analysis submitted by a front door runs once, reports progress, and leaves a durable record.

Handlers here are small functions standing in for the imaging pipeline; the store is a real SQLite file.
Handlers block on Events rather than sleeping, so the tests decide exactly when each job moves on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConfigurationError, StudyError
from pipeline.jobs import (
    EmbeddedJobRunner,
    JobState,
    ProgressReporter,
    SqliteJobStore,
    UnknownJobError,
)
from tests.fork_support import succeeds_in_a_forked_child

EMPHYSEMA_PARAMS = {
    "imaging_study": "ImagingStudy/123",
    "analyzer": "ct-emphysema",
    "fhir_base": "http://127.0.0.1:8080/fhir",
}
WAIT_S = 5.0


def finished_report(params: dict[str, Any], report: ProgressReporter) -> dict[str, Any]:
    report(0.5, "analysing 61 images")
    return {"report": "DiagnosticReport/77", "written": ["Observation/78"], "study": params["imaging_study"]}


class GatedHandler:
    """A handler that reports progress, then waits for the test to let it finish."""

    def __init__(self) -> None:
        self.reported = threading.Event()
        self.proceed = threading.Event()
        self.calls = 0

    def __call__(self, params: dict[str, Any], report: ProgressReporter) -> dict[str, Any]:
        self.calls += 1
        report(12 / 61, "fetching images 12/61")
        self.reported.set()
        assert self.proceed.wait(WAIT_S), "test never released the handler"
        return {"report": "DiagnosticReport/77", "laa950_percent": 11.4}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "jobs.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteJobStore]:
    with SqliteJobStore(db_path) as job_store:
        yield job_store


def test_job_goes_queued_running_done_with_progress_and_result(store: SqliteJobStore) -> None:
    gated = GatedHandler()
    with EmbeddedJobRunner(store, {"ct-emphysema": gated}) as runner:
        submitted = runner.submit("ct-emphysema", EMPHYSEMA_PARAMS)
        assert submitted.state is JobState.QUEUED
        assert submitted.params == EMPHYSEMA_PARAMS

        assert gated.reported.wait(WAIT_S)
        running = runner.get(submitted.id)
        assert running.state is JobState.RUNNING
        assert running.step == "fetching images 12/61"
        assert running.progress == pytest.approx(12 / 61)

        gated.proceed.set()
        done = runner.wait(submitted.id, timeout=WAIT_S)

    assert done.state is JobState.DONE
    assert done.result == {"report": "DiagnosticReport/77", "laa950_percent": 11.4}
    assert done.progress == 1.0
    assert done.error is None
    assert done.started_at is not None and done.finished_at is not None
    assert done.created_at <= done.started_at <= done.finished_at
    assert done.to_json()["state"] == "done"


def test_finished_job_survives_reopening_the_store(db_path: Path) -> None:
    with SqliteJobStore(db_path) as store, EmbeddedJobRunner(store, {"ct-emphysema": finished_report}) as runner:
        job = runner.submit("ct-emphysema", EMPHYSEMA_PARAMS)
        done = runner.wait(job.id, timeout=WAIT_S)

    with SqliteJobStore(db_path) as reopened:
        again = reopened.get(job.id)
    assert again == done
    assert again is not None and again.result == {
        "report": "DiagnosticReport/77",
        "written": ["Observation/78"],
        "study": "ImagingStudy/123",
    }


def test_second_store_instance_sees_a_running_job_of_the_first(store: SqliteJobStore, db_path: Path) -> None:
    gated = GatedHandler()
    with EmbeddedJobRunner(store, {"ct-emphysema": gated}) as runner, SqliteJobStore(db_path) as poller:
        job = runner.submit("ct-emphysema", EMPHYSEMA_PARAMS)
        assert gated.reported.wait(WAIT_S)
        seen = poller.get(job.id)
        assert seen is not None and seen.state is JobState.RUNNING and seen.step == "fetching images 12/61"
        assert [r.id for r in poller.list(kind="ct-emphysema", state=JobState.RUNNING)] == [job.id]
        gated.proceed.set()
        runner.wait(job.id, timeout=WAIT_S)
        assert poller.get(job.id).state is JobState.DONE  # type: ignore[union-attr]


def test_study_error_fails_the_job_with_its_message_and_remedy(store: SqliteJobStore) -> None:
    def no_ct_series(params: dict[str, Any], report: ProgressReporter) -> dict[str, Any]:
        raise StudyError(
            f"{params['imaging_study']} has no CT series with at least 50 slices.",
            remedy="Order a chest CT, or choose an analyzer for the modality acquired.",
        )

    with EmbeddedJobRunner(store, {"ct-emphysema": no_ct_series}) as runner:
        failed = runner.wait(runner.submit("ct-emphysema", EMPHYSEMA_PARAMS).id, timeout=WAIT_S)

    assert failed.state is JobState.FAILED
    assert failed.result is None
    assert failed.error == {
        "type": "StudyError",
        "message": "ImagingStudy/123 has no CT series with at least 50 slices.",
        "remedy": "Order a chest CT, or choose an analyzer for the modality acquired.",
    }


def test_unexpected_exception_leaves_a_generic_error_and_keeps_phi_out_of_record_and_log(
    store: SqliteJobStore, caplog: pytest.LogCaptureFixture
) -> None:
    def crashes_on_patient_name(params: dict[str, Any], report: ProgressReporter) -> dict[str, Any]:
        header = {"PatientName": "DOE^JANE", "PatientBirthDate": "19610412"}
        raise KeyError(f"{header['PatientName']} {header['PatientBirthDate']}")

    with (
        caplog.at_level(logging.INFO, logger="pipeline.jobs"),
        EmbeddedJobRunner(store, {"ct-emphysema": crashes_on_patient_name}) as runner,
    ):
        failed = runner.wait(runner.submit("ct-emphysema", EMPHYSEMA_PARAMS).id, timeout=WAIT_S)

    assert failed.state is JobState.FAILED
    assert failed.error is not None
    assert failed.error["type"] == "InternalError"
    assert f"see the server log for job {failed.id}" in failed.error["message"]
    assert "DOE^JANE" not in str(failed.to_json()) and "Traceback" not in str(failed.to_json())
    assert failed.id in caplog.text and "KeyError" in caplog.text
    assert "DOE^JANE" not in caplog.text and "ImagingStudy/123" not in caplog.text


def test_same_dedupe_key_while_running_returns_the_same_job(store: SqliteJobStore) -> None:
    gated = GatedHandler()
    key = "ct-emphysema:ImagingStudy/123"
    with EmbeddedJobRunner(store, {"ct-emphysema": gated}) as runner:
        first = runner.submit("ct-emphysema", EMPHYSEMA_PARAMS, dedupe_key=key)
        assert gated.reported.wait(WAIT_S)
        second = runner.submit("ct-emphysema", EMPHYSEMA_PARAMS, dedupe_key=key)
        assert second.id == first.id
        assert len(store.list()) == 1

        gated.proceed.set()
        runner.wait(first.id, timeout=WAIT_S)
        # Once the first analysis finished, a new order for the same study is a new job.
        again = runner.submit("ct-emphysema", EMPHYSEMA_PARAMS, dedupe_key=key)
        assert again.id != first.id
        runner.wait(again.id, timeout=WAIT_S)
    assert gated.calls == 2


def test_unknown_kind_names_the_closest_kind(store: SqliteJobStore) -> None:
    kinds = {"ct-emphysema": finished_report, "ct-bone": finished_report}
    with (
        EmbeddedJobRunner(store, kinds) as runner,
        pytest.raises(ConfigurationError, match=r"Unknown job kind 'ct-emphysem'\. Did you mean 'ct-emphysema'\?"),
    ):
        runner.submit("ct-emphysem", EMPHYSEMA_PARAMS)
    assert store.list() == ()


def test_unknown_job_id_is_a_404(store: SqliteJobStore) -> None:
    with (
        EmbeddedJobRunner(store, {"ct-emphysema": finished_report}) as runner,
        pytest.raises(UnknownJobError, match="No job with id 'no-such-job'") as caught,
    ):
        runner.get("no-such-job")
    assert caught.value.http_status == 404


def test_params_carrying_a_token_are_refused_before_storage(store: SqliteJobStore) -> None:
    with (
        EmbeddedJobRunner(store, {"ct-emphysema": finished_report}) as runner,
        pytest.raises(ConfigurationError, match=r"params\.auth\.access_token looks like a credential"),
    ):
        runner.submit("ct-emphysema", {**EMPHYSEMA_PARAMS, "auth": {"access_token": "eyJhbGciOi"}})
    assert store.list() == ()


def test_concurrent_submissions_with_two_workers_all_finish(store: SqliteJobStore) -> None:
    # Each handler waits at a two-party barrier: it only passes if the two workers really run side by side.
    side_by_side = threading.Barrier(2, timeout=WAIT_S)

    def paired(params: dict[str, Any], report: ProgressReporter) -> dict[str, Any]:
        side_by_side.wait()
        report(1.0, "written")
        return {"report": f"DiagnosticReport/{params['n']}"}

    submitted: list[str] = []
    with EmbeddedJobRunner(store, {"ct-emphysema": paired}, max_workers=2) as runner:
        threads = [
            threading.Thread(target=lambda n=n: submitted.append(runner.submit("ct-emphysema", {"n": n}).id))
            for n in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
        finished = [runner.wait(job_id, timeout=WAIT_S) for job_id in submitted]

    assert len(submitted) == 8
    assert {job.state for job in finished} == {JobState.DONE}
    assert sorted(job.result["report"] for job in finished if job.result) == [f"DiagnosticReport/{n}" for n in range(8)]


def test_restart_fails_interrupted_running_jobs_and_runs_queued_ones(db_path: Path) -> None:
    # Simulate a crash: one job was running, one still queued, when the process died.
    with SqliteJobStore(db_path) as crashed:
        was_running, _ = crashed.create("ct-emphysema", EMPHYSEMA_PARAMS, dedupe_key="ct-emphysema:ImagingStudy/123")
        assert crashed.mark_running(was_running.id)
        was_queued, _ = crashed.create("ct-emphysema", {**EMPHYSEMA_PARAMS, "imaging_study": "ImagingStudy/456"})

    with SqliteJobStore(db_path) as store, EmbeddedJobRunner(store, {"ct-emphysema": finished_report}) as runner:
        interrupted = runner.get(was_running.id)
        resumed = runner.wait(was_queued.id, timeout=WAIT_S)

    assert interrupted.state is JobState.FAILED
    assert interrupted.error is not None and interrupted.error["type"] == "JobInterrupted"
    assert "submit the analysis again" in interrupted.error["remedy"]
    assert resumed.state is JobState.DONE
    assert resumed.result is not None and resumed.result["study"] == "ImagingStudy/456"


def test_a_process_forked_while_another_thread_writes_the_store_can_still_write_it(
    store: SqliteJobStore, db_path: Path
) -> None:
    # Celery's prefork pool forks a replacement child from a worker's main process, where the sweeper's thread
    # writes the job store. A child forked in the middle of such a write inherited SQLite's note that its process
    # holds the lock, so its own store could never write ("database is locked" after the 10 s wait): every job
    # handed to it failed before it was claimed. The fork now waits for the write to end.
    writing, go_on = threading.Event(), threading.Event()

    def sweep_slowly() -> None:
        with store._transaction() as db:  # a write held open, as a sweep's is for a moment
            db.execute("UPDATE jobs SET step = step")
            writing.set()
            go_on.wait(WAIT_S)

    sweeper = threading.Thread(target=sweep_slowly)
    sweeper.start()
    assert writing.wait(WAIT_S)
    threading.Timer(0.2, go_on.set).start()

    def open_own_store() -> None:  # as a new pool child does: opening writes the schema
        SqliteJobStore(db_path).close()

    assert succeeds_in_a_forked_child(open_own_store), "the forked process could not write the job store"
    sweeper.join()

"""The clinician app on the Celery engine: the analysis a clinician starts runs on a worker process, with the
token of her own launch, which the worker finds in the shared session store by the job's launch reference.

Real components throughout: the sandbox EHR (authorization server and scope-enforcing proxy) in front of
sekmet-fhir, Orthanc, Redis, and an ``imaging-cds worker`` process started from the deployment's settings.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devtools.demo import load_sample_study
from devtools.samples import SAMPLES
from devtools.sandbox.dev import CLIENT_ID, serve_app_with_sandbox
from devtools.servers import FhirServer, OrthancServer, RedisServer, redis_server
from devtools.workers import deployment_keyring, worker_node
from fhir_adapters.client import FhirClient
from pipeline.jobs import JobState
from service.settings import load_settings
from service.web import celery_runner
from tests.engine_support import write_settings
from tests.smart_support import launch_over_http, practitioner_resource


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def test_a_clinicians_analysis_runs_on_a_worker_with_the_token_of_her_launch(
    tmp_path: Path, redis: RedisServer, fhir_base: FhirServer, orthanc: OrthancServer
) -> None:
    fhir = FhirClient(fhir_base.base_url, session=requests.Session())
    study = load_sample_study(fhir, orthanc, SAMPLES["lung2"], copy=2300)
    practitioner = f"Practitioner/{fhir.create(practitioner_resource('Engine'))['id']}"
    common = {"broker_url": redis.url, "fhir_base": fhir_base.base_url, "dicomweb": orthanc.dicomweb_url}
    runner = celery_runner(load_settings(write_settings(tmp_path, **common)))  # serve's side: records, publishes

    with serve_app_with_sandbox(
        fhir_base.base_url,
        tmp_path / "data" / "app",
        orthanc.dicomweb_url,
        job_runner=runner,
        keyring=deployment_keyring(tmp_path),  # the worker opens the sealed session with the deployment's key
    ) as app:
        registration = {"fhir_base": app.sandbox.fhir_base, "client_id": CLIENT_ID, "redirect_uri": app.redirect_uri}
        settings = write_settings(tmp_path, **common, extra={"smart_clients": [registration]})
        with worker_node(settings, "node-app"):
            page = launch_over_http(app, study, practitioner)
            browser: requests.Session = page.session  # type: ignore[attr-defined]
            study_id = study.imaging_study.split("/")[1]
            study_page = browser.get(f"{app.url}/studies/{study_id}", timeout=60)
            token = re.search(r'name="csrf_token" value="([^"]+)"', study_page.text)
            assert token is not None
            progress = browser.post(
                f"{app.url}/studies/{study_id}/analyze", data={"analyzer": "ct-emphysema", "csrf_token": token[1]}
            )
            for _ in range(240):  # the progress page refreshes itself until it forwards to the result
                if "/reports/" in progress.url:
                    break
                assert '<p id="job-error-message"></p>' in progress.text, progress.text
                time.sleep(0.5)
                progress = browser.get(progress.url)

    assert "/reports/" in progress.url and "LAA-950" in progress.text
    [job] = runner.store.list()
    assert job.state is JobState.DONE and job.worker is not None
    assert int(job.worker.split(":")[1]) != os.getpid()  # analysed in a worker process, not the app's
    assert set(job.params) == {"imaging_study", "analyzers", "fhir_base", "launch_ref"}  # a reference, no token
    report_id = progress.url.rsplit("/", 1)[1].split("?")[0]
    assert fhir.read("DiagnosticReport", report_id)["subject"]["reference"] == study.patient

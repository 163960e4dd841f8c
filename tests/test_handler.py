"""The one analysis handler every front door uses, run as a job against the real FHIR server and Orthanc.

Order-sign queues a study with several analyzers (the ones that do not suit it are skipped, with their reason);
the clinician app and the CLI name one analyzer, and a study it does not suit is that job's error.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from core.allowlist import AllowList
from core.errors import StudyError
from devtools.demo import LoadedStudy, load_sample_study
from devtools.samples import SAMPLES
from devtools.servers import FhirServer, OrthancServer
from fhir_adapters.client import FhirClient
from pipeline.handler import ANALYZE_STUDY, StudyAnalysisHandler, analysis_params
from pipeline.jobs import EmbeddedJobRunner, JobState, SqliteJobStore


@pytest.fixture(scope="module")
def client(fhir_base: FhirServer) -> FhirClient:
    return FhirClient(fhir_base.base_url, session=requests.Session())


@pytest.fixture(scope="module")
def lung2(client: FhirClient, orthanc: OrthancServer) -> LoadedStudy:
    return load_sample_study(client, orthanc, SAMPLES["lung2"])


def test_an_order_sign_job_files_what_suits_the_chest_ct_and_skips_the_radiograph_model(
    client: FhirClient, lung2: LoadedStudy, allow: AllowList, tmp_path: Path
) -> None:
    handler = StudyAnalysisHandler(client_for=lambda params: client, dicomweb_allow_list=allow)
    params = analysis_params(lung2.imaging_study, ["cxr-pneumonia", "ct-emphysema"], skip_unsuitable=True)
    with EmbeddedJobRunner(SqliteJobStore(tmp_path / "jobs.sqlite"), {ANALYZE_STUDY: handler}) as runner:
        job = runner.wait(runner.submit(ANALYZE_STUDY, params).id, timeout=300)
    assert job.state == JobState.DONE, job.error
    assert job.result is not None
    report = job.result["diagnosticReports"]["ct-emphysema"]
    filed = client.read("DiagnosticReport", report.split("/")[1])
    assert filed["status"] in ("preliminary", "final") and filed["subject"]["reference"] == lung2.patient
    assert list(job.result["skipped"]) == ["cxr-pneumonia"]
    assert "CR" in job.result["skipped"]["cxr-pneumonia"] or "DX" in job.result["skipped"]["cxr-pneumonia"]
    assert job.result["diagnosticReport"] == report and job.result["media"]  # one analysis reads like itself


def test_an_analyzer_chosen_by_a_clinician_that_does_not_suit_the_study_is_the_jobs_error(
    client: FhirClient, lung2: LoadedStudy, allow: AllowList
) -> None:
    handler = StudyAnalysisHandler(client_for=lambda params: client, dicomweb_allow_list=allow)
    with pytest.raises(StudyError, match=lung2.imaging_study):
        handler.analyses(analysis_params(lung2.imaging_study, ["cxr-pneumonia"]), lambda progress, step: None)

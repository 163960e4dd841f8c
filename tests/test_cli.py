"""The ``imaging-cds`` command as an integrator runs it: a real subprocess against the real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests

from devtools.demo import load_sample_study
from devtools.samples import SAMPLES
from devtools.servers import FhirServer, OrthancServer
from fhir_adapters.client import FhirClient


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imaging_cds.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def lung2_study(fhir_base: FhirServer, orthanc: OrthancServer) -> str:
    client = FhirClient(fhir_base.base_url, session=requests.Session())
    return load_sample_study(client, orthanc, SAMPLES["lung2"]).imaging_study


def test_analyze_prints_json_with_the_measured_values(
    fhir_base: FhirServer, orthanc: OrthancServer, lung2_study: str
) -> None:
    done = _run(
        "analyze", lung2_study, "--fhir-base", fhir_base.base_url, "--allow-dicomweb", orthanc.dicomweb_url, "--json"
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["imagingStudy"] == lung2_study
    assert summary["analyzer"]["name"] == "ct-emphysema"
    laa = next(m for m in summary["measurements"] if m["key"] == "laa950_percent")
    assert laa["unit"] == "%" and laa["value"] < 5
    assert summary["diagnosticReport"].startswith("DiagnosticReport/")
    assert "chosen" in summary["series"]["reason"]


def test_analyze_human_summary_names_the_report(
    fhir_base: FhirServer, orthanc: OrthancServer, lung2_study: str
) -> None:
    done = _run(
        "analyze",
        lung2_study,
        "--fhir-base",
        fhir_base.base_url,
        env={"IMAGING_CDS_DICOMWEB_ALLOW": orthanc.dicomweb_url},
    )
    assert done.returncode == 0, done.stderr
    assert "LAA-950" in done.stdout
    assert "DiagnosticReport/" in done.stdout and "clinician review" in done.stdout


def test_unknown_study_fails_with_one_clear_line(fhir_base: FhirServer, orthanc: OrthancServer) -> None:
    done = _run(
        "analyze",
        "ImagingStudy/does-not-exist",
        "--fhir-base",
        fhir_base.base_url,
        "--allow-dicomweb",
        orthanc.dicomweb_url,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("imaging-cds: error:") and "does-not-exist" in done.stderr


def test_unknown_analyzer_suggests_the_closest_name(fhir_base: FhirServer, orthanc: OrthancServer) -> None:
    done = _run(
        "analyze",
        "ImagingStudy/x",
        "--analyzer",
        "ct-emphysem",
        "--fhir-base",
        fhir_base.base_url,
        "--allow-dicomweb",
        orthanc.dicomweb_url,
    )
    assert done.returncode == 1
    assert "Did you mean 'ct-emphysema'?" in done.stderr


def test_without_a_dicomweb_allow_list_nothing_is_fetched(fhir_base: FhirServer, lung2_study: str) -> None:
    done = _run("analyze", lung2_study, "--fhir-base", fhir_base.base_url, env={"IMAGING_CDS_DICOMWEB_ALLOW": ""})
    assert done.returncode == 1
    assert "--allow-dicomweb" in done.stderr


def test_reference_must_name_an_imaging_study(fhir_base: FhirServer, orthanc: OrthancServer) -> None:
    done = _run("analyze", "Patient/1", "--fhir-base", fhir_base.base_url, "--allow-dicomweb", orthanc.dicomweb_url)
    assert done.returncode == 1
    assert "ImagingStudy/<id>" in done.stderr

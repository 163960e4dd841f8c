"""``imaging-cds demo``: the whole path on this machine, against real servers and real scans.

It starts a local sekmet-fhir server and Orthanc, converts the bundled real sample scans into DICOM with proper
UIDs, stores them in Orthanc, registers Patient / Endpoint / ImagingStudy in the FHIR server (the way an EHR
would know them), analyses each study, reads what was written back from the FHIR server, and leaves the report
and explanation images in an output folder. The same loader serves the tests and the benchmarks.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import requests

from core.allowlist import AllowList
from core.errors import ImagingCdsError
from devtools.samples import (
    SAMPLES,
    SampleStudy,
    endpoint_resource,
    imaging_study_resource,
    load_sample,
    sample_uid,
    upload_series,
)
from devtools.servers import OrthancServer, fhir_server, orthanc_server
from fhir_adapters.builders import conditional_create_entry, identifier_query
from fhir_adapters.client import FhirClient
from fhir_adapters.constants import CANONICAL_BASE
from fhir_adapters.images import media_png
from fhir_adapters.terminology import unit_label
from models.registry import get_analyzer
from pipeline.analysis import AnalysisOutcome, analyze_study
from pipeline.handler import ANALYZE_STUDY, analysis_params
from pipeline.jobs import JobState

DEMO_PATIENT_SYSTEM = f"{CANONICAL_BASE}/sid/demo-patient"

SAMPLE_CHEST_CT = SAMPLES["lung2"]

# (sample, analyzer) pairs the demo runs, in order.
DEMO_RUNS: tuple[tuple[str, str], ...] = (
    ("lung2", "ct-emphysema"),
    ("lung2", "ct-bone"),
    ("lung1", "ct-lung-nodules"),
    ("abdomen", "ct-bone"),
    ("rsna-cxr", "cxr-pneumonia"),
    ("hippocrop-1", "mr-hippocampus"),
)
DEMO_PRACTITIONER_SYSTEM = f"{CANONICAL_BASE}/sid/demo-practitioner"


@dataclass(frozen=True)
class LoadedStudy:
    """A sample as the EHR and the PACS now know it."""

    sample: str
    imaging_study: str
    patient: str
    study_uid: str
    series_uid: str
    instance_count: int


def demo_patient(sample: SampleStudy) -> dict[str, Any]:
    """A clearly fictitious patient for a sample scan (the scans themselves are de-identified)."""
    family, _, given = sample.patient_name.partition("^")
    return {
        "resourceType": "Patient",
        "identifier": [{"system": DEMO_PATIENT_SYSTEM, "value": sample.patient_id}],
        "name": [{"family": family or "Demo", "given": [given or sample.name], "text": f"Demo patient {sample.name}"}],
    }


def load_sample_study(
    client: FhirClient, orthanc: OrthancServer, sample: SampleStudy, *, copy: int | None = None
) -> LoadedStudy:
    """Store a sample's DICOM series in Orthanc and register it in the FHIR server in one transaction.

    Patient, Endpoint and ImagingStudy are created conditionally on their identifiers, so loading twice
    leaves one of each. ``copy=n`` stores the same images as another patient's study (new Study, Series and SOP
    Instance UIDs, its own demo patient): for tests and benchmarks that need many distinct studies of one scan.
    """
    datasets = load_sample(sample.name)
    if copy is not None:
        sample = replace(sample, name=f"{sample.name}-copy-{copy}", patient_id=f"{sample.patient_id}-COPY-{copy}")
        _reidentify(datasets, sample.name)
    upload_series(orthanc.url, datasets)
    patient_urn = _urn(sample.name, "patient")
    endpoint_urn = _urn(sample.name, "endpoint")
    study_urn = _urn(sample.name, "study")
    endpoint = endpoint_resource(orthanc.dicomweb_url)
    study = imaging_study_resource(datasets, patient_reference=patient_urn, endpoint_reference=endpoint_urn)
    study_identifier = study["identifier"][0]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            conditional_create_entry(patient_urn, demo_patient(sample), DEMO_PATIENT_SYSTEM, sample.patient_id),
            conditional_create_entry(
                endpoint_urn, endpoint, endpoint["identifier"][0]["system"], endpoint["identifier"][0]["value"]
            ),
            conditional_create_entry(study_urn, study, study_identifier["system"], study_identifier["value"]),
        ],
    }
    response = client.transaction(bundle)
    locations = [str(entry["response"]["location"]) for entry in response["entry"]]
    patient_ref, _, study_ref = ("/".join(loc.split("/_history")[0].split("/")[-2:]) for loc in locations)
    return LoadedStudy(
        sample=sample.name,
        imaging_study=study_ref,
        patient=patient_ref,
        study_uid=str(datasets[0].StudyInstanceUID),
        series_uid=str(datasets[0].SeriesInstanceUID),
        instance_count=len(datasets),
    )


def _reidentify(datasets: list[Any], name: str) -> None:
    """New Study, Series and SOP Instance UIDs for a copy (deterministic for ``name``); pixels unchanged."""
    study_uid, series_uid = sample_uid(name, "study"), sample_uid(name, "series")
    for number, ds in enumerate(datasets, start=1):
        sop_uid = sample_uid(name, "instance", str(number))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid


def _urn(name: str, kind: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{CANONICAL_BASE}/demo/{name}/{kind}')}"


def _demo_practitioner(client: FhirClient) -> str:
    """The clinician who launches the app in the demo (created once, conditionally on its identifier)."""
    practitioner = {
        "resourceType": "Practitioner",
        "identifier": [{"system": DEMO_PRACTITIONER_SYSTEM, "value": "demo-radiologist"}],
        "name": [{"family": "Radiologist", "given": ["Demo"], "prefix": ["Dr"]}],
    }
    created = client.create(practitioner, if_none_exist=identifier_query(DEMO_PRACTITIONER_SYSTEM, "demo-radiologist"))
    return f"Practitioner/{created['id']}"


def _clinician_app(fhir_base: str, dicomweb_base: str, output: Path) -> Any:
    from devtools.sandbox.dev import serve_app_with_sandbox

    return serve_app_with_sandbox(fhir_base, output / "app-state", dicomweb_base)


def write_outputs(client: FhirClient, outcome: AnalysisOutcome, folder: Path) -> list[Path]:
    """Read the DiagnosticReport and its key images back from the EHR and save them for a person to open."""
    return write_report_files(client, outcome.diagnostic_report, outcome.summary(), folder)


def write_report_files(client: FhirClient, report_ref: str, summary: dict[str, Any], folder: Path) -> list[Path]:
    """Save ``summary`` and the report ``report_ref`` with its key images, as the EHR holds them (inline in their
    Media, or in a Binary)."""
    folder.mkdir(parents=True, exist_ok=True)
    report_type, report_id = report_ref.split("/")
    report = client.read(report_type, report_id)
    written = [folder / "summary.json"]
    written[0].write_text(json.dumps(summary, indent=2))
    for form in report.get("presentedForm", []):
        suffix = ".html" if form.get("contentType", "").startswith("text/html") else ".txt"
        path = folder / f"report{suffix}"
        path.write_bytes(base64.b64decode(form["data"]))
        written.append(path)
    for number, item in enumerate(report.get("media", []), start=1):
        media_type, media_id = item["link"]["reference"].split("/")
        media = client.read(media_type, media_id)
        path = folder / f"key-image-{number}.png"
        path.write_bytes(media_png(client, media))  # inline, or in the Binary the Media points at
        written.append(path)
    return written


def run_demo(output: Path, *, keep_running: bool, engine: str = "embedded") -> int:
    """Run every demo analysis and print where to look; returns the process exit status.

    ``engine="celery"``: a local Redis and one ``imaging-cds worker`` run the analyses, the demo's and the
    clinician app's (as ``serve`` with ``jobs.broker_url`` would); the worker's log is in ``output/engine``.
    """
    print("imaging-cds demo: starting a local FHIR R4 server (sekmet-fhir) and Orthanc (DICOMweb) on loopback...")
    with ExitStack() as stack:
        fhir = stack.enter_context(fhir_server())
        orthanc = stack.enter_context(orthanc_server())
        client = FhirClient(fhir.base_url, session=requests.Session())
        allow = AllowList.of([orthanc.dicomweb_url])
        print(f"  FHIR server : {fhir.base_url}")
        print(f"  Orthanc     : {orthanc.url}/app/explorer.html  (DICOMweb {orthanc.dicomweb_url})")
        runner, app = (
            _start_engine(stack, fhir.base_url, orthanc.dicomweb_url, output) if engine == "celery" else (None, None)
        )
        loaded: dict[str, LoadedStudy] = {}
        failures = 0
        for sample_name, analyzer_name in DEMO_RUNS:
            sample = SAMPLES[sample_name]
            if sample_name not in loaded:
                print(f"\nLoading sample '{sample.name}': {sample.description}")
                print(f"  licence: {sample.licence}")
                loaded[sample_name] = load_sample_study(client, orthanc, sample)
                study = loaded[sample_name]
                print(f"  stored {study.instance_count} DICOM instances in Orthanc; EHR holds {study.imaging_study}")
            study = loaded[sample_name]
            print(f"\nAnalysing {study.imaging_study} with {analyzer_name}...")
            folder = output / f"{sample_name}-{analyzer_name}"
            if runner is not None:
                failures += not _analyse_on_engine(runner, client, study, analyzer_name, folder)
                continue
            started = time.perf_counter()
            try:
                outcome = analyze_study(
                    client, study.imaging_study, get_analyzer(analyzer_name), dicomweb_allow_list=allow
                )
            except ImagingCdsError as exc:
                failures += 1
                print(f"  failed: {exc}")
                continue
            seconds = time.perf_counter() - started
            result = outcome.result
            print(f"  {result.conclusion}")
            for m in result.measurements:
                print(f"    {m.display:<48} {m.value:10.4g} {unit_label(m.unit)}")
            print(f"  category: {result.category.display}   ({seconds:.1f} s)")
            for warning in result.warnings:
                print(f"  warning: {warning}")
            files = write_outputs(client, outcome, folder)
            print(f"  written to the EHR (one transaction): {', '.join(outcome.written)}")
            print(f"  look at: {fhir.base_url}/{outcome.diagnostic_report}")
            print(f"           {files[0].parent}/ (report and explanation images read back from the EHR)")
        print(f"\nDone: {len(DEMO_RUNS) - failures} of {len(DEMO_RUNS)} analyses written as preliminary AI results.")
        if app is None:
            app = stack.enter_context(_clinician_app(fhir.base_url, orthanc.dicomweb_url, output))
        practitioner = _demo_practitioner(client)
        first = next(iter(loaded.values()))
        launch = app.sandbox.launch_url(first.patient, practitioner, app.launch_url)
        print("\nClinician app (SMART on FHIR), launched from the sandbox EHR (a development tool):")
        print(f"  open in a browser: {launch}")
        print(f"  it opens {first.patient}'s studies as {practitioner}; review and sign the AI results there.")
        print(f"  model cards: {app.url}/models/")
        if keep_running:
            print("The servers stay up so you can browse them; press Ctrl-C to stop.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                print("\nstopping")
    return 0 if failures == 0 else 1


def _start_engine(stack: ExitStack, fhir_base: str, dicomweb: str, output: Path) -> tuple[Any, Any]:
    """Redis, the clinician app on the engine, and one worker node (the app's registration in its settings)."""
    from devtools.sandbox.dev import CLIENT_ID, serve_app_with_sandbox
    from devtools.servers import redis_server
    from devtools.workers import deployment_keyring, worker_node, write_settings
    from service.settings import load_settings
    from service.web import celery_runner

    redis = stack.enter_context(redis_server())
    state = output / "engine"
    common: dict[str, Any] = {
        "broker_url": redis.url,
        "fhir_base": fhir_base,
        "dicomweb": dicomweb,
        "log_format": "text",
    }
    runner = celery_runner(load_settings(write_settings(state, **common)))
    keyring = deployment_keyring(state)  # the worker opens the app's sessions with the same key
    app = stack.enter_context(
        serve_app_with_sandbox(fhir_base, state / "data" / "app", dicomweb, job_runner=runner, keyring=keyring)
    )
    registration = {"fhir_base": app.sandbox.fhir_base, "client_id": CLIENT_ID, "redirect_uri": app.redirect_uri}
    settings = write_settings(state, **common, extra={"smart_clients": [registration]})
    print(f"  Redis       : {redis.url}  (job broker)")
    print(f"  worker      : imaging-cds worker --config {settings}  (starting...)")
    node = stack.enter_context(worker_node(settings, "demo"))
    print(f"                ready, process {node.process.pid}; its log: {node.log}")
    return runner, app


def _analyse_on_engine(runner: Any, client: FhirClient, study: LoadedStudy, analyzer: str, folder: Path) -> bool:
    """Submit one analysis to the worker, wait for it, and show what it filed; False when it failed."""
    started = time.perf_counter()
    record = runner.submit(ANALYZE_STUDY, analysis_params(study.imaging_study, [analyzer]))
    print(f"  job {record.id} queued")
    record = runner.wait(record.id, timeout=900)
    seconds = time.perf_counter() - started
    if record.state is not JobState.DONE or record.result is None:
        error = record.error or {"message": f"still {record.state.value} after 900 s", "remedy": ""}
        print(f"  failed: {error['message']} {error['remedy']}".rstrip())
        return False
    report_ref = str(record.result["diagnosticReport"])
    report = client.read(*report_ref.split("/"))
    print(f"  {report.get('conclusion', '')}")
    print(f"  done by worker {record.worker} on attempt {record.attempts} ({seconds:.1f} s from submit to filed)")
    files = write_report_files(client, report_ref, record.result, folder)
    print(f"  look at: {client.base_url}/{report_ref}")
    print(f"           {files[0].parent}/ (report and explanation images read back from the EHR)")
    return True

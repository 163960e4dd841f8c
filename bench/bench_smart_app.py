"""Benchmark: clicking "Analyze" in the clinician app until the results are on screen, against the pipeline alone.

In one run, on the same real chest CT (pyradiomics lung2 in Orthanc, its ImagingStudy in sekmet-fhir):

(a) baseline: ``imaging_cds.pipeline.analyze_study`` called directly against the FHIR server, what
    ``imaging-cds analyze`` does;
(b) the app: in headless Chromium, launched from the sandbox EHR, click Analyze on the study page and stop the
    clock when the result page shows every explanation image (``naturalWidth > 0``). This adds the job
    queue, the progress polling, the SMART proxy in front of FHIR, and rendering the result page.

Both write to the EHR idempotently, so every run after the first does the same work. One warm-up of each, then
``--repeats`` alternating runs; prints the medians and the ratio (b)/(a) (target <= 1.2).

Run: .venv/bin/python bench/bench_smart_app.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
from playwright.sync_api import Page, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fhir_adapters.client import FhirClient
from imaging_cds.allowlist import AllowList
from imaging_cds.demo import SAMPLE_CHEST_CT, load_sample_study
from imaging_cds.pipeline import analyze_study
from imaging_cds.servers import fhir_server, orthanc_server
from models.registry import get_analyzer
from smart_launch.sandbox.dev import serve_app_with_sandbox
from tests.smart_support import CHROMIUM_ARGS, practitioner_resource

ANALYZER = "ct-emphysema"
ALL_IMAGES_SHOWN = (
    "Array.from(document.querySelectorAll('img.explanation')).length > 0 && "
    "Array.from(document.querySelectorAll('img.explanation')).every(i => i.complete && i.naturalWidth > 0)"
)


def click_analyze_until_shown(page: Page, study_url: str) -> float:
    """Seconds from the Analyze click to a result page with every explanation image decoded."""
    page.goto(study_url)
    page.check(f"#analyzer-{ANALYZER}")
    start = time.perf_counter()
    page.click("#analyze-button")
    page.wait_for_url("**/reports/*", timeout=600_000)
    page.wait_for_function(ALL_IMAGES_SHOWN, timeout=60_000)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    analyzer = get_analyzer(ANALYZER)
    with fhir_server() as fhir, orthanc_server() as orthanc, tempfile.TemporaryDirectory() as tmp:
        client = FhirClient(fhir.base_url, session=requests.Session())
        loaded = load_sample_study(client, orthanc, SAMPLE_CHEST_CT)
        practitioner = f"Practitioner/{client.create(practitioner_resource('Bench'))['id']}"
        allow = AllowList.of([orthanc.dicomweb_url])

        def pipeline() -> float:
            start = time.perf_counter()
            analyze_study(client, loaded.imaging_study, analyzer, dicomweb_allow_list=allow)
            return time.perf_counter() - start

        with (
            serve_app_with_sandbox(fhir.base_url, Path(tmp), orthanc.dicomweb_url) as app,
            sync_playwright() as playwright,
        ):
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(app.sandbox.launch_url(loaded.patient.split("/")[1], practitioner, app.launch_url))
            page.click("#approve")
            page.wait_for_selector("table.studies")
            study_url = f"{app.url}/studies/{loaded.imaging_study.split('/')[1]}"

            print(f"Study {loaded.imaging_study}: {loaded.instance_count} CT images; analyzer {ANALYZER}")
            print(f"warm-up: pipeline {pipeline():.2f} s, app {click_analyze_until_shown(page, study_url):.2f} s")
            baseline: list[float] = []
            in_app: list[float] = []
            for run in range(1, args.repeats + 1):
                baseline.append(pipeline())
                in_app.append(click_analyze_until_shown(page, study_url))
                print(f"run {run}: pipeline {baseline[-1]:.2f} s, app click-to-results {in_app[-1]:.2f} s")
            browser.close()

    base = statistics.median(baseline)
    app_time = statistics.median(in_app)
    ratio = app_time / base
    print(f"\nmedian pipeline (imaging-cds analyze):     {base:.2f} s")
    print(f"median app, Analyze click to results shown: {app_time:.2f} s")
    print(f"ratio app / pipeline: {ratio:.2f} (target <= 1.2) -> {'OK' if ratio <= 1.2 else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()

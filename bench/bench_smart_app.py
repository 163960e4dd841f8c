"""Benchmark: clicking "Analyze" in the clinician app until the results are on screen, against the pipeline alone.

In one run, on the same real chest CT (pyradiomics lung2 in Orthanc, its ImagingStudy in sekmet-fhir), with the
app launched in headless Chromium from the sandbox EHR:

(a) baseline: ``pipeline.analysis.analyze_study`` - what ``imaging-cds analyze`` does - called directly,
    against the same EHR FHIR endpoint the app uses (the sandbox EHR's SMART-protected base) with the same
    launch's access token, so both read and write FHIR the same way;
(b) the app: from the clinician's click on Analyze (the click event's own timestamp in the page) until the
    result has painted every explanation image (Element Timing ``renderTime``), both on the browser's clock.
    This adds what the app adds: the job queue, the progress shown on the study page and its long poll, the result
    placed in that page (or, without it, the result page), serving the images, and the browser's painting.

Also printed, for context only: the pipeline straight against the FHIR server (without the sandbox EHR's
proxy in front), the click-to-results time as the Playwright driver sees it (it adds the driver's own
round trips to the browser), and the display floor: on the same study page, the Analyze click answered at once
with the result already filed, which the page stages, fetches and decodes the images of, and places as the
app's script does - no analysis, no request for the result - until every explanation image has painted. That
is the least time this browser, on this machine, takes to show this result; the target leaves 0.2 x the
pipeline for everything the app adds, the display included.

Both write to the EHR idempotently, so every run after the first does the same work. One warm-up of each, then
``--repeats`` alternating runs; prints the medians and the ratio (b)/(a) (target <= 1.2).

Run: .venv/bin/python bench/bench_smart_app.py [--repeats 9]
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

from core.allowlist import AllowList
from devtools.demo import SAMPLE_CHEST_CT, load_sample_study
from devtools.sandbox.dev import serve_app_with_sandbox
from devtools.servers import fhir_server, orthanc_server
from fhir_adapters.client import FhirClient
from models.registry import get_analyzer
from pipeline.analysis import analyze_study
from pipeline.memory import freeze_long_lived
from smart_launch.app import SESSION_COOKIE
from tests.smart_support import CHROMIUM_ARGS, practitioner_resource

ANALYZER = "ct-emphysema"
ALL_IMAGES_SHOWN = (
    "Array.from(document.querySelectorAll('img.explanation')).length > 0 && "
    "Array.from(document.querySelectorAll('img.explanation')).every(i => i.complete && i.naturalWidth > 0)"
)
# Kept in sessionStorage, which outlives the navigations from the study page to the results (same origin, same tab).
RECORD_CLICK = """() => document.getElementById('analyze-button').addEventListener('click', (event) => {
  sessionStorage.setItem('bench-click-ms', String(performance.timeOrigin + event.timeStamp));
}, { capture: true, once: true })"""
# Runs in every page the tab opens: on a result page, notes when the last explanation image was painted, on the
# browser's clock - the Element Timing API's renderTime of the images the page marks ``elementtiming``.
NOTE_SHOWN = """(() => {
  const painted = [];
  new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) {
      if (entry.identifier === 'explanation') { painted.push(entry.renderTime || entry.loadTime); }
    }
    const expected = document.querySelectorAll('img.explanation').length;
    if (expected > 0 && painted.length >= expected) {
      window.benchShownMs = performance.timeOrigin + Math.max(...painted);
    }
  }).observe({ type: 'element', buffered: true });
})()"""
SHOWN_AT = f"() => ({ALL_IMAGES_SHOWN}) && window.benchShownMs"
# The display floor's click: the Analyze form's submission is taken before the app's script sees it, and the
# result already filed is shown the way that script shows one (staged, images decoded, then placed whole).
SHOW_FILED_ON_SUBMIT = """(html) => document.addEventListener('submit', (event) => {
  event.preventDefault();
  event.stopImmediatePropagation();
  const staged = document.createElement('div');
  staged.innerHTML = html;
  const decoded = Array.from(staged.querySelectorAll('img'), (img) => img.decode().catch(() => null));
  Promise.all(decoded).then(() => document.getElementById('main').replaceChildren(...staged.childNodes));
}, { capture: true, once: true })"""


def _open_study_with_click_timer(page: Page, study_url: str) -> None:
    """The study page, the benchmarked analyzer chosen, the Analyze click's own timestamp to be recorded."""
    page.goto(study_url)
    page.check(f"#analyzer-{ANALYZER}")
    page.evaluate(RECORD_CLICK)


def _wait_until_shown(page: Page) -> float:
    """Wait for every explanation image to paint; the last paint's time on the browser's clock (ms)."""
    return float(page.wait_for_function(SHOWN_AT, timeout=60_000).json_value())


def _seconds_since_click(page: Page, shown_ms: float) -> float:
    """Seconds from the recorded click to ``shown_ms``, both on the browser's clock."""
    return (shown_ms - float(page.evaluate("() => sessionStorage.getItem('bench-click-ms')"))) / 1000.0


def click_analyze_until_shown(page: Page, study_url: str) -> tuple[float, float]:
    """Seconds from the Analyze click to a result page with every explanation image painted: on the browser's
    clock (click event to the last image's paint), and as the driver sees it."""
    _open_study_with_click_timer(page, study_url)
    start = time.perf_counter()
    page.click("#analyze-button")
    page.wait_for_url("**/reports/*", timeout=600_000)
    shown_ms = _wait_until_shown(page)
    driver = time.perf_counter() - start
    return _seconds_since_click(page, shown_ms), driver


def click_until_filed_result_shown(page: Page, study_url: str, result_html: str) -> float:
    """The display floor: seconds from the Analyze click to every explanation image of ``result_html`` painted,
    when the click is answered at once with that result (see ``SHOW_FILED_ON_SUBMIT``)."""
    _open_study_with_click_timer(page, study_url)
    page.evaluate(SHOW_FILED_ON_SUBMIT, result_html)
    page.click("#analyze-button")
    return _seconds_since_click(page, _wait_until_shown(page))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    analyzer = get_analyzer(ANALYZER)
    with fhir_server() as fhir, orthanc_server() as orthanc, tempfile.TemporaryDirectory() as tmp:
        direct = FhirClient(fhir.base_url, session=requests.Session())
        loaded = load_sample_study(direct, orthanc, SAMPLE_CHEST_CT)
        practitioner = f"Practitioner/{direct.create(practitioner_resource('Bench'))['id']}"
        allow = AllowList.of([orthanc.dicomweb_url])

        def pipeline(client: FhirClient) -> float:
            start = time.perf_counter()
            analyze_study(client, loaded.imaging_study, analyzer, dicomweb_allow_list=allow)
            return time.perf_counter() - start

        with (
            serve_app_with_sandbox(fhir.base_url, Path(tmp), orthanc.dicomweb_url) as app,
            sync_playwright() as playwright,
        ):
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.add_init_script(NOTE_SHOWN)
            page.goto(app.sandbox.launch_url(loaded.patient.split("/")[1], practitioner, app.launch_url))
            page.click("#approve")
            page.wait_for_selector("table.studies")
            study_url = f"{app.url}/studies/{loaded.imaging_study.split('/')[1]}"
            # The launch's own session: the same EHR endpoint, the same access token as the app's analysis.
            session_id = next(c["value"] for c in page.context.cookies() if c["name"] == SESSION_COOKIE)
            state = app.ext.sessions.get(session_id)
            assert state is not None and state.authorized
            via_ehr = app.ext.fhir_client(session_id, state)

            print(f"Study {loaded.imaging_study}: {loaded.instance_count} CT images; analyzer {ANALYZER}")
            print(
                f"warm-up: pipeline {pipeline(via_ehr):.2f} s, direct {pipeline(direct):.2f} s, "
                f"app {click_analyze_until_shown(page, study_url)[0]:.2f} s"
            )
            # The result as the app placed it; every run files the same report (idempotent), so it stays current.
            result_html = page.evaluate("() => document.getElementById('main').innerHTML")
            print(f"warm-up: display floor {click_until_filed_result_shown(page, study_url, result_html):.3f} s")
            # A served app runs in a long-lived process whose start-up objects are frozen for the collector
            # (pipeline.memory); this process, which holds both paths, is put in the same steady state.
            freeze_long_lived()
            baseline: list[float] = []
            without_proxy: list[float] = []
            in_app: list[float] = []
            in_driver: list[float] = []
            display: list[float] = []
            for run in range(1, args.repeats + 1):
                baseline.append(pipeline(via_ehr))
                shown, driver = click_analyze_until_shown(page, study_url)
                in_app.append(shown)
                in_driver.append(driver)
                display.append(click_until_filed_result_shown(page, study_url, result_html))
                without_proxy.append(pipeline(direct))
                print(
                    f"run {run}: pipeline {baseline[-1]:.3f} s, app click-to-results {in_app[-1]:.3f} s "
                    f"(ratio {in_app[-1] / baseline[-1]:.2f}); driver's view {driver:.3f} s; "
                    f"display floor {display[-1] * 1000:.0f} ms; "
                    f"pipeline without the EHR proxy {without_proxy[-1]:.3f} s"
                )
            browser.close()

    base = statistics.median(baseline)
    app_time = statistics.median(in_app)
    ratio = app_time / base
    print(f"\nmedian pipeline (imaging-cds analyze, same EHR endpoint): {base:.3f} s")
    print(f"median app, Analyze click to results shown:               {app_time:.3f} s")
    print(f"  for context: pipeline without the EHR proxy {statistics.median(without_proxy):.3f} s; ")
    print(f"  click-to-results as the Playwright driver sees it {statistics.median(in_driver):.3f} s")
    added = statistics.median(a - b for a, b in zip(in_app, baseline, strict=True))
    print(f"  what the app adds, median of the runs' differences: {added * 1000:.0f} ms")
    print(
        f"  display floor (the click answered at once with the filed result, shown as the app shows it): "
        f"{statistics.median(display) * 1000:.0f} ms, of the {0.2 * base * 1000:.0f} ms the target leaves the app"
    )
    print(f"ratio app / pipeline: {ratio:.2f} (target <= 1.2) -> {'OK' if ratio <= 1.2 else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()

"""The clinician app in real headless Chromium, launched from the sandbox EHR in front of real sekmet-fhir + Orthanc.

Each test is a clinician's path through the app: the EHR launch through sign-off of an AI result, a standalone
launch, a launch that opens one study, and the ways a launch can go wrong (consent denied, no write permission,
a tampered ``state``, a wrong PKCE verifier, a replayed code), each of which must end in a clear message.
Screenshots of the main screens are saved under ``artifacts/screenshots/`` at 1280x800 and at tablet width.
"""

from __future__ import annotations

import json
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
from playwright.sync_api import Browser, Page, Route, ViewportSize, sync_playwright

from devtools.demo import LoadedStudy, load_sample_study
from devtools.samples import SAMPLES
from devtools.sandbox.dev import RunningApp, serve_app_with_sandbox
from devtools.servers import FhirServer, OrthancServer
from fhir_adapters.audit import recorded_now
from fhir_adapters.client import FhirClient
from fhir_adapters.validation import validate_resource
from smart_launch.session import PendingLaunch
from tests.followup_support import emphysema_result, file_compared_result
from tests.smart_support import (
    CHROMIUM_ARGS,
    SCREENSHOTS,
    app_pacs,
    audit_events,
    entity_of,
    practitioner_resource,
    profile_of,
)

pytestmark = pytest.mark.slow

TABLET: ViewportSize = {"width": 768, "height": 1024}
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
DECISION = re.compile(r".*/authorize/decision$")


@pytest.fixture(scope="module")
def fhir(fhir_base: FhirServer) -> FhirClient:
    return FhirClient(fhir_base.base_url, session=requests.Session())


@pytest.fixture(scope="module")
def chest_ct(fhir: FhirClient, orthanc: OrthancServer) -> LoadedStudy:
    """The real de-identified chest CT (pyradiomics lung2) in Orthanc, and its ImagingStudy in the EHR."""
    return load_sample_study(fhir, orthanc, SAMPLES["lung2"])


@pytest.fixture(scope="module")
def practitioner(fhir: FhirClient) -> str:
    created = fhir.create(practitioner_resource("Radiologist"))
    return f"Practitioner/{created['id']}"


@pytest.fixture(scope="module")
def app(
    fhir_base: FhirServer, orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    with serve_app_with_sandbox(
        fhir_base.base_url, tmp_path_factory.mktemp("smart-app"), orthanc.dicomweb_url
    ) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=DESKTOP)
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    yield tab
    context.close()


def screenshot(page: Page, name: str) -> None:
    """Save the screen at desktop and tablet width (the artefacts a reviewer looks at)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size(DESKTOP)
    page.screenshot(path=str(SCREENSHOTS / f"{name}-1280.png"))
    page.set_viewport_size(TABLET)
    page.screenshot(path=str(SCREENSHOTS / f"{name}-768.png"), full_page=True)
    page.set_viewport_size(DESKTOP)


WATCH_RESULT_PLACED = """() => new MutationObserver((changes, observer) => {
  const images = document.querySelectorAll('#main img.explanation');
  if (images.length === 0) { return; }
  window.resultPlaced = {
    images: images.length,
    loaded: Array.from(images).filter((i) => i.complete && i.naturalWidth > 0).length,
  };
  observer.disconnect();
}).observe(document.getElementById('main'), { childList: true, subtree: true })"""
"""Notes, the moment the result enters the study page, how many of its explanation images are loaded."""
ON_FIRST_SCREEN = """(selector) => {
  const box = document.querySelector(selector).getBoundingClientRect();
  return window.scrollY === 0 && box.top >= 0 && box.left >= 0 && box.bottom <= window.innerHeight
    && box.right <= window.innerWidth;
}"""
"""Whether the element is wholly on the first screen: the page unscrolled, the element inside the viewport."""


def ehr_launch(page: Page, app: RunningApp, chest_ct: LoadedStudy, practitioner: str, **kwargs: object) -> None:
    """Click the app in the EHR and land on the sandbox's consent page."""
    patient = chest_ct.patient.split("/")[1]
    page.goto(app.sandbox.launch_url(patient, practitioner, app.launch_url, **kwargs))  # type: ignore[arg-type]
    page.wait_for_selector("#approve")


def ehr_launch_approved(page: Page, app: RunningApp, chest_ct: LoadedStudy, practitioner: str) -> None:
    """Launch from the EHR, approve the consent and land on the patient's study list."""
    ehr_launch(page, app, chest_ct, practitioner)
    page.click("#approve")
    page.wait_for_selector("table.studies")


def test_ehr_launch_analyze_accept_files_a_final_report_signed_by_the_launching_practitioner(
    page: Page, app: RunningApp, chest_ct: LoadedStudy, practitioner: str, fhir: FhirClient
) -> None:
    started = recorded_now()
    ehr_launch_approved(page, app, chest_ct, practitioner)
    assert page.url.rstrip("/") == app.url
    assert "Demo patient lung2" in page.inner_text(".patient-banner")
    row = page.inner_text("table.studies tbody")
    assert "CT" in row and "CHEST" in row.upper()
    screenshot(page, "01-study-list")

    page.click(f"a[href='/studies/{chest_ct.imaging_study.split('/')[1]}']")
    page.wait_for_selector("#analyze-button")
    assert page.is_enabled("#analyze-button")
    screenshot(page, "02-study")
    visited: list[str] = []
    page.on("framenavigated", lambda frame: visited.append(frame.url))
    page.evaluate(WATCH_RESULT_PLACED)
    page.focus("#analyze-button")
    page.keyboard.press("Enter")  # keyboard only: a real button, reachable and operable without a mouse
    page.wait_for_url(re.compile(r".*/reports/[^/]+$"), timeout=300_000)
    # With JavaScript the progress is followed on the study page itself, and the result is shown there too: the
    # address becomes the result's, and focus moves to its heading, as opening the result page would put it.
    assert not [url for url in visited if "/jobs/" in url], visited
    assert page.title().startswith("AI result") and page.evaluate("document.activeElement.tagName") == "H1"
    page.wait_for_function(  # a function, not an expression: Playwright would eval() one, which the CSP forbids
        "() => Array.from(document.querySelectorAll('img.explanation')).every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.eval_on_selector("img.explanation", "i => i.naturalWidth") > 0
    # The result appeared whole: its explanation images were loaded when it was placed, not filled in afterwards.
    placed = page.evaluate("() => window.resultPlaced")
    assert placed["images"] >= 1 and placed["loaded"] == placed["images"], placed
    findings = page.inner_text("table.findings")
    assert "LAA" in findings and "%" in findings
    # At 1280x800 the first screen holds the verdict, the first measured value and an explanation image beside it.
    for part in ("h1", "table.findings tbody tr", "img.explanation"):
        assert page.evaluate(ON_FIRST_SCREEN, part), f"{part} is not on the first screen at 1280x800"
    assert "version" in page.inner_text(".facts")
    assert page.get_attribute("a[href^='/models/']", "href") == "/models/ct-emphysema"
    html = page.content()
    session_id = next(c["value"] for c in page.context.cookies() if c["name"] == "imaging_cds_sid")
    state = app.ext.sessions.get(session_id)
    assert state is not None and state.access_token and state.refresh_token  # the server holds them ...
    assert state.access_token not in html  # ... and never shows them in the page
    screenshot(page, "03-result")

    report_id = page.url.rsplit("/", 1)[1]
    # The skip link still jumps within the result (no reload), and Back from the jump stays on the result.
    page.evaluate("window.sameDocumentMarker = 'same document'")
    page.focus(".skip-link")
    page.keyboard.press("Enter")
    page.wait_for_url("**#main")
    page.go_back()
    assert page.url.endswith(f"/reports/{report_id}") and page.evaluate("window.sameDocumentMarker") == "same document"
    # Back returns to the study; Forward opens the result page itself, read from the EHR.
    page.go_back()
    page.wait_for_selector("#analyze-button")
    assert page.url.endswith(f"/studies/{chest_ct.imaging_study.split('/')[1]}")
    page.go_forward()
    page.wait_for_selector("#accept-button")
    assert page.url.endswith(f"/reports/{report_id}") and "LAA" in page.inner_text("table.findings")
    page.click("#accept-button")
    page.wait_for_selector("#review-outcome")
    assert "Accepted" in page.inner_text("#review-outcome")
    assert page.inner_text("#report-status").startswith("Final")  # read back from the EHR, not a kept copy
    screenshot(page, "04-accepted")

    stored = fhir.read("DiagnosticReport", report_id)  # read sekmet directly, not through the app
    assert stored["status"] == "final"
    assert stored["resultsInterpreter"] == [{"reference": practitioner}]
    provenance = list(fhir.search("Provenance", {"target": f"DiagnosticReport/{report_id}"}))
    assert any(a["who"]["reference"] == practitioner for p in provenance for a in p["agent"])
    figures = app.ext.reviews.figures()
    assert figures["ct-emphysema"].accepted >= 1
    assert app.ext.reviews.decisions(f"DiagnosticReport/{report_id}")[-1][:2] == ("accepted", practitioner)

    # Secrets at rest: after the whole flow no state file holds the tokens or the session cookie, readable by
    # the service's account only (files 0600, their folder 0700).
    state = app.ext.sessions.get(session_id)
    assert state is not None and state.access_token and state.refresh_token
    secrets_in_use = [state.access_token, state.refresh_token, session_id]
    data_dir = app.ext.config.data_dir
    files = [f for f in data_dir.rglob("*") if f.is_file()]
    assert {"smart-sessions.sqlite", "smart-jobs.sqlite", "reviews.sqlite", "audit-outbox.sqlite"} <= {
        f.name for f in files
    }
    for file in files:
        content = file.read_bytes()
        assert not [s for s in secrets_in_use if s.encode() in content], f"a secret is readable in {file.name}"
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, f"{file.name} is {file.stat().st_mode:o}"
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700

    # Audit: the launch, the list, the study, the analysis and the sign-off each left their BALP AuditEvents in
    # the EHR's FHIR server, all for this practitioner, none carrying the patient's name.
    # (Other tests of this session read the same demo patient: only what this test's clinician did is checked.)
    events = [e for e in audit_events(app, fhir, chest_ct.patient) if e["recorded"] >= started]
    for event in events:
        validate_resource(event)
        assert any(a.get("who", {}).get("reference") == practitioner for a in event["agent"]), event["id"]
        assert "Demo patient" not in json.dumps(event)
    made = {(profile_of(e), entity_of(e)) for e in events}
    study_ref, report_ref = chest_ct.imaging_study, f"DiagnosticReport/{report_id}"
    assert ("PatientRead", chest_ct.patient) in made  # the banner
    assert ("PatientQuery", "GET ImagingStudy") in made  # the study list
    assert ("PatientRead", study_ref) in made  # the study page, and the analysis reading it again
    assert ("PatientRead", report_ref) in made  # the result page, read before the sign-off
    assert ("PatientUpdate", report_ref) in made  # the sign-off
    transfers = [e for e in events if e["type"]["code"] == "110104"]  # the images fetched from the PACS
    assert transfers and transfers[0]["agent"][1]["network"]["address"].rstrip("/") == app_pacs(app)


def test_a_result_whose_images_cannot_be_loaded_is_still_shown(
    page: Page, app: RunningApp, chest_ct: LoadedStudy, practitioner: str
) -> None:
    """The study page waits for a result's images before showing it; an image that fails must not hold it back."""
    ehr_launch_approved(page, app, chest_ct, practitioner)
    page.goto(f"{app.url}/studies/{chest_ct.imaging_study.split('/')[1]}")
    page.route("**/media/**", lambda route: route.abort("connectionfailed"))
    page.click("#analyze-button")
    page.wait_for_url(re.compile(r".*/reports/[^/]+$"), timeout=300_000)
    assert "LAA" in page.inner_text("table.findings")
    assert page.evaluate("() => document.querySelectorAll('img.explanation').length") >= 1
    assert page.evaluate("() => Array.from(document.querySelectorAll('img.explanation')).every(i => !i.naturalWidth)")


def test_launch_with_fhir_context_opens_that_study(
    page: Page, app: RunningApp, chest_ct: LoadedStudy, practitioner: str
) -> None:
    ehr_launch(page, app, chest_ct, practitioner, fhir_context=[chest_ct.imaging_study])
    page.click("#approve")
    page.wait_for_url(f"{app.url}/studies/{chest_ct.imaging_study.split('/')[1]}")
    assert page.inner_text("h1") == "DEMO CHEST CT"
    assert page.is_visible("#analyze-button")


def test_standalone_launch_lets_the_clinician_pick_the_patient(
    page: Page, app: RunningApp, chest_ct: LoadedStudy
) -> None:
    page.goto(f"{app.url}/")
    screenshot(page, "00-welcome")
    page.click(".launch-list a")
    page.check(f"#patient-{chest_ct.patient.split('/')[1]}")
    page.check("input[name='sandbox_practitioner']")
    page.click("#continue")
    page.click("#approve")
    page.wait_for_selector("table.studies")
    assert "Demo patient lung2" in page.inner_text(".patient-banner")


def test_denied_consent_says_nothing_was_shared(
    page: Page, app: RunningApp, chest_ct: LoadedStudy, practitioner: str
) -> None:
    ehr_launch(page, app, chest_ct, practitioner)
    page.click("#deny")
    page.wait_for_selector("[role=alert]")
    assert "Access not granted" in page.inner_text("h1")
    assert "declined" in page.inner_text("[role=alert]")
    screenshot(page, "05-denied")


def test_without_write_scopes_the_app_says_it_cannot_file_results_and_disables_analyze(
    page: Page, app: RunningApp, chest_ct: LoadedStudy, practitioner: str
) -> None:
    ehr_launch(page, app, chest_ct, practitioner)
    for box in page.query_selector_all("input[name=granted]"):
        scope = box.get_attribute("value") or ""
        if re.search(r"\.[a-z]*[cud][a-z]*$", scope) and not scope.endswith(".rs") and not scope.endswith(".r"):
            box.uncheck()
    page.click("#approve")
    page.wait_for_selector("table.studies")
    notice = page.inner_text(".notice.warning")
    assert "cannot file AI results" in notice and "DiagnosticReport.c" in notice
    assert "Not shown (no permission)" in page.inner_text("table.studies")  # never "none yet" when unknown
    page.click(f"a[href='/studies/{chest_ct.imaging_study.split('/')[1]}']")
    page.wait_for_selector("#analyze-button")
    assert page.is_disabled("#analyze-button")
    screenshot(page, "06-no-write")


def _capture_callback(page: Page) -> list[str]:
    """Stop the browser before the app's callback and keep its URL (code and state), as an attacker would.

    The consent decision is sent on the browser's behalf without following its redirect, so the code is issued
    but not yet redeemed; the browser shows a placeholder page.
    """
    captured: list[str] = []

    def hold(route: Route) -> None:
        answer = route.fetch(max_redirects=0)
        captured.append(answer.headers["location"])
        route.fulfill(status=200, body="held by the test", content_type="text/plain")

    page.route(DECISION, hold)
    return captured


def test_tampered_state_is_rejected(page: Page, app: RunningApp, chest_ct: LoadedStudy, practitioner: str) -> None:
    ehr_launch(page, app, chest_ct, practitioner)
    captured = _capture_callback(page)
    page.click("#approve")
    page.wait_for_selector("text=held by the test")
    page.unroute(DECISION)
    query = parse_qs(urlsplit(captured[0]).query)
    page.goto(f"{app.redirect_uri}?{urlencode({'code': query['code'][0], 'state': query['state'][0] + 'x'})}")
    assert "does not belong to the launch this browser started" in page.inner_text("[role=alert]")


def test_pkce_verifier_mismatch_is_rejected(
    page: Page, app: RunningApp, chest_ct: LoadedStudy, practitioner: str
) -> None:
    ehr_launch(page, app, chest_ct, practitioner)
    captured = _capture_callback(page)
    page.click("#approve")
    page.wait_for_selector("text=held by the test")
    page.unroute(DECISION)
    cookie = next(c for c in page.context.cookies() if c["name"] == "imaging_cds_launch")
    pending = PendingLaunch.open(cookie["value"], app.ext.keyring)  # only the app's key opens the pending launch
    assert pending is not None and pending.code_verifier
    pending.code_verifier = pending.code_verifier[::-1]  # the verifier no longer matches the challenge sent
    page.context.add_cookies([{**cookie, "value": pending.seal(app.ext.keyring)}])  # type: ignore[list-item]
    page.goto(captured[0])
    message = page.inner_text("[role=alert]")
    assert "invalid_grant" in message and "PKCE code verifier did not match" in message


def test_replayed_code_is_rejected(page: Page, app: RunningApp, chest_ct: LoadedStudy, practitioner: str) -> None:
    ehr_launch(page, app, chest_ct, practitioner)
    captured = _capture_callback(page)
    page.click("#approve")
    page.wait_for_selector("text=held by the test")
    page.unroute(DECISION)
    page.goto(captured[0])  # the genuine callback: the code is spent here
    page.wait_for_selector("table.studies")
    first_code = parse_qs(urlsplit(captured[0]).query)["code"][0]

    ehr_launch(page, app, chest_ct, practitioner)  # a second launch; its state is valid, the code is the old one
    second = _capture_callback(page)
    page.click("#approve")
    page.wait_for_selector("text=held by the test")
    page.unroute(DECISION)
    state = parse_qs(urlsplit(second[0]).query)["state"][0]
    page.goto(f"{app.redirect_uri}?{urlencode({'code': first_code, 'state': state})}")
    message = page.inner_text("[role=alert]")
    assert "invalid_grant" in message and "used already" in message
    screenshot(page, "07-replayed-code")


def test_expired_access_token_is_refreshed_without_the_clinician_noticing(
    browser: Browser,
    fhir_base: FhirServer,
    orthanc: OrthancServer,
    chest_ct: LoadedStudy,
    practitioner: str,
    tmp_path: Path,
) -> None:
    with serve_app_with_sandbox(fhir_base.base_url, tmp_path, orthanc.dicomweb_url, access_token_lifetime=3) as app:
        context = browser.new_context(viewport=DESKTOP)
        page = context.new_page()
        ehr_launch_approved(page, app, chest_ct, practitioner)
        session_id = next(c["value"] for c in context.cookies() if c["name"] == "imaging_cds_sid")
        first = app.ext.sessions.get(session_id)
        assert first is not None and first.token_lifetime_s == 3
        time.sleep(3.5)  # let the access token expire (a wait, not a measurement)
        page.reload()
        page.wait_for_selector("table.studies")
        assert "Demo patient lung2" in page.inner_text(".patient-banner")
        second = app.ext.sessions.get(session_id)
        assert second is not None and second.access_token != first.access_token
        context.close()


def test_a_followed_measurement_is_charted_across_the_patients_studies_with_its_repeatability_band(
    page: Page, app: RunningApp, practitioner: str, fhir: FhirClient
) -> None:
    """Issue 20: the study list and the result page chart LAA-950 over four chest CTs, readable without colour.

    The values are set by the test (no real pair of scans with progression exists); each result is filed and compared
    as the pipeline does it. The oldest was filed by a version the card does not vouch for: a hollow square.
    """
    created = fhir.create(
        {"resourceType": "Patient", "name": [{"family": "Trend", "given": ["Test"]}], "gender": "female"}
    )
    patient = f"Patient/{created['id']}"
    file_compared_result(fhir, patient, emphysema_result(2.4, version="0.9.0"), "2022-01-10T09:00:00+00:00")
    for laa, started in ((2.9, "2023-01-10"), (3.1, "2024-01-10"), (5.2, "2025-01-10")):
        newest = file_compared_result(fhir, patient, emphysema_result(laa), f"{started}T09:00:00+00:00")
    page.goto(app.sandbox.launch_url(created["id"], practitioner, app.launch_url))
    page.click("#approve")
    page.wait_for_selector("section.trends")
    chart = page.locator("figure#trend-1-laa950_percent")
    description = chart.locator("svg desc").text_content() or ""
    assert "2022-01-10: 2.4 % (another analyzer version, not compared)" in description
    assert "2025-01-10: 5.2 % (this result)" in description
    assert "Values from 1.8 to 4.2 % are within the repeatability of the prior value" in description
    assert "Verdict: increased" in description
    assert chart.locator("svg rect[stroke-dasharray]").count() >= 1  # the band: hatched, with a dashed edge
    assert chart.locator("svg circle[r='8']").count() == 1  # the shown result is the ringed one
    assert chart.locator("svg rect[width='10']").count() == 1  # the other version's hollow square
    assert "increased" in chart.locator("figcaption").inner_text()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("section.trends").screenshot(path=str(SCREENSHOTS / "05-trend-study-list.png"))

    page.click(f"a[href='/reports/{newest.split('/')[1]}']")
    page.wait_for_selector("section.trends figure svg")
    assert "Compared with the CT of 2024-01-10" in page.inner_text("p.conclusion")
    assert page.locator("section.trends figure").count() >= 1
    screenshot(page, "06-result-with-trend")
    page.locator("section.trends").screenshot(path=str(SCREENSHOTS / "06-trend-result.png"))

"""The clinician app over plain HTTP (no browser): client types, v1 fallback, security headers, CSRF, sessions.

The launches run against the real sandbox EHR in front of real sekmet-fhir; the consent page is submitted the
way a browser would submit it. The session, review and view rules are checked on their own further down.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from flask.testing import FlaskClient
from joserfc.jwk import RSAKey

from core.allowlist import AllowList
from devtools.demo import LoadedStudy, load_sample_study
from devtools.samples import SAMPLES
from devtools.sandbox.dev import RunningApp, serve_app_with_sandbox
from devtools.servers import FhirServer, OrthancServer
from fhir_adapters import constants, terminology
from fhir_adapters.client import FhirClient
from fhir_adapters.writer import WriteSettings
from models.registry import get_analyzer
from pipeline.analysis import analyze_study
from smart_launch.app import SESSION_COOKIE, create_app
from smart_launch.config import SmartAppConfig
from smart_launch.oauth import ClientRegistration, GrantedScopes
from smart_launch.reviews import ReviewLog, review_figures
from smart_launch.session import AuthorizationState, RecentReads, SessionStore
from smart_launch.views import (
    STATUS_WORDS,
    AnalyzerChoice,
    permissions,
    report_view,
    study_row,
    suitable_analyzers,
)
from tests.smart_support import launch_over_http, practitioner_resource


@pytest.fixture(scope="module")
def fhir(fhir_base: FhirServer) -> FhirClient:
    return FhirClient(fhir_base.base_url, session=requests.Session())


@pytest.fixture(scope="module")
def chest_ct(fhir: FhirClient, orthanc: OrthancServer) -> LoadedStudy:
    return load_sample_study(fhir, orthanc, SAMPLES["lung2"])


@pytest.fixture(scope="module")
def practitioner(fhir: FhirClient) -> str:
    return f"Practitioner/{fhir.create(practitioner_resource('Reviewer'))['id']}"


@pytest.fixture(scope="module")
def public_app(
    fhir_base: FhirServer, orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    with serve_app_with_sandbox(fhir_base.base_url, tmp_path_factory.mktemp("app"), orthanc.dicomweb_url) as app:
        yield app


def test_public_client_launch_shows_the_patients_chest_ct(
    public_app: RunningApp, chest_ct: LoadedStudy, practitioner: str
) -> None:
    page = launch_over_http(public_app, chest_ct, practitioner)
    assert page.status_code == 200 and page.url.rstrip("/") == public_app.url
    assert "Demo patient lung2" in page.text and "DEMO CHEST CT" in page.text
    assert "61" in page.text  # the 61 images of the series, as the EHR's ImagingStudy counts them


def test_every_response_has_a_strict_csp_and_the_cookie_is_httponly_and_samesite(
    public_app: RunningApp, chest_ct: LoadedStudy, practitioner: str
) -> None:
    page = launch_over_http(public_app, chest_ct, practitioner)
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert page.headers["Cache-Control"] == "no-store"
    set_cookie = next(r.headers["Set-Cookie"] for r in page.history if "Set-Cookie" in r.headers)
    assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
    assert "<script>" not in page.text  # no inline script anywhere


def test_a_state_changing_form_without_the_csrf_token_is_refused(
    public_app: RunningApp, chest_ct: LoadedStudy, practitioner: str
) -> None:
    page = launch_over_http(public_app, chest_ct, practitioner)
    browser: requests.Session = page.session  # type: ignore[attr-defined]
    study_id = chest_ct.imaging_study.split("/")[1]
    refused = browser.post(f"{public_app.url}/studies/{study_id}/analyze", data={"analyzer": "ct-emphysema"})
    assert refused.status_code == 400
    assert "security token is missing" in refused.text
    assert public_app.ext.job_store.list(limit=None) == ()  # nothing was started


def test_another_sessions_job_is_not_shown(public_app: RunningApp, chest_ct: LoadedStudy, practitioner: str) -> None:
    page = launch_over_http(public_app, chest_ct, practitioner)
    browser: requests.Session = page.session  # type: ignore[attr-defined]
    answer = browser.get(f"{public_app.url}/jobs/00000000-0000-0000-0000-000000000000/status")
    assert answer.status_code == 404 and "No analysis" in answer.text
    # The progress script asks for JSON and gets the same refusal with its remedy, which it shows and stops on.
    as_script = browser.get(
        f"{public_app.url}/jobs/00000000-0000-0000-0000-000000000000/status", headers={"Accept": "application/json"}
    )
    assert as_script.status_code == 404 and as_script.json()["remedy"].startswith("Start it from the study page")


def test_without_a_launch_the_app_says_how_to_open_it(public_app: RunningApp) -> None:
    page = requests.get(f"{public_app.url}/", timeout=10)
    assert "Open the app from the EHR" in page.text or "opens from a patient's chart" in page.text
    refused = requests.get(f"{public_app.url}/studies/abc", timeout=10)
    assert refused.status_code == 400 and "no active launch" in refused.text


def test_a_launch_from_an_unregistered_ehr_is_refused_before_any_request(public_app: RunningApp) -> None:
    answer = requests.get(f"{public_app.url}/launch", params={"iss": "http://169.254.169.254/fhir", "launch": "x"})
    assert answer.status_code == 400
    assert "not registered with the EHR" in answer.text


def test_confidential_client_with_a_secret_launches(
    fhir_base: FhirServer, orthanc: OrthancServer, chest_ct: LoadedStudy, practitioner: str, tmp_path: Path
) -> None:
    with serve_app_with_sandbox(
        fhir_base.base_url,
        tmp_path,
        orthanc.dicomweb_url,
        registration_overrides={"auth_method": "client_secret_basic", "client_secret": "s3cret-for-tests"},
        confidential_secret="s3cret-for-tests",
    ) as app:
        page = launch_over_http(app, chest_ct, practitioner)
        assert page.status_code == 200 and "DEMO CHEST CT" in page.text


def test_private_key_jwt_client_launches(
    fhir_base: FhirServer, orthanc: OrthancServer, chest_ct: LoadedStudy, practitioner: str, tmp_path: Path
) -> None:
    key = RSAKey.generate_key(2048, parameters={"kid": "clinician-app"}, private=True)
    with serve_app_with_sandbox(
        fhir_base.base_url,
        tmp_path,
        orthanc.dicomweb_url,
        registration_overrides={
            "auth_method": "private_key_jwt",
            "private_key": key.as_dict(private=True),
            "kid": "clinician-app",
            "algorithm": "RS384",
        },
        confidential_jwks={"keys": [key.as_dict(private=False)]},
    ) as app:
        page = launch_over_http(app, chest_ct, practitioner)
        assert page.status_code == 200 and "DEMO CHEST CT" in page.text


def test_a_v1_only_ehr_gets_read_and_write_scopes_and_the_app_works(
    fhir_base: FhirServer, orthanc: OrthancServer, chest_ct: LoadedStudy, practitioner: str, tmp_path: Path
) -> None:
    with serve_app_with_sandbox(fhir_base.base_url, tmp_path, orthanc.dicomweb_url, v1_only=True) as app:
        page = launch_over_http(app, chest_ct, practitioner)
        assert page.status_code == 200 and "DEMO CHEST CT" in page.text
        session_id = page.session.cookies.get(SESSION_COOKIE)  # type: ignore[attr-defined]
        state = app.ext.sessions.get(session_id)
        assert state is not None
        assert "patient/DiagnosticReport.write" in state.granted_scope.split()
        assert permissions(state.granted, state.fhir_user).can_analyze


def _csrf(page: requests.Response) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


def test_without_javascript_analysis_then_rejection_as_not_needed_is_filed_and_counted(
    public_app: RunningApp, fhir: FhirClient, orthanc: OrthancServer, practitioner: str
) -> None:
    other_ct = load_sample_study(fhir, orthanc, SAMPLES["lung1"])
    page = launch_over_http(public_app, other_ct, practitioner)
    browser: requests.Session = page.session  # type: ignore[attr-defined]
    study_id = other_ct.imaging_study.split("/")[1]
    study_page = browser.get(f"{public_app.url}/studies/{study_id}", timeout=120)
    token = _csrf(study_page)
    progress = browser.post(
        f"{public_app.url}/studies/{study_id}/analyze", data={"analyzer": "ct-emphysema", "csrf_token": token}
    )
    for _ in range(600):  # the progress page refreshes itself (no JS) until it forwards to the result
        if "/reports/" in progress.url:
            break
        assert '<p id="job-error-message"></p>' in progress.text, progress.text  # a failure shows its message
        time.sleep(0.5)
        progress = browser.get(progress.url)
    assert "/reports/" in progress.url and "LAA-950" in progress.text
    # The limits of the analysis come from the analyzer's model card, as models.registry reads it.
    assert "Validated on:" in progress.text and "Known limits:" in progress.text
    assert "not installed" not in progress.text
    report_id = progress.url.rsplit("/", 1)[1].split("?")[0]

    # The explanation images shown right after the analysis (kept from the run that filed them) are exactly the
    # PNGs the EHR holds, and a later launch, which reads them from the EHR, sees the same images.
    media_ids = re.findall(r'src="/media/([^"]+)"', progress.text)
    filed = fhir.read("DiagnosticReport", report_id)
    assert media_ids and media_ids == [m["link"]["reference"].split("/")[-1] for m in filed["media"]]
    later = launch_over_http(public_app, other_ct, practitioner).session  # type: ignore[attr-defined]
    for media_id in media_ids:
        in_ehr = base64.b64decode(fhir.read("Media", media_id)["content"]["data"])
        shown = browser.get(f"{public_app.url}/media/{media_id}")
        assert shown.headers["Content-Type"] == "image/png" and shown.content == in_ehr
        assert later.get(f"{public_app.url}/media/{media_id}").content == in_ehr

    no_reason = browser.post(
        f"{public_app.url}/reports/{report_id}/review", data={"decision": "reject", "csrf_token": token}
    )
    assert no_reason.status_code == 422 and "needs a reason" in no_reason.text
    rejected = browser.post(
        f"{public_app.url}/reports/{report_id}/review",
        data={
            "decision": "reject",
            "rejection_kind": "cancelled",
            "reason": "Duplicate request; the scan was reported elsewhere.",
            "csrf_token": token,
        },
    )
    assert "Rejected" in rejected.text
    # The page after the review reads the EHR again: the copy kept from the analysis was for one showing only.
    assert re.search(r'<dd id="report-status">\s*Cancelled', rejected.text), rejected.text
    stored = fhir.read("DiagnosticReport", report_id)
    assert stored["status"] == "cancelled"
    assert "Duplicate request" in stored["conclusion"]
    assert public_app.ext.reviews.figures()["ct-emphysema"].rejected >= 1


def test_key_images_filed_as_binary_are_shown_from_the_ehr(
    public_app: RunningApp, fhir: FhirClient, orthanc: OrthancServer, allow: AllowList, practitioner: str
) -> None:
    # Filed under a request limit the three key images do not fit: some travel as Binary (issue 24).
    study = load_sample_study(fhir, orthanc, SAMPLES["lung2"], copy=2403)
    outcome = analyze_study(
        fhir,
        study.imaging_study,
        get_analyzer("ct-emphysema"),
        dicomweb_allow_list=allow,
        write_settings=WriteSettings(max_request_bytes=400_000),
    )
    assert outcome.images_as_binary >= 1
    report = fhir.read_reference(outcome.diagnostic_report)
    browser: requests.Session = launch_over_http(public_app, study, practitioner).session  # type: ignore[attr-defined]
    page = browser.get(f"{public_app.url}/reports/{report['id']}", timeout=60)
    media_ids = re.findall(r'src="/media/([^"]+)"', page.text)
    assert media_ids == [m["link"]["reference"].split("/")[1] for m in report["media"]]
    # Read through the sandbox EHR with the clinician's token (Binary.r, guarded by its securityContext).
    shown = [browser.get(f"{public_app.url}/media/{media_id}", timeout=60) for media_id in media_ids]
    assert all(r.status_code == 200 and r.headers["Content-Type"] == "image/png" for r in shown)
    assert [r.content for r in shown] == [e.png for e in outcome.result.explanations]


def test_the_study_pages_script_starts_the_analysis_and_follows_it_without_the_progress_page(
    public_app: RunningApp, chest_ct: LoadedStudy, practitioner: str, fhir: FhirClient
) -> None:
    page = launch_over_http(public_app, chest_ct, practitioner)
    browser: requests.Session = page.session  # type: ignore[attr-defined]
    study_id = chest_ct.imaging_study.split("/")[1]
    token = _csrf(browser.get(f"{public_app.url}/studies/{study_id}"))
    as_script = {"Accept": "application/json"}  # what static/progress.js sends

    def start(analyzer: str, query: str = "") -> requests.Response:
        """Send the study page's Analyze form as its script does."""
        return browser.post(
            f"{public_app.url}/studies/{study_id}/analyze{query}",
            data={"analyzer": analyzer, "csrf_token": token},
            headers=as_script,
        )

    unsuitable = start("cxr-pneumonia")
    assert unsuitable.status_code == 400 and unsuitable.headers["Content-Type"] == "application/json"
    assert "does not suit" in unsuitable.json()["message"] and unsuitable.json()["remedy"]

    started = start("ct-emphysema")
    assert started.status_code == 202, started.text
    job = started.json()
    assert job["state"] in ("queued", "running", "done") and job["jobUrl"].startswith("/jobs/")
    assert job["statusUrl"].startswith(job["jobUrl"] + "/status")
    status = job
    for _ in range(600):
        if status["state"] in ("done", "failed"):
            break
        status = browser.get(public_app.url + job["statusUrl"], headers=as_script).json()
    assert status["state"] == "done" and status["reportUrl"].startswith("/reports/"), status
    report_id = status["reportUrl"].rsplit("/", 1)[1]
    stored = fhir.read("DiagnosticReport", report_id)

    # The answer that says "done" carries the result itself, for the script to show in place: the result page's
    # main content, from the report the EHR returned when it was filed - findings, explanation images, review.
    placed = status["resultHtml"]
    assert "LAA-950" in placed and str(stored["conclusion"]) in placed.replace("&#39;", "'")
    assert re.search(rf'<dd id="report-status">\s*{re.escape(STATUS_WORDS[stored["status"]])}', placed)
    assert placed.count('class="explanation" elementtiming="explanation"') == len(stored["media"]) > 0
    assert "<html" not in placed and "patient-banner" not in placed  # a part of a page, not a page
    if stored["status"] == "preliminary":
        assert f'name="csrf_token" value="{token}"' in placed and 'id="accept-button"' in placed
    assert status["resultTitle"].startswith("AI result")
    # Once: asked again, the status only says where the result is, and the result page reads the EHR.
    again = browser.get(public_app.url + job["statusUrl"], headers=as_script).json()
    assert again["state"] == "done" and "resultHtml" not in again
    # Without ?inline=1 (the progress page's script) the answer never carries the result.
    plain = browser.get(public_app.url + job["statusUrl"].replace("&inline=1", ""), headers=as_script).json()
    assert plain["reportUrl"] == status["reportUrl"] and "resultHtml" not in plain

    shown = browser.get(public_app.url + status["reportUrl"])
    assert "LAA-950" in shown.text and str(stored["conclusion"]) in shown.text.replace("&#39;", "'")
    # Shown as the EHR holds it now (a re-run finds the report filed - and perhaps signed - before).
    assert re.search(rf'<dd id="report-status">\s*{re.escape(STATUS_WORDS[stored["status"]])}', shown.text)
    # The images are announced early (preload) and marked for paint timing; no script or token in the page.
    for media in stored["media"]:
        media_id = media["link"]["reference"].split("/")[-1]
        assert f'<link rel="preload" as="image" href="/media/{media_id}">' in shown.text
    assert 'elementtiming="explanation"' in shown.text

    # The script's start of an analysis waits for it as a status poll does (?wait=): a quick one is answered - done,
    # with its result - by the very request that started it (a re-run finds the same report, filed before).
    rerun = start("ct-emphysema", "?wait=5&inline=1")
    assert rerun.status_code == 200, rerun.text
    answer = rerun.json()
    assert answer["state"] == "done" and answer["reportUrl"] == status["reportUrl"]
    assert "LAA-950" in answer["resultHtml"] and answer["resultTitle"].startswith("AI result")


def test_the_servers_do_not_log_request_lines_that_carry_the_authorization_code(
    public_app: RunningApp,
    chest_ct: LoadedStudy,
    practitioner: str,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    page = launch_over_http(public_app, chest_ct, practitioner)
    assert page.status_code == 200 and any("code=" in r.headers.get("Location", "") for r in page.history)
    out, err = capfd.readouterr()
    logged = out + err + caplog.text
    assert "code=" not in logged and "/callback" not in logged and chest_ct.patient.split("/")[1] not in logged


# ---------------------------------------------------------------------------------------------- pure parts


def test_recent_reads_are_per_session_and_expire_so_the_ehr_stays_the_source_of_truth() -> None:
    now = [0.0]
    recent = RecentReads(ttl_s=60, max_entries=3, clock=lambda: now[0])
    recent.put("session-a", "Patient/1", {"id": "1"})
    assert recent.get("session-a", "Patient/1") == {"id": "1"}
    assert recent.get("session-b", "Patient/1") is None  # another launch never sees it
    now[0] = 61.0
    assert recent.get("session-a", "Patient/1") is None  # a minute later the page asks the EHR again
    for n in range(5):
        recent.put("session-a", f"Media/{n}", b"png")
    assert recent.get("session-a", "Media/0") is None and recent.get("session-a", "Media/4") == b"png"  # bounded
    recent.forget_session("session-a")
    assert recent.get("session-a", "Media/4") is None  # logout drops what the session kept


def test_authorization_state_round_trips_and_never_prints_its_tokens(tmp_path: Path) -> None:
    state = AuthorizationState(smart={"fhir_base": "https://ehr/fhir"}, client_id="app", access_token="SECRET-TOKEN")
    state.patient = "123"
    again = AuthorizationState.from_json(state.to_json())
    assert again == state
    assert "SECRET-TOKEN" not in repr(state) and "123" not in repr(state)


def test_sessions_expire_after_their_lifetime(tmp_path: Path) -> None:
    now = [1000.0]
    store = SessionStore(tmp_path / "s.sqlite", max_age_s=60, clock=lambda: now[0])
    session_id = store.create(AuthorizationState(smart={"fhir_base": "https://ehr/fhir"}, client_id="app"))
    assert store.get(session_id) is not None
    now[0] += 61
    assert store.get(session_id) is None
    assert store.get("guessed-id") is None


def test_review_figures_give_the_acceptance_rate_per_analyzer(tmp_path: Path) -> None:
    path = tmp_path / "reviews.sqlite"
    log = ReviewLog(path)
    log.record("DiagnosticReport/1", "ct-emphysema", "1.0.0", "accepted")
    log.record("DiagnosticReport/2", "ct-emphysema", "1.0.0", "accepted")
    log.record("DiagnosticReport/3", "ct-emphysema", "1.0.0", "rejected", rejection_kind="entered-in-error")
    log.record("DiagnosticReport/4", "cxr-pneumonia", "0.3.0", "rejected", rejection_kind="cancelled")
    log.close()
    figures = review_figures(path)
    assert figures["ct-emphysema"].acceptance_rate == pytest.approx(2 / 3)
    assert figures["cxr-pneumonia"].acceptance_rate == 0.0


def test_without_write_scopes_analysis_and_sign_off_are_refused_with_reasons() -> None:
    read_only = GrantedScopes.parse("launch openid fhirUser patient/ImagingStudy.rs patient/*.rs")
    can = permissions(read_only, "Practitioner/1")
    assert not can.can_analyze and not can.can_review
    assert can.can_read_results
    assert "cannot file AI results" in can.reasons[0] and "DiagnosticReport.c" in can.reasons[0]
    assert not permissions(GrantedScopes.parse("patient/ImagingStudy.rs"), "Practitioner/1").can_read_results
    full = GrantedScopes.parse("patient/*.cruds")
    assert permissions(full, "Practitioner/1").can_review
    assert not permissions(full, "Patient/1").can_review  # a patient cannot sign off an AI result


def test_only_analyzers_suited_to_the_modality_are_offered() -> None:
    study = {
        "resourceType": "ImagingStudy",
        "id": "s1",
        "started": "2024-03-01T10:00:00Z",
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}],
        "numberOfSeries": 1,
        "numberOfInstances": 61,
        "series": [
            {"uid": "1.2", "modality": {"code": "CT"}, "bodySite": {"display": "Chest"}, "numberOfInstances": 61}
        ],
    }
    row = study_row(study)
    assert (row.date, row.modalities, row.body_sites, row.instance_count) == ("2024-03-01", ("CT",), ("Chest",), 61)
    choices = [
        AnalyzerChoice("ct-emphysema", "CT emphysema", ("CT",)),
        AnalyzerChoice("us-breast", "Breast ultrasound", ("US",)),
    ]
    assert [a.name for a in suitable_analyzers(row.modalities, choices)] == ["ct-emphysema"]


@pytest.mark.parametrize(
    ("key", "quantity", "shown"),
    [
        ("pneumonia_probability", terminology.quantity(60.5, "%"), "60.5 %"),
        (terminology.PROBABILITY_KEY, terminology.quantity(0.87, "1"), "0.87"),  # a 0-1 score has no unit
    ],
)
def test_the_result_screen_gives_the_model_probability_with_its_unit(key: str, quantity: dict, shown: str) -> None:
    report = {"resourceType": "DiagnosticReport", "id": "r1", "result": [{"reference": "Observation/o1"}]}
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "code": {"coding": [{"system": constants.MEASUREMENT_CODESYSTEM, "code": key}]},
        "valueQuantity": quantity,
    }
    view = report_view(report, [observation])
    assert view.probability == shown and view.findings == ()


# ---------------------------------------------------------------------------------------------- bounded launches


def test_the_launch_endpoint_hammered_stores_nothing_and_asks_the_ehr_at_most_once(
    fhir_base: FhirServer, orthanc: OrthancServer, tmp_path: Path
) -> None:
    with serve_app_with_sandbox(fhir_base.base_url, tmp_path, orthanc.dicomweb_url, launches_per_minute=10_000) as app:
        outbound: list[str] = []
        app.ext.http.hooks["response"].append(lambda response, *args, **kwargs: outbound.append(response.url))
        anyone = requests.Session()  # nobody signed in: no cookie, no launch context the EHR issued
        for n in range(150):
            refused = anyone.get(app.launch_url, params={"iss": f"http://127.0.0.1:9/fhir/{n}", "launch": "x"})
            assert refused.status_code == 400 and "not registered" in refused.text
        assert outbound == []  # an unregistered iss is refused before any request
        for n in range(150):
            started = anyone.get(
                app.launch_url, params={"iss": app.sandbox.fhir_base, "launch": f"l{n}"}, allow_redirects=False
            )
            assert started.status_code == 302 and started.headers["Location"].startswith(app.sandbox.base_url)
        assert len(outbound) == 1 and outbound[0].endswith("/.well-known/smart-configuration")  # discovered once
        assert app.ext.sessions.count() == 0  # a launch is stored only once the EHR has authorised it
        assert app.ext.job_store.list(limit=None) == () and app.audit.outbox.pending() == 0


def test_each_client_address_may_start_only_so_many_launches_a_minute(
    fhir_base: FhirServer, orthanc: OrthancServer, tmp_path: Path
) -> None:
    with serve_app_with_sandbox(fhir_base.base_url, tmp_path, orthanc.dicomweb_url, launches_per_minute=5) as app:
        answers = [requests.get(app.launch_url, params={"iss": "https://x.example/fhir"}) for _ in range(7)]
        assert [a.status_code for a in answers] == [400] * 5 + [429] * 2
        assert answers[-1].headers["Retry-After"] == "60" and "Too many launches" in answers[-1].text


def _https_app(app: RunningApp, tmp_path: Path, **settings: object) -> FlaskClient:
    """The app as deployed behind HTTPS (Secure cookies), registered with the running sandbox EHR."""
    registration = ClientRegistration(
        fhir_base=app.sandbox.fhir_base, client_id="imaging-cds-clinician", redirect_uri="https://app.example/callback"
    )
    config = SmartAppConfig(
        clients=(registration,),
        data_dir=tmp_path / "https-app",
        dicomweb_allow_list=AllowList.of(["https://pacs.example/dicom-web"]),
        **settings,  # type: ignore[arg-type]
    )
    return create_app(config).test_client()


def test_over_https_cookies_are_host_prefixed_and_an_embedding_ehr_can_use_them(
    public_app: RunningApp, tmp_path: Path
) -> None:
    plain = _https_app(public_app, tmp_path)
    answer = plain.get("/launch", query_string={"iss": public_app.sandbox.fhir_base}, base_url="https://app.example")
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith("__Host-imaging_cds_launch=")  # the browser keeps it only if Secure, Path=/, no Domain
    assert "Secure" in cookie and "Path=/" in cookie and "Domain" not in cookie and "SameSite=Lax" in cookie
    assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]
    # A cookie without the prefix (set by a sibling subdomain over http, say) is not this app's launch.
    forged = plain.application.test_client().get(  # a browser that holds only the unprefixed cookie
        "/callback",
        query_string={"state": "s", "code": "c"},
        base_url="https://app.example",
        headers={"Cookie": "imaging_cds_launch=anything"},
    )
    assert forged.status_code == 400 and "no SMART launch in progress" in forged.text

    embedded = _https_app(public_app, tmp_path / "embedded", frame_ancestors=("https://ehr.example",))
    answer = embedded.get("/launch", query_string={"iss": public_app.sandbox.fhir_base}, base_url="https://app.example")
    assert "frame-ancestors https://ehr.example" in answer.headers["Content-Security-Policy"]
    cookie = answer.headers["Set-Cookie"]
    assert "SameSite=None" in cookie and "Partitioned" in cookie and "Secure" in cookie  # usable in the EHR's frame


# ---------------------------------------------------------------------------------------------- one job per user


def test_two_clinicians_analysing_one_study_each_run_their_own_job_with_their_own_token(
    public_app: RunningApp, fhir: FhirClient, chest_ct: LoadedStudy, practitioner: str
) -> None:
    second = f"Practitioner/{fhir.create(practitioner_resource('Second reader'))['id']}"
    study_id = chest_ct.imaging_study.split("/")[1]
    jobs: dict[str, str] = {}
    for who in (practitioner, second):
        browser: requests.Session = launch_over_http(public_app, chest_ct, who).session  # type: ignore[attr-defined]
        token = _csrf(browser.get(f"{public_app.url}/studies/{study_id}", timeout=120))
        started = browser.post(
            f"{public_app.url}/studies/{study_id}/analyze",
            data={"analyzer": "ct-emphysema", "csrf_token": token},
            allow_redirects=False,
        )
        assert started.status_code == 303
        jobs[who] = started.headers["Location"].rsplit("/", 1)[1]
    assert jobs[practitioner] != jobs[second]  # the second Analyze did not join the first clinician's job
    for who, job_id in jobs.items():
        record = public_app.ext.jobs.wait(job_id, timeout=300)
        assert record.state.value == "done", record.error
        session = public_app.ext.sessions.session_for_job_ref(str(record.params["launch_ref"]))
        state = public_app.ext.sessions.get(session) if session else None
        assert state is not None and state.fhir_user == who  # the job ran with its own clinician's session
    # Each job's accesses (its ImagingStudy read and its image retrieval) were made, and recorded, as its clinician.
    public_app.audit.drainer.drain_once()  # type: ignore[union-attr]
    events = list(fhir.search("AuditEvent", {"patient": chest_ct.patient, "type": "110104", "_count": "500"}))
    retrieved_by = {a["who"].get("reference") for e in events for a in e["agent"] if a.get("requestor")}
    assert {practitioner, second} <= retrieved_by

"""Operating ``serve``: liveness, readiness naming what is down, Prometheus metrics, JSON logs, OpenAPI.

The application is the one ``serve`` runs (``create_server_app`` from a settings file), called through its WSGI
interface, against the real FHIR server, Orthanc and Redis of the test session.
"""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate
from werkzeug.test import Client

from devtools.servers import FhirServer, OrthancServer, RedisServer, free_port, redis_server
from pipeline.jobs import EmbeddedJobRunner, SqliteJobStore
from service.logs import configure_logging, redact
from service.settings import parse_settings
from service.web import create_server_app
from tests.cds_support import CDS_BASE, EHR_ISS, EhrKeys, create_patient, prefetch_for
from tests.serve_support import write_state_key

PATIENT_VIEW = "imaging-ai-patient-view"


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def keys() -> EhrKeys:
    return EhrKeys()


def _settings(tmp_path: Path, keys: EhrKeys, *, fhir: str, pacs: str, broker: str | None, **extra: Any) -> Any:
    raw: dict[str, Any] = {
        "public_base_url": CDS_BASE,
        "data_dir": str(tmp_path / "data"),
        "dicomweb_allow": [pacs],
        "fhir_allow": [fhir],
        "cds_clients": [{"iss": EHR_ISS, "jwks": keys.public_jwks()}],
        "smart_clients": [{"fhir_base": fhir, "client_id": "imaging-cds"}],
        "backend": {"fhir_base": fhir, "auth": "none"},
        "state_key": {"file": str(write_state_key(tmp_path))},
        **extra,
    }
    if broker is not None:
        raw["jobs"] = {"broker_url": broker}
    return parse_settings(raw)


@pytest.fixture
def client(tmp_path: Path, keys: EhrKeys, fhir_base: FhirServer, orthanc: OrthancServer, redis: RedisServer) -> Client:
    settings = _settings(tmp_path, keys, fhir=fhir_base.base_url, pacs=orthanc.dicomweb_url, broker=redis.url)
    return Client(create_server_app(settings))


def test_healthz_says_alive_and_readyz_checks_the_ehr_the_pacs_and_the_broker(
    client: Client, fhir_base: FhirServer, orthanc: OrthancServer
) -> None:
    assert client.get("/healthz").json == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.json
    assert ready.json["checks"] == {
        f"fhir {fhir_base.base_url}": "ok",
        f"pacs {orthanc.dicomweb_url}": "ok",
        "broker": "ok",
    }


def test_readyz_names_each_dependency_that_cannot_be_reached(
    tmp_path: Path, keys: EhrKeys, fhir_base: FhirServer
) -> None:
    dead_pacs = f"http://127.0.0.1:{free_port()}/dicom-web"
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    settings = _settings(tmp_path, keys, fhir=fhir_base.base_url, pacs=dead_pacs, broker=dead_broker)
    answer = Client(create_server_app(settings)).get("/readyz")
    assert answer.status_code == 503
    assert answer.json["notReady"] == ["broker", f"pacs {dead_pacs}"]
    assert answer.json["checks"][f"pacs {dead_pacs}"] == "PACS did not answer (ConnectionError)"
    assert answer.json["checks"]["broker"].startswith("Redis broker did not answer")
    assert answer.json["checks"][f"fhir {fhir_base.base_url}"] == "ok"


def _hook(client: Client, keys: EhrKeys, fhir: str, *, token: str = "not-a-real-token") -> Any:
    patient = create_patient(fhir)
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": fhir,
        "fhirAuthorization": {"access_token": token, "token_type": "Bearer", "scope": "patient/*.read"},
        "context": {"patientId": patient, "userId": "Practitioner/1"},
        "prefetch": prefetch_for(fhir, PATIENT_VIEW, patient),
    }
    path = f"/cds-services/{PATIENT_VIEW}"
    return client.post(path, json=body, headers={"Authorization": f"Bearer {keys.sign(path)}"})


def test_metrics_count_requests_by_route_time_hooks_and_give_jobs_and_queue_depth(
    client: Client, keys: EhrKeys, fhir_base: FhirServer
) -> None:
    assert _hook(client, keys, fhir_base.base_url).status_code == 200
    client.get("/models/ct-emphysema.json")
    client.get(f"/cds-services/{uuid.uuid4()}")  # an unknown id must not become a label
    text = client.get("/metrics").get_data(as_text=True)
    assert 'imaging_cds_http_requests_total{method="POST",route="/cds-services/<service_id>",status="200"}' in text
    assert 'imaging_cds_http_requests_total{method="GET",route="/models/<name>.json",status="200"}' in text
    assert 'imaging_cds_cds_hook_seconds_count{service="imaging-ai-patient-view"}' in text
    assert 'imaging_cds_jobs{state="queued"}' in text and 'imaging_cds_jobs{state="failed"}' in text
    assert "imaging_cds_queue_depth 0.0" in text and "imaging_cds_broker_up 1.0" in text
    assert "# TYPE imaging_cds_analysis_seconds histogram" in text
    labels = [line for line in text.splitlines() if line.startswith("imaging_cds_http_requests_total{")]
    assert not [line for line in labels if re.search(r"[0-9a-f]{8}-[0-9a-f]{4}", line)], labels  # no raw ids


def test_json_logs_carry_the_request_id_and_never_the_hooks_token(
    client: Client, keys: EhrKeys, fhir_base: FhirServer
) -> None:
    stream = io.StringIO()
    handler = configure_logging("json", "INFO", stream=stream)
    token = "eyJhbGciOiJSUzM4NCJ9.eyJzdWIiOiJjbGluaWNpYW4ifQ.c2lnbmF0dXJlLXNlY3JldA"
    try:
        answer = _hook(client, keys, fhir_base.base_url, token=token)
        logging.getLogger("urllib3").info("sending Authorization: Bearer %s", token)  # a library that logs a header
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    request_id = answer.headers["X-Request-ID"]
    hook_lines = [line for line in lines if line["logger"] == "cds.app"]
    assert hook_lines and all(line["request_id"] == request_id for line in hook_lines)
    assert {"time", "level", "logger", "message", "request_id", "job_id"} <= set(lines[0])
    assert token not in stream.getvalue() and "signature-secret" not in stream.getvalue()
    assert "Bearer [redacted]" in stream.getvalue()


def test_a_callers_request_id_is_kept_and_a_malformed_one_replaced(client: Client) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "ehr-trace-0001"}).headers["X-Request-ID"] == (
        "ehr-trace-0001"
    )
    replaced = client.get("/healthz", headers={"X-Request-ID": "<script>"}).headers["X-Request-ID"]
    assert replaced != "<script>" and len(replaced) == 32


def test_a_jobs_log_lines_carry_its_job_id(tmp_path: Path) -> None:
    stream = io.StringIO()
    handler = configure_logging("json", "INFO", stream=stream)

    def logs(params: dict[str, Any], report: Any) -> dict[str, Any]:
        logging.getLogger("pipeline.analysis").info("analysing")
        return {}

    try:
        with EmbeddedJobRunner(SqliteJobStore(tmp_path / "jobs.sqlite"), {"analyze-study": logs}) as runner:
            job = runner.wait(runner.submit("analyze-study", {}).id, timeout=10)
    finally:
        logging.getLogger().removeHandler(handler)
    [line] = [json.loads(x) for x in stream.getvalue().splitlines() if '"analysing"' in x]
    assert line["job_id"] == job.id


@pytest.mark.parametrize(
    ("logged", "kept"),
    [
        ("token endpoint answered access_token=abc123&expires_in=300", "access_token=[redacted]&expires_in=300"),
        ("Authorization: Bearer eyJ0eXAi.eyJzdWIi.sig", "Authorization: Bearer [redacted]"),
        ("callback ?code=SplxlOBeZQQYbYS6WxSbIA&state=xyz", "?code=[redacted]&state=xyz"),
        ("job 7 failed: FhirServerError", "job 7 failed: FhirServerError"),
    ],
)
def test_token_shaped_values_are_redacted_from_any_log_line(logged: str, kept: str) -> None:
    assert kept in redact(logged)


def test_openapi_is_valid_and_lists_exactly_the_routes_served(client: Client) -> None:
    document = client.get("/openapi.json").json
    validate(document)
    application: Any = client.application
    dispatcher = application.app  # RequestMetrics -> DispatcherMiddleware
    apps = {"": dispatcher.app, **dispatcher.mounts}
    served = set()
    for prefix, flask_app in apps.items():
        for rule in flask_app.url_map.iter_rules():
            if rule.endpoint == "static":  # Flask's default static route; neither app has a static folder
                continue
            path = prefix + rule.rule.replace("<path:", "<").replace("<", "{").replace(">", "}")
            served |= {(path, method.lower()) for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {
        (path, method) for path, item in document["paths"].items() for method in item if method in ("get", "post")
    }
    assert documented == served

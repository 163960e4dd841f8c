"""Server-side request forgery: URLs that arrive from outside cannot steer a request (or a token) anywhere the
deployment did not allow.

Each attack here passed the old allow-list, which compared the raw string by prefix while requests (urllib3) and
servers then resolved ``..`` and ``%2e%2e``: an Endpoint address, a hook's ``fhirServer``, a CDS client's ``jku``
and a FHIR ``next`` link could climb out of the allowed base; a PACS could redirect the retrieval to any host; a
configured name resolving to the cloud metadata address was connected to; a Series UID went into the WADO-RS path
unchecked. The parties that attack (a hostile EHR, PACS or key server) cannot run here as themselves: loopback
servers play them (``tests/hostile_support.py``, ``tests/cds_support.py``), and every request is real HTTP.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from cds.app import create_app
from cds.config import TrustedClient
from cds.services import PATIENT_VIEW
from core.allowlist import AllowList, canonical_url
from core.errors import ConfigurationError, ImageDataError, NotAllowedError, StudyError
from dicom_io.dicomweb import fetch_series
from fhir_adapters.client import FhirClient
from fhir_adapters.study import ENDPOINT_CONNECTION_TYPE_SYSTEM, resolve_dicomweb_base, select_series
from models.base import SeriesRequirements
from tests.cds_support import EHR_ISS, EhrKeys, jwks_server, make_config, recording_listener
from tests.hostile_support import Reply, Seen, hostile_server

# Ways to climb one level out of an allowed base, as an attacker writes them.
CLIMBS = [
    "/../",  # a plain dot segment: urllib3 removes it before sending
    "/%2e%2e/",  # percent-encoded: sent as is, decoded by the server
    "/%2E%2e/",
    "/.%2e/",
    "/./../",
    "//..//",  # duplicate slashes around the dot segment
]
ENCODED_SEPARATORS = ["/%2e%2e%2f", "/..;/", "/%2e%2e%5c"]  # an encoded '/', Tomcat's '..;', an encoded '\'


class StaticToken:
    """A bearer token provider that never changes (the EHR's token, whose leak the test looks for)."""

    def authorization_header(self) -> str:
        return "Bearer secret-ehr-token"

    def invalidate(self) -> None:
        pass


def _study_with_endpoint(address: str) -> tuple[dict[str, Any], dict[str, Any]]:
    series = {"uid": "1.2.3.4", "modality": {"code": "CT"}, "numberOfInstances": 10}
    study = {
        "resourceType": "ImagingStudy",
        "id": "s1",
        "contained": [
            {
                "resourceType": "Endpoint",
                "id": "pacs",
                "status": "active",
                "connectionType": {"system": ENDPOINT_CONNECTION_TYPE_SYSTEM, "code": "dicom-wado-rs"},
                "address": address,
            }
        ],
        "endpoint": [{"reference": "#pacs"}],
        "series": [series],
    }
    return study, series


# ---------------------------------------------------------------- Endpoint address


@pytest.mark.parametrize("climb", CLIMBS + ENCODED_SEPARATORS)
def test_an_endpoint_address_climbing_out_of_the_allowed_pacs_base_is_refused(climb: str) -> None:
    allow = AllowList.of(["http://127.0.0.1:8042/dicom-web"])
    study, series = _study_with_endpoint(f"http://127.0.0.1:8042/dicom-web{climb}tools/execute-script")
    client = FhirClient("http://127.0.0.1:9/fhir")  # contained Endpoints: nothing is read from it
    with pytest.raises(NotAllowedError, match="DICOMweb endpoint of ImagingStudy/s1"):
        resolve_dicomweb_base(client, study, series, allow_list=allow)


def test_an_endpoint_address_is_returned_in_the_canonical_form_that_was_checked() -> None:
    allow = AllowList.of(["http://127.0.0.1:8042/dicom-web"])
    study, series = _study_with_endpoint("HTTP://127.0.0.1:8042//dicom-web/./wado/../")
    client = FhirClient("http://127.0.0.1:9/fhir")  # contained Endpoints: nothing is read from it
    assert resolve_dicomweb_base(client, study, series, allow_list=allow) == "http://127.0.0.1:8042/dicom-web"


# ---------------------------------------------------------------- a hook's fhirServer

HOOK = {
    "hook": "patient-view",
    "hookInstance": "0b8a3e2c-5c4a-4d87-a1a0-6d1f4a0d6b11",
    "context": {"patientId": "p1", "userId": "Practitioner/1"},
    "fhirAuthorization": {"access_token": "secret-ehr-token", "token_type": "Bearer", "scope": "patient/*.read"},
}


@pytest.mark.parametrize("climb", CLIMBS + ENCODED_SEPARATORS)
def test_a_fhir_server_climbing_out_of_the_allowed_base_is_refused_before_any_request(
    tmp_path: Path, climb: str
) -> None:
    keys = EhrKeys()
    path = f"/cds-services/{PATIENT_VIEW}"
    with recording_listener() as (origin, connections):
        app = create_app(make_config(tmp_path, keys, f"{origin}/fhir")).test_client()
        body = {**HOOK, "fhirServer": f"{origin}/fhir{climb}admin"}
        response = app.post(path, json=body, headers={"Authorization": f"Bearer {keys.sign(path)}"})
    assert response.status_code == 403
    assert response.get_json()["error"] == "fhir_server_not_allowed"
    assert connections == []  # neither the token nor the patient id left the service


# ---------------------------------------------------------------- a CDS client's jku


@pytest.mark.parametrize("climb", CLIMBS)
def test_a_jku_climbing_out_of_the_allowed_key_path_is_refused_without_a_request(tmp_path: Path, climb: str) -> None:
    """The allowed path holds the EHR's keys; a key set served anywhere else on that host (an upload folder, another
    tenant) would let whoever controls it forge CDS client JWTs."""
    attacker_keys = EhrKeys()
    path = f"/cds-services/{PATIENT_VIEW}"
    with jwks_server(attacker_keys.public_jwks()) as (url, requested):
        origin = url.rsplit("/", 1)[0]
        client = TrustedClient(iss=EHR_ISS, jku_allow_list=(f"{origin}/keys",))
        app = create_app(make_config(tmp_path, attacker_keys, f"{origin}/fhir", client=client)).test_client()
        token = attacker_keys.sign(path, header={"jku": f"{origin}/keys{climb}jwks.json"})
        body = {**HOOK, "prefetch": {"imagingStudies": None, "aiReports": None}}
        response = app.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert requested == []


# ---------------------------------------------------------------- FhirClient: where the bearer token goes


@pytest.mark.parametrize("climb", CLIMBS)
def test_a_next_link_climbing_out_of_the_fhir_base_gets_no_request_and_no_token(climb: str) -> None:
    def script(seen: Seen) -> Reply:
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [{"relation": "next", "url": f"{server.url}/fhir{climb}steal?page=2"}],
            "entry": [{"resource": {"resourceType": "Patient", "id": "1"}}],
        }
        return Reply(headers={"Content-Type": "application/fhir+json"}, body=json.dumps(bundle).encode())

    with hostile_server(script) as server:
        client = FhirClient(f"{server.url}/fhir", auth=StaticToken())
        assert not client.is_own_url(f"{server.url}/fhir{climb}steal")
        results = client.search("Patient")
        assert next(results)["id"] == "1"
        with pytest.raises(NotAllowedError, match="'next' link"):
            next(results)
    assert server.paths == ["/fhir/Patient"]  # the token went to the FHIR base only


def test_own_urls_are_judged_and_sent_in_canonical_form() -> None:
    client = FhirClient("https://ehr.example.org/fhir")
    assert client.is_own_url("https://EHR.example.org.:443/fhir//Patient/./1")
    assert not client.is_own_url("https://ehr.example.org/fhir-admin/Patient/1")
    assert not client.is_own_url("https://ehr.example.org/fhir/%2e%2e/admin")
    assert client.check_url("https://EHR.example.org:443//fhir/Patient/1", what="x") == (
        "https://ehr.example.org/fhir/Patient/1"
    )


# ---------------------------------------------------------------- redirects


def _empty_multipart() -> Reply:
    return Reply(headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}, body=b"--b--")


def test_a_pacs_redirect_to_a_host_off_the_list_is_refused_before_it_is_followed() -> None:
    with recording_listener() as (elsewhere, connections):

        def script(seen: Seen) -> Reply:
            return Reply(302, {"Location": f"{elsewhere}/dicom-web{seen.path.removeprefix('/dicom-web')}"})

        with hostile_server(script) as pacs, pytest.raises(NotAllowedError, match="redirect"):
            list(fetch_series(f"{pacs.url}/dicom-web", "1.2.3", "1.2.3.4", timeout=5))
    assert connections == []
    assert len(pacs.seen) == 1  # asked once: a refusal is not retried


def test_a_pacs_redirect_within_its_own_base_is_followed() -> None:
    def script(seen: Seen) -> Reply:
        if "moved" in seen.path:
            return _empty_multipart()
        return Reply(307, {"Location": f"{seen.path}?moved=1"})

    with hostile_server(script) as pacs, pytest.raises(ImageDataError, match="series has no instances"):
        list(fetch_series(f"{pacs.url}/dicom-web", "1.2.3", "1.2.3.4", timeout=5))
    assert pacs.paths == ["/dicom-web/studies/1.2.3/series/1.2.3.4", "/dicom-web/studies/1.2.3/series/1.2.3.4?moved=1"]


# ---------------------------------------------------------------- addresses no request may go to


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/latest/",  # IPv4-mapped IPv6
        "http://0xa9fea9fe/latest/",  # the same address as one hexadecimal number
        "http://2852039166/latest/",  # ... and as one decimal number
        "http://169.254.169.254./latest/",  # trailing dot
        "http://[fd00:ec2::254]/latest/",  # AWS's IPv6 metadata address
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://0.0.0.0:8042/dicom-web",  # unspecified: reaches this machine
        "http://[::]:8042/dicom-web",
        "http://[fe80::1]/",
    ],
)
def test_link_local_metadata_and_unspecified_addresses_are_refused_in_every_spelling(url: str) -> None:
    with pytest.raises(ConfigurationError, match="link-local, metadata or unspecified"):
        AllowList.of([url])
    with pytest.raises(NotAllowedError):
        AllowList.of(["http://127.0.0.1:8042/"]).check(url)


def test_a_configured_host_name_that_resolves_to_the_metadata_address_is_not_connected_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DNS cannot be run here for a made-up name, so the resolver answers as a poisoned (or rebinding) DNS would."""
    asked: list[str] = []

    def poisoned(host: str, port: int, *args: Any) -> list[tuple[Any, ...]]:
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]

    monkeypatch.setattr(socket, "getaddrinfo", poisoned)
    allow = AllowList.of(["http://pacs.hospital.test:8042/dicom-web"])  # a name: only its answer tells
    base = allow.check("http://pacs.hospital.test:8042/dicom-web")
    with pytest.raises(NotAllowedError, match=r"resolves to 169\.254\.169\.254"):
        list(fetch_series(base, "1.2.3", "1.2.3.4", timeout=5))
    with pytest.raises(NotAllowedError, match="metadata"):
        FhirClient("http://ehr.hospital.test/fhir").capability_statement()
    assert asked == ["pacs.hospital.test", "ehr.hospital.test"]  # checked once per connection, then refused


# ---------------------------------------------------------------- UIDs in the WADO-RS path


def test_a_series_uid_that_is_not_a_dicom_uid_never_reaches_the_wado_rs_path() -> None:
    hostile_uid = "1.2.3/../../../tools/execute-script"
    study, series = _study_with_endpoint("http://127.0.0.1:8042/dicom-web")
    series["uid"] = hostile_uid
    with pytest.raises(StudyError, match="not a valid DICOM UID"):
        select_series(study, SeriesRequirements(modalities=("CT",)))
    with recording_listener() as (pacs, connections):
        with pytest.raises(ImageDataError, match=r"Series Instance UID .* is not a DICOM UID"):
            list(fetch_series(f"{pacs}/dicom-web", "1.2.3", hostile_uid, timeout=5))
        with pytest.raises(ImageDataError, match="Study Instance UID"):
            list(fetch_series(f"{pacs}/dicom-web", "1.2.3?x=", "1.2.3", timeout=5))
    assert connections == []


# ---------------------------------------------------------------- the canonical form itself


@pytest.mark.parametrize(
    ("url", "canonical"),
    [
        ("http://pacs:8042/dicom-web/../tools/execute-script", "http://pacs:8042/tools/execute-script"),
        ("http://pacs:8042/dicom-web/%2e%2e/tools", "http://pacs:8042/tools"),
        ("http://PACS.:8042//dicom-web//studies/", "http://pacs:8042/dicom-web/studies/"),
        ("https://ehr.example.org:443/fhir", "https://ehr.example.org/fhir"),
        ("http://ehr.example.org:80/fhir/%7Ea%41", "http://ehr.example.org/fhir/~aA"),
        ("https://bücher.example/fhir", "https://xn--bcher-kva.example/fhir"),
        ("http://[0:0:0:0:0:0:0:1]:8080/x", "http://[::1]:8080/x"),
        ("http://[::ffff:127.0.0.1]:8080/x", "http://127.0.0.1:8080/x"),
        ("http://2130706433:8080/x", "http://127.0.0.1:8080/x"),
        ("http://127.1:8080/x", "http://127.0.0.1:8080/x"),
        ("http://h/a/b/..?q=1#frag", "http://h/a/?q=1"),
    ],
)
def test_urls_are_brought_to_the_form_a_server_resolves_them_to(url: str, canonical: str) -> None:
    assert canonical_url(url).geturl() == canonical


@pytest.mark.parametrize(
    "url",
    [
        "http://pacs/dicom-web/%2e%2e%2ftools",  # an encoded slash
        "http://pacs/dicom-web/..;/tools",  # a dot segment with parameters
        "http://pacs/dicom-web/%252e%252e/tools",  # double encoding
        "http://pacs/dicom-web/a%00b",  # an encoded NUL
        "http://pacs\\@evil/dicom-web",  # a backslash
        "http://user:pass@pacs/dicom-web",  # credentials
        "http://pacs/dicom web",  # whitespace
        "http://pacs:99999/",  # no such port
        "http://999.1.1.1/",  # neither an IPv4 address nor a host name
        "ftp://pacs/dicom-web",
        "//pacs/dicom-web",
    ],
)
def test_urls_servers_would_read_differently_are_refused(url: str) -> None:
    with pytest.raises(NotAllowedError):
        canonical_url(url)


def test_an_allow_list_entry_admits_whole_segments_only() -> None:
    allow = AllowList.of(["https://ehr.example.org/fhir"])
    assert allow.allows("https://ehr.example.org/fhir/Patient/1")
    assert not allow.allows("https://ehr.example.org/fhir-admin/Patient/1")
    assert not allow.allows("http://ehr.example.org/fhir/Patient/1")  # another scheme is another origin
    assert not allow.allows("https://ehr.example.org:8443/fhir/Patient/1")

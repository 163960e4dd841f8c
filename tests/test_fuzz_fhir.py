"""Fuzzing the FHIR readers: whatever an EHR answers, choosing a series, reading its UID and its Endpoint, reading the
patient's age and sex, and following a search give a result or a typed refusal (:class:`ImagingCdsError`), never
another exception.

The seeds are real: the ImagingStudy and Endpoint the project builds from the bundled head CT for an EHR (as the
demo registers them), and a Patient. Hypothesis damages them element by element (an element replaced by a value
of the wrong JSON type, or removed). Search answers are fuzzed through a real HTTP round trip from a loopback
server playing the EHR (``tests/hostile_support.py``).
"""

from __future__ import annotations

import copy
import json
from datetime import date
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st

from core.allowlist import AllowList
from core.errors import ImagingCdsError
from devtools.samples import endpoint_resource, imaging_study_resource, read_dicom_folder
from fhir_adapters.client import FhirClient
from fhir_adapters.patient import patient_context
from fhir_adapters.study import resolve_dicomweb_base, select_series, study_uid
from models.base import SeriesRequirements
from tests.fuzz_support import JUNK, damage, fuzz
from tests.hostile_support import Reply, Seen, hostile_server

DATA = Path(__file__).parent / "data"
PACS = "http://127.0.0.1:9/dicom-web"  # allowed, and nothing listens there: no request ever succeeds
HEAD_CT = SeriesRequirements(modalities=("CT",), min_instances=10, body_parts=("HEAD",), description_keywords=("head",))


@cache
def study_seed() -> dict[str, Any]:
    """The head CT's ImagingStudy with its Endpoint contained (so reading it needs no server)."""
    study = imaging_study_resource(
        read_dicom_folder(DATA / "ct/head_ge"), patient_reference="Patient/p1", endpoint_reference="#pacs"
    )
    study["id"] = "head-ct"
    study["contained"] = [{**endpoint_resource(PACS), "id": "pacs"}]
    return study


PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1950-03-01"}


def test_the_unharmed_seed_is_read() -> None:
    study = copy.deepcopy(study_seed())
    series, reason = select_series(study, HEAD_CT)
    assert study_uid(study) and "chosen" in reason
    client = FhirClient("http://127.0.0.1:9/fhir")
    assert resolve_dicomweb_base(client, study, series, allow_list=AllowList.of([PACS])) == PACS
    context = patient_context(PATIENT, study_started="2020-03-01T10:00:00Z")
    assert context.age_years == 70 and context.sex == "female"


@fuzz(800)
@given(edits=st.integers(1, 5), data=st.data())
def test_a_damaged_imaging_study_gives_a_series_and_endpoint_or_a_typed_refusal(
    edits: int, data: st.DataObject
) -> None:
    study = copy.deepcopy(study_seed())
    damage(study, data, edits)
    client = FhirClient("http://127.0.0.1:9/fhir", retries=1, timeout=2)
    try:
        uid = study_uid(study)
        series, _ = select_series(study, HEAD_CT)
        base = resolve_dicomweb_base(client, study, series, allow_list=AllowList.of([PACS]))
    except ImagingCdsError as exc:
        event(type(exc).__name__)
        return
    event("read")
    assert uid and base.startswith(PACS)


@fuzz(300)
@given(patient=st.dictionaries(st.sampled_from(["resourceType", "gender", "birthDate", "id"]), JUNK), started=JUNK)
def test_a_damaged_patient_gives_an_age_and_sex_or_unknown(patient: dict[str, Any], started: Any) -> None:
    context = patient_context(patient, study_started=started, today=date(2026, 1, 1))
    assert context.age_years is None or 0 <= context.age_years < 200
    assert context.sex in (None, "male", "female", "other", "unknown")


@fuzz(150)
@given(
    bundle=JUNK
    | st.fixed_dictionaries(
        {
            "resourceType": st.sampled_from(["Bundle", "Patient"]) | JUNK,
            "entry": JUNK | st.lists(JUNK | st.fixed_dictionaries({"resource": JUNK, "search": JUNK}), max_size=3),
            "link": JUNK | st.lists(st.fixed_dictionaries({"relation": JUNK, "url": JUNK}), max_size=2),
        }
    ),
    status=st.sampled_from([200, 200, 200, 201, 302, 400, 404, 410, 500]),
)
def test_any_search_answer_gives_resources_or_a_typed_error(bundle: Any, status: int) -> None:
    body = json.dumps(bundle).encode()

    def answer(seen: Seen) -> Reply:
        return Reply(status, {"Content-Type": "application/fhir+json"}, body)

    with hostile_server(answer) as ehr:
        client = FhirClient(f"{ehr.url}/fhir", retries=1, timeout=5)
        try:
            found = list(client.search("ImagingStudy", {"patient": "p1"}))
        except ImagingCdsError as exc:
            event(type(exc).__name__)
            return
    event("read")
    assert all(isinstance(resource, dict) for resource in found)

"""Age and sex for analyzers, derived from the EHR's Patient; nothing identifying passes."""

from __future__ import annotations

import uuid
from datetime import date

from devtools.servers import FhirServer
from fhir_adapters.client import FhirClient
from fhir_adapters.patient import age_on, patient_context, read_patient_context
from models.base import PatientContext


def test_age_is_in_completed_years_on_the_study_day() -> None:
    assert age_on(date(1950, 6, 15), date(2025, 6, 14)) == 74
    assert age_on(date(1950, 6, 15), date(2025, 6, 15)) == 75
    assert age_on(date(2000, 2, 29), date(2025, 2, 28)) == 24  # a leap-day birthday counts from 1 March


def test_the_study_date_not_today_sets_the_age_and_unknowns_stay_unknown() -> None:
    patient = {"resourceType": "Patient", "birthDate": "1960-03-01", "gender": "female"}
    assert patient_context(patient, study_started="2020-02-29T10:00:00Z") == PatientContext(59, "female")
    assert patient_context({"birthDate": "1960"}, study_started="2020-01-01") == PatientContext(None, None)
    assert patient_context({"gender": "bogus"}, study_started=None) == PatientContext(None, None)


def test_the_real_servers_patient_gives_age_and_sex(fhir_base: FhirServer) -> None:
    client = FhirClient(fhir_base.base_url)
    mrn = uuid.uuid4().hex
    created = client.create(
        {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:test:mrn", "value": mrn}],
            "birthDate": "1948-11-30",
            "gender": "male",
        }
    )
    context = read_patient_context(client, f"Patient/{created['id']}", study_started="2024-11-29")
    assert context == PatientContext(age_years=75, sex="male")
    missing = read_patient_context(client, "Patient/does-not-exist-" + mrn[:8], study_started="2024-11-29")
    assert missing == PatientContext()

"""The patient facts an analyzer may use, read from the EHR's Patient: age on the study day and sex, nothing else.

Normative references (hippocampal volume by age and sex) and risk models (the Brock nodule model) need them; the
pipeline reads the Patient only for analyzers that say they use it (``uses_patient_context``). The values are
derived here, so no name, identifier or date ever reaches :mod:`models`.
"""

from __future__ import annotations

import logging
from datetime import date
from typing import Any, cast

from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirForbidden, FhirNotFound
from models.base import AdministrativeSex, PatientContext

log = logging.getLogger(__name__)

_SEXES: frozenset[str] = frozenset({"male", "female", "other", "unknown"})


def _date_prefix(value: Any) -> date | None:
    """The calendar date at the start of a FHIR ``date``/``dateTime`` (``YYYY-MM-DD...``); partial dates give None."""
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def age_on(birth_date: date, day: date) -> int:
    """Age in completed years on ``day`` (a birthday counts from its own day)."""
    return day.year - birth_date.year - ((day.month, day.day) < (birth_date.month, birth_date.day))


def patient_context(patient: dict[str, Any], *, study_started: str | None, today: date | None = None) -> PatientContext:
    """Age on the day the study started (today when the study gives no date) and administrative sex.

    A birth date given only as a year or year-month leaves the age unknown rather than guessed to the day.
    """
    born = _date_prefix(patient.get("birthDate"))
    day = _date_prefix(study_started) or today or date.today()
    age = age_on(born, day) if born is not None and born <= day else None
    gender = patient.get("gender")
    sex = cast(AdministrativeSex, gender) if isinstance(gender, str) and gender in _SEXES else None
    return PatientContext(age_years=age, sex=sex)


def read_patient_context(client: FhirClient, subject_reference: str, *, study_started: str | None) -> PatientContext:
    """:func:`patient_context` of the study's subject; unknown (not an error) when the EHR will not show it."""
    try:
        patient = client.read_reference(subject_reference)
    except (FhirForbidden, FhirNotFound) as exc:
        log.info("Patient context unavailable (%s); analyzers that need age or sex will say so", type(exc).__name__)
        return PatientContext()
    if patient.get("resourceType") != "Patient":
        return PatientContext()
    return patient_context(patient, study_started=study_started)

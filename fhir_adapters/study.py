"""Read an ImagingStudy and decide which series to analyse and where to fetch its pixels from.

This is the first arrow of the pipeline: ``EHR --ImagingStudy/Endpoint--> fhir_adapters --study ref-->``.
The decisions are pure functions on FHIR R4 dicts (:func:`study_uid`, :func:`select_series`); only
:func:`resolve_dicomweb_base` and :func:`choose_series` talk to the FHIR server, through
:class:`~fhir_adapters.client.FhirClient`.

Every refusal is a :class:`~core.errors.StudyError` that names the ImagingStudy by id, the series by
UID and what is missing, so an integrator can fix the EHR data; messages never quote free text (series
descriptions may carry more than a protocol name). Elements are read with :mod:`fhir_adapters.fhirjson`: one of
the wrong JSON type reads as absent, so damaged EHR data ends in such a refusal, never in an exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from core.allowlist import AllowList
from core.errors import NotAllowedError, StudyError
from core.uids import is_dicom_uid
from fhir_adapters.client import FhirClient
from fhir_adapters.fhirjson import element, items, reference
from models.base import SeriesRequirements

DICOM_UID_SYSTEM = "urn:dicom:uid"
ENDPOINT_CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
WADO_RS = "dicom-wado-rs"

# DICOM Body Part Examined terms (PS3.16 CID 4031) and their SNOMED CT codes: an EHR's ImagingStudy often codes
# series.bodySite in SNOMED ("51185008") where an analyzer names the DICOM term ("CHEST").
DICOM_BODY_PART_SNOMED: dict[str, str] = {
    "ABDOMEN": "818981001",
    "BRAIN": "12738006",
    "BREAST": "76752008",
    "CHEST": "51185008",
    "HEAD": "69536005",
    "HEART": "80891009",
    "LIVER": "10200004",
    "LUNG": "39607008",
    "NECK": "45048000",
    "PELVIS": "816092008",
    "WHOLEBODY": "38266002",
}


@dataclass(frozen=True)
class SeriesChoice:
    """The series chosen for analysis, where to retrieve it, and why it was chosen (shown to clinicians)."""

    study_uid: str
    series_uid: str
    modality: str
    body_part: str | None
    description: str | None
    instance_count: int
    dicomweb_base: str
    reason: str


def _study_label(imaging_study: dict[str, Any]) -> str:
    study_id = imaging_study.get("id")
    return f"ImagingStudy/{study_id[:64] if isinstance(study_id, str) and study_id else '(no id)'}"


def study_uid(imaging_study: dict[str, Any]) -> str:
    """The Study Instance UID, from the identifier with system ``urn:dicom:uid`` (value ``urn:oid:<uid>``).

    The UID is what the PACS knows the study by; without it there is nothing to retrieve.
    """
    for identifier in map(element, items(imaging_study.get("identifier"))):
        if identifier.get("system") != DICOM_UID_SYSTEM:
            continue
        value = str(identifier.get("value", "")).strip()
        uid = value.removeprefix("urn:oid:")
        if is_dicom_uid(uid):
            return uid
        raise StudyError(
            f"{_study_label(imaging_study)} has a DICOM UID identifier that is not a valid UID.",
            remedy="Its value should be 'urn:oid:' followed by the Study Instance UID (digits and dots).",
        )
    raise StudyError(
        f"{_study_label(imaging_study)} has no Study Instance UID.",
        remedy=f"Add an identifier with system '{DICOM_UID_SYSTEM}' and value 'urn:oid:<Study Instance UID>'.",
    )


# ---------------------------------------------------------------- endpoints


def _connection_type(endpoint: dict[str, Any]) -> tuple[str | None, str | None]:
    connection = endpoint.get("connectionType")
    codings = connection if isinstance(connection, list) else [connection]  # R4: one Coding; R5: a list
    for coding in codings:
        if isinstance(coding, dict) and coding.get("code"):
            return coding.get("system"), str(coding.get("code"))
    return None, None


def _endpoint_problem(endpoint: dict[str, Any]) -> str | None:
    """Why this Endpoint cannot serve WADO-RS, or None if it can."""
    system, code = _connection_type(endpoint)
    if code != WADO_RS or system != ENDPOINT_CONNECTION_TYPE_SYSTEM:
        return f"its connection type is {code or 'missing'}, not {WADO_RS}"
    status = endpoint.get("status")
    if status != "active":
        return f"its status is {status or 'missing'}, not active"
    if not str(endpoint.get("address") or "").strip():
        return "it has no address"
    return None


def _load_endpoint(client: FhirClient, imaging_study: dict[str, Any], reference: str) -> dict[str, Any]:
    if reference.startswith("#"):
        wanted = reference[1:]
        for contained in map(element, items(imaging_study.get("contained"))):
            if contained.get("resourceType") == "Endpoint" and contained.get("id") == wanted:
                return dict(contained)
        raise StudyError(
            f"{_study_label(imaging_study)} refers to a contained Endpoint {reference} that it does not contain.",
            remedy="Add the Endpoint to ImagingStudy.contained or reference a stored Endpoint.",
        )
    endpoint = client.read_reference(reference)
    if endpoint.get("resourceType") != "Endpoint":
        raise StudyError(
            f"{_study_label(imaging_study)} endpoint {reference} is a {endpoint.get('resourceType')}, not an Endpoint.",
            remedy="Point ImagingStudy.endpoint at an Endpoint resource.",
        )
    return endpoint


def resolve_dicomweb_base(
    client: FhirClient,
    imaging_study: dict[str, Any],
    series: dict[str, Any],
    *,
    allow_list: AllowList | None = None,
) -> str:
    """The WADO-RS base URL to retrieve ``series`` from, checked against the allow-list.

    The series' own ``endpoint`` overrides the study's (a study can be spread over archives). Endpoints may
    be contained (``#id``) or stored. The first active ``dicom-wado-rs`` Endpoint wins. Its address comes
    from the EHR's data, so before it is returned it must pass ``allow_list`` (or the client's); with
    neither configured nothing is allowed, because an unchecked address would let EHR data steer our
    requests (and a PACS token) anywhere.
    """
    label = _study_label(imaging_study)
    series_uid = series.get("uid") if is_dicom_uid(series.get("uid")) else "(no UID)"
    references = items(series.get("endpoint")) or items(imaging_study.get("endpoint"))
    if not references:
        raise StudyError(
            f"{label} has no endpoint for series {series_uid}, so its images cannot be located.",
            remedy="Add an Endpoint (connectionType dicom-wado-rs) to the ImagingStudy or to the series.",
        )
    problems: list[str] = []
    for ref in references:
        target = reference(ref)
        if not target:
            problems.append("an endpoint without a reference")
            continue
        endpoint = _load_endpoint(client, imaging_study, target)
        problem = _endpoint_problem(endpoint)
        if problem is not None:
            problems.append(f"Endpoint {target[:80]}: {problem}")
            continue
        address = str(endpoint["address"]).strip().rstrip("/")
        checker = allow_list or client.allow_list
        if checker is None:
            raise NotAllowedError(
                f"The DICOMweb address of {label} cannot be checked: no allow-list is configured.",
                remedy="Configure the PACS DICOMweb base URLs this service may retrieve images from.",
            )
        return checker.check(address, what=f"The DICOMweb endpoint of {label}").rstrip("/")  # the form checked
    raise StudyError(
        f"{label} has no usable DICOMweb endpoint for series {series_uid}: " + "; ".join(problems) + ".",
        remedy=f"Give it an active Endpoint with connectionType {WADO_RS} "
        f"({ENDPOINT_CONNECTION_TYPE_SYSTEM}) and the PACS WADO-RS base as address.",
    )


# ---------------------------------------------------------------- series selection


def _instance_count(series: dict[str, Any]) -> int:
    count = series.get("numberOfInstances")
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return count
    return len(items(series.get("instance")))


def _modality(series: dict[str, Any]) -> str:
    code = element(series.get("modality")).get("code")
    return code.upper() if isinstance(code, str) else ""


def _body_site_terms(series: dict[str, Any]) -> list[str]:
    site = series.get("bodySite")
    codings = site if isinstance(site, list) else [site]
    terms: list[str] = []
    for coding in codings:
        if isinstance(coding, dict):
            terms += [str(coding[k]) for k in ("display", "code") if coding.get(k)]
    return terms


def _body_part_label(series: dict[str, Any]) -> str | None:
    terms = _body_site_terms(series)
    return terms[0] if terms else None


def _matches_body_part(series: dict[str, Any], body_parts: tuple[str, ...]) -> str | None:
    """The first wanted body part that the series' bodySite names: code or display (case-insensitive), or the
    SNOMED CT code of that DICOM body part term."""
    terms = [t.lower() for t in _body_site_terms(series)]
    for part in body_parts:
        wanted = part.lower()
        snomed = DICOM_BODY_PART_SNOMED.get(part.upper())
        if any(wanted in term or term == snomed for term in terms):
            return part
    return None


# DICOM Body Part Examined terms (PS3.16 CID 4031) looked for, as whole words, in study and series descriptions
# when an analyzer accepts only some body parts: a study described as "SHOULDER" is not a brain MR.
_DESCRIBED_BODY_PARTS = frozenset(
    {
        *DICOM_BODY_PART_SNOMED,
        "ANKLE", "ARM", "CSPINE", "ELBOW", "EXTREMITY", "FOOT", "HAND", "HIP", "KIDNEY", "KNEE", "LEG", "LSPINE",
        "PROSTATE", "SHOULDER", "SPINE", "TSPINE", "WRIST",
    }
)  # fmt: skip


def _named_body_parts(text: str) -> set[str]:
    return {word for word in re.findall(r"[A-Z]+", text.upper()) if word in _DESCRIBED_BODY_PARTS}


def _body_part_mismatch(imaging_study: dict[str, Any], series: dict[str, Any], accepted: tuple[str, ...]) -> str | None:
    """The body part a series is said to show, when that is none of ``accepted`` (else None).

    Coded ``bodySite`` first; without one, the body-part words of the series' and the study's descriptions. Only
    the matched DICOM term is ever quoted, never the free text around it.
    """
    wanted = {a.upper() for a in accepted}
    terms = [t.lower() for t in _body_site_terms(series)]
    if terms:
        coded = {
            part
            for part, snomed in DICOM_BODY_PART_SNOMED.items()
            if any(part.lower() in t or t == snomed for t in terms)
        }
        if coded and not coded & wanted:
            return sorted(coded)[0]
        return None
    named = _named_body_parts(str(series.get("description") or "")) | _named_body_parts(
        str(imaging_study.get("description") or "")
    )
    if named and not named & wanted:
        return sorted(named)[0]
    return None


def _keywords_in(description: str, keywords: tuple[str, ...]) -> list[str]:
    text = description.lower()
    return [k for k in keywords if k.lower() in text]


def _rejection(
    series: dict[str, Any], requirements: SeriesRequirements, imaging_study: dict[str, Any] | None = None
) -> str | None:
    uid = series.get("uid") or "(no UID)"
    modality = _modality(series)
    wanted = "/".join(m.upper() for m in requirements.modalities)
    if not series.get("uid"):
        return "a series has no Series Instance UID"
    if not is_dicom_uid(series["uid"]):
        return f"a series has a Series Instance UID that is not a valid DICOM UID ({str(series['uid'])[:70]!r})"
    if modality not in {m.upper() for m in requirements.modalities}:
        return f"series {uid} is {modality or 'of unknown modality'}, the analyzer needs {wanted}"
    count = _instance_count(series)
    if count < requirements.min_instances:
        image_word = "image" if count == 1 else "images"
        return f"series {uid} has {count} {image_word}, the analyzer needs at least {requirements.min_instances}"
    if requirements.accepted_body_parts:
        other = _body_part_mismatch(imaging_study or {}, series, requirements.accepted_body_parts)
        if other is not None:
            parts = "/".join(requirements.accepted_body_parts)
            return f"series {uid} shows the {other} (by its body site or description), the analyzer reads {parts}"
    return None


def select_series(imaging_study: dict[str, Any], requirements: SeriesRequirements) -> tuple[dict[str, Any], str]:
    """Choose the series an analyzer should see, and say why in plain words.

    Hard filters: modality and minimum number of images. The remaining candidates are ranked by: not
    matching an excluded description keyword (scouts, localizers), matching a wanted body part
    (``bodySite``), the number of wanted description keywords, then the number of images; ties keep the
    EHR's order. Raises :class:`StudyError` listing each series and why it was rejected when none qualifies.
    """
    label = _study_label(imaging_study)
    if imaging_study.get("status") in ("entered-in-error", "cancelled"):
        raise StudyError(
            f"{label} has status {imaging_study['status']}; it is not analysed.",
            remedy="Order the analysis on a valid study.",
        )
    all_series = [s for s in items(imaging_study.get("series")) if isinstance(s, dict)]
    if not all_series:
        raise StudyError(f"{label} lists no series.", remedy="The EHR's ImagingStudy should list its series.")
    candidates: list[tuple[tuple[int, int, int, int, int], dict[str, Any]]] = []
    rejected: list[str] = []
    for position, series in enumerate(all_series):
        reason = _rejection(series, requirements, imaging_study)
        if reason is not None:
            rejected.append(reason)
            continue
        description = str(series.get("description") or "")
        excluded = bool(_keywords_in(description, requirements.excluded_description_keywords))
        body = _matches_body_part(series, requirements.body_parts) is not None
        keywords = len(_keywords_in(description, requirements.description_keywords))
        rank = (int(not excluded), int(body), keywords, _instance_count(series), -position)
        candidates.append((rank, series))
    if not candidates:
        raise StudyError(
            f"{label} has no series the analyzer can use: " + "; ".join(rejected) + ".",
            remedy="Check that the order went to the right study, or choose an analyzer for this modality.",
        )
    candidates.sort(key=lambda c: c[0], reverse=True)
    chosen = candidates[0][1]
    return chosen, _explain(chosen, requirements, others=len(candidates) - 1, rejected=rejected)


def _explain(series: dict[str, Any], requirements: SeriesRequirements, *, others: int, rejected: list[str]) -> str:
    count = _instance_count(series)
    body_label = _body_part_label(series)
    detail = f"{count} image{'s' if count != 1 else ''}" + (f", {body_label}" if body_label else "")
    grounds: list[str] = []
    body = _matches_body_part(series, requirements.body_parts)
    if body is not None:
        grounds.append(f"body part matches {body}")
    description = str(series.get("description") or "")
    if hits := _keywords_in(description, requirements.description_keywords):
        grounds.append("description mentions " + ", ".join(repr(h) for h in hits))
    if excluded := _keywords_in(description, requirements.excluded_description_keywords):
        grounds.append("although its description mentions " + ", ".join(repr(e) for e in excluded))
    if others:
        grounds.append(f"ranked first of {others + 1} suitable series")
    else:
        grounds.append(f"the only {_modality(series)} series with at least {requirements.min_instances} images")
    text = f"{_modality(series)} series {series['uid']} ({detail}) chosen: " + "; ".join(grounds) + "."
    if rejected:
        text += f" {len(rejected)} other series excluded: " + "; ".join(rejected) + "."
    return text


# ---------------------------------------------------------------- reading the study


def read_imaging_study(client: FhirClient, imaging_study_id_or_ref: str) -> dict[str, Any]:
    """Read an ImagingStudy given its id (``"123"``), a relative reference or an absolute URL."""
    ref = imaging_study_id_or_ref.strip()
    if "/" not in ref:
        return client.read("ImagingStudy", ref)
    resource = client.read_reference(ref)
    if resource.get("resourceType") != "ImagingStudy":
        raise StudyError(
            f"{ref[:80]} is a {resource.get('resourceType')}, not an ImagingStudy.",
            remedy="Pass the ImagingStudy to analyse.",
        )
    return resource


def choose_series(
    client: FhirClient,
    imaging_study_id_or_ref: str,
    requirements: SeriesRequirements,
    allow_list: AllowList | None = None,
) -> tuple[dict[str, Any], SeriesChoice]:
    """Read the ImagingStudy, choose the series to analyse and find its DICOMweb base.

    Returns the ImagingStudy as read (builders reference it) and the :class:`SeriesChoice`.
    """
    imaging_study = read_imaging_study(client, imaging_study_id_or_ref)
    uid = study_uid(imaging_study)
    series, reason = select_series(imaging_study, requirements)
    base = resolve_dicomweb_base(client, imaging_study, series, allow_list=allow_list)
    description = series.get("description")
    return imaging_study, SeriesChoice(
        study_uid=uid,
        series_uid=str(series["uid"]),
        modality=_modality(series),
        body_part=_body_part_label(series),
        description=str(description) if description else None,
        instance_count=_instance_count(series),
        dicomweb_base=base,
        reason=reason,
    )

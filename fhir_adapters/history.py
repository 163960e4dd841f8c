"""Find a patient's earlier results of one analyzer in the EHR: the priors a new result is compared with.

One FHIR search per analysis (more only on a server that ignores ``_include``, see :func:`with_results`): the
patient's DiagnosticReports in the project's analysis identifier system, with the analyzer's report code, effective
no later than the study being analysed, newest first, with their result Observations included (and their Devices,
where the server supports ``_include:iterate``). The same answer says whether this very analysis was filed before (a
re-run, which must add nothing) and gives the earlier results, with the findings they list one by one (each nodule's
Observation, its centre among its components) and the lungs' extent (a report extension): all a lesion comparison
needs, so matching nodules costs no further search. Reports are read by the one reader of filed results,
:mod:`fhir_adapters.results`; reports about any other patient or analyzer are dropped, whatever the server returned.

A Device the server did not include (sekmet-fhir does not support ``Observation:device``) is read once and kept for
the life of the process (:func:`with_devices`): a Device id always stands for the same analyzer version, and a
patient's results come from a handful of versions, so a screen or an analysis reads at most those few.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fhir_adapters import fhirjson
from fhir_adapters.client import FhirClient
from fhir_adapters.constants import ANALYSIS_IDENTIFIER_SYSTEM
from fhir_adapters.errors import FhirError
from fhir_adapters.results import AiFinding, extract_findings, index_resources, parse_datetime
from fhir_adapters.terminology import report_code
from models.followup import PriorMeasurement, PriorResult, lesion

HISTORY_PAGE_SIZE = 10
"""Results asked for in the one search: the newest 10 reports with the analyzer's report code (about 5 studies when
two analyzers share the code, as ct-emphysema and ct-heart share "Chest CT"). The comparison needs the newest
comparable one; when none of these 10 is comparable the result says so rather than asking again. The app charts
the whole history with its own search."""

IDS_PER_SEARCH = 50
_devices: dict[tuple[str, str], dict[str, Any]] = {}
_devices_lock = threading.Lock()


@dataclass(frozen=True)
class ResultHistory:
    """What the EHR holds of one analyzer's results for one patient, up to the study being analysed.

    ``earlier`` are the results of studies acquired before it, newest first; ``filed`` is this very analysis when it
    was filed before (same study, series, analyzer and version); ``truncated`` says the search had more results than
    one page held (older ones are then not in ``earlier``).
    """

    earlier: tuple[AiFinding, ...]
    filed: AiFinding | None
    truncated: bool = False


def search_params(patient_reference: str, analyzer: str, study_date: str) -> dict[str, str | list[str]]:
    """The one search: this patient's AI reports with the analyzer's report code, effective up to ``study_date``."""
    code = report_code(analyzer)
    return {
        "subject": patient_reference,
        "identifier": f"{ANALYSIS_IDENTIFIER_SYSTEM}|",
        "code": f"{code.system}|{code.code}",
        "date": f"le{study_date}",
        "_sort": "-date",
        # What the reader needs of a report, not its HTML rendering or conclusion text (most of its bytes).
        "_elements": "identifier,status,subject,effectiveDateTime,issued,result,imagingStudy,conclusionCode,extension",
        "_include": "DiagnosticReport:result",
        "_include:iterate": "Observation:device",
        "_count": str(HISTORY_PAGE_SIZE),
    }


def read_history(
    client: FhirClient, *, patient_reference: str, analyzer: str, study_date: str, analysis_id: str
) -> ResultHistory:
    """The patient's results of ``analyzer`` up to ``study_date`` (FHIR dateTime of the study), in one search.

    ``analysis_id`` identifies the analysis being run (:func:`fhir_adapters.builders.analysis_identifier`): a report
    with that identifier is this analysis filed before, not a prior.
    """
    bundle = client.search_bundle("DiagnosticReport", search_params(patient_reference, analyzer, study_date))
    resources = [
        resource
        for entry in map(fhirjson.element, fhirjson.items(bundle.get("entry")))
        if isinstance(resource := entry.get("resource"), dict)
    ]
    patient_id = patient_reference.rpartition("/")[2]
    resources = with_devices(client, with_results(client, resources))
    index = index_resources(resources)
    findings = [f for f in extract_findings(resources, patient_id=patient_id) if f.analyzer == analyzer]
    study_time = parse_datetime(study_date)
    filed = next((f for f in findings if _identifier(index, f.report_reference) == analysis_id), None)
    earlier = tuple(
        f
        for f in findings
        if f is not filed and f.effective is not None and study_time is not None and f.effective < study_time
    )
    truncated = any(
        isinstance(link, dict) and link.get("relation") == "next" for link in fhirjson.items(bundle.get("link"))
    )
    return ResultHistory(earlier=earlier, filed=filed, truncated=truncated)


def prior_results(history: ResultHistory, *, modality: str) -> tuple[PriorResult, ...]:
    """The earlier results as :mod:`models.followup` compares them (``modality`` names the scans in the report)."""
    priors = []
    for finding in history.earlier:
        if finding.effective is None:
            continue
        priors.append(
            PriorResult(
                reference=finding.report_reference,
                analyzer=finding.analyzer,
                version=finding.version,
                effective=finding.effective,
                imaging_study=next(iter(finding.imaging_studies), ""),
                measurements=tuple(
                    PriorMeasurement(m.key, m.value, m.unit, m.text, m.reference)
                    for m in finding.measurements
                    if m.reference
                ),
                acquisition=finding.acquisition,
                modality=modality,
                lesions=tuple(
                    found
                    for listed in finding.listed
                    if (
                        found := lesion(
                            listed.key or listed.reference,
                            listed.centre_mm,
                            {m.key: m.value for m in listed.measurements},
                            {v.key: v.code for v in listed.values},
                            listed.reference,
                        )
                    )
                    is not None
                ),
                lungs_mm=finding.lungs_mm,
            )
        )
    return tuple(priors)


def _identifier(index: Mapping[str, Mapping[str, Any]], report_reference: str) -> str | None:
    report = index.get(report_reference) or {}
    for identifier in fhirjson.items(report.get("identifier")):
        if isinstance(identifier, dict) and identifier.get("system") == ANALYSIS_IDENTIFIER_SYSTEM:
            value = identifier.get("value")
            return value if isinstance(value, str) else None
    return None


def with_results(client: FhirClient, resources: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``resources`` plus the result Observations of its reports that the server did not include.

    A server that ignores ``_include`` (Medplum's in-memory engine does) answers with the reports alone; their
    Observations are then fetched by id, :data:`IDS_PER_SEARCH` to a search (a URL stays well under common limits).
    A server that honours ``_include`` costs nothing here.
    """
    present = {f"{r.get('resourceType')}/{r.get('id')}" for r in resources}
    missing = sorted(
        {
            reference
            for r in resources
            if r.get("resourceType") == "DiagnosticReport"
            for reference in map(fhirjson.reference, fhirjson.items(r.get("result")))
            if reference.startswith("Observation/") and reference not in present
        }
    )
    if not missing:
        return list(resources)
    found: list[dict[str, Any]] = []
    for start in range(0, len(missing), IDS_PER_SEARCH):
        ids = [reference.partition("/")[2] for reference in missing[start : start + IDS_PER_SEARCH]]
        bundle = client.search_bundle("Observation", {"_id": ",".join(ids), "_count": str(len(ids))})
        found.extend(
            resource
            for entry in map(fhirjson.element, fhirjson.items(bundle.get("entry")))
            if isinstance(resource := entry.get("resource"), dict) and resource.get("resourceType") == "Observation"
        )
    return [*resources, *found]


def with_devices(client: FhirClient, resources: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``resources`` plus the Devices their Observations name that are not among them: what the reader needs to
    say which analyzer version filed each result (:attr:`~fhir_adapters.results.AiFinding.version`).

    A Device that cannot be read is left out (its results read as of an unknown version, never compared); it is
    asked for again next time.
    """
    present = {f"{r.get('resourceType')}/{r.get('id')}" for r in resources}
    wanted = {
        device
        for r in resources
        if r.get("resourceType") == "Observation"
        for device in [fhirjson.reference(r.get("device"))]
        if device.startswith("Device/") and device not in present
    }
    found: list[dict[str, Any]] = []
    for reference in sorted(wanted):
        device = _device(client, reference)
        if device is not None:
            found.append(device)
    return [*resources, *found]


def _device(client: FhirClient, reference: str) -> dict[str, Any] | None:
    key = (client.base_url, reference)
    with _devices_lock:
        if key in _devices:
            return _devices[key]
    try:
        device = client.read("Device", reference.partition("/")[2])
    except FhirError:
        return None
    with _devices_lock:
        _devices[key] = device
    return device

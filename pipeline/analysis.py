"""One study, end to end: FHIR ImagingStudy in, DICOMweb images, analysis, AI findings back to the EHR.

Each arrow of the data flow happens in one place, and this module only strings them together:

    fhir_adapters.study.choose_series      ImagingStudy + Endpoint  ->  SeriesChoice (why this series)
    fhir_adapters.patient                  Patient                  ->  age and sex (analyzers that use them)
    dicom_io.dicomweb.fetch_series      WADO-RS                  ->  pydicom datasets, streamed
    dicom_io.volume.assemble_volume     datasets                 ->  checked, sorted HU volume
    models.<analyzer>.analyze              ImageInput               ->  AnalysisResult
    fhir_adapters.history.read_history     one FHIR search          ->  the patient's earlier results (searched
                                                                        while the images download)
    models.followup.compare_with_history   result + earlier results ->  FollowupComparison (with the nodules
                                                                        matched to the prior's: models.lesion_followup)
    fhir_adapters.builders                 AnalysisResult           ->  one transaction Bundle
    fhir_adapters.writer.write_results     Bundle                   ->  the EHR, as it takes it (idempotent)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from core.allowlist import AllowList
from core.errors import ImagingCdsError, StudyError
from core.limits import DEFAULT_LIMITS, InputLimits, too_large
from dicom_io.dicomweb import fetch_series
from dicom_io.volume import assemble_volume
from fhir_adapters.audit import AuditedFhirClient, failure_of
from fhir_adapters.builders import AnalysisTarget, DeviceInfo, analysis_identifier, build_results_bundle
from fhir_adapters.client import FhirClient
from fhir_adapters.fhirjson import relative_reference
from fhir_adapters.history import HISTORY_PAGE_SIZE, ResultHistory, prior_results, read_history
from fhir_adapters.patient import read_patient_context
from fhir_adapters.results import parse_datetime
from fhir_adapters.study import SeriesChoice, choose_series
from fhir_adapters.writer import CAPABILITIES, CapabilityCache, WriteSettings, write_results
from models.base import AnalysisResult, Analyzer, ImageInput
from models.followup import Acquisition, FollowupComparison, as_json, compare_with_history, followup_spec
from models.registry import get_card

ProgressCallback = Callable[[float, str], None]

PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "US", "XA", "RF", "OT"})


def _no_progress(progress: float, step: str) -> None:
    """Default progress sink: the CLI and tests that do not follow progress."""


@dataclass
class StepTimings:
    """Wall-clock seconds per pipeline step, in the order they ran (the benchmark reports these)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class AnalysisOutcome:
    """What one run did: the series it chose and why, what the analyzer found, what the EHR now holds."""

    imaging_study: str
    series: SeriesChoice
    result: AnalysisResult
    diagnostic_report: str
    written: tuple[str, ...]
    already_present: bool
    corrections: tuple[str, ...]
    timings: dict[str, float]
    filed: dict[str, dict[str, Any]] = field(default_factory=dict)
    """With ``keep_filed``: the resources as the EHR answered the writes with them, by ``Type/id`` (empty when
    the server left them out of its answer)."""
    write_strategy: str = "transaction"
    """How the results went to the EHR: ``transaction`` or ``ordered`` (see :mod:`fhir_adapters.writer`)."""
    write_reason: str = ""
    images_as_binary: int = 0
    comparison: FollowupComparison | None = None
    """The comparison with the patient's earlier result that this run filed (``None`` for an analyzer whose card
    follows nothing over time, and for a re-run, which files nothing new: the EHR holds the first run's)."""

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable summary (no PHI: resource ids and DICOM UIDs only)."""
        return {
            "imagingStudy": self.imaging_study,
            "series": {
                "uid": self.series.series_uid,
                "modality": self.series.modality,
                "instances": self.series.instance_count,
                "reason": self.series.reason,
            },
            "analyzer": {"name": self.result.analyzer, "version": self.result.version},
            "category": {"code": self.result.category.code, "display": self.result.category.display},
            "probability": self.result.probability,
            "measurements": [
                {
                    "key": m.key,
                    "display": m.display,
                    "value": m.value,
                    "unit": m.unit,
                    "interpretation": m.interpretation,
                }
                for m in self.result.measurements
            ],
            "conclusion": self.result.conclusion,
            "comparison": None if self.comparison is None else as_json(self.comparison),
            "warnings": list(self.result.warnings),
            "corrections": list(self.corrections),
            "diagnosticReport": self.diagnostic_report,
            "written": list(self.written),
            "alreadyPresent": self.already_present,
            "write": {
                "strategy": self.write_strategy,
                "reason": self.write_reason,
                "imagesAsBinary": self.images_as_binary,
            },
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


def device_info(analyzer: Analyzer, *, card_base_url: str | None) -> DeviceInfo:
    """Describe the analyzer as the FHIR Device its results point to (with the weights' hash when it has any)."""
    card_url = f"{card_base_url.rstrip('/')}/models/{analyzer.name}" if card_base_url else None
    return DeviceInfo(
        name=analyzer.name,
        version=analyzer.version,
        title=analyzer.title,
        model_sha256=getattr(analyzer, "model_sha256", None),
        card_url=card_url,
    )


def load_image(
    choice: SeriesChoice, *, expected_modality_projection: bool, limits: InputLimits = DEFAULT_LIMITS
) -> tuple[ImageInput, tuple[str, ...]]:
    """Fetch the chosen series over WADO-RS and turn it into the analyzer's input, within ``limits``.

    Cross-sectional series (CT, MR, PT) become a checked volume; projection images (CR, DX, MG, US) are
    analysed one image at a time, the first instance of the series.
    """
    if choice.instance_count > limits.instances_per_series:  # the EHR says so: refuse before asking the PACS
        raise too_large(
            f"Series {choice.series_uid}", "instances_per_series", limits.instances_per_series, unit="instances"
        )
    datasets = fetch_series(
        choice.dicomweb_base,
        choice.study_uid,
        choice.series_uid,
        limits=limits,
        expected_instances=choice.instance_count or None,
    )
    if expected_modality_projection:
        from dicom_io.projection import projection_input

        first = next(iter(datasets), None)
        if first is None:
            raise StudyError(f"Series {choice.series_uid} returned no images.", remedy="Check the series in the PACS.")
        return projection_input(first, limits=limits), ()
    volume = assemble_volume(datasets, expected_series_uid=choice.series_uid, limits=limits)
    return volume.to_image_input(), volume.corrections


@contextmanager
def _audited_retrieval(client: FhirClient, choice: SeriesChoice, *, imaging_study: str, patient: str) -> Iterator[None]:
    """Record the images fetched from the PACS in the client's audit trail (a client without one records none):
    the images are patient data read with the same authority as the FHIR resources around them."""
    if not isinstance(client, AuditedFhirClient):
        yield
        return
    where = {
        "pacs": choice.dicomweb_base,
        "patient": relative_reference(patient),
        "imaging_study": imaging_study,
        "study_uid": choice.study_uid,
        "series_uid": choice.series_uid,
    }
    try:
        yield
    except ImagingCdsError as exc:
        outcome, failure = failure_of(exc)
        client.trail.dicom_transfer(outcome=outcome, failure=failure, **where)
        raise
    client.trail.dicom_transfer(**where)


def analyze_study(
    client: FhirClient,
    imaging_study: str,
    analyzer: Analyzer,
    *,
    dicomweb_allow_list: AllowList,
    card_base_url: str | None = None,
    progress: ProgressCallback = _no_progress,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    keep_filed: bool = False,
    limits: InputLimits = DEFAULT_LIMITS,
    write_settings: WriteSettings | None = None,
    capabilities: CapabilityCache = CAPABILITIES,
) -> AnalysisOutcome:
    """Analyse one ImagingStudy with ``analyzer`` and file the findings in the EHR.

    The findings go in one transaction where the EHR takes it, else in ordered writes with the report last
    (:func:`fhir_adapters.writer.write_results`, by the EHR's CapabilityStatement and ``write_settings``).
    Re-running with the same study, series and analyzer version writes nothing new: every resource is
    created conditionally on a deterministic identifier; a re-run after a failed write completes it. Any failure
    before the write-back writes nothing. ``keep_filed`` asks the EHR to answer with the filed resources as they
    now stand (``AnalysisOutcome.filed``), for a caller that shows them next. ``limits`` bounds what the PACS
    may send (see :class:`core.limits.InputLimits`).
    """
    timings = StepTimings()
    progress(0.0, "reading the ImagingStudy")
    with timings.step("read_study"):
        study, choice = choose_series(client, imaging_study, analyzer.requirements, dicomweb_allow_list)
    subject = (study.get("subject") or {}).get("reference")
    if not subject:
        raise StudyError(
            f"{imaging_study} has no subject.", remedy="The ImagingStudy must reference the Patient it belongs to."
        )

    target = AnalysisTarget(
        imaging_study_id=str(study["id"]),
        patient_reference=subject,
        study_uid=choice.study_uid,
        series_uid=choice.series_uid,
        selection_reason=choice.reason,
        study_started=study.get("started"),
    )
    # The patient's earlier results are searched for while the images download: the search needs only the study.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prior-search") as background:
        searching = background.submit(find_history, client, analyzer, target)
        progress(0.1, f"fetching {choice.instance_count} images of series {choice.series_uid}")
        projection = set(analyzer.requirements.modalities) <= PROJECTION_MODALITIES
        with (
            timings.step("fetch_decode"),
            _audited_retrieval(client, choice, imaging_study=f"ImagingStudy/{study['id']}", patient=subject),
        ):
            image, corrections = load_image(choice, expected_modality_projection=projection, limits=limits)
        with timings.step("find_prior"):  # what the search still takes once the images are in
            history = searching.result()

    if getattr(analyzer, "uses_patient_context", False):
        with timings.step("read_patient"):
            context = read_patient_context(client, subject, study_started=study.get("started"))
        image = replace(image, patient=context)

    progress(0.6, f"running {analyzer.name}")
    with timings.step("analyze"):
        analyzer.check_input(image)
        result = analyzer.analyze(image)
    target = replace(target, acquisition=Acquisition.from_attributes(image.attributes))
    del image  # the volume is not needed for write-back; free it before building the bundle
    comparison = compare_with_prior(analyzer, result, target, history)

    progress(0.85, "writing findings to the EHR")
    with timings.step("build_bundle"):
        device = device_info(analyzer, card_base_url=card_base_url)
        bundle = build_results_bundle(target, result, device, issued=now(), comparison=comparison)
    with timings.step("write_back"):
        filed = write_results(
            client, bundle, settings=write_settings, capabilities=capabilities, representation=keep_filed
        )
    progress(1.0, "done")
    return AnalysisOutcome(
        imaging_study=f"ImagingStudy/{study['id']}",
        series=choice,
        result=result,
        diagnostic_report=filed.report,
        written=filed.written,
        already_present=not filed.report_created,
        corrections=tuple(corrections),
        timings=dict(timings.seconds),
        filed=filed.filed,
        write_strategy=filed.strategy,
        write_reason=filed.reason,
        images_as_binary=filed.images_as_binary,
        comparison=comparison,
    )


@dataclass(frozen=True)
class NotComparable:
    """Why a study cannot be compared with earlier results at all (it has no date to place it after them)."""

    reason: str


def find_history(
    client: FhirClient, analyzer: Analyzer, target: AnalysisTarget
) -> ResultHistory | NotComparable | None:
    """The patient's earlier results of ``analyzer``, with one FHIR search; ``None`` when its card follows nothing."""
    if followup_spec(get_card(analyzer.name)) is None:
        return None
    if target.study_started is None or parse_datetime(target.study_started) is None:
        return NotComparable(
            f"{target.imaging_study_reference} has no acquisition date in the EHR (ImagingStudy.started), so it is "
            "not compared with earlier results."
        )
    return read_history(
        client,
        patient_reference=target.patient_reference,
        analyzer=analyzer.name,
        study_date=target.study_started,
        analysis_id=analysis_identifier(target.study_uid, target.series_uid, analyzer.name, analyzer.version),
    )


def compare_with_prior(
    analyzer: Analyzer,
    result: AnalysisResult,
    target: AnalysisTarget,
    history: ResultHistory | NotComparable | None,
) -> FollowupComparison | None:
    """Compare ``result`` with the earlier results :func:`find_history` found.

    ``None`` when the analyzer's card follows nothing over time, or when this analysis was filed before: a re-run
    must add nothing, so it brings no comparison of its own (the first run's is in the EHR).
    """
    spec = followup_spec(get_card(analyzer.name))
    if spec is None or history is None:
        return None
    if isinstance(history, NotComparable):
        return FollowupComparison(result.analyzer, datetime.now(UTC), None, not_compared=(history.reason,))
    current_date = parse_datetime(target.study_started)
    if history.filed is not None or current_date is None:
        return None
    comparison = compare_with_history(
        result,
        current_date=current_date,
        acquisition=target.acquisition or Acquisition(),
        history=prior_results(history, modality=analyzer.requirements.modalities[0]),
        spec=spec,
    )
    if comparison.prior is None and history.truncated:
        searched = (
            f"Only the newest {HISTORY_PAGE_SIZE} earlier reports were searched, and none was a comparable result of "
            f"{analyzer.name}; older ones may be."
        )
        comparison = replace(comparison, not_compared=(*comparison.not_compared, searched))
    return comparison

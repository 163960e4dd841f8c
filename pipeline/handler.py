"""The one job handler: analyse this ImagingStudy with these analyzers.

Every way an analysis starts goes through :class:`StudyAnalysisHandler`: the ``imaging-cds analyze`` command
runs it in-process (:meth:`StudyAnalysisHandler.analyses`), the clinician app and the CDS service's order-sign
submit it as a job (:data:`ANALYZE_STUDY`; the handler is called by whichever job runner holds it), and a
distributed worker calls the same handler with the same params. What differs between them is injected, not
re-written:

* where the FHIR client comes from (``client_for``): the clinician's session for the app, the backend-services
  client for order-sign and the CLI - params never carry a credential (:func:`pipeline.jobs.check_params`);
* what happens once a result is filed (``on_outcome``): the app keeps the filed report for the page that opens
  next.

Params are plain JSON: ``{"imaging_study": "ImagingStudy/123", "analyzers": ["ct-emphysema", ...]}``, and
``"skip_unsuitable": true`` when the analyzers are tried on a study nobody chose them for (order-sign): an
analyzer the study has no series for, or whose input check refuses the series, is skipped with its reason
instead of failing the job. The result is a lean summary (references, versions, timings), never findings: job
records are read by pollers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from core.allowlist import AllowList
from core.errors import ConfigurationError, StudyError, UnsuitableInputError
from core.limits import DEFAULT_LIMITS, InputLimits
from fhir_adapters.client import FhirClient
from fhir_adapters.writer import ServerWriteSettings
from pipeline.analysis import AnalysisOutcome, ProgressCallback, analyze_study
from pipeline.memory import LoadedAnalyzers
from pipeline.telemetry import ANALYSIS_SECONDS

ANALYZE_STUDY = "analyze-study"
"""The job kind every front door submits."""

ClientFor = Callable[[Mapping[str, Any]], FhirClient]
"""The FHIR client a job's params run with (looked up from a reference in the params, never carried by them)."""

OutcomeSink = Callable[[Mapping[str, Any], AnalysisOutcome], None]
"""Called with the params and each outcome once its results are filed."""


def analysis_params(imaging_study: str, analyzers: tuple[str, ...] | list[str], **extra: Any) -> dict[str, Any]:
    """The params of an :data:`ANALYZE_STUDY` job (``extra``: references the caller's ``client_for`` needs)."""
    return {"imaging_study": imaging_study, "analyzers": list(analyzers), **extra}


def _analyzer_names(params: Mapping[str, Any]) -> tuple[str, ...]:
    names = params.get("analyzers")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigurationError(
            "An analysis job names no analyzer.", remedy="Submit it with 'analyzers': a list of analyzer names."
        )
    return tuple(names)


def outcome_summary(outcome: AnalysisOutcome) -> dict[str, Any]:
    """What a job record keeps of one analysis: where its results are, not what they say."""
    return {
        "analyzer": outcome.result.analyzer,
        "version": outcome.result.version,
        "diagnosticReport": outcome.diagnostic_report,
        "media": [ref.split("/", 1)[1] for ref in outcome.written if ref.startswith("Media/")],
        "alreadyPresent": outcome.already_present,
        "writeStrategy": outcome.write_strategy,
        "timings": {k: round(v, 3) for k, v in outcome.timings.items()},
    }


@dataclass
class StudyAnalysisHandler:
    """Analyse an ImagingStudy with the analyzers its params name and file each result in the EHR."""

    client_for: ClientFor
    dicomweb_allow_list: AllowList
    card_base_url: str | None = None
    loaded: LoadedAnalyzers = field(default_factory=LoadedAnalyzers)
    keep_filed: bool = False
    on_outcome: OutcomeSink | None = None
    limits: InputLimits = DEFAULT_LIMITS
    write_settings: ServerWriteSettings = field(default_factory=ServerWriteSettings)
    """How results are written to each FHIR server (see :mod:`fhir_adapters.writer`)."""

    def analyses(
        self, params: Mapping[str, Any], report: ProgressCallback
    ) -> tuple[list[AnalysisOutcome], dict[str, str]]:
        """Run each named analyzer in turn: the outcomes filed, and the analyzers skipped with their reasons."""
        imaging_study = params.get("imaging_study")
        if not isinstance(imaging_study, str) or not imaging_study.startswith("ImagingStudy/"):
            raise ConfigurationError(
                "An analysis job names no ImagingStudy.", remedy="Submit it with 'imaging_study': 'ImagingStudy/<id>'."
            )
        names = _analyzer_names(params)
        skip_unsuitable = bool(params.get("skip_unsuitable", False))
        client = self.client_for(params)
        outcomes: list[AnalysisOutcome] = []
        skipped: dict[str, str] = {}
        for name in names:
            started = time.perf_counter()
            try:
                outcome = analyze_study(
                    client,
                    imaging_study,
                    self.loaded.get(name),
                    dicomweb_allow_list=self.dicomweb_allow_list,
                    card_base_url=self.card_base_url,
                    progress=report,
                    keep_filed=self.keep_filed,
                    limits=self.limits,
                    write_settings=self.write_settings.for_server(client.base_url),
                )
            except (StudyError, UnsuitableInputError) as exc:
                if not skip_unsuitable:
                    raise
                skipped[name] = exc.message  # no series this analyzer is built for
                continue
            ANALYSIS_SECONDS.labels(name).observe(time.perf_counter() - started)
            if self.on_outcome is not None:
                self.on_outcome(params, outcome)
            outcomes.append(outcome)
        return outcomes, skipped

    def __call__(self, params: Mapping[str, Any], report: ProgressCallback) -> dict[str, Any]:
        """The job handler (``handler(params, report) -> result``, see :mod:`pipeline.jobs`)."""
        outcomes, skipped = self.analyses(params, report)
        summaries = [outcome_summary(o) for o in outcomes]
        first = summaries[0] if summaries else {}
        return {
            # The first analysis at the top level: a job for one analyzer reads like that analysis.
            **first,
            "imagingStudy": params["imaging_study"],
            "analyses": summaries,
            "diagnosticReports": {s["analyzer"]: s["diagnosticReport"] for s in summaries},
            "skipped": skipped,
        }

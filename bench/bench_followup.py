"""Benchmark: what comparing with the prior costs an analysis, in one run.

The same real chest CT (pyradiomics lung2; lung1 for ct-lung-nodules; under new UIDs each time) is analysed end to
end, in alternating rounds:
(a) for a new patient with no earlier results (the one history search answers empty), and
(b) for a patient whose record already holds ``--priors`` earlier results of the analyzer (the search returns them
    with their Observations, the newest comparable one is compared, the comparison Observations are filed).
Prints the median wall and CPU time of each, the ratio (b)/(a) against the target (<= 1.1, issue 20), the median
time of the history step itself, and the FHIR requests each analysis made.

Run: .venv/bin/python bench/bench_followup.py [--analyzer ct-emphysema|ct-heart|ct-bone|ct-lung-nodules] [--rounds 7]
     [--priors 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import requests

from core.allowlist import AllowList
from devtools.samples import endpoint_resource, imaging_study_resource, load_sample, refiled, upload_series
from devtools.servers import fhir_server, orthanc_server
from fhir_adapters.builders import AnalysisTarget, build_results_bundle
from fhir_adapters.client import FhirClient
from models.registry import get_analyzer
from pipeline.analysis import AnalysisOutcome, analyze_study, device_info

TARGET = 1.1
SAMPLES = {"ct-emphysema": "lung2", "ct-heart": "lung2", "ct-bone": "abdomen", "ct-lung-nodules": "lung1"}


class CountingSession(requests.Session):
    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        self.requests += 1
        return super().request(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--analyzer", default="ct-emphysema", choices=sorted(SAMPLES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--priors", type=int, default=20)
    args = parser.parse_args()

    analyzer = get_analyzer(args.analyzer)
    pixels = load_sample(SAMPLES[args.analyzer])
    with fhir_server() as fhir, orthanc_server() as orthanc:
        session = CountingSession()
        client = FhirClient(fhir.base_url, session=session)
        allow = AllowList.of([orthanc.dicomweb_url])
        endpoint = client.create(endpoint_resource(orthanc.dicomweb_url))

        def new_patient() -> str:
            return f"Patient/{client.create({'resourceType': 'Patient'})['id']}"

        def study(patient: str, date: str) -> str:
            images = refiled(pixels, date, namespace=f"bench-followup-{uuid.uuid4()}")
            upload_series(orthanc.url, images)
            resource = imaging_study_resource(
                images, patient_reference=patient, endpoint_reference=f"Endpoint/{endpoint['id']}"
            )
            return f"ImagingStudy/{client.create(resource)['id']}"

        def analyse(imaging_study: str) -> tuple[float, float, AnalysisOutcome, int]:
            before = session.requests
            wall, cpu = time.perf_counter(), time.process_time()
            outcome = analyze_study(client, imaging_study, analyzer, dicomweb_allow_list=allow)
            return time.perf_counter() - wall, time.process_time() - cpu, outcome, session.requests - before

        # The patient with a history: one real analysis, then that result filed for --priors earlier studies.
        followed = new_patient()
        first = analyse(study(followed, "20000101"))[2]
        device = device_info(analyzer, card_base_url=None)
        for year in range(2001, 2001 + args.priors):
            target = AnalysisTarget(
                imaging_study_id=client.create(
                    {"resourceType": "ImagingStudy", "status": "available", "subject": {"reference": followed}}
                )["id"],
                patient_reference=followed,
                study_uid=f"2.25.{uuid.uuid4().int}",
                series_uid=f"2.25.{uuid.uuid4().int}",
                selection_reason="bench history",
                study_started=f"{year}-01-01T09:00:00+00:00",
            )
            client.transaction(build_results_bundle(target, first.result, device, issued=datetime.now(UTC)))
        analyse(study(new_patient(), "20250101"))  # warm up the no-history path too

        without: list[tuple[float, float, float, int]] = []
        with_priors: list[tuple[float, float, float, int]] = []
        compared = 0
        steps: dict[int, list[dict[str, float]]] = {}
        for round_ in range(args.rounds):
            later = f"{date(2026, 1, 1) + timedelta(days=round_):%Y%m%d}"
            cases = [(without, new_patient(), "20250101"), (with_priors, followed, later)]
            for rows, patient, day in cases if round_ % 2 == 0 else cases[::-1]:  # neither always goes first
                wall, cpu, outcome, calls = analyse(study(patient, day))
                rows.append((wall, cpu, outcome.timings.get("find_prior", 0.0), calls))
                steps.setdefault(id(rows), []).append(outcome.timings)
                if patient == followed and outcome.comparison is not None:
                    compared = len(outcome.comparison.history)

    def median(rows: list[tuple[float, float, float, int]], column: int) -> float:
        return statistics.median(row[column] for row in rows)

    print(f"analyzer {args.analyzer}, {args.rounds} alternating rounds, history of up to {compared} earlier results")
    print(f"{'':28}{'wall s':>9}{'cpu s':>9}{'history step s':>16}{'FHIR requests':>15}")
    for name, rows in (("(a) no earlier results", without), ("(b) with earlier results", with_priors)):
        print(f"{name:28}{median(rows, 0):9.3f}{median(rows, 1):9.3f}{median(rows, 2):16.4f}{median(rows, 3):15.0f}")
    for name, rows in (("(a)", without), ("(b)", with_priors)):
        split = steps[id(rows)]
        print(name, {k: round(statistics.median(t.get(k, 0.0) for t in split), 4) for k in split[0]})
    wall_ratio = median(with_priors, 0) / median(without, 0)
    cpu_ratio = median(with_priors, 1) / median(without, 1)
    verdict = "meets" if wall_ratio <= TARGET else "misses"
    print(f"ratio (b)/(a): wall {wall_ratio:.3f}, cpu {cpu_ratio:.3f} ({verdict} the target <= {TARGET})")


if __name__ == "__main__":
    main()

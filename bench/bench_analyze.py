"""Benchmark: full ``analyze`` of a real chest CT against the I/O floor, in one run.

(a) the floor: fetch the series' bytes over WADO-RS (dicomweb-client) and decode every instance with pydicom;
(b) the full pipeline on the same study: read the ImagingStudy, fetch + decode + assemble, analyze, build and
    write the transaction to the FHIR server.
Prints the median of each (wall clock and this process's CPU time: on a shared machine the CPU ratio is the
steadier one), the ratio (b)/(a) against the analyzer's target (ct-emphysema 2.0, ct-heart 2.5,
ct-lung-nodules 3.0), the time split by step, and the peak memory allocated during (b) (tracemalloc, separate
run) against the decoded float32 volume (target <= 3x). tracemalloc sees numpy's arrays but not torch's own
buffers (the nodule network's activations).

Run: .venv/bin/python bench/bench_analyze.py [--analyzer ct-heart] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np
import requests
from dicomweb_client.api import DICOMwebClient

from core.allowlist import AllowList
from devtools.demo import SAMPLE_CHEST_CT, load_sample_study
from devtools.servers import fhir_server, orthanc_server
from fhir_adapters.client import FhirClient
from models.registry import get_analyzer
from pipeline.analysis import analyze_study

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
TARGETS = {"ct-emphysema": 2.0, "ct-heart": 2.5, "ct-lung-nodules": 3.0}
"""Full analysis / I/O floor targets: emphysema (issue 2), heart and great vessels (issue 19), lung nodules
(issue 18: it does far more)."""


def io_floor(dicomweb_base: str, study_uid: str, series_uid: str) -> tuple[float, int]:
    """Fetch every instance of the series over WADO-RS and decode its pixels; returns seconds, decoded bytes."""
    start = time.perf_counter()
    client = DICOMwebClient(url=dicomweb_base)
    instances = client.retrieve_series(study_uid, series_uid)
    decoded = [
        ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in instances
    ]
    seconds = time.perf_counter() - start
    return seconds, sum(a.nbytes for a in decoded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--analyzer", default="ct-emphysema", choices=sorted(TARGETS))
    args = parser.parse_args()

    analyzer = get_analyzer(args.analyzer)
    target = TARGETS[args.analyzer]
    with fhir_server() as fhir, orthanc_server() as orthanc:
        client = FhirClient(fhir.base_url, session=requests.Session())
        loaded = load_sample_study(client, orthanc, SAMPLE_CHEST_CT)
        allow = AllowList.of([orthanc.dicomweb_url])

        def full() -> dict[str, float]:
            outcome = analyze_study(client, loaded.imaging_study, analyzer, dicomweb_allow_list=allow)
            return outcome.timings

        # Warm up both paths (first write creates resources; later runs are idempotent re-runs).
        io_floor(orthanc.dicomweb_url, loaded.study_uid, loaded.series_uid)
        full()

        floor_runs: list[float] = []
        full_runs: list[float] = []
        floor_cpu: list[float] = []
        full_cpu: list[float] = []
        step_runs: list[dict[str, float]] = []
        decoded_bytes = 0
        for _ in range(args.repeats):
            cpu = time.process_time()
            seconds, decoded_bytes = io_floor(orthanc.dicomweb_url, loaded.study_uid, loaded.series_uid)
            floor_cpu.append(time.process_time() - cpu)
            floor_runs.append(seconds)
            cpu = time.process_time()
            start = time.perf_counter()
            step_runs.append(full())
            full_runs.append(time.perf_counter() - start)
            full_cpu.append(time.process_time() - cpu)

        tracemalloc.start()
        full()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

    floor = statistics.median(floor_runs)
    total = statistics.median(full_runs)
    floor_cpu_s, total_cpu_s = statistics.median(floor_cpu), statistics.median(full_cpu)
    print(f"study: {SAMPLE_CHEST_CT.name} ({loaded.instance_count} CT images), analyzer {args.analyzer}, "
          f"{args.repeats} repeats, medians")  # fmt: skip
    print(f"(a) I/O floor, WADO-RS fetch + pydicom decode : {floor * 1000:8.1f} ms   (CPU {floor_cpu_s * 1000:.1f} ms)")
    print(f"(b) full analyze (read, fetch, analyze, write): {total * 1000:8.1f} ms   (CPU {total_cpu_s * 1000:.1f} ms)")
    print(f"ratio (b)/(a)                                 : {total / floor:8.2f}   (target <= {target:.1f})")
    print(f"ratio (b)/(a), this process's CPU time        : {total_cpu_s / floor_cpu_s:8.2f}")
    print("time by step (median):")
    for step in step_runs[0]:
        print(f"    {step:<14} {statistics.median(r[step] for r in step_runs) * 1000:8.1f} ms")
    print(f"decoded volume (float32)                      : {decoded_bytes / 2**20:8.1f} MiB")
    print(f"peak memory allocated during (b)              : {peak / 2**20:8.1f} MiB")
    print(f"ratio peak / decoded volume                   : {peak / decoded_bytes:8.2f}   (target <= 3.0)")


if __name__ == "__main__":
    main()

"""Benchmark: full ``analyze`` of a real chest CT against the I/O floor, in one run.

(a) the floor: fetch the series' bytes over WADO-RS (dicomweb-client) and decode every instance with pydicom;
(b) the full pipeline on the same study: read the ImagingStudy, fetch + decode + assemble, analyze, build and
    write the transaction to the FHIR server.
Prints the median of each (wall clock and this process's CPU time: on a shared machine the CPU ratio is the
steadier one), the ratio (b)/(a) against the analyzer's target (ct-emphysema 2.0, ct-heart 2.5,
ct-lung-nodules 3.0), the time split by step, and the peak memory allocated during (b) (tracemalloc, separate
run) against the decoded float32 volume (target <= 3x). tracemalloc sees numpy's arrays but not torch's own
buffers (the nodule network's activations), so the growth of the process's peak resident memory during that run is
printed beside it (Linux: the high-water mark is reset first through /proc/self/clear_refs).

For ct-lung-nodules it also times, on the same decoded volume, the two steps whose cost grows with the number of
candidates (the candidate search, and the false-positive networks over every candidate it finds) and prints the
ratio the pipeline would reach if the rest of the analysis cost nothing: the floor this detector design sets.

Run: .venv/bin/python bench/bench_analyze.py [--analyzer ct-lung-nodules] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import ctypes
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
from fhir_adapters.study import choose_series
from models.base import Analyzer, ImageInput
from models.registry import get_analyzer
from pipeline.analysis import analyze_study, load_image

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


def resident_high_water_reset() -> bool:
    """Reset this process's peak resident set size (Linux ``clear_refs`` 5); False where that is not possible.

    Freed heap memory is handed back to the system first (glibc ``malloc_trim``), so that a run cannot reuse
    pages an earlier run left resident and look smaller than it is.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def resident_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in KiB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def nodule_detector_floor(analyzer: Analyzer, image: ImageInput, repeats: int) -> dict[str, float]:
    """Median seconds of the candidate search and of the networks over its candidates, and the candidate count."""
    from models.lung import segment_lungs
    from models.nodules.analyzer import LungNoduleAnalyzer
    from models.nodules.detect import find_candidates
    from models.nodules.network import candidate_features

    assert isinstance(analyzer, LungNoduleAnalyzer)
    models = analyzer.models
    spacing = (float(image.spacing[0]), float(image.spacing[1]), float(image.spacing[2]))
    lungs = segment_lungs(image.array, spacing)
    search: list[float] = []
    network: list[float] = []
    count = 0
    for _ in range(repeats):
        start = time.perf_counter()
        candidates = find_candidates(image.array, spacing, lungs.labels, lungs.box)
        search.append(time.perf_counter() - start)
        radii = [c.radius_mm for c in candidates]
        features = candidate_features(
            radii, [c.lung_surround for c in candidates], [c.dense_surround for c in candidates]
        )
        start = time.perf_counter()
        models.candidate_probabilities(image.array, spacing, [c.centre for c in candidates], radii, features)
        network.append(time.perf_counter() - start)
        count = len(candidates)
    return {"search": statistics.median(search), "network": statistics.median(network), "candidates": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--analyzer", default="ct-emphysema", choices=sorted(TARGETS))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, as a worker gets its share of the cores (default 1: the I/O floor runs on one core, and "
        "on a shared machine a second thread waiting for a busy core slows the networks down)",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

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
        resident_growth = None
        if resident_high_water_reset():
            resident_before = resident_kib("VmRSS")
            full()
            resident_growth = (resident_kib("VmHWM") - resident_before) * 1024

        detector = None
        if args.analyzer == "ct-lung-nodules":
            _, choice = choose_series(client, loaded.imaging_study, analyzer.requirements, allow)
            image, _ = load_image(choice, expected_modality_projection=False)
            detector = nodule_detector_floor(analyzer, image, args.repeats)

    floor = statistics.median(floor_runs)
    total = statistics.median(full_runs)
    floor_cpu_s, total_cpu_s = statistics.median(floor_cpu), statistics.median(full_cpu)
    print(f"study: {SAMPLE_CHEST_CT.name} ({loaded.instance_count} CT images), analyzer {args.analyzer}, "
          f"{args.repeats} repeats, medians, {args.threads} torch thread(s)")  # fmt: skip
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
    if resident_growth is not None:
        print(
            f"peak resident memory growth during (b)        : {resident_growth / 2**20:8.1f} MiB   "
            f"({resident_growth / decoded_bytes:.2f} x the decoded volume; torch's buffers included)"
        )
    if detector is not None:
        rest = total - statistics.median(r["analyze"] for r in step_runs)
        bound = rest + detector["search"] + detector["network"]
        print(f"nodule candidates on this scan                : {detector['candidates']:8.0f}")
        print(f"    candidate search                          : {detector['search'] * 1000:8.1f} ms")
        print(f"    false-positive networks, every candidate  : {detector['network'] * 1000:8.1f} ms")
        print(
            f"ratio if the rest of the analysis cost nothing: {bound / floor:8.2f}   "
            "(pipeline steps besides analyze + candidate search + networks, over (a))"
        )


if __name__ == "__main__":
    main()

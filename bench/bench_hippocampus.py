"""Benchmark: hippocampal volumetry of one real HippoCrop series against its I/O floor, in one run.

(a) the floor: fetch the series over WADO-RS (dicomweb-client) and decode every instance with pydicom;
(b) the full pipeline on the same study, model already loaded: read the ImagingStudy and the Patient, fetch +
    decode + assemble, segment, write the findings (report, observations, key images) to the FHIR server.
Prints the median of each, the ratio (b)/(a) (target <= 3.0) and the time split by step. The cold start - importing
the analyzer's modules (torch, MONAI) and loading the hash-checked weights, what a fresh worker pays once - is
measured separately, in a new Python process, and reported on its own.

Run: .venv/bin/python bench/bench_hippocampus.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
from dicomweb_client.api import DICOMwebClient

from core.allowlist import AllowList
from devtools.samples import endpoint_resource, imaging_study_resource, load_sample, upload_series, with_new_uids
from devtools.servers import fhir_server, orthanc_server
from fhir_adapters.client import FhirClient
from pipeline.analysis import analyze_study

REPO = Path(__file__).resolve().parent.parent
SAMPLE = "hippocrop-1"

_COLD_START = """
import json, sys, time
started = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[1]))
from models.registry import get_analyzer
imported = time.perf_counter()
get_analyzer("mr-hippocampus")
print(json.dumps({"import": imported - started, "load": time.perf_counter() - imported}))
"""


def io_floor(dicomweb_base: str, study_uid: str, series_uid: str) -> float:
    """Fetch every instance of the series over WADO-RS and decode its pixels; returns seconds."""
    start = time.perf_counter()
    instances = DICOMwebClient(url=dicomweb_base).retrieve_series(study_uid, series_uid)
    decoded = [ds.pixel_array.astype(np.float32) for ds in instances]
    assert decoded
    return time.perf_counter() - start


def cold_start(threads: int) -> dict[str, float]:
    """Import + load in a fresh interpreter (what the first analysis of a new worker pays on top of (b))."""
    out = subprocess.run(
        [sys.executable, "-c", _COLD_START, str(threads)], capture_output=True, text=True, check=True, cwd=REPO
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the pipeline's workers use 1)")
    args = parser.parse_args()

    colds = [cold_start(args.threads) for _ in range(3)]
    import torch

    from models.registry import get_analyzer

    torch.set_num_threads(args.threads)
    analyzer = get_analyzer("mr-hippocampus")
    datasets = with_new_uids(load_sample(SAMPLE), namespace="bench_hippocampus")
    with fhir_server() as fhir, orthanc_server() as orthanc:
        client = FhirClient(fhir.base_url, session=requests.Session())
        upload_series(orthanc.url, datasets)
        patient = client.create({"resourceType": "Patient", "gender": "female", "birthDate": "1960-01-01"})
        endpoint = client.create(endpoint_resource(orthanc.dicomweb_url))
        study = client.create(
            imaging_study_resource(
                datasets, patient_reference=f"Patient/{patient['id']}", endpoint_reference=f"Endpoint/{endpoint['id']}"
            )
        )
        allow = AllowList.of([orthanc.dicomweb_url])
        study_uid, series_uid = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)

        def full() -> dict[str, float]:
            return analyze_study(client, f"ImagingStudy/{study['id']}", analyzer, dicomweb_allow_list=allow).timings

        io_floor(orthanc.dicomweb_url, study_uid, series_uid)  # warm up both paths; the first write creates
        full()
        floor_runs: list[float] = []
        full_runs: list[float] = []
        step_runs: list[dict[str, float]] = []
        for _ in range(args.repeats):  # interleaved, so a busy moment on a shared machine hits both alike
            floor_runs.append(io_floor(orthanc.dicomweb_url, study_uid, series_uid))
            start = time.perf_counter()
            step_runs.append(full())
            full_runs.append(time.perf_counter() - start)

    floor, total = statistics.median(floor_runs), statistics.median(full_runs)
    print(f"series: {SAMPLE} ({len(datasets)} MR images, {datasets[0].Rows}x{datasets[0].Columns}), "
          f"{args.repeats} repeats, medians, torch threads {args.threads}")  # fmt: skip
    print(f"(a) I/O floor, WADO-RS fetch + pydicom decode     : {floor * 1000:8.1f} ms")
    print(f"(b) full analysis, model loaded (read ... write)  : {total * 1000:8.1f} ms")
    print(f"ratio (b)/(a)                                     : {total / floor:8.2f}   (target <= 3.0)")
    print("time by step (median):")
    for step in step_runs[0]:
        print(f"    {step:<14} {statistics.median(r[step] for r in step_runs) * 1000:8.1f} ms")
    print("cold start, fresh process (median of 3), reported apart from (b):")
    for part in ("import", "load"):
        print(f"    {part:<14} {statistics.median(c[part] for c in colds) * 1000:8.1f} ms")


if __name__ == "__main__":
    main()

"""Benchmark: one chest radiograph analysed end to end by ``cxr-pneumonia``, against the fetch-and-decode floor.

(a) the floor: fetch the radiograph's series over WADO-RS (dicomweb-client) and decode it with pydicom;
(b) the full pipeline on the same study with the analyzer already loaded, as ``serve`` and the job workers hold
    it (``pipeline.memory.LoadedAnalyzers``): read the ImagingStudy, fetch + decode, input guard, MedMNIST
    preprocessing, ensemble, Grad-CAM key image, build and write the transaction to the FHIR server.
Rounds alternate (a) and (b); the medians and their ratio (b)/(a) are printed (target <= 5), with (b) split by step.

Then the command line's cold start, in fresh interpreters: (c) ``imaging-cds analyze`` of the same study as a user
runs it, start to exit; (d) its parts - imports, building the analyzer (weights read and hash-checked), the
first analysis of the decoded radiograph - with the process's CPU time beside the wall time (on a shared
machine the CPU time is the steadier figure); and the modules whose import costs most (``python -X importtime``).
Target for (d): imports + weights + first inference <= 2 s.

Run: .venv/bin/python bench/bench_radiograph.py [--repeats 9] [--cold 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient

from core.allowlist import AllowList
from devtools.demo import load_sample_study
from devtools.samples import SAMPLES
from devtools.servers import fhir_server, orthanc_server
from fhir_adapters.client import FhirClient
from pipeline.analysis import analyze_study
from pipeline.memory import LoadedAnalyzers

REPO = Path(__file__).resolve().parent.parent
ANALYZER = "cxr-pneumonia"
SAMPLE = SAMPLES["rsna-cxr"]

COLD_PARTS = """
import json, resource, sys, time
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
marks = {"start": (time.perf_counter(), cpu())}
from dicom_io.projection import read_projection
from fhir_adapters.client import FhirClient
from pipeline.handler import StudyAnalysisHandler
from pipeline.memory import LoadedAnalyzers
marks["imports"] = (time.perf_counter(), cpu())
analyzer = LoadedAnalyzers(freeze=False).get(sys.argv[1])
marks["weights"] = (time.perf_counter(), cpu())
image = read_projection(sys.argv[2])
marks["decode"] = (time.perf_counter(), cpu())
analyzer.check_input(image)
analyzer.analyze(image)
marks["first_inference"] = (time.perf_counter(), cpu())
print(json.dumps({k: [t - marks["start"][0], c - marks["start"][1]] for k, (t, c) in marks.items()}))
"""


def io_floor(dicomweb_base: str, study_uid: str, series_uid: str) -> float:
    """Fetch the series over WADO-RS and decode its pixels; returns seconds."""
    start = time.perf_counter()
    for dataset in DICOMwebClient(url=dicomweb_base).retrieve_series(study_uid, series_uid):
        dataset.pixel_array  # noqa: B018 - decoding is the point
    return time.perf_counter() - start


def cold_cli(fhir_base: str, dicomweb_base: str, imaging_study: str) -> float:
    """Wall time of ``imaging-cds analyze`` in a fresh interpreter, start to exit."""
    command = [
        sys.executable, "-m", "imaging_cds.cli", "analyze", imaging_study, "--analyzer", ANALYZER,
        "--fhir-base", fhir_base, "--allow-dicomweb", dicomweb_base, "--json",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, capture_output=True)
    return time.perf_counter() - start


def cold_parts(radiograph: Path) -> dict[str, list[float]]:
    """Cumulative [wall, CPU] seconds at each mark of :data:`COLD_PARTS`, in a fresh interpreter."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", COLD_PARTS, ANALYZER, str(radiograph)],
        check=True, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    parts: dict[str, list[float]] = json.loads(done.stdout.strip().splitlines()[-1])
    parts["process"] = [time.perf_counter() - start, float("nan")]
    return parts


def costliest_imports(count: int = 8) -> list[tuple[str, float]]:
    """Top-level modules of the cold path by cumulative import time (``python -X importtime``)."""
    code = "import dicom_io.projection, fhir_adapters.client, pipeline.handler, models.cxr_pneumonia"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], check=True, cwd=REPO, capture_output=True, text=True
    )
    totals: dict[str, float] = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (field.strip() for field in line.removeprefix("import time:").split("|"))
        if cumulative.isdigit() and name == name.lstrip() and "." not in name:  # top-level packages only
            totals[name] = totals.get(name, 0.0) + int(cumulative) / 1e6
    return sorted(totals.items(), key=lambda item: -item[1])[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--cold", type=int, default=3, help="fresh-interpreter runs for the cold start")
    args = parser.parse_args()

    with fhir_server() as fhir, orthanc_server() as orthanc:
        client = FhirClient(fhir.base_url, session=requests.Session())
        loaded = load_sample_study(client, orthanc, SAMPLE)
        allow = AllowList.of([orthanc.dicomweb_url])
        analyzer = LoadedAnalyzers().get(ANALYZER)  # as serve and the job workers hold it: built once

        def full() -> tuple[float, dict[str, float]]:
            start = time.perf_counter()
            outcome = analyze_study(client, loaded.imaging_study, analyzer, dicomweb_allow_list=allow)
            return time.perf_counter() - start, outcome.timings

        io_floor(orthanc.dicomweb_url, loaded.study_uid, loaded.series_uid)  # warm both paths
        full()
        floors: list[float] = []
        fulls: list[float] = []
        steps: list[dict[str, float]] = []
        for _ in range(args.repeats):
            floors.append(io_floor(orthanc.dicomweb_url, loaded.study_uid, loaded.series_uid))
            seconds, timings = full()
            fulls.append(seconds)
            steps.append(timings)

        cli_runs = [cold_cli(fhir.base_url, orthanc.dicomweb_url, loaded.imaging_study) for _ in range(args.cold)]

    radiograph = SAMPLE.path / "rsna_cxr_unlabelled.dcm"
    parts = [cold_parts(radiograph) for _ in range(args.cold)]
    imports = costliest_imports()

    floor, total = statistics.median(floors), statistics.median(fulls)
    print(f"study: {SAMPLE.description}; analyzer {ANALYZER} {analyzer.version}; {args.repeats} alternating rounds")
    print(f"(a) floor: WADO-RS fetch + pydicom decode       : {floor * 1000:8.1f} ms")
    print(f"(b) full analyze, analyzer loaded (read study, fetch, analyze, write): {total * 1000:8.1f} ms")
    print(f"ratio (b)/(a)                                   : {total / floor:8.2f}   (target <= 5)")
    print("(b) by step (median):")
    for step in steps[0]:
        print(f"    {step:<14} {statistics.median(r[step] for r in steps) * 1000:8.1f} ms")
    print(f"(c) cold 'imaging-cds analyze' of the same study, start to exit (median of {args.cold}): "
          f"{statistics.median(cli_runs):.2f} s")  # fmt: skip
    print(f"(d) cold start in a fresh interpreter (median of {args.cold}), cumulative wall / CPU seconds:")
    for mark in ("imports", "weights", "decode", "first_inference"):
        wall = statistics.median(p[mark][0] for p in parts)
        cpu = statistics.median(p[mark][1] for p in parts)
        print(f"    {mark:<16} {wall:6.2f} s wall  {cpu:6.2f} s CPU")
    inference_wall = statistics.median(p["first_inference"][0] - p["decode"][0] + p["weights"][0] for p in parts)
    inference_cpu = statistics.median(p["first_inference"][1] - p["decode"][1] + p["weights"][1] for p in parts)
    print(f"    imports + weights + first inference (decode excluded): {inference_wall:.2f} s wall, "
          f"{inference_cpu:.2f} s CPU   (target <= 2 s)")  # fmt: skip
    print("costliest imports on the cold path (cumulative, one run):")
    for name, seconds in imports:
        print(f"    {name:<20} {seconds:6.2f} s")


if __name__ == "__main__":
    main()

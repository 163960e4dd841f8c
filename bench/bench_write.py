"""Benchmark: what filing a result costs by each write strategy, on each real FHIR server, in one run.

The same emphysema-sized result (a Device, 6 Observations, 3 key images of about 150 kB as the chest CT's are, the
report, the Provenance: 12 resources) is filed for a fresh patient each time, through
:func:`fhir_adapters.writer.write_results`, in alternating rounds:

* sekmet-fhir: one transaction (the baseline), ordered writes, and one transaction with its two largest images sent
  ahead as Binary (``max_request_bytes`` 400 kB);
* Medplum's FHIR engine: ordered writes (its default limits refuse the 12-entry transaction).

Prints the median milliseconds per filing and each against sekmet's transaction. The key images are PNGs of
random pixels of the real images' size (this measures the writes, not the images). Medplum's figure is its test
engine's: the in-memory repository answers each conditional create by scanning every stored resource of the type,
so a filing's time grows with what the engine holds (measured here: about 0.3 s for the first, 2 s by the 16th);
it says nothing of Medplum's server, whose repository is Postgres.

Run: .venv/bin/python bench/bench_write.py [--rounds 5] [--per-round 4]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import requests
from PIL import Image

from devtools.servers import fhir_server, medplum_server
from fhir_adapters.builders import AnalysisTarget, DeviceInfo, build_results_bundle
from fhir_adapters.client import FhirClient
from fhir_adapters.writer import WriteSettings, write_results
from models.base import AnalysisResult, Category, Explanation, Measurement

DEVICE = DeviceInfo("ct-emphysema", "bench", "CT emphysema quantification")


def _png(size: int, seed: int) -> bytes:
    side = int((size / 3) ** 0.5)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


RESULT = AnalysisResult(
    analyzer="ct-emphysema",
    version="bench",
    measurements=tuple(Measurement(f"m{n}", f"Measurement {n}", float(n), "%") for n in range(6)),
    category=Category("none", "No emphysema", "bench", False),
    conclusion="No emphysema.",
    explanations=tuple(Explanation(f"Overlay {n}", "overlay", _png(148_000, n), n) for n in range(3)),
)


def _filing(client: FhirClient, settings: WriteSettings) -> Callable[[], float]:
    def once() -> float:
        patient = client.create({"resourceType": "Patient", "name": [{"family": "Bench"}]})
        target = AnalysisTarget(
            "bench-study", f"Patient/{patient['id']}", f"2.25.{uuid.uuid4().int}", f"2.25.{uuid.uuid4().int}", "-"
        )
        bundle = build_results_bundle(target, RESULT, DEVICE, issued=datetime.now(UTC))
        start = time.perf_counter()
        write_results(client, bundle, settings=settings)
        return (time.perf_counter() - start) * 1000

    return once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=4)
    args = parser.parse_args()
    with fhir_server() as sekmet, medplum_server() as medplum:
        sekmet_client = FhirClient(sekmet.base_url, session=requests.Session())
        medplum_client = FhirClient(medplum.base_url, session=requests.Session())
        cases = {
            "sekmet, one transaction (baseline)": _filing(sekmet_client, WriteSettings("transaction")),
            "sekmet, ordered writes": _filing(sekmet_client, WriteSettings("ordered")),
            "sekmet, transaction + 2 Binary": _filing(sekmet_client, WriteSettings(max_request_bytes=400_000)),
            "medplum, ordered writes": _filing(medplum_client, WriteSettings()),
        }
        for once in cases.values():  # warm-up: connections, the CapabilityStatement, the Device
            once()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, once in cases.items():
                times[name].extend(once() for _ in range(args.per_round))
    baseline = statistics.median(times["sekmet, one transaction (baseline)"])
    print(f"{'filing of a 12-resource result':<40} {'median ms':>10} {'x baseline':>11}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<40} {median:>10.1f} {median / baseline:>11.2f}")


if __name__ == "__main__":
    main()

"""Test support for follow-up comparisons: real scans filed again as another study of the same patient.

No real longitudinal pair of scans is available, so the plumbing is checked on copies of real scans: the same pixels
under new UIDs and another study date (an unchanged patient scanned twice, to the voxel), and a copy resampled with
the patient shifted by a few millimetres, so that every slice lands at another position in the anatomy (an unchanged
patient scanned twice, as a scanner would see it). Neither is a validation of progression figures, and the model
cards say so.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from devtools.samples import endpoint_resource, imaging_study_resource, refiled, upload_series
from devtools.servers import OrthancServer
from fhir_adapters.builders import AnalysisTarget, DeviceInfo, build_results_bundle
from fhir_adapters.client import FhirClient
from models.base import AnalysisResult, Category, Measurement
from models.followup import Acquisition
from models.registry import get_analyzer
from pipeline.analysis import compare_with_prior, find_history

SHIFT_MM = (1.0, 3.0, -2.0)
"""Patient shift of the resampled copy, (z, y, x) in mm: 1 mm along the table (every slice at another position in
the anatomy) and a few millimetres across, rounded to whole pixels so that only the slice direction is
interpolated."""


def shifted(datasets: Sequence[Dataset], shift_mm: tuple[float, float, float] = SHIFT_MM) -> list[Dataset]:
    """The images as if the patient lay ``shift_mm`` (z, y, x) away, the in-plane shift in whole pixels.

    The slice positions in the headers stay; the anatomy moves under them, so each slice samples the body between
    two of the original slices (linear interpolation along z, which also averages their noise a little). Headers and
    pixel format are the source's.
    """
    ordered = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    volume = np.stack([ds.pixel_array.astype(np.float32) for ds in ordered])
    slope = float(ordered[0].get("RescaleSlope", 1) or 1)
    intercept = float(ordered[0].get("RescaleIntercept", 0) or 0)
    dz = abs(float(ordered[1].ImagePositionPatient[2]) - float(ordered[0].ImagePositionPatient[2]))
    rows_mm, columns_mm = (float(v) for v in ordered[0].PixelSpacing)
    steps = (shift_mm[0] / dz, float(round(shift_mm[1] / rows_mm)), float(round(shift_mm[2] / columns_mm)))
    moved = ndimage.shift(volume * slope + intercept, steps, order=1, mode="nearest")
    stored = np.rint((moved - intercept) / slope)
    info = np.iinfo(ordered[0].pixel_array.dtype)
    stored = np.clip(stored, info.min, info.max).astype(ordered[0].pixel_array.dtype)
    out = []
    for ds, plane in zip(ordered, stored, strict=True):
        copied = copy.deepcopy(ds)
        copied.PixelData = np.ascontiguousarray(plane).tobytes()
        out.append(copied)
    return out


@dataclass(frozen=True)
class FiledStudy:
    imaging_study: str  # "ImagingStudy/<id>"
    started: str


def file_study(
    client: FhirClient, orthanc: OrthancServer, patient: str, datasets: Sequence[Dataset], study_date: str
) -> FiledStudy:
    """Put ``datasets`` in Orthanc as a new study of ``patient`` (``Patient/<id>``) dated ``study_date``, and its
    ImagingStudy in the EHR."""
    images = refiled(datasets, study_date, namespace=f"followup-{uuid.uuid4()}")
    upload_series(orthanc.url, images)
    endpoint_json = endpoint_resource(orthanc.dicomweb_url)
    identifier = endpoint_json["identifier"][0]
    endpoint = client.create(endpoint_json, if_none_exist=f"identifier={identifier['system']}|{identifier['value']}")
    resource = imaging_study_resource(
        images, patient_reference=patient, endpoint_reference=f"Endpoint/{endpoint['id']}"
    )
    created = client.create(resource)
    return FiledStudy(f"ImagingStudy/{created['id']}", str(created.get("started", "")))


def resource_count(client: FhirClient, patient: str) -> int:
    """How many DiagnosticReports and Observations the EHR holds about ``patient``: a re-run must not change it."""
    total = 0
    for kind in ("DiagnosticReport", "Observation"):
        bundle = client.search_bundle(kind, {"subject": patient, "_summary": "count"})
        total += int(bundle.get("total", 0))
    return total


THIN_ACQUISITION = Acquisition(slice_thickness_mm=1.0, kernel="B30f")


def emphysema_result(laa: float, *, version: str = "1.0.2") -> AnalysisResult:
    """A ct-emphysema result with the LAA-950 a test sets (no real pair of scans with progression exists here)."""
    category = (
        Category("mild", "Mild emphysema (LAA-950 5-10%)", "test rule", abnormal=True)
        if laa >= 5
        else Category("none", "No emphysema by CT densitometry (LAA-950 < 5%)", "test rule", abnormal=False)
    )
    return AnalysisResult(
        analyzer="ct-emphysema",
        version=version,
        measurements=(
            Measurement("laa950_percent", "LAA-950", laa, "%", "H" if laa >= 5 else "N"),
            Measurement("lung_volume_ml", "Lung volume", 5400.0, "mL"),
        ),
        category=category,
        conclusion=f"LAA-950 {laa} %.",
    )


def file_compared_result(
    client: FhirClient,
    patient: str,
    result: AnalysisResult,
    started: str,
    *,
    acquisition: Acquisition = THIN_ACQUISITION,
) -> str:
    """File ``result`` for a new chest CT study of ``patient`` on ``started`` as the pipeline files it: compared with
    the patient's earlier results by :func:`pipeline.analysis.find_history` and ``compare_with_prior`` (the one search
    and the card's rules), in one transaction. Returns the DiagnosticReport reference."""
    study = client.create(
        {
            "resourceType": "ImagingStudy",
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:2.25.{uuid.uuid4().int}"}],
            "status": "available",
            "subject": {"reference": patient},
            "started": started,
            "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}],
            "description": "CT chest",
        }
    )
    target = AnalysisTarget(
        imaging_study_id=str(study["id"]),
        patient_reference=patient,
        study_uid=f"2.25.{uuid.uuid4().int}",
        series_uid=f"2.25.{uuid.uuid4().int}",
        selection_reason="test",
        study_started=started,
        acquisition=acquisition,
    )
    analyzer = get_analyzer(result.analyzer)
    comparison = compare_with_prior(analyzer, result, target, find_history(client, analyzer, target))
    device = DeviceInfo(name=result.analyzer, version=result.version, title="CT emphysema quantification")
    bundle = build_results_bundle(target, result, device, issued=datetime.now(UTC), comparison=comparison)
    response = client.transaction(bundle)
    return next(
        "/".join(e["response"]["location"].split("/_history")[0].split("/")[-2:])
        for e in response["entry"]
        if "DiagnosticReport/" in e["response"]["location"]
    )

"""The project's real sample images as DICOM studies a PACS can hold, and the FHIR resources that point at them.

The demo and the end-to-end tests need real CT series in a real PACS (Orthanc). Two of the project's real scans
ship as research volumes (NRRD, NIfTI), not as DICOM; this module writes them out as ordinary CT Image Storage
series with the geometry of the source file, deterministic UIDs (the same sample always gets the same UIDs, so
re-loading is idempotent), and a clearly synthetic, de-identified demo patient. The pixel values are the source's
Hounsfield units, untouched: nothing here synthesises image content.

The abdominal DICOM series (``example_ct_dicom``) lost its Study/Series/SOP Instance UIDs to an anonymiser. It is
kept defective on purpose: the project must report such data, so no function here repairs it.

Geometry conventions: DICOM patient coordinates are LPS (x to the patient's left, y posterior, z superior).
NRRD files say which space they use; NIfTI affines are RAS and are converted by negating x and y.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from core.errors import ConfigurationError, ImageDataError, PacsError

DATA_DIR = Path(__file__).resolve().parent.parent / "tests" / "data"

DICOM_MODALITY_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED_SYSTEM = "http://snomed.info/sct"
ENDPOINT_CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
ENDPOINT_PAYLOAD_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"

BODY_SITE_SNOMED: dict[str, tuple[str, str]] = {
    "CHEST": ("51185008", "Thoracic structure"),
    "ABDOMEN": ("818983003", "Abdomen"),
    "HEAD": ("69536005", "Head structure"),
    "BRAIN": ("12738006", "Brain structure"),
}
"""DICOM BodyPartExamined -> SNOMED CT body structure (DICOM PS3.16 Annex L), for ImagingStudy.series.bodySite."""

_STUDY_DATE = "20250101"
_STUDY_TIME = "090000"
_TIMEZONE = "+0000"


@dataclass(frozen=True)
class SampleStudy:
    """One real sample scan: where it comes from, how it is presented to the PACS, and its licence.

    ``loadable`` is False for samples kept defective on purpose (the PACS must refuse them).
    """

    name: str
    source: str  # relative to tests/data
    body_part: str
    patient_id: str
    patient_name: str
    description: str
    licence: str
    loadable: bool = True

    @property
    def path(self) -> Path:
        return DATA_DIR / self.source


SAMPLES: dict[str, SampleStudy] = {
    sample.name: sample
    for sample in (
        SampleStudy(
            name="lung2",
            source="ct/chest_pyradiomics/lung2_image.nrrd",
            body_part="CHEST",
            patient_id="DEMO-LUNG2",
            patient_name="Demo^Lung2",
            description="Non-contrast chest CT 5 mm (pyradiomics lung2)",
            licence="BSD-3 (Harvard Medical School), PyPI sdist pyradiomics==3.0.1 data/; see LICENSE.txt beside it",
        ),
        SampleStudy(
            name="lung1",
            source="ct/chest_pyradiomics/lung1_image.nrrd",
            body_part="CHEST",
            patient_id="DEMO-LUNG1",
            patient_name="Demo^Lung1",
            description="Chest CT 5 mm (pyradiomics lung1)",
            licence="BSD-3 (Harvard Medical School), PyPI sdist pyradiomics==3.0.1 data/; see LICENSE.txt beside it",
        ),
        SampleStudy(
            name="abdomen",
            source="ct/abdomen_totalseg/example_ct.nii.gz",
            body_part="ABDOMEN",
            patient_id="DEMO-ABDOMEN",
            patient_name="Demo^Abdomen",
            description="Abdomen/pelvis CT 3 mm, spine T11-L5 (TotalSegmentator example)",
            licence="Apache-2.0 code, data CC BY 4.0; GitHub wasserth/TotalSegmentator tests/reference_files",
        ),
        SampleStudy(
            name="rsna-cxr",
            source="cr/rsna_pneumonia",
            body_part="CHEST",
            patient_id="DEMO-RSNA-CXR",
            patient_name="Demo^ChestXray",
            description="Chest radiograph, CR PA, 1024x1024 (RSNA Pneumonia Detection Challenge, label unknown)",
            licence="RSNA challenge data terms; via GitHub mlmed/torchxrayvision tests/",
        ),
        SampleStudy(
            name="head-ge",
            source="ct/head_ge",
            body_part="HEAD",
            patient_id="QMNx85rKkkg",
            patient_name="REMOVED",
            description="Head CT (GE), gantry tilt 18.5 deg, uneven gaps (as shipped)",
            licence="BSD-2, GitHub neurolabusc/dcm_qa_ct In/GE; scan courtesy of Aliza Medical Imaging",
        ),
        *(
            SampleStudy(
                name=f"hippocrop-{n}",
                source=f"mr/hippocrop/{folder}",
                body_part="BRAIN",
                patient_id=f"DEMO-HIPPOCROP-{n}",
                patient_name=f"Demo^Hippocrop{n}",
                description=f"Brain MRI hippocampal crop (HippoCrop), 1 mm, TCIA {patient}",
                licence="TCIA Brain-Tumor-Progression, CC BY 3.0; via GitHub udacity/nd320-c3-3d-imaging-starter",
            )
            for n, folder, patient in (
                (1, "Study1_13_HCropVolume", "PGBM-002"),
                (2, "Study2_14_HCropVolume", "PGBM-006"),
                (3, "Study3_11_HCropVolume", "PGBM-003"),
            )
        ),
        SampleStudy(
            name="abdomen-dicom-no-uids",
            source="ct/abdomen_totalseg/example_ct_dicom",
            body_part="ABDOMEN",
            patient_id="",
            patient_name="",
            description="Abdominal CT, JPEG 2000, Study/Series/SOP UIDs stripped (defect)",
            licence="Apache-2.0 code, data CC BY 4.0; GitHub wasserth/TotalSegmentator tests/reference_files",
            loadable=False,
        ),
    )
}


def sample_uid(name: str, *parts: str) -> UID:
    """A DICOM UID that is the same every time for the same sample and part (study, series, instance 7...)."""
    return generate_uid(entropy_srcs=["imaging-cds-sample", name, *parts])


def _canonical_in_plane(array: np.ndarray, affine_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip the two in-plane axes where they run against the patient axis they mostly follow.

    DICOM viewers expect axial images with rows running to the patient's left and columns to posterior; a volume
    stored the other way round (NIfTI's RAS) would otherwise become a valid but mirrored-looking DICOM series.
    Flipping an axis and moving the origin to its other end keeps every voxel at the same patient position.
    """
    affine = affine_lps.copy()
    for axis in (0, 1):
        direction = affine[:3, axis]
        if direction[int(np.argmax(np.abs(direction)))] < 0:
            array = np.flip(array, axis=axis)
            affine[:3, 3] = affine[:3, 3] + direction * (array.shape[axis] - 1)
            affine[:3, axis] = -direction
    return array, affine


def _to_int16_hu(array: np.ndarray, *, source: str) -> np.ndarray:
    rounded = np.rint(array) if np.issubdtype(array.dtype, np.floating) else array
    low, high = int(rounded.min()), int(rounded.max())
    if low < np.iinfo(np.int16).min or high > np.iinfo(np.int16).max:
        raise ImageDataError(
            f"{source} holds values {low}..{high}, outside the int16 range a CT series stores.",
            remedy="Check that the file is a CT in Hounsfield units.",
        )
    return rounded.astype(np.int16)


def _ct_series(array_ijk: np.ndarray, affine_lps: np.ndarray, sample: SampleStudy) -> list[Dataset]:
    """Write a volume indexed (column i, row j, slice k) with an LPS voxel-to-patient affine as CT slices."""
    array_ijk, affine = _canonical_in_plane(array_ijk, affine_lps)
    hu = _to_int16_hu(array_ijk, source=sample.source)
    row_step, column_step, slice_step = affine[:3, 0], affine[:3, 1], affine[:3, 2]
    column_spacing, row_spacing, slice_spacing = (float(np.linalg.norm(v)) for v in (row_step, column_step, slice_step))
    # "+ 0.0" turns -0.0 into 0.0, so the header does not say "-0".
    orientation = [*(row_step / column_spacing + 0.0), *(column_step / row_spacing + 0.0)]
    study_uid, series_uid = sample_uid(sample.name, "study"), sample_uid(sample.name, "series")
    frame_of_reference_uid = sample_uid(sample.name, "frame-of-reference")
    datasets = []
    for k in range(hu.shape[2]):
        position = affine[:3, 3] + k * slice_step
        sop_uid = sample_uid(sample.name, "instance", str(k + 1))
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = _STUDY_DATE
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = _STUDY_TIME
        ds.TimezoneOffsetFromUTC = _TIMEZONE
        ds.AccessionNumber = f"DEMO-{sample.name.upper()}"
        ds.Modality = "CT"
        ds.Manufacturer = ""
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = f"DEMO {sample.body_part} CT"
        ds.SeriesDescription = sample.description
        ds.PatientName = sample.patient_name
        ds.PatientID = sample.patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "Synthetic demo patient; pixels from a public research file"
        ds.BodyPartExamined = sample.body_part
        ds.SliceThickness = f"{slice_spacing:.6g}"
        ds.SpacingBetweenSlices = f"{slice_spacing:.6g}"
        ds.KVP = ""
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v + 0.0:.6g}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{position[2]:.6g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[0])
        ds.PixelSpacing = [f"{row_spacing:.7g}", f"{column_spacing:.7g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        # DICOM pixel data is row-major (row j, column i): the transpose of the (i, j) slice.
        ds.PixelData = np.ascontiguousarray(hu[:, :, k].T).tobytes()
        datasets.append(ds)
    return datasets


def _sample_named(name: str) -> SampleStudy:
    try:
        return SAMPLES[name]
    except KeyError:
        raise ConfigurationError(
            f"Unknown sample {name!r}.", remedy=f"Choose one of: {', '.join(sorted(SAMPLES))}."
        ) from None


def ct_series_from_nrrd(path: str | Path, *, name: str) -> list[Dataset]:
    """Convert a CT volume in NRRD (pyradiomics' lung scans) to a DICOM CT series, one dataset per slice.

    The NRRD ``space directions`` and ``space origin`` give the voxel-to-patient mapping; both LPS and RAS spaces
    are accepted. The slice order of the file is kept (``InstanceNumber`` 1 is the file's first slice).
    """
    import nrrd  # pynrrd: only the sample loader needs it

    data, header = nrrd.read(str(path))
    space = str(header.get("space", "")).lower()
    if data.ndim != 3 or "space directions" not in header or "space origin" not in header:
        raise ImageDataError(f"{path} is not a 3-D NRRD with space directions and origin.", remedy="Use a CT volume.")
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(header["space directions"], dtype=float).T  # rows of the header are axis vectors
    affine[:3, 3] = np.asarray(header["space origin"], dtype=float)
    if space in ("right-anterior-superior", "ras"):
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    elif space not in ("left-posterior-superior", "lps"):
        raise ImageDataError(f"{path} uses NRRD space {space!r}.", remedy="Only LPS or RAS NRRD volumes are supported.")
    return _ct_series(data, affine, _sample_named(name))


def ct_series_from_nifti(path: str | Path, *, name: str) -> list[Dataset]:
    """Convert a CT volume in NIfTI (TotalSegmentator's example) to a DICOM CT series.

    NIfTI's affine maps voxels to RAS; DICOM is LPS, so x and y change sign. Any scl_slope/scl_inter in the
    header is applied by nibabel, so the values written are Hounsfield units.
    """
    import nibabel  # only the sample loader needs it
    from nibabel.spatialimages import SpatialImage

    image = nibabel.load(str(path))
    if not isinstance(image, SpatialImage):
        raise ImageDataError(f"{path} is not a NIfTI image.", remedy="Use a 3-D NIfTI CT volume.")
    data = np.asanyarray(image.dataobj)
    if data.ndim != 3:
        raise ImageDataError(f"{path} is not a 3-D volume.", remedy="Use a single CT volume.")
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(image.affine, dtype=np.float64)
    return _ct_series(data, affine, _sample_named(name))


def read_dicom_folder(path: str | Path) -> list[Dataset]:
    """Read every DICOM file in a folder as it is (no repair), in file-name order."""
    files = sorted(p for p in Path(path).iterdir() if p.is_file())
    return [dcmread(p) for p in files]


def load_sample(name: str) -> list[Dataset]:
    """The DICOM datasets of one sample from :data:`SAMPLES`: converted volumes or the DICOM files as shipped."""
    sample = _sample_named(name)
    if sample.source.endswith(".nrrd"):
        return ct_series_from_nrrd(sample.path, name=name)
    if sample.source.endswith((".nii", ".nii.gz")):
        return ct_series_from_nifti(sample.path, name=name)
    return read_dicom_folder(sample.path)


def with_new_uids(datasets: Iterable[Dataset], *, namespace: str) -> list[Dataset]:
    """Copies of ``datasets`` whose Study, Series, SOP Instance and Frame of Reference UIDs are replaced, the same
    way for the same ``namespace`` every time, and differently for another one.

    A test or benchmark that stores a shared sample under its own namespace gets its own study in the PACS and
    its own ImagingStudy in the EHR, so what other tests did with the same sample never changes what it sees.
    Pixels and every other attribute are unchanged.
    """
    mapped: dict[str, UID] = {}

    def new(uid: object) -> UID:
        key = str(uid)
        if key not in mapped:
            mapped[key] = generate_uid(entropy_srcs=["imaging-cds-relabel", namespace, key])
        return mapped[key]

    copies = []
    for original in datasets:
        ds = copy.deepcopy(original)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if ds.get(keyword):
                setattr(ds, keyword, new(ds.get(keyword)))
        if getattr(ds, "file_meta", None) is not None and ds.get("SOPInstanceUID"):
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        copies.append(ds)
    return copies


def refiled(datasets: Iterable[Dataset], study_date: str, *, namespace: str) -> list[Dataset]:
    """The same images as another study taken on ``study_date`` (YYYYMMDD): :func:`with_new_uids` under
    ``namespace``, and the study, series and content dates set to that day (a follow-up scan for tests and
    benchmarks)."""
    copies = with_new_uids(datasets, namespace=namespace)
    for ds in copies:
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    return copies


def dataset_bytes(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file (preamble, file meta), the form ``POST /instances`` expects."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def upload_series(
    orthanc_url: str,
    datasets: Iterable[Dataset],
    *,
    session: requests.Session | None = None,
    timeout: float = 60.0,
) -> list[str]:
    """Store each dataset in Orthanc (``POST /instances``, one by one) and return Orthanc's instance ids.

    Orthanc answers 400 for a file it will not store (for example without Study/Series/SOP Instance UIDs); that
    is the data's fault and raises :class:`ImageDataError`. Other failures raise :class:`PacsError`.
    """
    http = session or requests.Session()
    base = orthanc_url.rstrip("/")
    stored: list[str] = []
    for number, ds in enumerate(datasets, start=1):
        try:
            response = http.post(
                f"{base}/instances",
                data=dataset_bytes(ds),
                headers={"Content-Type": "application/dicom"},
                timeout=timeout,
            )
        except requests.RequestException as exc:
            raise PacsError(
                f"Could not store instance {number} in the PACS at {base}: {type(exc).__name__}.",
                remedy="Check that the PACS is running and reachable.",
            ) from exc
        if response.status_code == 400:
            raise ImageDataError(
                f"The PACS at {base} refused instance {number} (HTTP 400: {_orthanc_reason(response)}).",
                remedy="The file is not valid DICOM for storage; check that it has Study/Series/SOP Instance UIDs.",
            )
        if response.status_code >= 300:
            raise PacsError(
                f"The PACS at {base} answered HTTP {response.status_code} when storing instance {number}.",
                remedy="Check the PACS log.",
            )
        stored.append(str(response.json()["ID"]))
    return stored


def _orthanc_reason(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return "no reason given"
    return str(body.get("Message") or body.get("Details") or "no reason given") if isinstance(body, dict) else "?"


def _fhir_datetime(ds: Dataset) -> str | None:
    """StudyDate/StudyTime as a FHIR dateTime; the time is only given when DICOM says which time zone it is in."""
    date = str(ds.get("StudyDate", "") or "")
    if len(date) != 8 or not date.isdigit():
        return None
    day = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    time = str(ds.get("StudyTime", "") or "").split(".")[0]
    offset = str(ds.get("TimezoneOffsetFromUTC", "") or "")
    if len(time) >= 4 and time.isdigit() and len(offset) == 5 and offset[0] in "+-":
        seconds = time[4:6] or "00"
        return f"{day}T{time[:2]}:{time[2:4]}:{seconds}{offset[:3]}:{offset[3:]}"
    return day


def _modality_coding(modality: str) -> dict[str, str]:
    return {"system": DICOM_MODALITY_SYSTEM, "code": modality}


def imaging_study_resource(
    datasets: Sequence[Dataset], *, patient_reference: str, endpoint_reference: str
) -> dict[str, Any]:
    """An R4 ImagingStudy describing ``datasets`` (one study, one or more series) for an EHR to hold.

    The study is identified by its DICOM Study Instance UID (``urn:dicom:uid`` / ``urn:oid:...``), so an EHR can
    create it conditionally and a re-load finds the existing resource.
    """
    if not datasets:
        raise ImageDataError("No instances given for the ImagingStudy.", remedy="Pass the datasets of the study.")
    study_uids = {str(ds.get("StudyInstanceUID", "")) for ds in datasets}
    if len(study_uids) != 1 or "" in study_uids:
        raise ImageDataError(
            f"The instances belong to {len(study_uids)} studies or lack a Study Instance UID.",
            remedy="Build one ImagingStudy per DICOM study, from instances that carry UIDs.",
        )
    study_uid = study_uids.pop()
    by_series: dict[str, list[Dataset]] = {}
    for ds in datasets:
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    endpoint = [{"reference": endpoint_reference}]
    series_entries = []
    for series_uid, members in by_series.items():
        first = members[0]
        entry: dict[str, Any] = {
            "uid": series_uid,
            "modality": _modality_coding(str(first.Modality)),
            "numberOfInstances": len(members),
            "endpoint": endpoint,
        }
        if first.get("SeriesNumber") not in (None, ""):
            entry["number"] = int(first.SeriesNumber)
        if first.get("SeriesDescription"):
            entry["description"] = str(first.SeriesDescription)
        body_site = BODY_SITE_SNOMED.get(str(first.get("BodyPartExamined", "")).upper())
        if body_site:
            entry["bodySite"] = {"system": SNOMED_SYSTEM, "code": body_site[0], "display": body_site[1]}
        instances = []
        for ds in sorted(members, key=lambda d: int(d.get("InstanceNumber") or 0)):
            instance: dict[str, Any] = {
                "uid": str(ds.SOPInstanceUID),
                "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{ds.SOPClassUID}"},
            }
            if ds.get("InstanceNumber") not in (None, ""):
                instance["number"] = int(ds.InstanceNumber)
            instances.append(instance)
        entry["instance"] = instances
        series_entries.append(entry)
    first = datasets[0]
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
        "status": "available",
        "modality": [_modality_coding(m) for m in sorted({str(ds.Modality) for ds in datasets})],
        "subject": {"reference": patient_reference},
        "endpoint": endpoint,
        "numberOfSeries": len(series_entries),
        "numberOfInstances": len(datasets),
        "series": series_entries,
    }
    started = _fhir_datetime(first)
    if started:
        resource["started"] = started
    if first.get("StudyDescription"):
        resource["description"] = str(first.StudyDescription)
    return resource


def endpoint_resource(dicomweb_base: str, *, name: str = "PACS DICOMweb (WADO-RS)") -> dict[str, Any]:
    """An R4 Endpoint for a DICOMweb service; its identifier is the base URL, so it can be created conditionally."""
    address = dicomweb_base.rstrip("/")
    return {
        "resourceType": "Endpoint",
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": address}],
        "status": "active",
        "connectionType": {
            "system": ENDPOINT_CONNECTION_TYPE_SYSTEM,
            "code": "dicom-wado-rs",
            "display": "DICOM WADO-RS",
        },
        "name": name,
        "payloadType": [
            {"coding": [{"system": ENDPOINT_PAYLOAD_TYPE_SYSTEM, "code": "any", "display": "Any"}], "text": "DICOM"}
        ],
        "payloadMimeType": ["application/dicom"],
        "address": address,
    }

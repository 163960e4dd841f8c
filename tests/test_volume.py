"""Volume assembly from real CT series: correct order, spacing and HU, and a clear refusal for each defect.

Defects are made from real instances (a dropped slice, a repeated one, another series mixed in); no pixel data is
synthesised.
"""

from __future__ import annotations

import copy
from pathlib import Path

import nrrd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from core.errors import ImageDataError
from devtools.samples import ct_series_from_nrrd, load_sample, read_dicom_folder
from dicom_io.volume import Volume, assemble_volume


@pytest.fixture(scope="module")
def lung2(data_dir: Path) -> list[Dataset]:
    return ct_series_from_nrrd(data_dir / "ct/chest_pyradiomics/lung2_image.nrrd", name="lung2")


@pytest.fixture(scope="module")
def lung2_volume(lung2: list[Dataset]) -> Volume:
    return assemble_volume(lung2)


@pytest.fixture(scope="module")
def head_ge(data_dir: Path) -> list[Dataset]:
    return read_dicom_folder(data_dir / "ct/head_ge")


def test_lung2_volume_has_the_scan_geometry_and_plausible_hounsfield_units(lung2_volume: Volume) -> None:
    volume = lung2_volume
    assert volume.array.shape == (61, 512, 512) and volume.array.dtype == np.float32
    assert volume.spacing == pytest.approx((5.0, 0.627, 0.627), abs=1e-3)
    assert volume.corrections == ()
    assert float(volume.array[:, :20, :20].mean()) == pytest.approx(-1024, abs=30)  # air outside the patient
    assert float(volume.array[30, 200:300, 200:300].mean()) > -200  # mediastinum / upper abdomen soft tissue
    assert volume.attributes["Modality"] == "CT" and volume.attributes["BodyPartExamined"] == "CHEST"
    assert not {"PatientName", "PatientID", "PatientBirthDate"} & set(volume.attributes)


def test_slices_run_inferior_to_superior_whatever_order_they_arrive_in(
    lung2: list[Dataset], lung2_volume: Volume, data_dir: Path
) -> None:
    source, _ = nrrd.read(str(data_dir / "ct/chest_pyradiomics/lung2_image.nrrd"))  # LPS, +5 mm per slice
    np.testing.assert_array_equal(lung2_volume.array[0], source[:, :, 0].T)  # most inferior slice first
    np.testing.assert_array_equal(lung2_volume.array[-1], source[:, :, -1].T)
    # Reversed arrival and InstanceNumbers that say the opposite: the position on the normal decides.
    scrambled = [copy.copy(ds) for ds in reversed(lung2)]
    for number, ds in enumerate(scrambled, start=1):
        ds.InstanceNumber = number
    np.testing.assert_array_equal(assemble_volume(scrambled).array, lung2_volume.array)
    assert lung2_volume.index_to_patient((60, 0, 0))[2] - lung2_volume.index_to_patient((0, 0, 0))[2] == 300.0


def test_to_image_input_gives_the_analyzer_volume_spacing_and_modality(lung2_volume: Volume) -> None:
    image = lung2_volume.to_image_input()
    assert image.modality == "CT" and image.array is lung2_volume.array
    assert image.voxel_volume_ml == pytest.approx(5.0 * 0.6269531**2 / 1000)


def test_abdomen_dicom_without_uids_is_refused_naming_the_missing_uids(data_dir: Path) -> None:
    defective = read_dicom_folder(data_dir / "ct/abdomen_totalseg/example_ct_dicom")
    with pytest.raises(ImageDataError, match=r"lack StudyInstanceUID \(20 of 20.*SeriesInstanceUID.*SOPInstanceUID"):
        assemble_volume(defective)


def test_abdomen_jpeg2000_decodes_to_hounsfield_units_once_uids_are_given_explicitly(data_dir: Path) -> None:
    # Test-only, explicit repair (the production code never repairs UIDs): proves the JPEG 2000 decode path and
    # the sort by position (this series numbers its instances from superior to inferior).
    repaired = read_dicom_folder(data_dir / "ct/abdomen_totalseg/example_ct_dicom")
    study_uid, series_uid = generate_uid(), generate_uid()
    for ds in repaired:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    volume = assemble_volume(repaired)
    assert volume.array.shape == (20, 512, 512)
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert volume.origin[2] == pytest.approx(-804.5)  # the lowest slice first
    assert float(volume.array.min()) <= -1000 < -200 < float(volume.array[:, 150:350, 150:350].mean())
    assert float(volume.array.max()) > 1000  # contrast-filled vessels / cortical bone
    truncated = copy.deepcopy(repaired[7])
    truncated.PixelData = truncated.PixelData[:200]  # a transfer cut short
    with pytest.raises(ImageDataError, match=r"could not be decoded \(transfer syntax JPEG 2000"):
        assemble_volume([*repaired[:7], truncated, *repaired[8:]])


def test_ge_head_ct_with_uneven_gaps_is_refused(head_ge: list[Dataset]) -> None:
    with pytest.raises(ImageDataError, match=r"slice spacing is uneven \(1\.08 mm x1, 4 mm x13, 7 mm x13\)"):
        assemble_volume(head_ge)


def test_ge_head_ct_gantry_tilt_is_corrected_keeping_anatomy_where_it_was(head_ge: list[Dataset]) -> None:
    evenly_spaced = head_ge[:14]  # the 4 mm part of the real tilted acquisition
    volume = assemble_volume(evenly_spaced)
    assert len(volume.corrections) == 1 and "Gantry tilt of 18.5 degrees" in volume.corrections[0]
    assert volume.spacing[0] == pytest.approx(4.0, abs=0.01)  # along the slice normal, not the table travel 4.22
    assert volume.array.shape[0] == 14 and volume.array.shape[1] > 512  # grown so nothing is cut off
    # The centre of the head in each slice, in patient coordinates, is where the original slice had it.
    for k, ds in enumerate(evenly_spaced):
        hu = ds.pixel_array.astype(float)
        rows, columns = np.nonzero(hu > -300)
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        spacing = float(ds.PixelSpacing[0])
        original = (
            np.asarray(ds.ImagePositionPatient, dtype=float)
            + orientation[:3] * columns.mean() * spacing
            + orientation[3:] * rows.mean() * spacing
        )
        rows_c, columns_c = np.nonzero(volume.array[k] > -300)
        corrected = volume.index_to_patient((k, rows_c.mean(), columns_c.mean()))
        assert corrected == pytest.approx(original, abs=0.5)


def test_a_missing_slice_in_the_middle_is_refused(lung2: list[Dataset]) -> None:
    with pytest.raises(
        ImageDataError, match=r"about 1 slice\(s\) missing.*5\.00 mm spacing between -220\.0 and -210\.0 mm"
    ):
        assemble_volume(lung2[:29] + lung2[30:])


def test_a_duplicated_slice_is_refused(lung2: list[Dataset]) -> None:
    repeat = copy.deepcopy(lung2[10])
    repeat.SOPInstanceUID = generate_uid()
    with pytest.raises(ImageDataError, match=r"1 pair\(s\) of slices share a position"):
        assemble_volume([*lung2, repeat])
    with pytest.raises(ImageDataError, match="received more than once"):
        assemble_volume([*lung2, lung2[10]])


def test_instances_of_two_series_are_refused(lung2: list[Dataset]) -> None:
    lung1 = load_sample("lung1")
    with pytest.raises(ImageDataError, match="come from 2 series"):
        assemble_volume(lung2 + lung1)
    with pytest.raises(ImageDataError, match=f"returned instances of series {lung2[0].SeriesInstanceUID} instead"):
        assemble_volume(lung2, expected_series_uid=lung1[0].SeriesInstanceUID)


def altered(series: list[Dataset], index: int, **changes: object) -> list[Dataset]:
    """The series with one real instance's header changed (or an attribute removed when the value is None)."""
    changed = copy.deepcopy(series[index])
    for keyword, value in changes.items():
        if value is None:
            delattr(changed, keyword)
        else:
            setattr(changed, keyword, value)
    return [*series[:index], changed, *series[index + 1 :]]


def test_geometry_defects_are_refused_with_the_reason(lung2: list[Dataset]) -> None:
    with pytest.raises(ImageDataError, match="has no valid ImagePositionPatient"):
        assemble_volume(altered(lung2, 5, ImagePositionPatient=None))
    with pytest.raises(ImageDataError, match="different orientations"):
        assemble_volume(altered(lung2, 5, ImageOrientationPatient=[1, 0, 0, 0, 0, -1]))
    with pytest.raises(ImageDataError, match="pixel spacing differs"):
        assemble_volume(altered(lung2, 5, PixelSpacing=[0.7, 0.7]))
    with pytest.raises(ImageDataError, match=r"different sizes \(512x512, 256x512\)"):
        assemble_volume(altered(lung2, 5, Rows=256))
    with pytest.raises(ImageDataError, match=r"multi-frame .* not supported yet"):
        assemble_volume(altered(lung2, 5, NumberOfFrames=2))
    with pytest.raises(ImageDataError, match="series has no instances"):
        assemble_volume([])
    with pytest.raises(ImageDataError, match="at least two slices"):
        assemble_volume(lung2[:1])

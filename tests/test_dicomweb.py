"""WADO-RS retrieval from a real Orthanc: the real chest CT goes in as DICOM, comes back intact, and PACS
failures become errors that name the series and the PACS, not stack traces."""

from __future__ import annotations

from pathlib import Path

import nrrd
import numpy as np
import pytest
from pydicom.dataset import Dataset

from core.errors import ImageDataError, PacsError
from devtools.samples import ct_series_from_nrrd, upload_series
from devtools.servers import OrthancServer, free_port
from dicom_io.dicomweb import fetch_series
from dicom_io.volume import assemble_volume


@pytest.fixture(scope="module")
def lung2_in_pacs(orthanc: OrthancServer, data_dir: Path) -> list[Dataset]:
    series = ct_series_from_nrrd(data_dir / "ct/chest_pyradiomics/lung2_image.nrrd", name="lung2")
    upload_series(orthanc.url, series)
    return series


def test_lung2_fetched_over_wado_rs_assembles_into_the_original_scan(
    orthanc: OrthancServer, lung2_in_pacs: list[Dataset], data_dir: Path
) -> None:
    study_uid, series_uid = lung2_in_pacs[0].StudyInstanceUID, lung2_in_pacs[0].SeriesInstanceUID
    fetched = list(fetch_series(orthanc.dicomweb_url, study_uid, series_uid))
    assert sorted(ds.SOPInstanceUID for ds in fetched) == sorted(ds.SOPInstanceUID for ds in lung2_in_pacs)

    volume = assemble_volume(fetched, expected_series_uid=series_uid)
    assert volume.array.shape == (61, 512, 512)
    assert volume.spacing == pytest.approx((5.0, 0.627, 0.627), abs=1e-3)
    assert float(np.percentile(volume.array, 1)) == pytest.approx(-1000, abs=50)  # air
    assert float(volume.array[:, 200:300, 200:300].mean()) > -200  # soft tissue at the body's centre
    source, _ = nrrd.read(str(data_dir / "ct/chest_pyradiomics/lung2_image.nrrd"))
    np.testing.assert_array_equal(volume.array, np.transpose(source, (2, 1, 0)))  # inferior slice first, same HU


def test_a_series_the_pacs_does_not_hold_is_reported_as_having_no_instances(
    orthanc: OrthancServer, lung2_in_pacs: list[Dataset]
) -> None:
    study_uid = lung2_in_pacs[0].StudyInstanceUID
    with pytest.raises(ImageDataError, match=r"series 1\.2\.3\.4\.5 of study .* series has no instances"):
        list(fetch_series(orthanc.dicomweb_url, study_uid, "1.2.3.4.5"))


def test_an_unreachable_pacs_is_a_pacs_error_naming_series_and_base() -> None:
    base = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    with pytest.raises(PacsError, match=rf"series 1\.2\.3\.9 of study 1\.2\.3 at the PACS {base}: ConnectionError"):
        list(fetch_series(base, "1.2.3", "1.2.3.9", timeout=5))


def test_fetch_is_lazy_so_the_pipeline_can_stream(orthanc: OrthancServer, lung2_in_pacs: list[Dataset]) -> None:
    stream = fetch_series(orthanc.dicomweb_url, lung2_in_pacs[0].StudyInstanceUID, lung2_in_pacs[0].SeriesInstanceUID)
    first = next(stream)
    assert first.Modality == "CT" and first.SeriesInstanceUID == lung2_in_pacs[0].SeriesInstanceUID
    stream.close()

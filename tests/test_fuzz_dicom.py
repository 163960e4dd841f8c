"""Fuzzing DICOM decoding and volume assembly: whatever bytes a PACS sends, the result is a checked image or a typed
refusal (:class:`ImagingCdsError`: damaged data, a size limit), never another exception, never a hang.

The seeds are real: slices of the bundled chest CT (``lung2``) and the bundled chest radiograph, cropped to 64 x 64
pixels so that thousands of cases run in seconds (the pixels are the real ones, only fewer). Hypothesis then
damages them the ways a broken or hostile sender would: bytes overwritten or cut off anywhere in the header, a
header element given an arbitrary raw value (read exactly as a file's would be), the multipart framing around
them torn at any place. The hostile DICOM files in ``tests/data/hostile/dicom`` are replayed through the same
checks.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRLittleEndian

from core.errors import ImagingCdsError
from devtools.samples import ct_series_from_nrrd, dataset_bytes
from dicom_io.dicomweb import MultipartError, iter_multipart, read_instance
from dicom_io.projection import projection_input
from dicom_io.volume import Volume, assemble_volume
from tests.fuzz_support import fuzz, hostile_files

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")  # pydicom warns about the damage: expected

CROP = 64
GEOMETRY_AND_PIXELS = [
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
    "PhotometricInterpretation", "NumberOfFrames", "PixelSpacing", "ImageOrientationPatient",
    "ImagePositionPatient", "RescaleSlope", "RescaleIntercept", "SOPInstanceUID", "SeriesInstanceUID",
    "StudyInstanceUID", "Modality", "PlanarConfiguration", "PixelData", "WindowCenter", "WindowWidth",
    "VOILUTFunction", "PresentationLUTShape", "ImagerPixelSpacing", "GantryDetectorTilt", "SliceThickness",
]  # fmt: skip


def _cropped(ds: Dataset) -> Dataset:
    """The same instance with its real pixels cropped to the top-left 64 x 64 (geometry stays true)."""
    small = copy.deepcopy(ds)
    pixels = np.ascontiguousarray(ds.pixel_array[:CROP, :CROP])
    small.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    small.Rows, small.Columns = pixels.shape[:2]
    small.PixelData = pixels.tobytes()
    return small


DATA = Path(__file__).parent / "data"


@cache
def ct_slices() -> tuple[Dataset, ...]:
    """Four consecutive slices of the real chest CT, cropped (module-level, not a fixture: Hypothesis prints a
    fixture's value with every failing case)."""
    series = ct_series_from_nrrd(DATA / "ct/chest_pyradiomics/lung2_image.nrrd", name="lung2")
    return tuple(_cropped(ds) for ds in series[20:24])


@cache
def ct_bytes() -> tuple[bytes, ...]:
    return tuple(dataset_bytes(ds) for ds in ct_slices())


@cache
def radiograph() -> Dataset:
    return _cropped(dcmread(DATA / "cr/rsna_pneumonia/rsna_cxr_unlabelled.dcm"))


def _assemble(datasets: list[Dataset]) -> Volume | None:
    """Assemble, or None for a typed refusal; anything else fails the test (the property under test)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the values we feed it; that is the point
            volume = assemble_volume(datasets)
    except ImagingCdsError:
        return None
    assert volume.array.dtype == np.float32 and volume.array.ndim == 3
    assert all(s > 0 for s in volume.spacing)
    return volume


def test_the_unharmed_seeds_assemble() -> None:
    volume = _assemble([read_instance(b, index=i, where="seed") for i, b in enumerate(ct_bytes())])
    assert volume is not None and volume.array.shape == (4, CROP, CROP)
    first = ct_slices()[0]
    expected = first.pixel_array.astype(np.float32) * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_array_equal(volume.array[0], expected)  # HU, slice by slice, as the full-size series


def _pixel_data_offset(data: bytes) -> int:
    return data.find(b"\xe0\x7f\x10\x00")


@fuzz(400)
@given(
    which=st.integers(0, 3),
    edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.none() | st.floats(0, 1),
)
def test_bytes_damaged_anywhere_in_a_header_give_a_volume_or_a_typed_refusal(
    which: int, edits: list[tuple[float, int]], cut: float | None
) -> None:
    data = bytearray(ct_bytes()[which])
    header_end = _pixel_data_offset(bytes(data)) + 12
    for where, value in edits:
        data[int(where * (header_end - 1))] = value
    if cut is not None:
        del data[int(cut * len(data)) :]
    try:
        damaged = read_instance(bytes(data), index=which, where="the fuzzed series")
    except ImagingCdsError:
        return
    others = [read_instance(b, index=i, where="seed") for i, b in enumerate(ct_bytes()) if i != which]
    _assemble([damaged, *others])


def _tag(keyword: str) -> BaseTag:
    return Tag(keyword)


def _raw(keyword: str, value: bytes) -> RawDataElement:
    tag = _tag(keyword)
    return RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)


RAW_VALUES = st.one_of(
    st.binary(max_size=24),
    st.sampled_from([b"", b"\0", b"\xff\xff", b"\0\0\0\0", b"-1", b"NaN", b"inf", b"1e400", b"abc", b"1\\2\\3",
                     b"0\\0\\0\\0\\0\\0", b"1\\0\\0\\0\\1\\0 ", b"60000", b"\x60\xea", b"\x00\x00\x01\x00"]),
)  # fmt: skip


@fuzz(500)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from(GEOMETRY_AND_PIXELS), RAW_VALUES), min_size=1, max_size=4
    )
)
def test_any_raw_value_in_a_geometry_or_pixel_element_gives_a_volume_or_a_typed_refusal(
    edits: list[tuple[int, str, bytes]],
) -> None:
    slices = [copy.deepcopy(ds) for ds in ct_slices()]  # a shallow copy would share the seed's elements
    for index, keyword, value in edits:
        slices[index][_tag(keyword)] = _raw(keyword, value)
    _assemble(slices)


@fuzz(400)
@given(edits=st.lists(st.tuples(st.sampled_from(GEOMETRY_AND_PIXELS), RAW_VALUES), min_size=1, max_size=4))
def test_any_raw_value_in_a_radiograph_gives_an_image_or_a_typed_refusal(edits: list[tuple[str, bytes]]) -> None:
    damaged = copy.deepcopy(radiograph())
    for keyword, value in edits:
        damaged[_tag(keyword)] = _raw(keyword, value)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = projection_input(damaged)
    except ImagingCdsError:
        return
    assert image.array.ndim == 2 and image.array.dtype == np.float32


# ---------------------------------------------------------------- the multipart framing


def _message(parts: list[bytes], boundary: bytes, preamble: bytes, epilogue: bytes) -> bytes:
    framed = b"".join(b"\r\n--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + p for p in parts)
    return preamble + framed + b"\r\n--" + boundary + b"--" + epilogue


def _chunks(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    start = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        yield data[start:cut]
        start = cut
    yield data[start:]


BOUNDARY = st.text(alphabet="abcXYZ019'()+_,-./:=?", min_size=1, max_size=40).map(str.encode)


@fuzz(500)
@given(
    parts=st.lists(st.binary(max_size=200), max_size=6),
    boundary=BOUNDARY,
    preamble=st.sampled_from([b"", b"preamble text\r\n", b"\r\n"]),
    epilogue=st.sampled_from([b"", b"\r\n", b"epilogue"]),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_multipart_parts_come_back_whole_however_the_stream_is_cut(
    parts: list[bytes], boundary: bytes, preamble: bytes, epilogue: bytes, cuts: list[int]
) -> None:
    delimiter = b"\r\n--" + boundary
    parts = [p for p in parts if delimiter not in p + b"\r\n" and not (p + b"\r\n").startswith(b"--" + boundary)]
    if preamble.startswith(b"--" + boundary[:1]) or delimiter in preamble:
        return
    message = _message(parts, boundary, preamble, epilogue)
    assert list(iter_multipart(_chunks(message, cuts), boundary)) == parts


@fuzz(500)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 500), max_size=6))
def test_arbitrary_bytes_are_parts_or_a_multipart_error(data: bytes, cuts: list[int]) -> None:
    try:
        parts = list(iter_multipart(_chunks(b"--b\r\n\r\n" + data, cuts), b"b"))
    except MultipartError:
        return
    assert all(isinstance(p, bytes) for p in parts)


# ---------------------------------------------------------------- the hostile corpus


@pytest.mark.parametrize("path", hostile_files("dicom", "*.dcm"), ids=lambda p: p.name)
def test_every_hostile_dicom_file_is_refused_with_a_typed_error(path: Path) -> None:
    """Refused by the volume assembly; the radiograph path refuses it too, or (when what is damaged plays no part
    in a radiograph, such as the slice orientation) gives a finite image."""
    try:
        hostile = read_instance(path.read_bytes(), index=1, where=path.name)
    except ImagingCdsError:
        return
    second = copy.deepcopy(hostile)  # a second slice of the same series, 1 mm above: assembly reaches the damage
    second.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1.99"
    second.ImagePositionPatient = [0, 0, 1]
    assert _assemble([copy.deepcopy(hostile), second]) is None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = projection_input(hostile)
    except ImagingCdsError:
        return
    assert np.isfinite(image.array).all()


def test_dataset_bytes_round_trip() -> None:
    """The seeds survive the file format unchanged (so the fuzzed cases start from valid files)."""
    again = dcmread(io.BytesIO(ct_bytes()[0]))
    assert again.SOPInstanceUID == ct_slices()[0].SOPInstanceUID and again.Rows == CROP

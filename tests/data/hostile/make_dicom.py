"""Write the hostile DICOM files of this corpus (``dicom/*.dcm``); run it to regenerate them:

    .venv/bin/python tests/data/hostile/make_dicom.py

Each file is a small CT instance (64 x 64 pixels of a flat test pattern, not a clinical image) damaged in one way a
broken or hostile sender could: a header that lies about the image size, a value of the wrong kind, a damaged
element, a truncated or non-DICOM file. ``tests/test_fuzz_dicom.py`` checks that each one is refused with a typed
error by both the volume assembly and the radiograph path.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless

OUT = Path(__file__).parent / "dicom"


def _base() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1.1"
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.826.0.1.3680043.8.498.1.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.2"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelSpacing = [0.7, 0.7]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = (np.arange(64 * 64, dtype=np.int16) % 2000).tobytes()
    return ds


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _patched(ds: Dataset, tag_bytes: bytes, vr_and_value: bytes) -> bytes:
    """The file of ``ds`` with the element starting ``tag_bytes`` rewritten in place (same total length)."""
    data = bytearray(_bytes(ds))
    at = data.index(tag_bytes, 132)
    data[at + 4 : at + 4 + len(vr_and_value)] = vr_and_value
    return bytes(data)


def _set(**values: object) -> Callable[[], bytes]:
    def make() -> bytes:
        ds = _base()
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        return _bytes(ds)

    return make


def _raw_value(keyword_tag: bytes, vr: bytes, value: bytes, **present: object) -> Callable[[], bytes]:
    """The base file with one element's value replaced by raw bytes (``present`` adds elements first)."""

    def make() -> bytes:
        ds = _base()
        for keyword, placeholder in present.items():
            setattr(ds, keyword, placeholder)
        data = bytearray(_bytes(ds))
        at = data.index(keyword_tag, 132)
        old_length = struct.unpack("<H", data[at + 6 : at + 8])[0]
        element = keyword_tag + vr + struct.pack("<H", len(value)) + value
        data[at : at + 8 + old_length] = element
        return bytes(data)

    return make


def _deep_sequence(depth: int) -> bytes:
    """Sequences nested ``depth`` deep (undefined lengths), written as raw bytes between Modality and the UIDs."""
    data = _bytes(_base())
    at = data.index(b"\x20\x00\x0d\x00", 132)
    opening = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    closing = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return data[:at] + opening * depth + closing * depth + data[at:]


def _jpeg2000_garbage() -> bytes:
    ds = _base()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    item = b"\xff\x4f\xff\x51" + b"\x00" * 60  # a JPEG 2000 start and a SIZ marker full of zeros
    fragments = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0" + struct.pack("<I", len(item)) + item
    ds["PixelData"] = DataElement(
        0x7FE00010, "OB", fragments + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", is_undefined_length=True
    )
    return _bytes(ds)


def _huge_length() -> bytes:
    data = bytearray(_bytes(_base()))
    at = data.index(b"\xe0\x7f\x10\x00", 132)
    data[at + 8 : at + 12] = struct.pack("<I", 0xFFFFFFF0)  # PixelData claims 4 GiB; the file ends long before,
    return bytes(data[:-100])  # and even the real pixels are cut short


FILES: dict[str, Callable[[], bytes]] = {
    "rows_columns_60000.dcm": _set(Rows=60000, Columns=60000),
    "frames_100000.dcm": _set(NumberOfFrames=100000),
    "samples_per_pixel_65535.dcm": _set(SamplesPerPixel=65535),
    "bits_allocated_0.dcm": _set(BitsAllocated=0),
    "bits_allocated_7.dcm": _set(BitsAllocated=7),
    "no_pixel_data.dcm": lambda: _bytes(_without_pixels()),
    "pixel_data_short.dcm": _set(PixelData=b"\0\0"),
    "rows_odd_length.dcm": _raw_value(b"\x28\x00\x10\x00", b"US", b"\x40"),
    "rows_unknown_vr.dcm": lambda: _patched(_base(), b"\x28\x00\x10\x00", b"ZZ"),
    "pixel_spacing_text.dcm": _raw_value(b"\x28\x00\x30\x00", b"DS", b"abc\\def "),
    "pixel_spacing_one_value.dcm": _raw_value(b"\x28\x00\x30\x00", b"DS", b"0.7 "),
    "orientation_nan.dcm": _raw_value(b"\x20\x00\x37\x00", b"DS", b"NaN\\0\\0\\0\\1\\0 "),
    "rescale_slope_inf.dcm": _raw_value(b"\x28\x00\x53\x10", b"DS", b"inf "),
    "frames_text.dcm": _raw_value(b"\x28\x00\x08\x00", b"IS", b"many", NumberOfFrames=1),
    "deep_sequence_5000.dcm": lambda: _deep_sequence(5000),
    "jpeg2000_garbage.dcm": _jpeg2000_garbage,
    "pixel_data_claims_4gib.dcm": _huge_length,
    "truncated_header.dcm": lambda: _bytes(_base())[:300],
    "not_dicom.dcm": lambda: b"<html><body>502 Bad Gateway</body></html>",
    "empty.dcm": lambda: b"",
}


def _without_pixels() -> Dataset:
    ds = _base()
    del ds.PixelData
    return ds


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, make in FILES.items():
        (OUT / name).write_bytes(make())
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()

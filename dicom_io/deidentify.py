"""De-identified DICOM exports for research and evaluation: DICOM PS3.15 Annex E, checked before anything is kept.

What is done to each instance, and why:

* **Basic Application Level Confidentiality Profile** (PS3.15 E.2): every attribute of Table E.1-1 gets the
  table's action. The table is not written here: it comes from ``dicom-anonymizer`` (Kitware), which generates
  it from the standard's own Table E.1-1 (release :data:`PROFILE_TABLE`). Actions with a choice take the one that
  keeps a Type 2 attribute present and removes the rest: X/Z and Z/D and X/Z/D empty the value, X/D replaces it
  with a dummy, X/Z/U* keeps the sequence and remaps the UIDs in it. Attributes the table does not list are kept
  (acquisition geometry, rescale, kernel, body part, view: what the analyzers read).
* **Retain Longitudinal Temporal Information with Modified Dates Option** (E.3.6): every date (DA, and the date
  of each DT) is moved by one whole number of days per patient, the same for all of that patient's studies and
  exports made with the same key, so intervals between a patient's studies survive; times of day are kept.
  The birth date is emptied (Basic Profile: Z). ``LongitudinalTemporalInformationModified`` says MODIFIED.
* **UIDs** (action U) are remapped deterministically (``2.25.`` + a keyed hash of the original UID), so a UID
  shared by instances, series or studies (Frame of Reference, referenced images) maps to the same new UID
  within an export and across exports made with the same key.
* **The patient**: ``PatientID`` and ``PatientName`` become one keyed pseudonym (``ANON-...``), so a patient's
  studies stay together; everything else identifying the patient is emptied or removed by the table.
* **Private attributes are removed** (E.3.10 Retain Safe Private is not offered); so are curves and overlays.
* **Burned-in annotation**: an instance whose ``BurnedInAnnotation`` (or ``RecognizableVisualFeatures``) is YES
  is refused; pixels are never masked here. Pixel data are copied unchanged, byte for byte.

The key (32 random bytes, like the state key: ``core.sealing``) makes pseudonyms, date shifts and UIDs
repeatable; whoever holds it can link an export back to the source, so it stays with the data steward and only
its id is written into the export. Without a key, a random one is used and the export cannot be linked to any
other.

:func:`residual_identifiers` then reads every exported file and looks for what must not survive: the source's
patient and staff names, identifiers, dates and instance UIDs. The export is written to a temporary folder
next to the destination and moved into place only when every instance was de-identified and the scan found
nothing: a refused instance or a finding leaves no partial export behind.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence

from core.errors import ConfigurationError, ImageDataError, ImagingCdsError

PROFILE_TABLE = "dicomfields_2026c"
"""Release of PS3.15 Table E.1-1 used (as ``dicom-anonymizer`` ships it)."""
DUMMY = "ANONYMIZED"
PSEUDONYM_PREFIX = "ANON-"
MIN_SHIFT_DAYS = 366
MAX_SHIFT_DAYS = 3650
"""Dates move back by one to ten years: never zero, so no source date survives unchanged."""
REPORT_FILE = "deidentification.json"
LABELS_FILE = "labels.csv"

BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
MODIFIED_DATES_CODE = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
METHOD = ["DICOM PS3.15 E.2 Basic Profile", "E.3.6 Retain Longitudinal Temporal Information Modified Dates"]
"""``DeidentificationMethod`` (LO, so each value at most 64 characters)."""

_ACTIONS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z",
    "X_Z_TAGS": "Z",
    "X_D_TAGS": "D",
    "X_Z_D_TAGS": "Z",
    "X_Z_U_STAR_TAGS": "U*",
}
_PIXEL_GROUP = 0x7FE0
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_NAME_PARTS = re.compile(r"[\^=]")
_ID_KEYWORD = re.compile(r"(ID|IDs|Number|Numbers)$")


class BurnedInAnnotationError(ImageDataError):
    """An instance says identifying text or features are in its pixels; it is not exported."""


class ResidualIdentifierError(ImagingCdsError):
    """The check of an export found source identifiers in it; the export was not kept."""

    http_status = 500

    def __init__(self, message: str, *, findings: Sequence[Residual], remedy: str = "") -> None:
        super().__init__(message, remedy=remedy)
        self.findings = tuple(findings)


@dataclass(frozen=True)
class Residual:
    """A source identifier found in an export: which file, where, and what kind (never the value itself)."""

    file: str
    where: str
    kind: str


# ---------------------------------------------------------------------------------------------- the profile


@lru_cache(maxsize=1)
def profile_table() -> tuple[dict[int, str], tuple[tuple[int, int, int, int, str], ...]]:
    """Table E.1-1 as ``{tag: action}`` plus the masked entries (``50xx,xxxx`` curves, ``60xx`` overlays...)."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    table = dicom_anonymization_database_selector(PROFILE_TABLE)
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in _ACTIONS.items():
        for entry in table[category]:
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:
                masked.append((entry[0], entry[1], entry[2], entry[3], action))
    return exact, tuple(masked)


def action_for(tag: int) -> str | None:
    """The profile's action for ``tag`` (D, Z, X, U, U*), or ``None`` when the table keeps it."""
    exact, masked = profile_table()
    found = exact.get(tag)
    if found is not None:
        return found
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, g_mask, e_mask, action in masked:
        if group & g_mask == g & g_mask and element & e_mask == e & e_mask:
            return action
    return None


# ---------------------------------------------------------------------------------------------- the key


@dataclass(frozen=True)
class DeidentificationKey:
    """The secret behind pseudonyms, date shifts and UIDs; the same key gives the same results every time."""

    secret: bytes = field(repr=False)

    @classmethod
    def random(cls) -> DeidentificationKey:
        return cls(secrets.token_bytes(32))

    @property
    def key_id(self) -> str:
        """A public name for the key (a hash), written into the export so the steward knows which key made it."""
        return hashlib.sha256(b"imaging-cds deidentification key\x00" + self.secret).hexdigest()[:12]

    def _mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self.secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def pseudonym(self, patient: str) -> str:
        return PSEUDONYM_PREFIX + self._mac("patient", patient).hex()[:12].upper()

    def shift_days(self, patient: str) -> int:
        span = MAX_SHIFT_DAYS - MIN_SHIFT_DAYS
        return -(MIN_SHIFT_DAYS + int.from_bytes(self._mac("date-shift", patient)[:8], "big") % span)

    def uid(self, original: str) -> str:
        """``2.25.`` and a UUID made from a keyed hash of ``original`` (PS3.5 B.2): the same UID for the same key."""
        return f"2.25.{uuid.UUID(bytes=self._mac('uid', original)[:16], version=4).int}"


def patient_key(dataset: Dataset) -> str:
    """Who an instance belongs to, for the pseudonym and the date shift: its PatientID, else its PatientName."""
    return str(dataset.get("PatientID", "") or "").strip() or str(dataset.get("PatientName", "") or "").strip()


# ---------------------------------------------------------------------------------------------- one instance


def _shift_date(value: str, days: int) -> str:
    text = value.strip()
    if len(text) < 8 or not text[:8].isdigit():
        return ""  # a partial or malformed date cannot be moved by days: emptied
    moved = date(int(text[:4]), int(text[4:6]), int(text[6:8])) + timedelta(days=days)
    return f"{moved:%Y%m%d}" + text[8:]  # a DT keeps its time of day and offset


def _values(element: DataElement) -> list[str]:
    value = element.value
    if value is None:
        return []
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return [str(value)]


def _set(element: DataElement, values: list[str]) -> None:
    element.value = values[0] if len(values) == 1 else values


def _empty(element: DataElement) -> None:
    if element.VR == "SQ":
        element.value = DicomSequence([])
    elif element.VR in ("US", "SS", "UL", "SL", "FL", "FD", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "AT"):
        element.value = None
    else:
        element.value = ""


def _dummy(element: DataElement) -> None:
    if element.VR in ("DS", "IS"):
        element.value = "0"
    elif element.VR in ("US", "SS", "UL", "SL", "FL", "FD"):
        element.value = 0
    elif element.VR == "AS":
        element.value = "000Y"
    elif element.VR in ("SQ", "OB", "OW", "UN"):
        _empty(element)
    else:
        element.value = DUMMY


@dataclass
class Deidentifier:
    """Applies the profile and the option to datasets, in place (see the module docstring)."""

    key: DeidentificationKey
    _deleted: set[int] = field(default_factory=set, repr=False)

    def refuse_burned_in(self, dataset: Dataset, where: str) -> None:
        for keyword in ("BurnedInAnnotation", "RecognizableVisualFeatures"):
            if str(dataset.get(keyword, "") or "").strip().upper() == "YES":
                raise BurnedInAnnotationError(
                    f"{where} says {keyword} = YES: identifying text or features are in its pixels, "
                    "which this export does not mask.",
                    remedy="Leave the instance out, or mask its pixels with a tool made for that and set "
                    f"{keyword} to NO before exporting.",
                )

    def _apply(self, dataset: Dataset, *, where: str) -> None:
        self.refuse_burned_in(dataset, where)
        patient = patient_key(dataset)
        pseudonym = self.key.pseudonym(patient)
        shift = self.key.shift_days(patient)

        def visit(_: Dataset, element: DataElement) -> None:
            self._element(element, shift)

        dataset.walk(visit)
        if getattr(dataset, "file_meta", None) is not None:
            dataset.file_meta.walk(visit)
        dataset.remove_private_tags()
        dataset.PatientName = pseudonym
        dataset.PatientID = pseudonym
        dataset.PatientIdentityRemoved = "YES"
        dataset.LongitudinalTemporalInformationModified = "MODIFIED"
        dataset.DeidentificationMethod = METHOD
        codes = []
        for value, meaning in (BASIC_PROFILE_CODE, MODIFIED_DATES_CODE):
            code = Dataset()
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, "DCM", meaning
            codes.append(code)
        dataset.DeidentificationMethodCodeSequence = DicomSequence(codes)

    def _element(self, element: DataElement, shift: int) -> None:
        if element.tag.is_private or element.tag.group == _PIXEL_GROUP:
            return  # private ones are removed afterwards; pixels are kept as they are
        action = action_for(int(element.tag))
        if element.VR in ("DA", "DT"):
            if element.keyword == "PatientBirthDate":
                _empty(element)
            else:
                _set(element, [_shift_date(v, shift) for v in _values(element)])
            return
        if element.VR == "TM" or action is None or action == "U*":
            return  # times kept (dates moved by whole days); unlisted attributes kept; U* sequences walked into
        if action == "X":
            self._deleted.add(int(element.tag))  # removed once the walk is done (see deidentified)
            return
        if action == "U" and element.VR == "UI":
            _set(element, [self.key.uid(v) for v in _values(element) if v])
        elif action == "D":
            _dummy(element)
        else:  # Z, and U on a non-UID element
            _empty(element)

    def deidentified(self, dataset: Dataset, *, where: str = "an instance") -> Dataset:
        """``dataset`` de-identified in place, with the profile's X attributes removed, and returned."""
        self._deleted = set()
        self._apply(dataset, where=where)
        _remove(dataset, self._deleted)
        return dataset


def _remove(dataset: Dataset, tags: set[int]) -> None:
    """Delete the attributes the profile removes (X), at every level of nesting."""
    for doomed in [e.tag for e in list(dataset) if int(e.tag) in tags]:
        del dataset[doomed]
    for element in dataset:
        if element.VR == "SQ" and element.value:
            for item in element.value:
                _remove(item, tags)
    if getattr(dataset, "file_meta", None) is not None:
        for doomed in [e.tag for e in list(dataset.file_meta) if int(e.tag) in tags]:
            del dataset.file_meta[doomed]


# ---------------------------------------------------------------------------------------------- the check


@dataclass
class SourceIdentifiers:
    """What must not survive an export: the source's names, identifiers, dates and instance UIDs.

    A value that the source also carries in an attribute the profile keeps (a phantom's PatientID that is its
    manufacturer's name) cannot be told apart from that attribute in the export; it is listed in ``unscannable``
    instead of being searched for.
    """

    values: dict[str, str] = field(default_factory=dict)
    unscannable: set[str] = field(default_factory=set)

    def add_source(self, dataset: Dataset) -> None:
        found: dict[str, str] = {}
        kept: set[str] = set()

        def visit(_: Dataset, element: DataElement) -> None:
            if element.tag.group == _PIXEL_GROUP:
                return
            if element.VR not in _TEXT_VRS:
                return
            action = None if element.tag.is_private else action_for(int(element.tag))
            texts = [t for t in (v.strip() for v in _values(element)) if t]
            if element.VR in ("DA", "DT"):
                for text in texts:
                    if len(text) >= 8 and text[:8].isdigit():
                        found[text[:8]] = "date"
            elif element.VR == "PN" and action is not None:
                for text in texts:
                    for part in [text, *_NAME_PARTS.split(text)]:
                        if len(part.strip()) >= 3 and any(c.isalpha() for c in part):
                            found[part.strip().upper()] = "name"
            elif element.VR == "UI" and action in ("U", "U*"):
                for text in texts:
                    found[text] = "UID"
            elif action is not None and element.VR in ("LO", "SH", "CS") and _ID_KEYWORD.search(element.keyword):
                for text in texts:
                    found[text.upper()] = "identifier"
            elif action is None and not element.tag.is_private and element.VR in ("LO", "SH", "CS", "ST", "LT", "PN"):
                kept.update(t.upper() for t in texts)

        dataset.walk(visit)
        if getattr(dataset, "file_meta", None) is not None:
            dataset.file_meta.walk(visit)
        for value, kind in found.items():
            if len(value) < 3:
                continue  # too short to search for without matching everything
            if value in kept:
                self.unscannable.add(kind)
            else:
                self.values.setdefault(value, kind)


_NUMERIC_VRS = frozenset({"DS", "IS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT"})


def _texts_of(dataset: Dataset) -> Iterator[tuple[str, str, str]]:
    """``(element keyword, text, VR)`` for every element of an exported dataset that can carry text (pixels
    excepted; binary values read as Latin-1, so a name hidden in one is found too)."""
    collected: list[tuple[str, str, str]] = []

    def visit(_: Dataset, element: DataElement) -> None:
        if element.tag.group == _PIXEL_GROUP or element.VR == "SQ":
            return
        name = element.keyword or str(element.tag)
        if element.tag.is_private:
            collected.append((name, "\x00private", element.VR))
        value = element.value
        if isinstance(value, bytes):
            collected.append((name, value.decode("latin-1"), "OB"))
        elif element.VR not in _NUMERIC_VRS:
            collected.extend((name, text, element.VR) for text in _values(element))

    dataset.walk(visit)
    if getattr(dataset, "file_meta", None) is not None:
        dataset.file_meta.walk(visit)
    yield from collected


def _searchable(kind: str, value: str, vr: str) -> bool:
    """Whether finding ``value`` in an element of ``vr`` means it leaked. A new UID is 39 digits from a hash: a
    source UID in it is a leak, but a source date or number matching a run of its digits is chance."""
    if vr == "UI":
        return kind == "UID" or (kind in ("name", "identifier") and any(c.isalpha() for c in value))
    return True


def residual_identifiers(export: Path, source: SourceIdentifiers) -> list[Residual]:
    """Every place in the export (files, and their paths) where a source identifier or a private tag remains."""
    findings: list[Residual] = []
    searched = sorted(source.values.items(), key=lambda item: -len(item[0]))
    for path in sorted(p for p in export.rglob("*") if p.is_file() and p.suffix == ".dcm"):
        relative = path.relative_to(export).as_posix()
        upper_path = relative.upper()
        for value, kind in searched:
            if value in upper_path and _searchable(kind, value, "UI"):  # a path is made of a pseudonym and UIDs
                findings.append(Residual(relative, "file path", kind))
        dataset = dcmread(path)
        if str(dataset.get("PatientIdentityRemoved", "")) != "YES":
            findings.append(Residual(relative, "PatientIdentityRemoved", "marking"))
        for where, text, vr in _texts_of(dataset):
            if text == "\x00private":
                findings.append(Residual(relative, where, "private attribute"))
                continue
            upper = text.upper()
            for value, kind in searched:
                if value in upper and _searchable(kind, value, vr):
                    findings.append(Residual(relative, where, kind))
    return list(dict.fromkeys(findings))  # a full name and its parts found in one place: one finding


# ---------------------------------------------------------------------------------------------- an export


@dataclass
class ExportReport:
    """What an export holds (counts, not identities), and where each source file went (kept in memory only)."""

    output: Path
    key_id: str
    key_given: bool
    instances: int = 0
    patients: int = 0
    studies: int = 0
    series: int = 0
    skipped_not_dicom: int = 0
    unscannable: tuple[str, ...] = ()
    written: dict[Path, Path] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
            "options": ["Retain Longitudinal Temporal Information with Modified Dates"],
            "profile_table": f"PS3.15 Table E.1-1, release {PROFILE_TABLE.removeprefix('dicomfields_')}",
            "private_attributes": "removed",
            "burned_in_annotation": "instances marked YES refused; pixels never masked",
            "key_id": self.key_id if self.key_given else None,
            "key": "given" if self.key_given else "random, for this export only (it cannot be linked to another)",
            "instances": self.instances,
            "patients": self.patients,
            "studies": self.studies,
            "series": self.series,
            "skipped_not_dicom": self.skipped_not_dicom,
            "residual_identifier_check": "clean",
            "not_searchable": sorted(self.unscannable),
        }


def _source_files(inputs: Iterable[Path]) -> Iterator[tuple[Path, Path]]:
    """``(root, file)`` for each file under the inputs (a file is its own root's child)."""
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                yield path, file
        elif path.is_file():
            yield path.parent, path
        else:
            raise ConfigurationError(f"{path} does not exist.", remedy="Name DICOM files or folders holding them.")


def _read(file: Path) -> Dataset | None:
    try:
        return dcmread(file)
    except (InvalidDicomError, EOFError, ValueError, OSError):
        return None


def deidentify_export(inputs: Sequence[Path], output: Path, *, key: DeidentificationKey | None = None) -> ExportReport:
    """De-identify every DICOM file under ``inputs`` into ``output`` (which must not exist yet), check it, keep it.

    Files that are not DICOM are skipped (counted). A folder with ``labels.csv`` (``file,label``, as ``imaging-cds
    evaluate`` reads) gets it rewritten in the export with each case's new path. Raises
    :class:`BurnedInAnnotationError` or :class:`ResidualIdentifierError` with nothing written.
    """
    output = Path(output)
    if output.exists():
        raise ConfigurationError(f"{output} exists already.", remedy="Name a new folder for the export.")
    chosen = key or DeidentificationKey.random()
    deidentifier = Deidentifier(chosen)
    report = ExportReport(output=output, key_id=chosen.key_id, key_given=key is not None)
    source = SourceIdentifiers()
    partial = output.with_name(f".{output.name}.partial-{secrets.token_hex(4)}")
    partial.mkdir(parents=True, mode=0o700)
    patients: set[str] = set()
    studies: set[str] = set()
    series: set[str] = set()
    roots: set[Path] = set()
    try:
        for count, (root, file) in enumerate(_source_files(inputs)):
            roots.add(root)
            dataset = _read(file)
            if dataset is None or ("PixelData" not in dataset and "SOPClassUID" not in dataset):
                report.skipped_not_dicom += 1
                continue
            source.add_source(dataset)
            deidentifier.deidentified(dataset, where=f"instance {count + 1} of the export")
            study = str(dataset.get("StudyInstanceUID", "") or "study")
            serie = str(dataset.get("SeriesInstanceUID", "") or "series")
            name = str(dataset.get("SOPInstanceUID", "") or f"instance-{count + 1:05d}")
            target = partial / str(dataset.PatientID) / study / serie / f"{name}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            dataset.save_as(target, enforce_file_format=False)
            report.written[file.resolve()] = target.relative_to(partial)
            patients.add(str(dataset.PatientID))
            studies.add(study)
            series.add(serie)
        if not report.written:
            raise ConfigurationError(
                "No DICOM instance was found in the inputs.", remedy="Name DICOM files or folders."
            )
        _rewrite_labels(roots, report.written, partial)
        findings = residual_identifiers(partial, source)
        if findings:
            shown = "; ".join(f"{f.file}: {f.kind} in {f.where}" for f in findings[:10])
            raise ResidualIdentifierError(
                f"The de-identified export still holds {len(findings)} source identifier(s): {shown}. "
                "Nothing was kept.",
                findings=findings,
                remedy="Report this with the list above (it names elements, not values); do not share the data.",
            )
        report.instances = len(report.written)
        report.patients, report.studies, report.series = len(patients), len(studies), len(series)
        report.unscannable = tuple(sorted(source.unscannable))
        (partial / REPORT_FILE).write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report


def _rewrite_labels(roots: set[Path], written: Mapping[Path, Path], export: Path) -> None:
    """Each input folder's ``labels.csv``, with each case (a file, or a folder holding one series) at its new path."""
    rows: list[dict[str, str]] = []
    for root in sorted(roots):
        table = root / LABELS_FILE
        if not table.is_file():
            continue
        with table.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                case = (root / row["file"]).resolve()
                if case.is_dir():
                    targets = {p.parent for s, p in written.items() if case in s.parents}
                else:
                    targets = {written[case]} if case in written else set()
                if len(targets) != 1:
                    raise ConfigurationError(
                        f"{LABELS_FILE} line for case {len(rows) + 1} does not name one exported file or series.",
                        remedy="Each row must name one DICOM file, or a folder holding one series.",
                    )
                rows.append({"file": next(iter(targets)).as_posix(), "label": row["label"]})
    if rows:
        with (export / LABELS_FILE).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file", "label"])
            writer.writeheader()
            writer.writerows(rows)

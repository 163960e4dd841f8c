"""What a DICOM UID looks like, checked where UIDs from outside become parts of a request path.

The EHR's ImagingStudy names the study and the series by UID, and those UIDs go into WADO-RS paths
(``/studies/{study}/series/{series}``). Anything but a UID there (a ``/``, ``..``, ``?``) could steer the request
elsewhere on the PACS, so both the EHR side (:mod:`fhir_adapters.study`) and the PACS side
(:mod:`dicom_io.dicomweb`) check with this one definition.
"""

from __future__ import annotations

import re

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_UID_CHARS = 64


def is_dicom_uid(value: object) -> bool:
    """Whether ``value`` is a DICOM UID (PS3.5 section 9.1: digits separated by dots, at most 64 characters).

    Leading zeros in a component are tolerated: the standard forbids them, but some devices write them, and they
    cannot change where a request goes.
    """
    return isinstance(value, str) and len(value) <= MAX_UID_CHARS and _UID.fullmatch(value) is not None

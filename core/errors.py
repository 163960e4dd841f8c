"""The project's exception hierarchy.

Every error a clinician or an integrator can meet derives from :class:`ImagingCdsError` and carries a
message that names *what* was wrong (study, series, field) and a ``remedy`` that says what to do about it.
Front doors (CLI, CDS Hooks, the SMART app) turn these into exit codes or HTTP statuses in one place each;
none of them ever shows a stack trace. Messages never contain PHI: they name resources by id and DICOM
objects by UID.
"""

from __future__ import annotations


class ImagingCdsError(Exception):
    """Base class for every error the project raises on purpose.

    ``http_status`` is the status a web front door should answer with when this error ends a request.
    """

    http_status: int = 500

    def __init__(self, message: str, *, remedy: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.remedy = remedy

    def __str__(self) -> str:
        return f"{self.message} {self.remedy}".strip() if self.remedy else self.message


class ConfigurationError(ImagingCdsError):
    """The project's own settings are wrong (unknown option, missing file, bad allow-list entry)."""

    http_status = 500


class NotAllowedError(ImagingCdsError):
    """A URL (a hook's ``fhirServer``, an Endpoint's address) is outside the configured allow-list."""

    http_status = 403


class StudyError(ImagingCdsError):
    """The ImagingStudy cannot be analysed as it stands (no suitable series, no endpoint)."""

    http_status = 422


class ImageDataError(ImagingCdsError):
    """The DICOM data is unusable: missing UIDs, undecodable pixels, inconsistent geometry."""

    http_status = 422


class PacsError(ImagingCdsError):
    """The PACS (DICOMweb) could not be reached or answered with an error."""

    http_status = 502


class UnsuitableInputError(ImagingCdsError):
    """An analyzer was given an image it was not built for (wrong modality, body part, view)."""

    http_status = 422


class LimitExceededError(ImagingCdsError):
    """An input is larger than a configured limit (:class:`core.limits.InputLimits`).

    ``limit`` names the setting (``limits.cds_request_bytes``...), so an administrator who expects such inputs
    knows what to raise; the refusal happens before the input is read in full or anything is allocated for it.
    """

    http_status = 413

    def __init__(self, message: str, *, limit: str, remedy: str = "") -> None:
        super().__init__(message, remedy=remedy or f"If such inputs are expected, an administrator can raise {limit}.")
        self.limit = limit

"""How large any input may be, in one place: configurable, with defaults safe for one analysis server.

Every limit here is checked *before* the input is read in full or memory is allocated for it: a body is counted
while it streams in, a DICOM header's Rows x Columns x frames is checked before the pixels are decoded. A refusal
is a :class:`~core.errors.LimitExceededError` naming the setting (``limits.<field>`` in the deployment file,
see :mod:`service.settings`) and its value, so an administrator can raise the one limit that a legitimate input
met.

The defaults leave room for the largest inputs this project is built for (a 2,000-slice thin-section CT, a
full-field mammogram, a patient's whole imaging history in a hook's prefetch) with a wide margin, and refuse
what only a broken or hostile peer sends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from core.errors import ConfigurationError, LimitExceededError
from core.options import did_you_mean

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


@dataclass(frozen=True)
class InputLimits:
    """The limits (all positive integers); see each field's note for what it bounds and why its default."""

    cds_request_bytes: int = 8 * MIB
    """A CDS Hooks request body. A prefetch of 100 ImagingStudies and 100 AI reports with their Observations is
    well under 1 MiB; the CDS client may send more (draft orders, larger bundles)."""

    fhir_response_bytes: int = 64 * MIB
    """One FHIR response. A transaction answer carrying the filed explanation images (PNG as base64) is a few MiB."""

    fhir_search_pages: int = 100
    """``next`` links followed in one search: 100 pages of 100 entries are 10,000 resources of one patient."""

    jwks_bytes: int = 256 * KIB
    """A CDS client's JWK Set fetched from its ``jku``: a set of a few public keys is a few KiB."""

    dicomweb_response_bytes: int = 2 * GIB
    """One WADO-RS series retrieval (the multipart body as it arrives): a 2,000-slice 512x512 CT is 1 GiB."""

    instances_per_series: int = 5000
    """Instances accepted in one series: a whole-body CT at 0.6 mm is about 3,000 slices."""

    image_pixels: int = 100_000_000
    """Rows x Columns x frames x samples of one DICOM instance: a full-field digital mammogram is about 30
    million; DICOM allows 65,535 x 65,535 per frame, which no analyzer here can use."""

    decoded_bytes: int = 4 * GIB
    """Memory of the decoded image an analyzer receives (float32): a 2,000-slice 512x512 CT takes 2 GiB."""

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigurationError(
                    f"limits.{spec.name} must be a positive whole number, not {value!r}.",
                    remedy=f"Set it to a positive integer (default {spec.default}).",
                )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, source: str = "settings") -> InputLimits:
        """Read the ``limits`` section of a deployment file; an unknown key fails with a "did you mean" hint."""
        known = [spec.name for spec in fields(cls)]
        for key in raw:
            if key not in known:
                raise ConfigurationError(
                    f"{source}: unknown limit '{key}'.{did_you_mean(str(key), known)}",
                    remedy=f"Known limits: {', '.join(known)}.",
                )
        return cls(**dict(raw))


DEFAULT_LIMITS = InputLimits()


def describe_bytes(count: int) -> str:
    """``8388608`` -> ``"8 MiB"``: a size as an administrator would write it."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if count >= size:
            value = count / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{count} bytes"


def too_large(what: str, limit_name: str, limit: int, *, unit: str = "bytes", remedy: str = "") -> LimitExceededError:
    """The refusal for ``what`` exceeding ``limits.<limit_name>`` (``limit`` in ``unit``)."""
    shown = describe_bytes(limit) if unit == "bytes" else f"{limit:,} {unit}"
    return LimitExceededError(
        f"{what} is larger than the {shown} allowed (limits.{limit_name}).", limit=f"limits.{limit_name}", remedy=remedy
    )

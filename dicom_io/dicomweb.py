"""WADO-RS retrieval of one series from a PACS, streamed instance by instance and bounded while it streams.

The caller has already checked the DICOMweb base URL against the allow-list. This module sends one "retrieve
series" request and cuts the ``multipart/related`` answer into DICOM instances as its bytes arrive
(:func:`iter_multipart`), and maps failures to the project's errors in one place: unreachable or failing PACS ->
:class:`PacsError` (retryable, HTTP 502 at a front door); a series the PACS does not have, or one without
instances -> :class:`ImageDataError`; an answer larger than ``limits.dicomweb_response_bytes`` or holding more than
``limits.instances_per_series`` instances -> :class:`~core.errors.LimitExceededError`, raised while it streams in,
before it is held in memory. Messages name the study, the series and the PACS base URL, nothing about the patient.

Why ``retrieve series`` (one streamed request) and not a QIDO-RS instance list plus one WADO-RS request per
instance: measured on loopback Orthanc 1.10 with the 61-slice, 32 MB chest CT (sample ``lung2``), the streamed
series took 0.11-0.36 s (a raw multipart GET of the same bytes 0.12 s; the RUNBOOK gives ~0.14 s), the
per-instance route 5.0-6.7 s, about 85 ms per request. The streamed route also holds only the part being parsed
besides the instances already yielded.

Why the multipart answer is read here and not by ``dicomweb-client`` (which ``bench/bench_analyze.py`` still uses
as the I/O floor): its reader keeps a part of any size in memory and cannot be bounded, its retry wraps every
exception (a refusal would be sent three times), and it follows redirects wherever they lead. Here the session is
:func:`core.outbound.outbound_session`, which follows a redirect only within the same DICOMweb base and refuses
link-local and metadata addresses when connecting.
"""

from __future__ import annotations

import re
import time
from collections.abc import Generator, Iterable, Iterator
from io import BytesIO

import requests
from pydicom import dcmread
from pydicom.dataset import Dataset

from core.allowlist import AllowList
from core.errors import ImageDataError, PacsError
from core.limits import DEFAULT_LIMITS, InputLimits, too_large
from core.outbound import limit_body, outbound_session
from core.uids import is_dicom_uid

MAX_ATTEMPTS = 3
"""Requests per retrieval: a connection failure or 408/429/503/504 is retried after 0.5 s and 1 s. A longer
schedule keeps a clinician waiting for a PACS that is down."""
RETRY_WAITS_S = (0.5, 1.0)
RETRIABLE_STATUS = frozenset({408, 429, 503, 504})
ACCEPT = 'multipart/related; type="application/dicom"'
"""The PACS's default transfer syntax (Explicit VR Little Endian unless it keeps the stored one)."""
CHUNK_BYTES = 1 << 20

_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")  # RFC 2046 section 5.1.1
_PADDING = frozenset(b" \t")


class MultipartError(ValueError):
    """The answer is not a well-formed ``multipart/related`` message (RFC 2046)."""


class TruncatedMultipartError(MultipartError):
    """The answer ended before its closing delimiter: the transfer was cut short."""


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/related`` Content-Type, or :class:`MultipartError`."""
    media_type, _, parameters = content_type.partition(";")
    if media_type.strip().lower() != "multipart/related":
        raise MultipartError(f"the answer is {media_type.strip()[:80] or 'untyped'!r}, not multipart/related")
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "boundary":
            boundary = value.strip().strip('"').encode("latin-1", "replace")
            if not _BOUNDARY.fullmatch(boundary):
                raise MultipartError("its multipart boundary is not a valid boundary")
            return boundary
    raise MultipartError("its multipart Content-Type has no boundary")


def _part_body(segment: bytes | bytearray) -> bytes:
    """The body of one part: skip the rest of the delimiter line and the part's headers."""
    line_end = segment.find(b"\r\n")
    if line_end < 0 or not set(segment[:line_end]) <= _PADDING:
        raise MultipartError("a boundary line is followed by something other than a line break")
    rest = segment[line_end + 2 :]
    if rest.startswith(b"\r\n"):  # a part without headers
        return bytes(rest[2:])
    headers_end = rest.find(b"\r\n\r\n")
    if headers_end < 0:
        raise MultipartError("a part's headers do not end with an empty line")
    return bytes(rest[headers_end + 4 :])


def iter_multipart(chunks: Iterable[bytes], boundary: bytes) -> Iterator[bytes]:
    """Yield the part bodies of a multipart message (RFC 2046 section 5.1) as its bytes arrive in ``chunks``.

    Only the part being cut is buffered. The preamble and the epilogue are ignored; a message that ends before
    its closing delimiter (``--boundary--``) is refused with :class:`MultipartError`, because a truncated
    answer would otherwise pass for a shorter series.
    """
    delimiter = b"\r\n--" + boundary
    buffer = bytearray(b"\r\n")  # the first delimiter may open the body with no line break before it
    seen_delimiter = False
    after_delimiter = False  # the two bytes after a delimiter tell a closing one ("--") from the next part
    scan_from = 0
    for chunk in chunks:
        buffer += chunk
        while True:
            if after_delimiter:
                if len(buffer) < 2:
                    break
                if buffer.startswith(b"--"):
                    return  # the closing delimiter: the rest is the epilogue
                after_delimiter = False
            at = buffer.find(delimiter, scan_from)
            if at < 0:
                scan_from = max(0, len(buffer) - len(delimiter) + 1)
                break
            if seen_delimiter:
                yield _part_body(buffer[:at])
            seen_delimiter = after_delimiter = True
            del buffer[: at + len(delimiter)]
            scan_from = 0
    if not seen_delimiter:
        raise MultipartError("no multipart boundary was found in the answer")
    raise TruncatedMultipartError("the answer ended before its closing multipart boundary (truncated)")


def read_instance(body: bytes, *, index: int, where: str) -> Dataset:
    """One part as a pydicom dataset (PS3.10 file format), or :class:`ImageDataError` naming the part."""
    try:
        return dcmread(BytesIO(body))
    except Exception as exc:  # pydicom raises many plain types for a damaged file; to the caller all mean the same
        raise ImageDataError(
            f"Instance {index} of {where} is not a readable DICOM file ({type(exc).__name__}).",
            remedy="Check the instance in the PACS; re-send it from the modality if it is damaged.",
        ) from exc


def _get(session: requests.Session, url: str, *, where: str, timeout: float, limits: InputLimits) -> requests.Response:
    """GET with the retry schedule of :data:`MAX_ATTEMPTS`; the body is bounded while it is read."""
    hook = limit_body(
        limits.dicomweb_response_bytes, what=f"The answer for {where}", limit_name="dicomweb_response_bytes"
    )
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            response = session.get(
                url, headers={"Accept": ACCEPT}, stream=True, timeout=timeout, hooks={"response": hook}
            )
        except requests.RequestException as exc:
            if attempt < MAX_ATTEMPTS and isinstance(exc, requests.ConnectionError | requests.Timeout):
                time.sleep(RETRY_WAITS_S[attempt - 1])
                continue
            raise PacsError(
                f"Could not retrieve {where}: {type(exc).__name__}.",
                remedy="Check that the PACS is running and reachable from this service, then try again.",
            ) from exc
        if response.status_code in RETRIABLE_STATUS and attempt < MAX_ATTEMPTS:
            response.close()
            time.sleep(RETRY_WAITS_S[attempt - 1])
            continue
        return response
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def fetch_series(
    dicomweb_base: str,
    study_uid: str,
    series_uid: str,
    *,
    session: requests.Session | None = None,
    timeout: float = 60.0,
    limits: InputLimits = DEFAULT_LIMITS,
    expected_instances: int | None = None,
) -> Generator[Dataset, None, None]:
    """Yield the instances of one series as pydicom datasets, as they arrive over WADO-RS.

    This is a generator: nothing is requested until the first instance is asked for, and errors are raised
    from the iteration. Instances come in the PACS's order; :func:`dicom_io.volume.assemble_volume` sorts.
    Without a ``session``, redirects are followed only within ``dicomweb_base``.

    A transfer cut short (the PACS restarted mid-series, say) never passes for a complete series: a part is handed
    over only once the next delimiter has arrived, an answer without its closing delimiter is a :class:`PacsError`,
    and so is one with fewer than ``expected_instances`` (the count the EHR's ImagingStudy gives), since an
    analysis of what arrived would describe part of the scan.
    """
    base = dicomweb_base.rstrip("/")
    where = f"series {series_uid} of study {study_uid} at the PACS {base}"
    for name, uid in (("Study", study_uid), ("Series", series_uid)):
        if not is_dicom_uid(uid):
            raise ImageDataError(
                f"The {name} Instance UID {str(uid)[:70]!r} is not a DICOM UID; nothing was requested from {base}.",
                remedy=f"Correct the {name} Instance UID in the ImagingStudy (digits and dots, at most 64).",
            )
    http = session or outbound_session(AllowList.of([base]))
    response = _get(
        http, f"{base}/studies/{study_uid}/series/{series_uid}", where=where, timeout=timeout, limits=limits
    )
    with response:
        if response.status_code == 404:
            raise ImageDataError(
                f"The PACS has no instances of {where} (HTTP 404): series has no instances.",
                remedy="Check that the ImagingStudy's series UID matches the PACS, or send the images to the PACS.",
            )
        if response.status_code != 200:
            raise PacsError(
                f"Retrieving {where} failed with HTTP {response.status_code}.",
                remedy="Check the PACS and its DICOMweb service, then try again.",
            )
        received = 0
        try:
            boundary = multipart_boundary(response.headers.get("Content-Type", ""))
            for body in iter_multipart(response.iter_content(CHUNK_BYTES), boundary):
                received += 1
                if received > limits.instances_per_series:
                    raise too_large(
                        f"The answer for {where}", "instances_per_series", limits.instances_per_series, unit="instances"
                    )
                yield read_instance(body, index=received, where=where)
        except TruncatedMultipartError as exc:
            raise PacsError(
                f"Retrieving {where} broke off after {received} instance(s): {exc}.",
                remedy="Check the PACS and the network, then try again.",
            ) from exc
        except MultipartError as exc:
            raise PacsError(
                f"The answer for {where} was not a DICOM multipart message: {exc}.",
                remedy="Check that the Endpoint address is the PACS's DICOMweb (WADO-RS) base URL.",
            ) from exc
        except requests.RequestException as exc:
            raise PacsError(
                f"Retrieving {where} broke off after {received} instance(s): {type(exc).__name__}.",
                remedy="Check the PACS and the network, then try again.",
            ) from exc
    if received == 0:
        raise ImageDataError(
            f"The PACS returned nothing for {where}: series has no instances.",
            remedy="Check the series in the PACS; it may still be arriving.",
        )
    if expected_instances is not None and received < expected_instances:
        raise PacsError(
            f"The PACS sent {received} of the {expected_instances} instances the EHR lists for {where}: the "
            "transfer was cut short, or the series is not complete in the PACS.",
            remedy="Try again; if it persists, compare the series in the PACS with the EHR's ImagingStudy.",
        )

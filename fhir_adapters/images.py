"""Read a filed key image back: inline in its ``Media``, or in the ``Binary`` the Media points at.

The writer (:mod:`fhir_adapters.writer`) keeps an image inline when the request fits the server's size limit and
otherwise writes it as a Binary that ``Media.content.url`` names. Whoever shows the image (the clinician app, the
demo's report files) reads it here, so both forms look the same to them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from typing import Any

from fhir_adapters import fhirjson
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirError, FhirNotFound

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decode(data: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(data), validate=True)
    except (binascii.Error, ValueError):
        raise FhirError(
            f"{what} is not valid base64.", remedy="The image was stored damaged; re-run the analysis."
        ) from None


def media_png(client: FhirClient, media: Mapping[str, Any]) -> bytes:
    """The PNG bytes of a key-image ``media`` read from ``client``'s server.

    A Binary is read through :meth:`FhirClient.read_reference`, so a ``content.url`` pointing at another server is
    refused unless allow-listed, and gets no token. Where the Media records the image's ``size`` and ``hash``
    (SHA-1, as the writer does), the Binary must match them: a reader never shows an image other than the one the
    report was written with. Raises :class:`FhirNotFound` for a Media that holds no PNG image.
    """
    what = f"Media/{media.get('id', '?')}"
    content = fhirjson.element(media.get("content"))
    if content.get("contentType") != "image/png" or not (content.get("data") or content.get("url")):
        raise FhirNotFound(f"{what} holds no PNG image.", remedy="Open the image from its report.")
    if content.get("data"):
        png = _decode(content["data"], f"The image of {what}")
    else:
        binary = client.read_reference(str(content["url"]))
        if binary.get("resourceType") != "Binary" or not binary.get("data"):
            raise FhirNotFound(f"The image of {what} is not in a Binary with data.", remedy="Re-run the analysis.")
        png = _decode(binary["data"], f"The Binary of {what}")
        size, digest = content.get("size"), content.get("hash")
        actual = base64.b64encode(hashlib.sha1(png, usedforsecurity=False).digest()).decode("ascii")
        if (isinstance(size, int) and size != len(png)) or (isinstance(digest, str) and digest != actual):
            raise FhirError(
                f"The Binary of {what} does not match the size and hash its Media records.",
                remedy="The image was changed after the report was written; re-run the analysis.",
            )
    if not png.startswith(PNG_SIGNATURE):
        raise FhirNotFound(f"{what} holds no PNG image.", remedy="Open the image from its report.")
    return png

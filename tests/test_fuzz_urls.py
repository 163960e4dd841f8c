"""Property-based tests of the outbound allow-list: whatever URL arrives, the check either refuses it with a
:class:`NotAllowedError` or returns a URL that requests sends unchanged and that no lenient server can resolve to a
place outside the allowed base.

"Lenient server" is modelled as the most forgiving reading of a path: every percent escape decoded (once), ``\\``
read as ``/``, ``;`` parameters dropped from segments, duplicate slashes merged, dot segments removed. The hostile
URLs of ``tests/data/hostile/urls.txt`` (collected from SSRF write-ups and this project's own findings) are
checked the same way.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import pytest
import requests
from hypothesis import example, given
from hypothesis import strategies as st

from core.allowlist import AllowList, canonical_url
from core.errors import NotAllowedError
from tests.fuzz_support import HOSTILE, fuzz

BASE = "http://pacs.example.org:8042/dicom-web"
ALLOW = AllowList.of([BASE, "https://ehr.example.org/fhir"])

# Pieces attackers splice into paths; the property must hold for any sequence of them.
SEGMENTS = st.sampled_from(
    [
        "dicom-web", "studies", "1.2.3", "tools", "..", ".", "", "%2e%2e", "%2E%2e", ".%2e", "%2e", "..;", ";x",
        "%2f", "%2F", "%5c", "%252e", "%00", "%41", "a%2fb", "~", "%7e", "..%2f..", "\\..", "ä", " ", "?", "#", "@",
        "%", "%g0", "dicom-web;jsessionid=1", "DICOM-WEB",
    ]
)  # fmt: skip
HOSTS = st.sampled_from(
    [
        "pacs.example.org:8042", "PACS.example.org:8042", "pacs.example.org.:8042", "pacs.example.org",
        "pacs.example.org:80", "pacs.example.org:08042", "evil.example.org:8042", "pacs.example.org@evil.org:8042",
        "127.0.0.1:8042", "[::ffff:127.0.0.1]:8042", "169.254.169.254", "pacs.example.org:8042\\@evil.org",
        "xn--pacs-.example.org:8042", "pacs。example。org:8042",
    ]
)  # fmt: skip


def _lenient_path(url: str) -> list[str]:
    """The segments a maximally forgiving server would resolve the path of ``url`` to."""
    path = unquote(urlsplit(url).path).replace("\\", "/")
    resolved: list[str] = []
    for segment in path.split("/"):
        segment = segment.split(";", 1)[0]
        if segment in ("", "."):
            continue
        if segment == "..":
            if resolved:
                resolved.pop()
            continue
        resolved.append(segment)
    return resolved


def _sent(url: str) -> str:
    """The URL requests (urllib3) would put on the wire for ``url``."""
    return str(requests.Request("GET", url).prepare().url)


@fuzz(1000)
@given(scheme=st.sampled_from(["http", "HTTP", "https"]), host=HOSTS, segments=st.lists(SEGMENTS, max_size=8))
@example(scheme="http", host="pacs.example.org:8042", segments=["dicom-web", "..", "tools"])
@example(scheme="http", host="pacs.example.org:8042", segments=["dicom-web", "%2e%2e", "tools"])
@example(scheme="http", host="pacs.example.org:8042", segments=["dicom-web", "", "..", "", "tools"])
def test_an_allowed_url_stays_under_its_base_as_sent_and_as_any_server_resolves_it(
    scheme: str, host: str, segments: list[str]
) -> None:
    url = f"{scheme}://{host}/" + "/".join(segments)
    try:
        checked = ALLOW.check(url)
    except NotAllowedError:
        return
    assert _sent(checked) == checked  # requests/urllib3 send it unchanged: what was checked is what goes out
    target = canonical_url(checked)
    assert (target.scheme, target.host, target.port) == ("http", "pacs.example.org", 8042)
    assert _lenient_path(checked)[:1] == ["dicom-web"]


@fuzz(1000)
@given(st.text(max_size=120))
@example("http://[::1")
@example("http://host:65536/")
@example("http://%zz/")
@example("http://a..b/")
@example("http://" + "a" * 64 + ".org/")
@example("http://xn--/")
@example("http://\u0130.example/")
def test_any_text_is_either_a_canonical_url_or_a_refusal(text: str) -> None:
    try:
        first = canonical_url(text)
    except NotAllowedError:
        return
    again = canonical_url(first.geturl())
    assert again == first  # canonical form is a fixed point
    assert first.scheme in ("http", "https") and first.host and first.path.startswith("/")


@fuzz(100)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20), st.lists, max_leaves=5))
def test_a_url_that_is_not_a_string_is_refused(value: object) -> None:
    with pytest.raises(NotAllowedError):
        ALLOW.check(value)  # type: ignore[arg-type]


def _corpus() -> list[str]:
    lines = (HOSTILE / "urls.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("url", _corpus())
def test_every_url_of_the_hostile_corpus_is_refused(url: str) -> None:
    with pytest.raises(NotAllowedError):
        ALLOW.check(url.replace("{BASE}", BASE))

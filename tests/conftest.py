"""Shared fixtures: the real servers (sekmet-fhir, Medplum's FHIR engine, Orthanc) started once per test session.

Tests that need a clean server state create their own resources with fresh identifiers, so one server per
session is enough and keeps the suite fast on a 2-core machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.allowlist import AllowList
from devtools.servers import FhirServer, OrthancServer, fhir_server, medplum_server, orthanc_server

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def fhir_base() -> Iterator[FhirServer]:
    """A real sekmet-fhir R4 server, open (no auth), strict inbound validation."""
    with fhir_server() as server:
        yield server


@pytest.fixture(scope="session")
def medplum() -> Iterator[FhirServer]:
    """Medplum's FHIR engine (npm ``@medplum/fhir-router``, in-memory) with Medplum's default limits."""
    with medplum_server() as server:
        yield server


@pytest.fixture(scope="session")
def orthanc() -> Iterator[OrthancServer]:
    """A real Orthanc with the DICOMweb plugin."""
    with orthanc_server() as server:
        yield server


@pytest.fixture(scope="session")
def allow(orthanc: OrthancServer) -> AllowList:
    """The DICOMweb allow-list that admits only this session's Orthanc."""
    return AllowList.of([orthanc.dicomweb_url])

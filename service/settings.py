"""One deployment file configures ``imaging-cds serve``: the CDS Hooks service, the clinician app and the cards.

The file is JSON or YAML, written by an administrator; nothing in it is ever evaluated, and nothing arriving in
a request can change it. Secrets are not written in the file: it names environment variables or key files that
hold them. Example (YAML)::

    public_base_url: https://imaging-cds.hospital.example      # where EHRs and browsers reach this server
    data_dir: /var/lib/imaging-cds                              # SQLite: jobs, sessions, reviews, CDS feedback
    dicomweb_allow: [https://pacs.hospital.example/dicom-web]   # PACS an Endpoint may point at
    fhir_allow: [https://ehr.hospital.example/fhir]             # FHIR servers a hook's fhirServer may name
    cds_clients:                                                # EHRs allowed to call the CDS service
      - {iss: https://ehr.hospital.example, jwks_file: /etc/imaging-cds/ehr-jwks.json}
    smart_clients:                                              # the app's registrations, one per EHR (iss)
      - {fhir_base: https://ehr.hospital.example/fhir, client_id: imaging-cds,
         auth_method: private_key_jwt, private_key_file: /etc/imaging-cds/app-key.pem, kid: app-1}
    backend:                                                    # optional: background analyses on order-sign
      {fhir_base: https://ehr.hospital.example/fhir, client_id: imaging-cds-system,
       private_key_file: /etc/imaging-cds/system-key.pem, kid: sys-1, algorithm: RS384}
    limits:                                                     # optional: input size limits (core.limits)
      {cds_request_bytes: 8388608, instances_per_series: 5000}  # any field of InputLimits; others keep defaults
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.allowlist import AllowList
from core.errors import ConfigurationError
from core.limits import DEFAULT_LIMITS, InputLimits
from core.options import did_you_mean

_TOP_LEVEL_KEYS = (
    "public_base_url",
    "data_dir",
    "dicomweb_allow",
    "fhir_allow",
    "cds_clients",
    "smart_clients",
    "backend",
    "secure_cookies",
    "limits",
)


@dataclass(frozen=True)
class BackendClient:
    """A SMART Backend Services registration used for analyses that no clinician launched (order-sign)."""

    fhir_base: str
    client_id: str
    private_key_file: Path
    kid: str
    algorithm: str = "RS384"
    token_url: str | None = None
    scope: str = (
        "system/ImagingStudy.rs system/Endpoint.rs system/DiagnosticReport.cru system/Observation.cr "
        "system/Media.c system/Device.cr system/Provenance.cu"
    )


@dataclass(frozen=True)
class Settings:
    """A validated deployment file (see the module docstring for the format)."""

    public_base_url: str
    data_dir: Path
    dicomweb_allow: AllowList
    fhir_allow: AllowList
    cds_clients: tuple[Mapping[str, Any], ...]
    smart_clients: tuple[Mapping[str, Any], ...]
    backend: BackendClient | None
    secure_cookies: bool
    limits: InputLimits = DEFAULT_LIMITS

    @property
    def base_url(self) -> str:
        return self.public_base_url.rstrip("/")

    @property
    def app_base_url(self) -> str:
        """Where the clinician app is mounted (its launch URL is ``{app_base_url}/launch``)."""
        return f"{self.base_url}/app"


def _require(raw: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in raw or raw[key] in (None, "", []):
        raise ConfigurationError(f"{source}: '{key}' is missing.", remedy="See 'imaging-cds serve --help'.")
    return raw[key]


def secret_from_env(name: str, *, what: str) -> str:
    """Read a secret from the environment variable the deployment file names."""
    value = os.environ.get(name)
    if not value:
        raise ConfigurationError(f"{what}: environment variable {name} is not set.", remedy=f"Export {name}.")
    return value


def parse_settings(raw: Mapping[str, Any], *, source: str = "settings") -> Settings:
    """Validate a loaded deployment file; unknown keys fail with a "did you mean" hint."""
    for key in raw:
        if key not in _TOP_LEVEL_KEYS:
            raise ConfigurationError(
                f"{source}: unknown key '{key}'.{did_you_mean(str(key), _TOP_LEVEL_KEYS)}",
                remedy=f"Known keys: {', '.join(_TOP_LEVEL_KEYS)}.",
            )
    public = str(_require(raw, "public_base_url", source))
    if not public.startswith(("http://", "https://")):
        raise ConfigurationError(f"{source}: public_base_url must be an absolute http(s) URL.")
    backend_raw = raw.get("backend")
    backend = None
    if backend_raw:
        backend = BackendClient(
            fhir_base=str(_require(backend_raw, "fhir_base", f"{source} backend")),
            client_id=str(_require(backend_raw, "client_id", f"{source} backend")),
            private_key_file=Path(_require(backend_raw, "private_key_file", f"{source} backend")),
            kid=str(_require(backend_raw, "kid", f"{source} backend")),
            algorithm=str(backend_raw.get("algorithm", "RS384")),
            token_url=backend_raw.get("token_url"),
        )
    return Settings(
        public_base_url=public,
        data_dir=Path(str(_require(raw, "data_dir", source))),
        dicomweb_allow=AllowList.of(_require(raw, "dicomweb_allow", source)),
        fhir_allow=AllowList.of(raw.get("fhir_allow", [])),
        cds_clients=tuple(raw.get("cds_clients", [])),
        smart_clients=tuple(raw.get("smart_clients", [])),
        backend=backend,
        secure_cookies=bool(raw.get("secure_cookies", public.startswith("https://"))),
        limits=_limits(raw.get("limits"), source),
    )


def _limits(raw: Any, source: str) -> InputLimits:
    if raw is None:
        return DEFAULT_LIMITS
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"{source}: 'limits' must be a mapping of limit names to numbers.")
    return InputLimits.from_mapping(raw, source=source)


def load_settings(path: Path) -> Settings:
    """Read and validate a deployment file (``.json``, ``.yaml`` or ``.yml``)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(f"Cannot read the settings file {path}: {exc.strerror}.") from exc
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigurationError(
            f"The settings file {path} is not valid {path.suffix.lstrip('.').upper()}: {exc}"
        ) from exc
    if not isinstance(raw, dict):
        raise ConfigurationError(f"The settings file {path} must hold a mapping of settings.")
    return parse_settings(raw, source=str(path))

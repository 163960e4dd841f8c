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
    fhir_write:                                                 # optional: how results are written, per server
      - {fhir_base: https://ehr.hospital.example/fhir, strategy: auto, max_transaction_entries: 50,
         max_request_bytes: 1000000}
    jobs:                                                       # optional: analyses on Celery workers
      {broker_url: "redis://127.0.0.1:6379/0", soft_time_limit_s: 900, hard_time_limit_s: 960,
       max_memory_per_child_mb: 4096, max_attempts: 3}
    logging: {format: json, level: INFO}                        # optional: text (default) or json
    limits:                                                     # optional: input size limits (core.limits)
      {cds_request_bytes: 8388608, instances_per_series: 5000}  # any field of InputLimits; others keep defaults

``fhir_write`` is rarely needed: the writer reads each server's CapabilityStatement and knows Medplum's limits;
name a server there when a proxy before it caps requests lower, or its transactions take fewer entries (see
:class:`fhir_adapters.writer.WriteSettings`).

``backend`` without credentials (``{fhir_base: ..., auth: none}``) talks to an open FHIR server: development only.
Without ``jobs`` analyses run on threads inside ``serve``; with ``jobs.broker_url`` ``serve`` only queues them and
``imaging-cds worker --config <the same file>`` runs them (see :class:`pipeline.celery_engine.EngineSettings`
for every ``jobs`` key and its default). ``serve`` and its workers share ``data_dir`` (the job records, and the
clinician app's sessions that app analyses run with).
    state_key:                                                  # seals sessions at rest (AES-256-GCM)
      file: /etc/imaging-cds/state.key                          # or env: IMAGING_CDS_STATE_KEY
      previous: [{file: /etc/imaging-cds/state-2025.key}]       # still opened, never used to seal (rotation)
    audit:                                                      # where AuditEvents go (BALP; via a local outbox)
      {fhir_base: https://ehr.hospital.example/fhir, auth: backend}   # auth: backend (default) or none
    cds_replay: redis://cache.hospital.internal:6379/0          # optional: JWT replay cache shared by hosts
    frame_ancestors: [https://ehr.hospital.example]             # optional: EHRs that may embed the app

``state_key`` is required when ``smart_clients`` are configured: the clinicians' tokens are never stored in
readable form (``serve`` and its workers must be given the same key). ``audit`` defaults to the ``backend``'s FHIR
server and credentials (it asks for ``system/AuditEvent.cu``); with neither, ``serve`` refuses to start, because
every access to patient data must be recorded somewhere. ``cds_replay`` defaults to a SQLite file in ``data_dir``
(enough for one host).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from core.allowlist import AllowList
from core.errors import ConfigurationError
from core.limits import DEFAULT_LIMITS, InputLimits
from core.options import did_you_mean
from core.sealing import Keyring, KeySource
from fhir_adapters.writer import ServerWriteSettings, WriteSettings
from pipeline.celery_engine import EngineSettings

_TOP_LEVEL_KEYS = (
    "public_base_url",
    "data_dir",
    "dicomweb_allow",
    "fhir_allow",
    "cds_clients",
    "smart_clients",
    "backend",
    "secure_cookies",
    "fhir_write",
    "jobs",
    "logging",
    "limits",
    "state_key",
    "audit",
    "cds_replay",
    "frame_ancestors",
)
_LOG_FORMATS = ("text", "json")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class BackendClient:
    """A SMART Backend Services registration used for analyses that no clinician launched (order-sign)."""

    fhir_base: str
    client_id: str | None
    """``None``: an open FHIR server, no credentials (``auth: none``; development only)."""
    private_key_file: Path | None
    kid: str | None
    algorithm: str = "RS384"
    token_url: str | None = None
    timeout_s: float = 30.0
    """Seconds to wait for each answer of the FHIR server (a slower one is retried, then the job retried)."""
    scope: str = (
        "system/ImagingStudy.rs system/Endpoint.rs system/DiagnosticReport.cru system/Observation.cr "
        "system/Media.crs system/Binary.cru system/Device.cr system/Provenance.cu"
    )


@dataclass(frozen=True)
class StateKey:
    """The key that seals secrets at rest, and the previous keys still accepted while a rotation completes."""

    current: KeySource
    previous: tuple[KeySource, ...] = ()

    def keyring(self) -> Keyring:
        return Keyring.from_sources(self.current, self.previous)


@dataclass(frozen=True)
class AuditDestination:
    """Where the audit outbox sends AuditEvents: a FHIR server, with the backend client's token or none."""

    fhir_base: str
    auth: str = "backend"
    site: str | None = None


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
    jobs: EngineSettings | None = None
    """The Celery engine's settings; ``None``: analyses run on threads inside ``serve``."""
    fhir_write: ServerWriteSettings = field(default_factory=ServerWriteSettings)
    """How results are written to each FHIR server; unnamed servers: decided from their CapabilityStatement."""
    log_format: str = "text"
    log_level: str = "INFO"
    limits: InputLimits = DEFAULT_LIMITS
    state_key: StateKey | None = None
    audit: AuditDestination | None = None
    cds_replay: str | None = None
    frame_ancestors: tuple[str, ...] = ()

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
    log_format, log_level = _parse_logging(raw.get("logging") or {}, source)
    backend = _parse_backend(raw.get("backend"), source)
    return Settings(
        public_base_url=public,
        data_dir=Path(str(_require(raw, "data_dir", source))),
        dicomweb_allow=AllowList.of(_require(raw, "dicomweb_allow", source)),
        fhir_allow=AllowList.of(raw.get("fhir_allow", [])),
        cds_clients=tuple(raw.get("cds_clients", [])),
        smart_clients=tuple(raw.get("smart_clients", [])),
        backend=backend,
        secure_cookies=bool(raw.get("secure_cookies", public.startswith("https://"))),
        jobs=_parse_jobs(raw.get("jobs"), source),
        fhir_write=_parse_fhir_write(raw.get("fhir_write"), source),
        log_format=log_format,
        log_level=log_level,
        limits=_limits(raw.get("limits"), source),
        state_key=_state_key(raw.get("state_key"), source),
        audit=_audit(raw.get("audit"), backend, source),
        cds_replay=str(raw["cds_replay"]) if raw.get("cds_replay") else None,
        frame_ancestors=_origins(raw.get("frame_ancestors"), source),
    )


def _parse_backend(raw: Mapping[str, Any] | None, source: str) -> BackendClient | None:
    if not raw:
        return None
    where = f"{source} backend"
    fhir_base = str(_require(raw, "fhir_base", where))
    try:
        timeout_s = float(raw.get("timeout_s", 30.0))
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{where}: timeout_s must be a number of seconds.") from exc
    if raw.get("auth") == "none" and not raw.get("client_id"):
        return BackendClient(fhir_base=fhir_base, client_id=None, private_key_file=None, kid=None, timeout_s=timeout_s)
    return BackendClient(
        timeout_s=timeout_s,
        fhir_base=fhir_base,
        client_id=str(_require(raw, "client_id", where)),
        private_key_file=Path(_require(raw, "private_key_file", where)),
        kid=str(_require(raw, "kid", where)),
        algorithm=str(raw.get("algorithm", "RS384")),
        token_url=raw.get("token_url"),
    )


def _parse_fhir_write(raw: Any, source: str) -> ServerWriteSettings:
    if not raw:
        return ServerWriteSettings()
    if not isinstance(raw, list) or not all(isinstance(entry, Mapping) for entry in raw):
        raise ConfigurationError(
            f"{source}: 'fhir_write' must be a list of settings, one per FHIR server.",
            remedy="Write each as {fhir_base: URL, strategy: ..., max_request_bytes: ...}.",
        )
    servers: dict[str, WriteSettings] = {}
    for index, entry in enumerate(raw):
        where = f"{source} fhir_write[{index}]"
        base = str(_require(entry, "fhir_base", where)).rstrip("/")
        if base in servers:
            raise ConfigurationError(f"{where}: {base} is named twice.", remedy="Keep one entry per FHIR server.")
        servers[base] = WriteSettings.from_mapping({k: v for k, v in entry.items() if k != "fhir_base"}, source=where)
    return ServerWriteSettings(servers)


def _parse_jobs(raw: Mapping[str, Any] | None, source: str) -> EngineSettings | None:
    if not raw:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"{source}: 'jobs' must be a mapping of settings.")
    known = tuple(f.name for f in fields(EngineSettings))
    for key in raw:
        if key not in known:
            raise ConfigurationError(
                f"{source}: unknown key 'jobs.{key}'.{did_you_mean(str(key), known)}",
                remedy=f"Known keys: {', '.join(known)}.",
            )
    _require(raw, "broker_url", f"{source} jobs")
    kinds: dict[str, type] = {
        f.name: type(f.default) if f.default is not MISSING else str for f in fields(EngineSettings)
    }
    values: dict[str, Any] = {}
    for key, value in raw.items():
        kind = kinds[key]
        try:
            values[key] = kind(value)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{source}: jobs.{key} must be a {kind.__name__}, not {value!r}.") from exc
    return EngineSettings(**values)


def _parse_logging(raw: Mapping[str, Any], source: str) -> tuple[str, str]:
    log_format = str(raw.get("format", "text")).lower()
    level = str(raw.get("level", "INFO")).upper()
    if log_format not in _LOG_FORMATS:
        raise ConfigurationError(
            f"{source}: logging.format must be one of {', '.join(_LOG_FORMATS)}, not {log_format!r}."
            f"{did_you_mean(log_format, _LOG_FORMATS)}"
        )
    if level not in _LOG_LEVELS:
        raise ConfigurationError(f"{source}: logging.level must be one of {', '.join(_LOG_LEVELS)}, not {level!r}.")
    return log_format, level


def _limits(raw: Any, source: str) -> InputLimits:
    if raw is None:
        return DEFAULT_LIMITS
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"{source}: 'limits' must be a mapping of limit names to numbers.")
    return InputLimits.from_mapping(raw, source=source)


def _state_key(raw: Any, source: str) -> StateKey | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"{source}: state_key must be a mapping with 'file' or 'env'.")
    previous = raw.get("previous") or []
    if not isinstance(previous, list):
        raise ConfigurationError(f"{source}: state_key.previous must be a list of {{file: ...}} or {{env: ...}}.")
    current = KeySource.from_mapping({k: v for k, v in raw.items() if k != "previous"}, where=f"{source}: state_key")
    return StateKey(current, tuple(KeySource.from_mapping(p, where=f"{source}: state_key.previous") for p in previous))


def _audit(raw: Any, backend: BackendClient | None, source: str) -> AuditDestination | None:
    if raw is None:
        if backend is None:
            return None
        return AuditDestination(backend.fhir_base, "backend" if backend.client_id else "none")
    if not isinstance(raw, Mapping) or set(raw) - {"fhir_base", "auth", "site"}:
        raise ConfigurationError(
            f"{source}: audit must be a mapping with fhir_base, and optionally auth (backend or none) and site."
        )
    auth = str(raw.get("auth", "backend" if backend is not None and backend.client_id else "none"))
    if auth not in ("backend", "none"):
        raise ConfigurationError(f"{source}: audit.auth must be 'backend' or 'none', not {auth!r}.")
    if auth == "backend" and (backend is None or not backend.client_id):
        raise ConfigurationError(
            f"{source}: audit.auth is 'backend' but no backend client with credentials is configured.",
            remedy="Configure 'backend' (its credentials send the AuditEvents), or set audit.auth: none.",
        )
    fhir_base = str(raw.get("fhir_base") or (backend.fhir_base if backend else ""))
    if not fhir_base.startswith(("http://", "https://")):
        raise ConfigurationError(f"{source}: audit.fhir_base must be the audit repository's FHIR base URL.")
    return AuditDestination(fhir_base, auth, str(raw["site"]) if raw.get("site") else None)


def _origins(raw: Any, source: str) -> tuple[str, ...]:
    origins = tuple(str(o) for o in (raw or []))
    for origin in origins:
        if not origin.startswith("https://") or origin.count("/") != 2:
            raise ConfigurationError(
                f"{source}: frame_ancestors entry {origin!r} is not an https origin.",
                remedy="Give origins only, for example https://ehr.hospital.example (no path).",
            )
    return origins


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

"""A sandbox EHR for development and tests: SMART App Launch 2.x authorization server + scope-enforcing FHIR proxy.

No SMART authorization server with EHR launch installs from our registries, so the project ships this one.
It is a DEVELOPMENT TOOL: in-memory state, generated keys, no real login. ``imaging-cds serve`` never enables
it; tests and ``imaging-cds demo`` start it explicitly in front of a real FHIR server (sekmet-fhir).

Interface
---------
``SandboxConfig(fhir_upstream, clients=[SandboxClient(...)], access_token_lifetime=3600, v1_only=False,
scopes_supported=None, auto_practitioner=None, ...)`` and
``SandboxClient(client_id, redirect_uris, client_secret=None, jwks=None, public=False, allowed_scopes=...)``.

``create_sandbox_app(config) -> Flask``; ``run_sandbox(config) -> Iterator[SandboxHandle]`` serves it on a free
loopback port in a background thread. ``SandboxHandle`` has ``base_url``, ``fhir_base`` (the ``iss``,
``{base_url}/fhir``), ``authorize_url``, ``token_url``, ``jwks_url``, ``smart_configuration_url``, ``app`` and
``launch_url(patient, practitioner, app_launch_url, encounter=None, fhir_context=None, need_patient_banner=True)``
(``fhir_context``: references as strings, or SMART 2.x objects such as ``{"reference": "ImagingStudy/1"}``).

Endpoints
---------
* ``{iss}/.well-known/smart-configuration`` - endpoints, ``code_challenge_methods_supported: ["S256"]``,
  ``token_endpoint_auth_methods_supported`` (client_secret_basic, client_secret_post, private_key_jwt, none),
  ``scopes_supported`` (v2 and v1 forms; only v1 with ``v1_only=True``, which also drops ``permission-v2``
  from ``capabilities`` and silently drops v2-syntax scopes from grants).
* ``{iss}/metadata`` - the real server's CapabilityStatement with ``rest.security`` carrying the
  ``oauth-uris`` extension (authorize, token), for apps that fall back from ``.well-known``. No token needed.
* ``{base}/launch-ehr`` - plays the EHR: binds patient/encounter/fhirContext/practitioner to an opaque launch id
  (valid one hour, reusable) and redirects to ``app_launch_url?iss={iss}&launch={id}``.
* ``{base}/authorize`` - checks the client, the EXACT redirect URI (a bad one gets an error page, never a
  redirect), ``response_type=code``, ``state`` (required), ``aud`` == iss, PKCE ``S256`` (``plain`` or no
  challenge is refused). ``launch`` param requires the ``launch`` scope and takes the context from the launch id;
  without it, ``launch/patient`` shows a patient picker (standalone). Then a consent page (form ``#consent``,
  checkboxes ``name=granted`` for each resource scope - untick to grant less - and buttons ``#approve`` /
  ``#deny``); Deny redirects with ``error=access_denied`` and the state. Test-only query options:
  ``sandbox_practitioner`` (who is signed in for a standalone launch; else ``auto_practitioner``, else a
  picker) and ``sandbox_patient`` (skips the patient picker).
* ``{base}/token`` - ``authorization_code`` (code single-use, 60 s, bound to client, redirect URI and PKCE
  challenge; a replayed code is refused with ``invalid_grant`` AND revokes every token issued from it) and
  ``refresh_token`` (same or narrower scope; the refresh token is not rotated). The response carries
  ``access_token``, ``token_type: Bearer``, ``expires_in``, ``scope`` (what was GRANTED), ``refresh_token``
  (when ``offline_access`` or ``online_access`` was granted), ``id_token`` (when ``openid``: RS256, ``iss`` =
  the FHIR base, ``aud`` = client_id, ``sub`` = practitioner id, ``fhirUser`` = ABSOLUTE URL
  ``{iss}/Practitioner/<id>`` when ``fhirUser`` or ``profile`` was granted, ``nonce`` echoed), ``patient``,
  ``encounter``, ``fhirContext`` (list of ``{"reference": ...}``), ``need_patient_banner``, ``smart_style_url``.
* ``{base}/.well-known/jwks.json`` - the public key for id_tokens.

What the FHIR proxy (``{iss}/...``) enforces
--------------------------------------------
* ``Authorization: Bearer``: missing, unknown, revoked or expired -> 401 + OperationOutcome +
  ``WWW-Authenticate: Bearer realm="sandbox-ehr"[, error="invalid_token"]``.
* Scopes (v2 ``patient/ImagingStudy.rs`` ..., v1 ``patient/*.read`` / ``.write`` / ``.*``, and ``user/`` forms):
  GET by id = r, search (GET type, POST ``_search``) = s, POST = c, PUT/PATCH = u, DELETE = d, ``$operations`` =
  r. Missing -> 403 + OperationOutcome naming the scope needed. Transactions/batches: every entry is checked
  the same way. Granular v2 scopes (``?category=...``) count as the unrestricted scope.
* ``patient/`` compartment (when no ``user/`` scope allows the call): searches are confined to the launch
  patient (``Patient`` gets ``_id`` pinned; compartment types get ``patient=Patient/<id>`` added, and a
  ``patient``/``subject`` naming someone else is refused); a read is refused when the returned resource's
  ``subject``/``patient``/``for``/``beneficiary``/``target`` names another patient; a create/update whose body
  names another patient is refused. Non-compartment types (Practitioner, Endpoint, Organization) are not confined.
  NOT enforced: resources pulled in by ``_include`` / ``_revinclude`` are not scope-checked (so
  ``ImagingStudy?_include=ImagingStudy:endpoint`` returns the Endpoint), and granular scope queries are ignored.
* QUIRK (as the reference SMART launcher): ``Location``, ``Content-Location``, ``fullUrl`` and Bundle
  ``link`` URLs are passed through exactly as the real FHIR server wrote them, so they point at the BACKING
  server, not at ``{iss}``. Apps must resolve them against their ``iss`` (keep the ``Type/id[/_history/v]`` tail).
"""

from devtools.sandbox.app import SandboxHandle, create_sandbox_app, run_sandbox
from devtools.sandbox.config import (
    DEFAULT_ALLOWED_SCOPES,
    V1_SCOPES_SUPPORTED,
    V2_SCOPES_SUPPORTED,
    SandboxClient,
    SandboxConfig,
)

__all__ = [
    "DEFAULT_ALLOWED_SCOPES",
    "V1_SCOPES_SUPPORTED",
    "V2_SCOPES_SUPPORTED",
    "SandboxClient",
    "SandboxConfig",
    "SandboxHandle",
    "create_sandbox_app",
    "run_sandbox",
]

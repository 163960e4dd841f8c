"""The sandbox's OAuth 2.0 authorization server, built from authlib's pieces with SMART's stricter rules.

authlib supplies the authorization-code and refresh grants, client authentication and PKCE; this module
binds them to the in-memory state and adds what SMART App Launch 2.x demands on top: PKCE with S256 only
(``plain`` and a missing challenge are refused), a mandatory ``state``, ``aud`` equal to the FHIR base,
``private_key_jwt`` with RS384/ES384, launch context and an RS256 ``id_token`` in the token response.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.integrations.flask_oauth2.requests import FlaskOAuth2Request
from authlib.oauth2.rfc6749 import (
    ClientMixin,
    InvalidClientError,
    InvalidRequestError,
    OAuth2Request,
)
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant, RefreshTokenGrant
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7636 import CodeChallenge
from flask import request as flask_request
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey

from devtools.sandbox.config import SandboxClient, SandboxConfig
from devtools.sandbox.scopes import allowed_subset, split_scopes
from devtools.sandbox.state import AuthorizationCodeRecord, Grant, SandboxState, TokenRecord

#: Client authentication methods the token endpoint accepts, in the order they are tried.
TOKEN_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]
#: Signature algorithms accepted on ``private_key_jwt`` assertions (SMART requires RS384 and ES384).
ASSERTION_ALGORITHMS = ["RS384", "ES384", "RS256", "ES256"]


class SandboxClientModel(ClientMixin):
    """authlib's view of a :class:`SandboxClient`."""

    def __init__(self, registration: SandboxClient, *, v1_only: bool) -> None:
        self.registration = registration
        self.v1_only = v1_only

    @property
    def client_id(self) -> str:
        return self.registration.client_id

    def get_client_id(self) -> str:
        return self.registration.client_id

    def get_default_redirect_uri(self) -> str | None:
        # SMART requires the app to send redirect_uri; never fall back to a default.
        return None

    def get_allowed_scope(self, scope: str) -> str:
        allowed = split_scopes(self.registration.allowed_scopes)
        return " ".join(allowed_subset(split_scopes(scope), allowed, v1_only=self.v1_only))

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.registration.redirect_uris  # exact match, no prefix or wildcard

    def check_client_secret(self, client_secret: str) -> bool:
        import hmac

        secret = self.registration.client_secret
        return bool(secret) and hmac.compare_digest(str(secret), client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.registration.public:
            return method == "none"
        if method in ("client_secret_basic", "client_secret_post"):
            return bool(self.registration.client_secret)
        if method == "private_key_jwt":
            return self.registration.jwks is not None
        return False

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("authorization_code", "refresh_token")


class StoredAuthorizationRequest(OAuth2Request):
    """An authorization request replayed from the parameters saved when the consent page was shown."""

    def __init__(self, uri: str, params: dict[str, str]) -> None:
        super().__init__("GET", uri)
        self._params = params
        self.payload = BasicOAuth2Payload(params)

    @property
    def args(self) -> dict[str, str]:
        return self._params

    @property
    def form(self) -> dict[str, str]:
        return {}


class SmartAuthorizationServer(AuthorizationServer):
    """authlib's Flask server that also accepts an already-built request (the consent replay)."""

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        if isinstance(request, OAuth2Request):
            return request
        return FlaskOAuth2Request(flask_request)


class S256OnlyCodeChallenge(CodeChallenge):
    """PKCE as SMART 2.x requires it: a challenge on every request, method S256, nothing else."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]  # noqa: RUF012 - authlib reads the class attribute

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge with code_challenge_method=S256.")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("Only code_challenge_method=S256 is supported; 'plain' is refused.")
        super().validate_code_challenge(grant, redirect_uri)

    def validate_code_verifier(self, grant: Any, result: Any) -> None:
        if not grant.request.form.get("code_verifier"):
            raise InvalidRequestError("Missing 'code_verifier': this code was issued with a PKCE challenge.")
        super().validate_code_verifier(grant, result)


class SmartRequestChecks:
    """Authorization-request rules SMART adds: ``state`` present and ``aud`` equal to the FHIR base URL."""

    def __init__(self, issuer: Callable[[], str]) -> None:
        self.issuer = issuer

    def __call__(self, grant: Any) -> None:
        grant.register_hook("after_validate_authorization_request_payload", self.validate)

    def validate(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("state"):
            raise InvalidRequestError("Missing 'state': SMART apps must send an unguessable state value.")
        aud = data.get("aud")
        if not aud:
            raise InvalidRequestError("Missing 'aud': set it to the FHIR base URL (the iss).")
        if aud.rstrip("/") != self.issuer().rstrip("/"):
            raise InvalidRequestError("'aud' does not match this EHR's FHIR base URL (the iss).")


class PrivateKeyJwtAuth(JWTBearerClientAssertion):
    """``private_key_jwt`` client authentication against the JWKS registered by value."""

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, state: SandboxState, token_url: Callable[[], str]) -> None:
        super().__init__(validate_jti=True, leeway=60)
        self.state = state
        self.token_url = token_url

    def get_audiences(self) -> list[str]:
        return [self.token_url()]

    def validate_jti(self, claims: Any, jti: str) -> bool:
        return self.state.use_jti(f"{claims['sub']}:{jti}", float(claims.get("exp") or 0))

    def resolve_client_public_key(self, client: SandboxClientModel) -> KeySet:
        return KeySet.import_key_set(client.registration.jwks or {"keys": []})  # type: ignore[arg-type]

    def process_assertion_claims(self, assertion: str, resolve_key: Any) -> Any:
        try:
            token = jwt.decode(assertion, resolve_key, algorithms=ASSERTION_ALGORITHMS)
        except (JoseError, ValueError) as error:
            raise InvalidClientError(description="The client assertion's signature or format is invalid.") from error
        self.verify_claims(token.claims)
        return token.claims


class SandboxIssuer:
    """Signs id_tokens and mints token responses carrying the SMART launch context."""

    def __init__(self, config: SandboxConfig, state: SandboxState, issuer: Callable[[], str]) -> None:
        self.config = config
        self.state = state
        self.issuer = issuer
        self.signing_key = RSAKey.generate_key(
            2048, parameters={"kid": uuid.uuid4().hex, "alg": "RS256", "use": "sig"}, private=True
        )

    def public_jwks(self) -> dict[str, Any]:
        return {"keys": [self.signing_key.as_dict(private=False)]}

    def id_token(self, client_id: str, grant: Grant, scopes: list[str]) -> str:
        now = int(time.time())
        practitioner = grant.context.practitioner
        claims: dict[str, Any] = {
            "iss": self.issuer(),
            "sub": practitioner.split("/")[-1] if practitioner else "anonymous",
            "aud": client_id,
            "iat": now,
            "exp": now + self.config.access_token_lifetime,
            "auth_time": grant.auth_time,
        }
        if practitioner and ("fhirUser" in scopes or "profile" in scopes):
            claims["fhirUser"] = f"{self.issuer().rstrip('/')}/{practitioner}"
        if grant.nonce:
            claims["nonce"] = grant.nonce
        header = {"alg": "RS256", "kid": self.signing_key.kid, "typ": "JWT"}
        return jwt.encode(header, claims, self.signing_key)

    def generate_token(
        self,
        grant_type: str,
        client: SandboxClientModel,
        user: Grant | None = None,
        scope: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        """authlib token generator: the Bearer token plus SMART's context fields."""
        import secrets

        scopes = split_scopes(scope)
        lifetime = expires_in or self.config.access_token_lifetime
        token: dict[str, Any] = {
            "token_type": "Bearer",
            "access_token": secrets.token_urlsafe(32),
            "expires_in": lifetime,
            "scope": " ".join(scopes),
        }
        wants_refresh = "offline_access" in scopes or "online_access" in scopes
        if include_refresh_token and wants_refresh:
            token["refresh_token"] = secrets.token_urlsafe(40)
        if user is not None:
            context = user.context
            if context.patient:
                token["patient"] = context.patient
            if context.encounter:
                token["encounter"] = context.encounter
            if context.fhir_context:
                token["fhirContext"] = [dict(item) for item in context.fhir_context]
            if context.patient:
                token["need_patient_banner"] = context.need_patient_banner
            if self.config.smart_style_url:
                token["smart_style_url"] = self.issuer().rsplit("/fhir", 1)[0] + "/smart-style.json"
            if "openid" in scopes:
                token["id_token"] = self.id_token(client.get_client_id(), user, scopes)
        return token


def build_authorization_server(
    app: Any,
    config: SandboxConfig,
    state: SandboxState,
    issuer: Callable[[], str],
    token_url: Callable[[], str],
) -> tuple[SmartAuthorizationServer, SandboxIssuer]:
    """Wire authlib to the sandbox's clients and state; returns the server and the id_token signer."""
    clients = {c.client_id: SandboxClientModel(c, v1_only=config.v1_only) for c in config.clients}
    signer = SandboxIssuer(config, state, issuer)

    def save_token(token: dict[str, Any], request: OAuth2Request) -> None:
        now = time.time()
        grant: Grant = request.user
        origin: str | None = None
        previous: TokenRecord | None = request.refresh_token
        if request.authorization_code is not None:
            origin = request.authorization_code.code
        elif previous is not None:
            origin = previous.origin_code
        refresh = token.get("refresh_token") or (previous.refresh_token if previous else None)
        state.add_token(
            TokenRecord(
                access_token=token["access_token"],
                refresh_token=refresh,
                client_id=request.client.get_client_id(),
                scope=token.get("scope", ""),
                grant=grant,
                issued_at=now,
                access_expires_at=now + int(token["expires_in"]),
                refresh_expires_at=previous.refresh_expires_at if previous else now + config.refresh_token_lifetime,
                origin_code=origin,
            )
        )

    class SmartAuthorizationCodeGrant(AuthorizationCodeGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS

        def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
            grant: Grant = request.user
            data = request.payload.data
            state.add_code(
                AuthorizationCodeRecord(
                    code=code,
                    client_id=request.client.get_client_id(),
                    redirect_uri=request.payload.redirect_uri,
                    scope=grant.scope,
                    grant=grant,
                    code_challenge=data.get("code_challenge"),
                    code_challenge_method=data.get("code_challenge_method"),
                    expires_at=time.time() + config.code_lifetime,
                )
            )

        def query_authorization_code(self, code: str, client: SandboxClientModel) -> AuthorizationCodeRecord | None:
            return state.redeem_code(code, client.get_client_id())

        def delete_authorization_code(self, authorization_code: AuthorizationCodeRecord) -> None:
            # Kept (marked used) so that a replay can be recognised and its tokens revoked.
            authorization_code.used = True

        def authenticate_user(self, authorization_code: AuthorizationCodeRecord) -> Grant:
            return authorization_code.grant

    class SmartRefreshTokenGrant(RefreshTokenGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS
        INCLUDE_NEW_REFRESH_TOKEN = False  # the refresh token stays valid until it expires or is revoked

        def authenticate_refresh_token(self, refresh_token: str) -> TokenRecord | None:
            return state.by_refresh_token(refresh_token)

        def authenticate_user(self, refresh_token: TokenRecord) -> Grant:
            return refresh_token.grant

        def revoke_old_credential(self, refresh_token: TokenRecord) -> None:
            return None

    app.config["OAUTH2_SCOPES_SUPPORTED"] = None  # scope policy lives in SandboxClientModel.get_allowed_scope
    server = SmartAuthorizationServer(app, query_client=clients.get, save_token=save_token)
    server.register_token_generator("default", signer.generate_token)
    server.register_grant(
        SmartAuthorizationCodeGrant, [S256OnlyCodeChallenge(required=True), SmartRequestChecks(issuer)]
    )
    server.register_grant(SmartRefreshTokenGrant)
    server.register_client_auth_method("private_key_jwt", PrivateKeyJwtAuth(state, token_url))
    return server, signer

"""Secrets at rest are sealed with AES-256-GCM under a key the deployment names (a file or an environment variable).

A SMART session holds the clinician's access and refresh tokens; a stolen copy of the state file (a backup, a
disk image, a second account on the host) must not hand them over. :class:`Keyring` seals each value with a
fresh 96-bit nonce and binds it to where it is stored (the ``context`` passed as GCM associated data, such as
the session row's key), so a sealed value copied into another row, or edited, fails to open instead of
being used.

Key rotation without logging anyone out: the keyring has one *current* key, which seals, and any number of
*previous* keys, which only open. Each sealed value names its key by a short id (a hash of the key, never the
key), so values sealed before a rotation still open, and a store re-seals a value with the current key the
next time it writes it. To rotate: make a new key, make it current and list the old one as previous; once
everything sealed under the old key has expired (sessions last one shift, pending launches minutes) or been
rewritten, drop it. See the README ("Secrets at rest").

A key is 32 random bytes, written base64-encoded: ``head -c 32 /dev/urandom | base64 > state.key; chmod 600
state.key``. A key file that other accounts may read is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.errors import ConfigurationError, ImagingCdsError

KEY_BYTES = 32
NONCE_BYTES = 12
FORMAT = "v1"
GENERATE_KEY = "head -c 32 /dev/urandom | base64 > /etc/imaging-cds/state.key && chmod 600 /etc/imaging-cds/state.key"


class SealedValueError(ImagingCdsError):
    """A sealed value cannot be opened: sealed under a key no longer configured, edited, or moved elsewhere."""

    http_status = 400


def key_id(key: bytes) -> str:
    """A short public name for ``key`` (the start of a domain-separated SHA-256): says which key sealed a value."""
    return hashlib.sha256(b"imaging-cds state key id\x00" + key).hexdigest()[:12]


def decode_key(text: str, *, source: str) -> bytes:
    """The 32 key bytes written base64 (standard or URL-safe alphabet) in ``text``."""
    cleaned = "".join(text.split())
    try:
        key = base64.b64decode(
            cleaned + "=" * (-len(cleaned) % 4), altchars=b"-_" if ("-" in cleaned or "_" in cleaned) else None
        )
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigurationError(
            f"{source} does not hold a 256-bit key written in base64.",
            remedy=f"Make one: {GENERATE_KEY}",
        )
    return key


@dataclass(frozen=True)
class KeySource:
    """Where one key is read from: a file (``file``) or an environment variable (``env``), never the settings."""

    file: Path | None = None
    env: str | None = None

    def __post_init__(self) -> None:
        if (self.file is None) == (self.env is None):
            raise ConfigurationError(
                "A state key must name exactly one of 'file' or 'env'.",
                remedy="Write, for example, state_key: {file: /etc/imaging-cds/state.key}.",
            )

    @classmethod
    def from_mapping(cls, raw: Any, *, where: str) -> KeySource:
        if not isinstance(raw, Mapping) or set(raw) - {"file", "env"}:
            raise ConfigurationError(
                f"{where} must be a mapping with 'file' or 'env'.",
                remedy="Write, for example, {file: /etc/imaging-cds/state.key} or {env: IMAGING_CDS_STATE_KEY}.",
            )
        file, env = raw.get("file"), raw.get("env")
        return cls(file=Path(str(file)) if file else None, env=str(env) if env else None)

    def read(self) -> bytes:
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise ConfigurationError(
                    f"The state key's environment variable {self.env} is not set.",
                    remedy=f"Export {self.env} with a base64 256-bit key (make one: head -c 32 /dev/urandom | base64).",
                )
            return decode_key(value, source=f"Environment variable {self.env}")
        assert self.file is not None
        try:
            mode = stat.S_IMODE(self.file.stat().st_mode)
            text = self.file.read_text()
        except OSError as exc:
            raise ConfigurationError(
                f"Cannot read the state key file {self.file}: {exc.strerror}.", remedy=f"Make one: {GENERATE_KEY}"
            ) from exc
        if mode & 0o077:
            raise ConfigurationError(
                f"The state key file {self.file} may be read by other accounts (mode {mode:04o}).",
                remedy=f"Restrict it to the service's account: chmod 600 {self.file}",
            )
        return decode_key(text, source=f"The state key file {self.file}")


class Keyring:
    """Seals values with the current key; opens values sealed with the current or any previous key."""

    def __init__(self, current: bytes, previous: Sequence[bytes] = ()) -> None:
        for key in (current, *previous):
            if len(key) != KEY_BYTES:
                raise ConfigurationError(f"A state key must be {KEY_BYTES} bytes, not {len(key)}.")
        self.current_id = key_id(current)
        self._ciphers = {key_id(key): AESGCM(key) for key in (*previous, current)}
        self._current = self._ciphers[self.current_id]

    def __repr__(self) -> str:
        return f"Keyring(current={self.current_id}, keys={len(self._ciphers)})"

    @classmethod
    def from_sources(cls, current: KeySource, previous: Sequence[KeySource] = ()) -> Keyring:
        return cls(current.read(), [source.read() for source in previous])

    @classmethod
    def ephemeral(cls) -> Keyring:
        """A keyring with a random key that lives as long as this process (tests, the demo, one-process tools).

        What it seals cannot be opened by another process or after a restart.
        """
        return cls(secrets.token_bytes(KEY_BYTES))

    def seal(self, plaintext: bytes, *, context: str) -> str:
        """``plaintext`` encrypted and authenticated under the current key, bound to ``context``, as ASCII."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._current.encrypt(nonce, plaintext, context.encode("utf-8"))
        body = base64.urlsafe_b64encode(nonce + sealed).decode("ascii").rstrip("=")
        return f"{FORMAT}.{self.current_id}.{body}"

    def open(self, token: str, *, context: str) -> bytes:
        """The plaintext of a value :meth:`seal` made with the same ``context``; :class:`SealedValueError` if it
        was sealed with a key this keyring does not hold, altered, or bound to another context."""
        version, _, rest = token.partition(".")
        kid, _, body = rest.partition(".")
        cipher = self._ciphers.get(kid)
        if version != FORMAT or cipher is None:
            raise SealedValueError(
                "A stored secret was sealed with a key this service no longer has.",
                remedy="Keep the old key listed under state_key.previous until what it sealed has expired.",
            )
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return cipher.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode("utf-8"))
        except (InvalidTag, binascii.Error, ValueError) as exc:
            raise SealedValueError(
                "A stored secret failed its integrity check (altered, or moved from where it was stored).",
                remedy="Sign in again; if it keeps happening, check who can write the service's state files.",
            ) from exc

    def sealed_with_current(self, token: str) -> bool:
        """Whether ``token`` is already sealed with the current key (else a writer should re-seal it)."""
        return token.startswith(f"{FORMAT}.{self.current_id}.")

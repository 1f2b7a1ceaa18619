"""The records of the token topic: what travels, and how it is sealed (docs/tokens.md).

Every record is AES-256-GCM encrypted with a key derived from the application secret (HKDF-SHA256),
its record key as the associated data: ``version (1 byte) | nonce (12 bytes) | ciphertext+tag``.
Token records carry a sequence number, so that a record written again (a replay) is recognised
as older than the token held (:func:`older`).

Record keys, all under ``<group id>/<app id>`` (one holder per group; groups never read each
other's records): the token itself (no suffix), and the notices below.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service import logs

RECORD_VERSION: Final = 1
HKDF_SALT: Final = b"device-rebind/shared-token/v1"
HKDF_INFO: Final = b"AES-256-GCM key of the token topic"
NONCE_BYTES: Final = 12
"""A random 96-bit nonce per record (AES-GCM's standard nonce size)."""

REFUSED_SUFFIX: Final = "/refused"
"""A follower's call was answered 1010005 (a token fingerprint, never the token)."""
NEED_SUFFIX: Final = "/need"
"""A follower has no usable token."""
BLOCKED_SUFFIX: Final = "/blocked"
"""The holder's login is refused for good (wrong or rotated secret)."""
ROTATING_SUFFIX: Final = "/rotating"
"""The holder is about to replace the token: hold new calls until the next token record."""
DRAINING_SUFFIX: Final = "/draining"
"""A replica still has calls in flight on the old token (``done`` once they are answered)."""
SUFFIXES: Final = (REFUSED_SUFFIX, NEED_SUFFIX, BLOCKED_SUFFIX, ROTATING_SUFFIX, DRAINING_SUFFIX)


def fingerprint(token: str) -> str:
    """A short, non-reversible name of a token (for refused notices; never logged with it)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class SharedToken:
    """What the holder publishes. Times are epoch seconds (they travel between hosts)."""

    access: str
    refresh: str | None
    issued_at: float
    expires_at: float
    renew_at: float
    holder: str
    sequence: int | None = None
    """One more than the highest sequence the publisher had seen (None: a record of a version
    without sequences). Records are ordered by (sequence, issued_at): see :func:`older`."""

    def __repr__(self) -> str:  # never print the token
        return (
            f"SharedToken(holder={self.holder!r}, sequence={self.sequence}, "
            f"expires_at={self.expires_at:.0f})"
        )

    def __post_init__(self) -> None:
        # A token read from the topic is masked in the logs like one obtained here.
        logs.register_secret(self.access)
        logs.register_secret(self.refresh)


def older(record: SharedToken, held: SharedToken) -> bool:
    """``record`` was published before ``held``: a lower sequence, or the same sequence and an
    earlier issue time (two publishers that had seen the same records: the later token is the
    one the platform knows). Without sequences (a record of an earlier version) the issue times
    decide. A record equal to ``held`` is not older (the same record read twice)."""
    if record.sequence is not None and held.sequence is not None:
        return (record.sequence, record.issued_at) < (held.sequence, held.issued_at)
    return record.issued_at < held.issued_at


class InvalidRecordError(Exception):
    """A token-topic record that cannot be used (wrong key, corrupt, other version)."""


class TokenCodec:
    """AES-GCM with a key derived from the app secret (HKDF-SHA256); the record key is the AAD.

    Layout: ``version (1 byte) | nonce (12 bytes) | ciphertext+tag``. Whoever can read the topic but
    lacks the secret learns nothing; whoever has the secret could log in anyway.
    """

    def __init__(self, app_id: str, secret: str) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=HKDF_SALT,
            info=HKDF_INFO + b"|" + app_id.encode(),
        ).derive(secret.encode())
        self._aead = AESGCM(key)

    def encrypt(self, payload: dict[str, Any], aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        plain = json.dumps(payload, separators=(",", ":")).encode()
        return bytes([RECORD_VERSION]) + nonce + self._aead.encrypt(nonce, plain, aad)

    def decrypt(self, value: bytes | None, aad: bytes) -> dict[str, Any]:
        if not value or len(value) < 1 + NONCE_BYTES + 16:
            raise InvalidRecordError("too short")
        if value[0] != RECORD_VERSION:
            raise InvalidRecordError(f"unknown version {value[0]}")
        nonce, sealed = value[1 : 1 + NONCE_BYTES], value[1 + NONCE_BYTES :]
        try:
            plain = self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise InvalidRecordError("authentication failed (another secret?)") from None
        try:
            payload = json.loads(plain)
        except ValueError:
            raise InvalidRecordError("not JSON") from None
        if not isinstance(payload, dict):
            raise InvalidRecordError("not an object")
        return payload

    def decrypts(self, value: bytes | None, aad: bytes) -> bool:
        try:
            self.decrypt(value, aad)
        except InvalidRecordError:
            return False
        return True

    def encode_token(self, token: SharedToken, aad: bytes) -> bytes:
        return self.encrypt(
            {
                "accessToken": token.access,
                "refreshToken": token.refresh,
                "issuedAt": token.issued_at,
                "expiresAt": token.expires_at,
                "renewAt": token.renew_at,
                "holder": token.holder,
                "seq": token.sequence,
            },
            aad,
        )

    def decode_token(self, value: bytes | None, aad: bytes) -> SharedToken:
        p = self.decrypt(value, aad)
        access, refresh, holder = p.get("accessToken"), p.get("refreshToken"), p.get("holder")
        times = [p.get("issuedAt"), p.get("expiresAt"), p.get("renewAt")]
        if not isinstance(access, str) or not access or not isinstance(holder, str):
            raise InvalidRecordError("fields missing")
        if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in times):
            raise InvalidRecordError("times missing")
        issued, expires, renew = (float(t) for t in times)  # type: ignore[arg-type]
        seq = p.get("seq")
        return SharedToken(
            access=access,
            refresh=refresh if isinstance(refresh, str) and refresh else None,
            issued_at=issued,
            expires_at=expires,
            renew_at=min(renew, expires),
            holder=holder,
            sequence=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        )


class RecordSeal:
    """The record keys of one group and application, sealed under the secret as it is now.

    The AES key derives from the secret, which may change (a rotated, mounted file): the codec
    is rebuilt whenever the secret read differs, and a record that does not open is tried once
    more with the secret read again.
    """

    def __init__(self, app_id: str, scope: str, secret: Callable[[], str]) -> None:
        self._app_id = app_id
        self._secret = secret
        self.token, self.refused, self.need, self.blocked, self.rotating, self.draining = (
            (scope + suffix).encode() for suffix in ("", *SUFFIXES)
        )
        self._codec_secret = secret()
        self._codec = TokenCodec(app_id, self._codec_secret)

    def codec(self) -> TokenCodec:
        """The codec of the secret as it is now (read again from its file, if it has one)."""
        secret = self._secret()
        if secret != self._codec_secret:
            self._codec = TokenCodec(self._app_id, secret)
            self._codec_secret = secret
        return self._codec

    def open(self, value: bytes | None, key: bytes) -> dict[str, Any]:
        try:
            return self._codec.decrypt(value, key)
        except InvalidRecordError:
            codec = self._codec
            if self.codec() is codec:
                raise
            return self._codec.decrypt(value, key)  # the secret changed: its new key

    def open_token(self, value: bytes | None) -> SharedToken:
        self.open(value, self.token)
        return self._codec.decode_token(value, self.token)

    def opens(self, value: bytes | None, key: bytes) -> bool:
        return self.codec().decrypts(value, key)

    def seal(self, key: bytes, payload: dict[str, Any]) -> bytes:
        return self.codec().encrypt(payload, key)

    def seal_token(self, token: SharedToken) -> bytes:
        return self.codec().encode_token(token, self.token)

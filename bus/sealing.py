"""Authenticated encryption of records at rest: AES-256-GCM with a self-describing header.

Record format (docs/security.md)::

    version (1) | key id (8) | nonce (12) | ciphertext + tag (len(plaintext) + 16)

The header (version + key id) and the caller's associated data (the record's place: ``seq + topic`` for
the log, the LMDB key, ``table + rowid + column`` for libSQL) are authenticated, so a record moved to
another place, a changed byte, a wrong key or a wrong aad all raise IntegrityError; wrong data is never
returned. Nonces are random 96-bit: safe for 2**32 records per derived key (NIST SP 800-38D), and every
purpose and every generation has its own key. The event log seals its records in blocks (bus/log.py):
one nonce per block of up to 64 records.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag

from bus.keys import (
    KEY_ID_LEN,
    LOG_LABEL,
    NONCE_LEN,
    DerivedKey,
    KeyRing,
    check_encryption_setting,
    keyring_for,
    store_label,
    subkey,
)
from contracts.errors import IntegrityError

VERSION = 1
TAG_LEN = 16
_VERSION_BYTE = bytes([VERSION])
_HEADER_LEN = 1 + KEY_ID_LEN
OVERHEAD = _HEADER_LEN + NONCE_LEN + TAG_LEN


def seal(key: DerivedKey, plaintext: bytes, aad: bytes) -> bytes:
    header = _VERSION_BYTE + key.key_id
    nonce = os.urandom(NONCE_LEN)
    return header + nonce + key.aead.encrypt(nonce, plaintext, header + aad)


def open_sealed(keyring: KeyRing, blob: bytes | memoryview, aad: bytes) -> bytes:
    """The plaintext of ``blob``, or IntegrityError naming the check that failed (``check`` field)."""
    if len(blob) < OVERHEAD:
        raise IntegrityError(
            f"sealed record too short: {len(blob)} < {OVERHEAD} bytes", check="length", length=len(blob)
        )
    if blob[0] != VERSION:
        raise IntegrityError(f"sealed record has unknown version {blob[0]}", check="version", version=blob[0])
    header = bytes(blob[:_HEADER_LEN])
    key_id = header[1:]
    key = keyring.get(key_id)
    if key is None:
        raise IntegrityError(
            f"sealed record names key {key_id.hex()}, not in the {keyring.label!r} keyring",
            check="key_id",
            key_id=key_id.hex(),
            label=keyring.label,
        )
    nonce = blob[_HEADER_LEN : _HEADER_LEN + NONCE_LEN]
    try:
        return key.aead.decrypt(nonce, blob[_HEADER_LEN + NONCE_LEN :], header + aad)
    except InvalidTag:
        raise IntegrityError(
            "sealed record failed authentication: altered bytes or wrong associated data",
            check="tag",
            key_id=key_id.hex(),
            label=keyring.label,
        ) from None


class KeyRingCipher:
    """bus/log.py's ``RecordCipher`` over a keyring: the log's 16-bit key id is the key generation (>= 1)."""

    def __init__(self, keyring: KeyRing) -> None:
        self.keyring = keyring
        self.key_id = keyring.current.generation

    def seal(self, body: bytes, aad: bytes) -> bytes:
        return seal(self.keyring.current, body, aad)

    def open(self, key_id: int, blob: bytes | memoryview, aad: bytes) -> bytes:
        body = open_sealed(self.keyring, blob, aad)
        generation = self.keyring[bytes(blob[1:_HEADER_LEN])].generation
        if generation != key_id:
            raise IntegrityError(
                f"record header says key generation {key_id}, the sealed body {generation}",
                check="generation",
                key_id=key_id,
            )
        return body


def log_cipher(home: Path, enabled: bool) -> KeyRingCipher | None:
    """The event log's cipher (None when the home's ``encryption`` setting is off)."""
    check_encryption_setting(home, enabled)
    return KeyRingCipher(keyring_for(home, LOG_LABEL)) if enabled else None


def store_keyring(home: Path, worker: str, enabled: bool) -> KeyRing | None:
    """A store worker's keyring (None when the home's ``encryption`` setting is off)."""
    check_encryption_setting(home, enabled)
    return keyring_for(home, store_label(worker)) if enabled else None


class Blinder:
    """Keyed hashes (keyed BLAKE2b, 16 bytes) of ids and tokens that a store must find by equality but not reveal.

    Derived from the keyring's current generation: a rotation changes every blinded value, so a store
    that blinds is rebuilt (``membus keys rotate``). Without a keyring the value passes through.
    """

    def __init__(self, keyring: KeyRing | None, purpose: str, size: int = 16) -> None:
        self._key = None if keyring is None else subkey(keyring.current, purpose)
        self.size = size

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def blind(self, value: bytes) -> bytes:
        if self._key is None:
            return value
        # keyed BLAKE2b is a MAC by design (RFC 7693) and 3x faster here than HMAC-SHA256
        return hashlib.blake2b(value, key=self._key, digest_size=self.size).digest()

    def blind_text(self, value: str) -> str:
        """Hex of the keyed hash of ``value`` (the text itself without a keyring)."""
        return value if self._key is None else self.blind(value.encode()).hex()

"""Client-side encryption of DR objects: AES-256-GCM in frames, so a large backup streams through memory.

Layout: `MDR1` | key id (8 bytes) | nonce prefix (8 bytes) | frames. A frame is at most FRAME plaintext
bytes, sealed with nonce = prefix + frame counter (4 bytes) and associated data = object key, counter
and a last-frame flag. A frame therefore cannot be moved to another object, reordered, dropped or
followed by the stream being cut short: the last frame must say it is last.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"MDR1"
FRAME = 1 << 20
_TAG = 16
_HEADER = len(MAGIC) + 8 + 8


class DecryptError(ValueError):
    """The ciphertext is not ours, was made with another key, or was altered."""


@dataclass(frozen=True)
class DataKey:
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != 32:
            raise ValueError("a DR data key is 32 bytes (AES-256)")

    @property
    def key_id(self) -> bytes:
        """Names the key without revealing it (the first 8 bytes of its sha256)."""
        return hashlib.sha256(b"membria-dr-key-id" + self.key).digest()[:8]

    @classmethod
    def generate(cls) -> DataKey:
        return cls(os.urandom(32))


def _aad(object_key: str, counter: int, last: bool) -> bytes:
    return object_key.encode() + struct.pack(">I?", counter, last)


def encrypt_stream(key: DataKey, object_key: str, src: BinaryIO, dst: BinaryIO) -> None:
    aead = AESGCM(key.key)
    prefix = os.urandom(8)
    dst.write(MAGIC + key.key_id + prefix)
    counter = 0
    current = src.read(FRAME)
    while True:
        following = src.read(FRAME) if len(current) == FRAME else b""
        last = not following
        nonce = prefix + struct.pack(">I", counter)
        dst.write(aead.encrypt(nonce, current, _aad(object_key, counter, last)))
        if last:
            return
        counter += 1
        current = following


def decrypt_stream(key: DataKey, object_key: str, src: BinaryIO) -> Iterator[bytes]:
    """Yield plaintext frames; raises DecryptError on any mismatch, including a truncated stream."""
    header = src.read(_HEADER)
    if len(header) < _HEADER or not header.startswith(MAGIC):
        raise DecryptError("not a Membria DR object (bad header)")
    if header[4:12] != key.key_id:
        raise DecryptError("encrypted with another data key than the one in Vault")
    prefix = header[12:20]
    aead = AESGCM(key.key)
    counter = 0
    current = src.read(FRAME + _TAG)
    while True:
        following = src.read(FRAME + _TAG) if len(current) == FRAME + _TAG else b""
        last = not following
        nonce = prefix + struct.pack(">I", counter)
        try:
            yield aead.decrypt(nonce, current, _aad(object_key, counter, last))
        except InvalidTag:
            raise DecryptError(f"frame {counter} fails authentication (altered, truncated or misplaced)") from None
        if last:
            return
        counter += 1
        current = following

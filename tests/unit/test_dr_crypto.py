"""Client-side encryption of DR objects: round trips, and every way a stream can be tampered with fails."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.dr import crypto
from appliance.dr.crypto import FRAME, DataKey, DecryptError, decrypt_stream, encrypt_stream

pytestmark = pytest.mark.unit


def seal(key: DataKey, name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    encrypt_stream(key, name, io.BytesIO(data), out)
    return out.getvalue()


def unseal(key: DataKey, name: str, blob: bytes) -> bytes:
    return b"".join(decrypt_stream(key, name, io.BytesIO(blob)))


@pytest.mark.parametrize("size", [0, 1, FRAME - 1, FRAME, FRAME + 1, 3 * FRAME + 17])
def test_round_trip_at_frame_boundaries(size: int) -> None:
    key = DataKey.generate()
    data = os.urandom(size)
    blob = seal(key, "site/backups/x", data)
    # A few random bytes can occur in any ciphertext by chance; 16 cannot (2^-128 per offset).
    if size >= 16:
        assert data[:16] not in blob
    assert unseal(key, "site/backups/x", blob) == data


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=4096))
def test_round_trip_any_bytes(data: bytes) -> None:
    key = DataKey(b"k" * 32)
    assert unseal(key, "a", seal(key, "a", data)) == data


def test_two_encryptions_differ() -> None:
    key = DataKey.generate()
    assert seal(key, "a", b"same") != seal(key, "a", b"same")


def test_wrong_key_is_named() -> None:
    blob = seal(DataKey.generate(), "a", b"data")
    with pytest.raises(DecryptError, match="another data key"):
        unseal(DataKey.generate(), "a", blob)


def test_object_moved_to_another_key_fails() -> None:
    key = DataKey.generate()
    blob = seal(key, "ship/audit_db/1.bin", b"rows")
    with pytest.raises(DecryptError, match="frame 0"):
        unseal(key, "ship/audit_db/2.bin", blob)


def test_flipped_bit_fails() -> None:
    key = DataKey.generate()
    blob = bytearray(seal(key, "a", b"x" * 1000))
    blob[40] ^= 1
    with pytest.raises(DecryptError):
        unseal(key, "a", bytes(blob))


def test_truncated_after_a_whole_frame_fails() -> None:
    # Cutting the stream at a frame boundary leaves a frame that was not sealed as the last one.
    key = DataKey.generate()
    blob = seal(key, "a", os.urandom(2 * FRAME + 5))
    header = len(crypto.MAGIC) + 16
    cut = blob[: header + 2 * (FRAME + 16)]
    with pytest.raises(DecryptError, match="frame 1"):
        unseal(key, "a", cut)


def test_reordered_frames_fail() -> None:
    key = DataKey.generate()
    blob = seal(key, "a", os.urandom(2 * FRAME + 5))
    header = len(crypto.MAGIC) + 16
    f0 = blob[header : header + FRAME + 16]
    f1 = blob[header + FRAME + 16 : header + 2 * (FRAME + 16)]
    swapped = blob[:header] + f1 + f0 + blob[header + 2 * (FRAME + 16) :]
    with pytest.raises(DecryptError, match="frame 0"):
        unseal(key, "a", swapped)


def test_not_our_format() -> None:
    with pytest.raises(DecryptError, match="bad header"):
        unseal(DataKey.generate(), "a", b"PK\x03\x04 a zip file")


def test_key_must_be_256_bits_and_is_not_printed() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        DataKey(b"short")
    key = DataKey(b"s" * 32)
    assert "sss" not in repr(key)

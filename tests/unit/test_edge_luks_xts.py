"""SectorCipher on the IEEE P1619 XTS-AES known answers, dm-crypt's large-sector tweaks, and the LUKS2 header model."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from edge_image.errors import ImageBadInput, ImageCheckFailed
from edge_image.luks import LuksHeader, SectorCipher

pytestmark = pytest.mark.unit

# IEEE P1619/D16 (2007) Annex B known answers, data unit 512 bytes, as in the Linux kernel's crypto/testmgr.h
# (aes_xts_tv_template "XTS-AES 4" and "XTS-AES 10") and the standard's vector 5 (vector 4's ciphertext
# re-encrypted as data unit 1). Plaintext of 4 and 10: bytes 00..ff twice.
PATTERN = bytes(range(256)) * 2
KEY_128 = bytes.fromhex("2718281828459045235360287471352631415926535897932384626433832795")
KEY_256 = bytes.fromhex(
    "2718281828459045235360287471352662497757247093699959574966967627"
    "3141592653589793238462643383279502884197169399375105820974944592"
)
VECTOR_4 = bytes.fromhex(  # XTS-AES-128, data unit 0
    "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c"
    "c78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412"
    "328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce"
    "93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad0265"
    "5ea92dc4c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8"
    "a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434"
    "1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c"
    "5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e"
    "94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc"
    "1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3"
    "e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344"
    "b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd"
    "74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752"
    "afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539edb609ef4f79c203e"
    "bb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d"
    "eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568"
)
VECTOR_5 = bytes.fromhex(  # XTS-AES-128, data unit 1, plaintext = VECTOR_4
    "264d3ca8512194fec312c8c9891f279fefdd608d0c027b60483a3fa811d65ee5"
    "9d52d9e40ec5672d81532b38b6b089ce951f0f9c35590b8b978d175213f329bb"
    "1c2fd30f2f7f30492a61a532a79f51d36f5e31a7c9a12c286082ff7d2394d18f"
    "783e1a8e72c722caaaa52d8f065657d2631fd25bfd8e5baad6e527d763517501"
    "c68c5edc3cdd55435c532d7125c8614deed9adaa3acade5888b87bef641c4c99"
    "4c8091b5bcd387f3963fb5bc37aa922fbfe3df4e5b915e6eb514717bdd2a7407"
    "9a5073f5c4bfd46adf7d282e7a393a52579d11a028da4d9cd9c77124f9648ee3"
    "83b1ac763930e7162a8d37f350b2f74b8472cf09902063c6b32e8c2d9290cefb"
    "d7346d1c779a0df50edcde4531da07b099c638e83a755944df2aef1aa31752fd"
    "323dcb710fb4bfbb9d22b925bc3577e1b8949e729a90bbafeacf7f7879e7b114"
    "7e28ba0bae940db795a61b15ecf4df8db07b824bb062802cc98a9545bb2aaeed"
    "77cb3fc6db15dcd7d80d7d5bc406c4970a3478ada8899b329198eb61c193fb62"
    "75aa8ca340344a75a862aebe92eee1ce032fd950b47d7704a3876923b4ad6284"
    "4bf4a09c4dbe8b4397184b7471360c9564880aedddb9baa4af2e75394b08cd32"
    "ff479c57a07d3eab5d54de5f9738b8d27f27a9f0ab11799d7b7ffefb2704c95c"
    "6ad12c39f1e867a4b7b1d7818a4b753dfd2a89ccb45e001a03a867b187f225dd"
)
VECTOR_10 = bytes.fromhex(  # XTS-AES-256, data unit 0xff
    "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b"
    "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd"
    "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0"
    "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca"
    "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0"
    "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f"
    "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec"
    "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a"
    "84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1"
    "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae"
    "9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29"
    "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac"
    "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f"
    "645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385"
    "1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa"
    "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151"
)


def test_ieee_1619_vector_10_aes_256() -> None:
    cipher = SectorCipher(KEY_256, 512)
    assert cipher.encrypt(PATTERN, 0xFF) == VECTOR_10
    assert cipher.decrypt(VECTOR_10, 0xFF) == PATTERN


def test_ieee_1619_vectors_4_and_5_as_two_sectors_in_one_call() -> None:
    cipher = SectorCipher(KEY_128, 512)
    assert cipher.encrypt(PATTERN + VECTOR_4, 0) == VECTOR_4 + VECTOR_5
    assert cipher.decrypt(VECTOR_4 + VECTOR_5, 0) == PATTERN + VECTOR_4


def test_iv_offset_adds_to_the_sector_number() -> None:
    assert SectorCipher(KEY_256, 512, iv_offset=0xF0).encrypt(PATTERN, 0xF) == VECTOR_10


def test_large_sectors_count_the_iv_in_512_byte_units() -> None:
    # dm-crypt without iv_large_sectors (LUKS2): 4096-byte sector n has tweak n * 8. XTS blocks depend only on the
    # tweak and their index, so a 4096-byte sector starts with the 512-byte unit of the same tweak.
    cipher = SectorCipher(KEY_256, 4096, iv_offset=0xFF - 8 * 31)
    sector = cipher.encrypt(PATTERN + bytes(3584), 31)
    assert sector[:512] == VECTOR_10
    assert cipher.decrypt(sector, 31)[:512] == PATTERN
    assert SectorCipher(KEY_128, 4096).encrypt(PATTERN + bytes(3584), 0)[:512] == VECTOR_4


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_round_trip_and_every_sector_differs(sector_size: int) -> None:
    key = os.urandom(64)
    cipher = SectorCipher(key, sector_size)
    data = os.urandom(sector_size) * 4  # four equal plaintext sectors
    sealed = cipher.encrypt(data, 1000)
    assert cipher.decrypt(sealed, 1000) == data
    assert len({sealed[i : i + sector_size] for i in range(0, len(sealed), sector_size)}) == 4
    assert cipher.encrypt(data[:sector_size], 1001) == sealed[sector_size : 2 * sector_size]
    assert cipher.decrypt(sealed, 1001) != data
    assert SectorCipher(os.urandom(64), sector_size).decrypt(sealed, 1000) != data


@pytest.mark.parametrize("length", [16, 31, 48, 65])
def test_wrong_key_length_refused(length: int) -> None:
    with pytest.raises(ImageBadInput, match="32 or 64 bytes"):
        SectorCipher(os.urandom(length), 4096)


def test_equal_key_halves_and_odd_sectors_refused() -> None:
    half = os.urandom(32)
    with pytest.raises(ImageBadInput, match="halves"):
        SectorCipher(half + half, 4096)
    with pytest.raises(ImageBadInput):
        SectorCipher(os.urandom(64), 1000)
    with pytest.raises(ValueError, match="whole 4096-byte sectors"):
        SectorCipher(os.urandom(64), 4096).encrypt(bytes(4097), 0)


# `cryptsetup luksDump --dump-json-metadata` of a first-booted image (cryptsetup 2.6.1): integers as strings, the
# segment's "dynamic" size, and a systemd-tpm2 token with its own fields.
DUMP: dict[str, Any] = json.loads("""
{
  "keyslots": {
    "0": {"type": "luks2", "key_size": 64, "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
          "area": {"type": "raw", "offset": "32768", "size": "258048", "encryption": "aes-xts-plain64",
                   "key_size": 64},
          "kdf": {"type": "argon2id", "time": 4, "memory": 65536, "cpus": 1, "salt": "c2FsdA=="}},
    "1": {"type": "luks2", "key_size": 64, "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
          "area": {"type": "raw", "offset": "290816", "size": "258048", "encryption": "aes-xts-plain64",
                   "key_size": 64},
          "kdf": {"type": "pbkdf2", "hash": "sha512", "iterations": 1000, "salt": "c2FsdA=="}}
  },
  "tokens": {
    "0": {"type": "systemd-tpm2", "keyslots": ["1"], "tpm2-blob": "AJ4AIA==", "tpm2-pcrs": [7],
          "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc", "tpm2-policy-hash": "00ff", "tpm2-pin": false}
  },
  "segments": {
    "0": {"type": "crypt", "offset": "16777216", "size": "dynamic", "iv_tweak": "0",
          "encryption": "aes-xts-plain64", "sector_size": 4096, "flags": ["discard"]}
  },
  "digests": {
    "0": {"type": "pbkdf2", "keyslots": ["0", "1"], "segments": ["0"], "hash": "sha256", "iterations": 1000,
          "salt": "c2FsdA==", "digest": "ZGlnZXN0"}
  },
  "config": {"json_size": "12288", "keyslots_size": "16744448"}
}
""")


def header(**changes: Any) -> LuksHeader:
    binary = {"uuid": "d1f82e24-0bb2-4fea-9f8d-6d2fee944584", "label": "membria-root"}
    return LuksHeader.model_validate({**DUMP, **binary, **changes})


def test_header_parses_a_dump() -> None:
    parsed = header()
    assert parsed.data_offset == 16 * 1024 * 1024
    segment = parsed.segment
    assert (segment.size, segment.iv_tweak, segment.sector_size, segment.flags) == ("dynamic", 0, 4096, ["discard"])
    slot = parsed.keyslots["0"]
    assert (slot.key_size, slot.kdf.type, slot.kdf.time, slot.kdf.memory, slot.kdf.cpus) == (
        64,
        "argon2id",
        4,
        65536,
        1,
    )
    assert (slot.area.offset, slot.area.size) == (32768, 258048)
    assert parsed.keyslots["1"].kdf.iterations == 1000
    token = parsed.tokens["0"]
    assert (token.type, token.keyslots) == ("systemd-tpm2", ["1"])
    assert token.model_extra is not None and token.model_extra["tpm2-pcrs"] == [7]
    assert parsed.digests["0"].keyslots == ["0", "1"]
    assert (parsed.config.json_size, parsed.config.keyslots_size) == (12288, 16744448)
    assert not parsed.reencrypting


def test_header_fixed_size_segment() -> None:
    segments = {"0": {**DUMP["segments"]["0"], "size": "1048576"}}
    assert header(segments=segments).segment.size == 1048576


def test_header_reencryption_is_seen() -> None:
    config = {**DUMP["config"], "requirements": {"mandatory": ["online-reencrypt-v2"]}}
    assert header(config=config).reencrypting
    slot = {"type": "reencrypt", "key_size": 1, "mode": "encrypt", "direction": "forward",
            "area": {"type": "datashift", "offset": "548864", "size": "8192", "shift_size": "33554432"}}  # fmt: skip
    reencrypt = header(keyslots={**DUMP["keyslots"], "2": slot})
    assert reencrypt.reencrypting
    assert reencrypt.keyslots["2"].kdf.type == "none"


def test_header_with_two_segments_has_no_single_segment() -> None:
    linear = {"type": "linear", "offset": "0", "size": "4096"}
    with pytest.raises(ImageCheckFailed, match="exactly one crypt segment"):
        _ = header(segments={**DUMP["segments"], "1": linear}).segment

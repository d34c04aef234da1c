"""Encryption at rest, byte for byte (SPEC §8; fact sheet encryption §A2, §A3).

Expectations are built by an independent reference implementation of the two
formats written here from the fact sheet's description, with nothing but
C{cryptography}'s AESGCM:

* single-shot C{aes-256-gcm-v1}: C{IV(12) || ciphertext || tag(16)}, no AAD;
* chunked C{aes-256-gcm-chunked-v1} ("DGE1"): C{"DGE1" || base_iv(12)}, then
  per 64 KiB chunk C{u32le(len) || ciphertext || tag}; chunk i's nonce is the
  base IV with bytes [8..12) XOR-ed with C{i} big-endian; its AAD is
  C{"DGE1" || u32le(i) || final(u8) || 7 zero bytes}; only the last frame is
  final (the decoder knows which from the plaintext size in the metadata).

The server's encoder must produce exactly what the reference produces for
the same IV, the server's decoder must read what the reference writes, and
every kind of tampering must end in L{EncryptionError} with nothing but a
prefix of the true plaintext released before it. Then: key ids, the key
ring's choice of key and its error texts (the seed's wording), and the
L{EncryptingBackend} over a real L{FilesystemBackend} (markers, no plaintext
on disk, ranges reading only the chunks they need, stripped xattrs).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from types import SimpleNamespace
from typing import Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, example, given, settings, strategies as st
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tests.unit.helpers import inline, meta_for
from dgproxy.storage.encrypting import (
    ChunkDecryptor, ChunkEncryptor, EncryptingBackend, EncryptionError, KeyRing, blob_size,
    decrypt_single, derive_key_id)
from dgproxy.storage.filesystem import FilesystemBackend
from dgproxy.storage.metadata import DELTA, REFERENCE, XATTR_NAME, ObjectMetadata

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KEY_A = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
KEY_B = bytes.fromhex("ff" * 16 + "ee" * 16)
# An IV whose last four bytes are all ones: XOR with i differs from addition.
IV = bytes.fromhex("a1a2a3a4a5a6a7a8ffffffff")
CHUNK = 65536
SIZES = (0, 1, 65535, 65536, 65537, 3 * 65536 + 5)

NO_KEY = "object is encrypted but no key is configured"
STRIPPED = "xattrs may have been stripped"


def plaintext(n: int, seed: int = 0) -> bytes:
    """n bytes that differ chunk to chunk (so a swapped chunk is visible)."""
    out = bytearray()
    block = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (seed, block)).digest()
        block += 1
    return bytes(out[:n])


# -- the reference implementation (from the fact sheet, not from the server) ----------------
def ref_nonce(base_iv: bytes, i: int) -> bytes:
    tail = int.from_bytes(base_iv[8:12], "big") ^ i
    return base_iv[:8] + tail.to_bytes(4, "big")


def ref_aad(i: int, final: bool) -> bytes:
    aad = b"DGE1" + i.to_bytes(4, "little") + (b"\x01" if final else b"\x00") + b"\x00" * 7
    assert len(aad) == 16
    return aad


def ref_chunks(data: bytes) -> list[bytes]:
    if not data:
        return [b""]
    return [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]


def ref_frames(key: bytes, base_iv: bytes, data: bytes, finals=None) -> list[bytes]:
    """The frames of C{data}; C{finals} overrides the final flag per chunk."""
    chunks = ref_chunks(data)
    aead = AESGCM(key)
    frames = []
    for i, chunk in enumerate(chunks):
        final = (i == len(chunks) - 1) if finals is None else finals[i]
        ct = aead.encrypt(ref_nonce(base_iv, i), chunk, ref_aad(i, final))
        frames.append(struct.pack("<I", len(ct)) + ct)
    return frames


def ref_encrypt(key: bytes, data: bytes, base_iv: bytes = IV) -> bytes:
    return b"DGE1" + base_iv + b"".join(ref_frames(key, base_iv, data))


def ref_decrypt(key: bytes, blob: bytes, size: int) -> bytes:
    """Strict reference decoder; raises ValueError on anything irregular."""
    if blob[:4] != b"DGE1" or len(blob) < 16:
        raise ValueError("bad header")
    base_iv = blob[4:16]
    final = max(0, (size - 1) // CHUNK)
    pos, out, i = 16, [], 0
    aead = AESGCM(key)
    while i <= final:
        if pos + 4 > len(blob):
            raise ValueError("truncated")
        (n,) = struct.unpack("<I", blob[pos:pos + 4])
        ct = blob[pos + 4:pos + 4 + n]
        if len(ct) != n:
            raise ValueError("truncated frame")
        try:
            chunk = aead.decrypt(ref_nonce(base_iv, i), ct, ref_aad(i, i == final))
        except InvalidTag:
            raise ValueError(f"chunk {i} fails") from None
        if i < final and len(chunk) != CHUNK:
            raise ValueError(f"non-final chunk {i} holds {len(chunk)} bytes")
        out.append(chunk)
        pos += 4 + n
        i += 1
    if pos != len(blob):
        raise ValueError("trailing bytes")
    return b"".join(out)


def ref_single(key: bytes, data: bytes, iv: bytes = IV[:12]) -> bytes:
    return iv + AESGCM(key).encrypt(iv, data, None)


def ref_wire_size(p: int) -> int:
    if p == 0:
        return 36
    return 16 + p + 20 * (-(-p // CHUNK))


def ref_key_id(name: str, key: bytes) -> str:
    return hashlib.sha256(name.encode("utf-8") + b"\x00" + key).digest()[:8].hex()


# -- driving the server's framing -----------------------------------------------------------
def split(data: bytes, step) -> list[bytes]:
    """C{data} cut into pieces: a fixed step, or a list of piece sizes (cycled)."""
    if isinstance(step, int):
        return [data[i:i + step] for i in range(0, len(data), step)] or [b""]
    pieces, pos, k = [], 0, 0
    while pos < len(data):
        n = max(1, step[k % len(step)])
        pieces.append(data[pos:pos + n])
        pos += n
        k += 1
    return pieces or [b""]


def server_decrypt(key: bytes, blob: bytes, size: int, step=65536, first: int = 0,
                   base_iv: Optional[bytes] = None) -> bytes:
    dec = ChunkDecryptor(key, size, first=first, base_iv=base_iv)
    out = [dec.update(piece) for piece in split(blob, step)]
    dec.finish()
    return b"".join(out)


def server_decrypt_partial(key: bytes, blob: bytes, size: int, step=4096):
    """(plaintext released, the error) — the error is None when it all decrypted."""
    dec = ChunkDecryptor(key, size)
    out = []
    try:
        for piece in split(blob, step):
            out.append(dec.update(piece))
        dec.finish()
    except EncryptionError as e:
        return b"".join(out), e
    return b"".join(out), None


def server_encrypt(key: bytes, data: bytes, step=65536, base_iv: Optional[bytes] = None) -> bytes:
    enc = ChunkEncryptor(key, base_iv=base_iv)
    out = [enc.update(piece) for piece in split(data, step) if piece]
    out.append(enc.finish())
    return b"".join(out)


class CapturedLog:
    """Events logged while the block runs."""

    def __enter__(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self.events.append)

    def text(self) -> str:
        from twisted.logger import formatEvent
        return "\n".join(formatEvent(e) for e in self.events)


# -- format vectors ---------------------------------------------------------------------------
class ChunkedFormatTests(unittest.TestCase):

    def test_reference_blobs_decrypt_on_the_server(self):
        for size in SIZES:
            data = plaintext(size, seed=size)
            blob = ref_encrypt(KEY_A, data)
            self.assertEqual(len(blob), ref_wire_size(size), size)
            for step in (1 if size < 70000 else 4099, 16, 65556, 10**7):
                if step == 1 and size > 2000:
                    continue
                got = server_decrypt(KEY_A, blob, size, step)
                self.assertTrue(got == data, f"size {size}, feed {step}: wrong plaintext")

    def test_server_blobs_decrypt_with_the_reference(self):
        for size in SIZES:
            data = plaintext(size, seed=size + 1)
            for step in (7, 65536, 65537, 10**7):
                if step == 7 and size > 70000:
                    continue
                blob = server_encrypt(KEY_A, data, step)
                self.assertEqual(blob[:4], b"DGE1")
                self.assertEqual(len(blob), ref_wire_size(size), (size, step))
                self.assertTrue(ref_decrypt(KEY_A, blob, size) == data, (size, step))

    def test_server_output_is_the_reference_output_for_the_same_iv(self):
        """With the random IV pinned, the encoding is fully determined by the format."""
        for size in SIZES:
            data = plaintext(size, seed=3)
            self.assertEqual(server_encrypt(KEY_A, data, 5000, base_iv=IV),
                             ref_encrypt(KEY_A, data, IV), size)

    def test_random_iv_per_object(self):
        data = plaintext(100)
        a, b = server_encrypt(KEY_A, data), server_encrypt(KEY_A, data)
        self.assertNotEqual(a[4:16], b[4:16])
        self.assertEqual(ref_decrypt(KEY_A, a, 100), ref_decrypt(KEY_A, b, 100))

    def test_layout_by_hand(self):
        """Field positions and little-endian lengths, spelt out."""
        blob = server_encrypt(KEY_A, b"", base_iv=IV)
        self.assertEqual(len(blob), 36)  # header + one empty final frame
        self.assertEqual(blob[:16], b"DGE1" + IV)
        self.assertEqual(blob[16:20], b"\x10\x00\x00\x00")
        self.assertEqual(blob[20:], AESGCM(KEY_A).encrypt(IV, b"", ref_aad(0, True)))

        blob = server_encrypt(KEY_A, b"x", base_iv=IV)
        self.assertEqual(blob[16:20], b"\x11\x00\x00\x00")
        self.assertEqual(len(blob), 16 + 4 + 17)

        data = plaintext(65537)
        blob = server_encrypt(KEY_A, data, base_iv=IV)
        self.assertEqual(blob[16:20], struct.pack("<I", 65552))
        second = 16 + 65556  # CHUNK_FRAME_WIRE_LEN
        self.assertEqual(blob[second:second + 4], struct.pack("<I", 17))
        # chunk 1's nonce: ff ff ff ff XOR 1 (not + 1), and its AAD says final
        nonce1 = IV[:8] + bytes.fromhex("fffffffe")
        self.assertEqual(AESGCM(KEY_A).decrypt(nonce1, blob[second + 4:],
                                               b"DGE1\x01\x00\x00\x00\x01" + b"\x00" * 7),
                         data[65536:])
        # chunk 0's AAD says not final
        self.assertEqual(AESGCM(KEY_A).decrypt(IV, blob[20:second],
                                               b"DGE1\x00\x00\x00\x00\x00" + b"\x00" * 7),
                         data[:65536])

    def test_decoding_from_a_later_chunk(self):
        """The range path: frames from chunk `first` on, base IV from the header."""
        data = plaintext(3 * 65536 + 5)
        blob = ref_encrypt(KEY_A, data)
        for first in range(4):
            body = blob[16 + first * 65556:]
            got = server_decrypt(KEY_A, body, len(data), 9999, first=first, base_iv=IV)
            self.assertTrue(got == data[first * CHUNK:], first)

    # -- tampering ---------------------------------------------------------------------------
    def assertRejected(self, blob: bytes, size: int, data: bytes, pattern: str = "",
                       key: bytes = KEY_A) -> EncryptionError:
        for step in (4096, 10**7):
            released, error = server_decrypt_partial(key, blob, size, step)
            self.assertIsNotNone(error, f"tampered blob decrypted ({len(released)} bytes)")
            self.assertIsInstance(error, EncryptionError)
            self.assertTrue(data.startswith(released),
                            "bytes released before the error are not the true plaintext")
            if pattern:
                self.assertRegex(str(error), pattern)
        return error

    def setUp(self):
        self.data = plaintext(3 * 65536 + 5, seed=42)
        self.size = len(self.data)
        self.header = b"DGE1" + IV
        self.frames = ref_frames(KEY_A, IV, self.data)
        self.blob = self.header + b"".join(self.frames)

    def flipped(self, pos: int, mask: int = 0x01) -> bytes:
        b = bytearray(self.blob)
        b[pos] ^= mask
        return bytes(b)

    def frame_start(self, i: int) -> int:
        return 16 + i * 65556

    def test_flipped_magic(self):
        self.assertRejected(self.flipped(0), self.size, self.data,
                            r"^bad chunked-encryption magic: 45474531$")

    def test_flipped_base_iv(self):
        for pos in (4, 11, 15):
            self.assertRejected(self.flipped(pos), self.size, self.data,
                                r"^chunk 0 decryption failed \(wrong key, tampered, or reordered\)$")

    def test_flipped_ciphertext(self):
        for chunk in range(4):
            pos = self.frame_start(chunk) + 4 + 2
            err = self.assertRejected(self.flipped(pos), self.size, self.data)
            self.assertEqual(str(err), f"chunk {chunk} decryption failed (wrong key, tampered, "
                                       "or reordered)")
            released, _ = server_decrypt_partial(KEY_A, self.flipped(pos), self.size, 100)
            self.assertEqual(released, self.data[:chunk * CHUNK])

    def test_flipped_tag(self):
        for chunk in range(4):
            end = self.frame_start(chunk + 1) if chunk < 3 else len(self.blob)
            self.assertRejected(self.flipped(end - 1, 0x80), self.size, self.data,
                                rf"^chunk {chunk} decryption failed")

    def test_flipped_length(self):
        at = self.frame_start(1)
        # low byte: the frame boundary moves, so authentication fails
        self.assertRejected(self.flipped(at, 0x01), self.size, self.data)
        # a huge declared length is refused before any buffering
        self.assertRejected(self.flipped(at + 3, 0x40), self.size, self.data,
                            r"^frame length \d+ exceeds ceiling 66576")
        # a length too short to hold a tag
        b = bytearray(self.blob)
        b[at:at + 4] = struct.pack("<I", 15)
        self.assertRejected(bytes(b), self.size, self.data,
                            r"^chunk 1 ciphertext too short: 15 bytes$")

    def test_ceiling_is_exactly_66576(self):
        b = bytearray(self.blob)
        b[16:20] = struct.pack("<I", 66577)
        self.assertRejected(bytes(b), self.size, self.data, r"frame length 66577 exceeds ceiling")
        b[16:20] = struct.pack("<I", 66576)  # allowed by the guard, then fails AEAD
        self.assertRejected(bytes(b), self.size, self.data, r"^chunk 0 decryption failed")

    def test_dropped_chunk(self):
        for drop in range(3):
            frames = self.frames[:drop] + self.frames[drop + 1:]
            self.assertRejected(self.header + b"".join(frames), self.size, self.data,
                                rf"^chunk {drop} decryption failed")

    def test_dropped_final_chunk(self):
        blob = self.header + b"".join(self.frames[:3])
        self.assertRejected(blob, self.size, self.data,
                            r"^stream truncated before chunk 3 \(expected final index 3\)$")

    def test_header_only(self):
        self.assertRejected(self.header, self.size, self.data,
                            r"^stream truncated before chunk 0 \(expected final index 3\)$")
        self.assertRejected(self.header, 0, b"", r"^stream truncated before chunk 0")
        self.assertRejected(self.header[:10], self.size, self.data,
                            r"^stream ended before encryption header")
        self.assertRejected(b"", 0, b"", r"^stream ended before encryption header")

    def test_swapped_chunks(self):
        for a, b in ((0, 1), (1, 2), (0, 2)):
            frames = list(self.frames)
            frames[a], frames[b] = frames[b], frames[a]
            self.assertRejected(self.header + b"".join(frames), self.size, self.data,
                                rf"^chunk {a} decryption failed")

    def test_truncated_final_chunk(self):
        for cut in (1, 5, 16, 20):
            self.assertRejected(self.blob[:-cut], self.size, self.data,
                                r"^stream truncated mid-frame-body$")

    def test_truncated_mid_length_field(self):
        blob = self.blob[:self.frame_start(3) + 2]
        err = self.assertRejected(blob, self.size, self.data)
        self.assertIn("truncated", str(err))

    def test_non_final_chunk_marked_final(self):
        """A truncation attack: an encoder that marks chunk 1 final (and stops there)."""
        frames = ref_frames(KEY_A, IV, self.data, finals=[False, True, False, True])
        self.assertRejected(self.header + b"".join(frames), self.size, self.data,
                            r"^chunk 1 decryption failed")
        # the first two chunks as a complete-looking object: the size says 4 chunks
        self.assertRejected(self.header + b"".join(frames[:2]), self.size, self.data)

    def test_final_chunk_not_marked_final(self):
        frames = ref_frames(KEY_A, IV, self.data, finals=[False] * 4)
        self.assertRejected(self.header + b"".join(frames), self.size, self.data,
                            r"^chunk 3 decryption failed")

    def test_size_that_disagrees_with_the_stream(self):
        # metadata claims fewer chunks than were written: chunk 1 is not final on the wire
        self.assertRejected(self.blob, 65536 + 1, self.data, r"^chunk 1 decryption failed")
        # metadata claims more chunks: the last frame on the wire is marked final too early
        self.assertRejected(self.blob, 5 * 65536, self.data, r"^chunk 3 decryption failed")

    def test_extra_bytes_after_the_final_frame_warn_but_do_not_fail(self):
        for extra in (b"\x00", b"garbage after the end", self.frames[0]):
            with CapturedLog() as captured:
                got = server_decrypt(KEY_A, self.blob + extra, self.size, 4096)
            self.assertTrue(got == self.data)
            self.assertIn("trailing bytes after final frame", captured.text())
            self.assertEqual([e for e in captured.events if e.get("log_level") is not None
                              and e["log_level"].name in ("error", "critical")], [])

    def test_wrong_key(self):
        for size in SIZES:
            data = plaintext(size)
            blob = ref_encrypt(KEY_A, data)
            err = self.assertRejected(blob, size, data, key=KEY_B)
            self.assertEqual(str(err), "chunk 0 decryption failed (wrong key, tampered, or "
                                       "reordered)")
            released, _ = server_decrypt_partial(KEY_B, blob, size)
            self.assertEqual(released, b"")

    def test_every_single_byte_flip_of_a_small_object_is_caught(self):
        data = plaintext(40)
        blob = ref_encrypt(KEY_A, data)
        for pos in range(len(blob)):
            b = bytearray(blob)
            b[pos] ^= 0x04
            released, error = server_decrypt_partial(KEY_A, bytes(b), 40, 7)
            self.assertIsNotNone(error, f"flip at {pos} went unnoticed")
            self.assertEqual(released, b"", pos)

    # -- properties ---------------------------------------------------------------------------
    @SETTINGS
    @given(size=st.integers(0, 4 * 65536 + 3), pieces=st.lists(st.integers(1, 70000), min_size=1,
                                                                max_size=6),
           seed=st.integers(0, 5))
    @example(size=65536, pieces=[65556], seed=0)
    @example(size=65537, pieces=[16, 4, 65552, 4, 17], seed=0)
    @example(size=0, pieces=[1], seed=0)
    def test_roundtrip_property(self, size, pieces, seed):
        data = plaintext(size, seed)
        ref_blob = ref_encrypt(KEY_A, data, IV)
        self.assertTrue(server_decrypt(KEY_A, ref_blob, size, pieces) == data)
        srv_blob = server_encrypt(KEY_A, data, pieces)
        self.assertEqual(len(srv_blob), ref_wire_size(size))
        self.assertTrue(ref_decrypt(KEY_A, srv_blob, size) == data)
        pinned = server_encrypt(KEY_A, data, pieces, base_iv=IV)
        self.assertTrue(pinned == ref_blob)

    @SETTINGS
    @given(size=st.integers(1, 3 * 65536 + 5), pos=st.integers(0, 10**7), mask=st.integers(1, 255),
           step=st.integers(1, 70000))
    def test_tamper_property(self, size, pos, mask, step):
        """Any single-byte change ends in an error; what was released is true plaintext."""
        data = plaintext(size, 9)
        blob = bytearray(ref_encrypt(KEY_A, data, IV))
        blob[pos % len(blob)] ^= mask
        released, error = server_decrypt_partial(KEY_A, bytes(blob), size, step)
        self.assertIsNotNone(error)
        self.assertTrue(data.startswith(released))


# -- single-shot ----------------------------------------------------------------------------
class SingleShotTests(unittest.TestCase):

    def test_reference_blobs_decrypt(self):
        for size in SIZES:
            data = plaintext(size, 5)
            blob = ref_single(KEY_A, data)
            self.assertEqual(len(blob), size + 28)
            self.assertTrue(decrypt_single(KEY_A, blob) == data, size)

    def test_errors(self):
        blob = ref_single(KEY_A, b"hello world")
        for bad in (KEY_B,):
            with self.assertRaises(EncryptionError) as cm:
                decrypt_single(bad, blob)
            self.assertEqual(str(cm.exception), "decryption failed (wrong key or tampered data)")
        for pos in (0, 11, 12, len(blob) - 1):
            b = bytearray(blob)
            b[pos] ^= 1
            with self.assertRaises(EncryptionError) as cm:
                decrypt_single(KEY_A, bytes(b))
            self.assertEqual(str(cm.exception), "decryption failed (wrong key or tampered data)")
        with self.assertRaises(EncryptionError) as cm:
            decrypt_single(KEY_A, blob[:27])
        self.assertEqual(str(cm.exception), "blob too short: 27 bytes")
        self.assertEqual(decrypt_single(KEY_A, ref_single(KEY_A, b"")), b"")  # 28 bytes is fine


# -- key ids and key selection --------------------------------------------------------------
class KeyIdTests(unittest.TestCase):

    def test_derivation(self):
        for name in ("default", "hetzner-fsn1", "default::legacy", "ünïcode"):
            for key in (KEY_A, KEY_B, b"\x00" * 32):
                kid = derive_key_id(name, key)
                self.assertEqual(kid, ref_key_id(name, key))
                self.assertRegex(kid, r"^[0-9a-f]{16}$")
        self.assertNotEqual(derive_key_id("a", KEY_A), derive_key_id("b", KEY_A))
        # a fixed vector, computed once by hand with hashlib
        self.assertEqual(derive_key_id("default", b"\x00" * 32),
                         hashlib.sha256(b"default\x00" + b"\x00" * 32).hexdigest()[:16])

    def test_service_derives_primary_and_legacy_ids(self):
        from dgproxy.service import encryption_for
        bc = SimpleNamespace(name="default", type="filesystem",
                             encryption={"mode": "aes256-gcm-proxy", "legacy_key": KEY_B.hex(),
                                         "legacy_key_id": "old-gen"})
        ring, native, messages = encryption_for(bc, {"DGP_ENCRYPTION_KEY": KEY_A.hex()})
        self.assertEqual(ring.key, KEY_A)
        self.assertEqual(ring.key_id, ref_key_id("default", KEY_A))
        self.assertEqual(ring.legacy_key, KEY_B)
        self.assertEqual(ring.legacy_key_id, "old-gen")
        self.assertIsNone(native)
        text = "\n".join(m for _, m in messages)
        self.assertIn(f"backend 'default' encryption: ENABLED (AES-256-GCM proxy, "
                      f"key_id={ref_key_id('default', KEY_A)})", text)
        self.assertIn("decrypt-only shim active (legacy key_id='old-gen')", text)
        self.assertNotIn("loaded from config file", text)

        bc = SimpleNamespace(name="hetzner-fsn1", type="filesystem",
                             encryption={"mode": "aes256-gcm-proxy", "key": KEY_A.hex(),
                                         "key_id": "pinned"})
        ring, _, messages = encryption_for(bc, {})
        self.assertEqual(ring.key_id, "pinned")
        self.assertIn("backend 'hetzner-fsn1' encryption key was loaded from config file (not "
                      "DGP_BACKEND_HETZNER_FSN1_ENCRYPTION_KEY)", "\n".join(m for _, m in messages))
        # the env var wins over YAML, and silences the warning
        ring, _, messages = encryption_for(
            bc, {"DGP_BACKEND_HETZNER_FSN1_ENCRYPTION_KEY": KEY_B.hex()})
        self.assertEqual(ring.key, KEY_B)
        self.assertNotIn("loaded from config file", "\n".join(m for _, m in messages))

    def test_service_ignores_the_key_under_mode_none(self):
        from dgproxy.service import encryption_for
        bc = SimpleNamespace(name="default", type="filesystem", encryption={"mode": "none"})
        ring, _, _ = encryption_for(bc, {"DGP_ENCRYPTION_KEY": KEY_A.hex()})
        self.assertIsNone(ring.key)
        self.assertFalse(ring.encrypts)

    def test_derived_legacy_id_uses_the_legacy_name(self):
        """legacy_key_id is required by config, but the ring derives '{name}::legacy' if absent."""
        from dgproxy.service import encryption_for
        bc = SimpleNamespace(name="default", type="filesystem",
                             encryption={"mode": "none", "legacy_key": KEY_A.hex()})
        ring, _, _ = encryption_for(bc, {})
        self.assertEqual(ring.legacy_key_id, ref_key_id("default::legacy", KEY_A))

    def test_key_id_collision_check(self):
        from dgproxy.service import Fatal, check_key_ids
        one = KeyRing("one", KEY_A, "shared")
        two = KeyRing("two", KEY_B, "shared")
        with self.assertRaises(Fatal) as cm:
            check_key_ids([one, two], {"one": "shared", "two": "shared"})
        self.assertIn("one", str(cm.exception))
        self.assertIn("two", str(cm.exception))
        self.assertIn("'shared'", str(cm.exception))
        # same key bytes: the documented portability escape hatch
        check_key_ids([one, KeyRing("two", KEY_A, "shared")], {"one": "shared", "two": "shared"})


class KeyRingTests(unittest.TestCase):

    def test_selection(self):
        ring = KeyRing("default", KEY_A, "gen-a", KEY_B, "gen-b")
        self.assertEqual(ring.for_object("gen-a"), KEY_A)
        self.assertEqual(ring.for_object("gen-b"), KEY_B)
        self.assertEqual(ring.for_object(None), KEY_A)  # unstamped (pre-v0.9): the primary
        plain = KeyRing("default", key_id=None, legacy_key=KEY_B, legacy_key_id="gen-b")
        self.assertEqual(plain.for_object("gen-b"), KEY_B)  # mode none + shim

    def test_no_key_configured(self):
        # an unstamped object on a backend with no key: the legacy shim is never consulted
        for ring in (KeyRing("default"), KeyRing("default", legacy_key=KEY_B,
                                                 legacy_key_id="gen-b")):
            with self.assertRaises(EncryptionError) as cm:
                ring.for_object(None)
            self.assertEqual(str(cm.exception), NO_KEY)
        # stamped with the configured key id, but the key itself is missing
        with self.assertRaises(EncryptionError) as cm:
            KeyRing("default", key=None, key_id="gen-a").for_object("gen-a")
        self.assertEqual(str(cm.exception), NO_KEY)

    def test_stamped_object_on_a_keyless_backend(self):
        with self.assertRaises(EncryptionError) as cm:
            KeyRing("default").for_object("gen-a")
        self.assertTrue(str(cm.exception).startswith(
            "object was encrypted with key id 'gen-a', but this backend has NO encryption key "
            "configured. The object can't be decrypted until the key is restored."),
            str(cm.exception))

    def test_key_id_mismatch(self):
        for ring in (KeyRing("default", KEY_B, "gen-b"),
                     KeyRing("default", KEY_B, "gen-b", KEY_A, "gen-z")):
            with self.assertRaises(EncryptionError) as cm:
                ring.for_object("gen-a")
            msg = str(cm.exception)
            self.assertIn("object was encrypted with key id 'gen-a', but this backend is "
                          "configured with key id 'gen-b'", msg)
            self.assertIn("(no legacy-shim match either)", msg)
            self.assertIn("Refusing to run AEAD", msg)
        # a stamp that names the legacy id, but only the id is there (no key): no AEAD attempt
        with self.assertRaises(EncryptionError):
            KeyRing("default", KEY_B, "gen-b", None, "gen-a").for_object("gen-a")


# -- the backend wrapper over a real filesystem -----------------------------------------------




class CountingSource:
    def __init__(self, source, counter: list):
        self._source = source
        self._counter = counter

    def read(self, size: int = 65536):
        d = self._source.read(size)

        def count(data):
            self._counter[0] += len(data)
            return data
        return d.addCallback(count)

    def close(self):
        self._source.close()


class Recording:
    """The inner backend, noting every open_read and the bytes actually read."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.reads: list[tuple[str, int, Optional[int]]] = []
        self.bytes_read = [0]

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def open_read(self, bucket, key, offset=0, length=None):
        self.reads.append((key, offset, length))
        source = await self.inner.open_read(bucket, key, offset, length)
        return None if source is None else CountingSource(source, self.bytes_read)


MARKER = b"PLAINTEXT-MARKER-c0ffee"


class EncryptingBackendTests(unittest.TestCase):

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.fs = FilesystemBackend(self.root)
        self.fs.prepare()
        os.makedirs(os.path.join(self.root, "b", "deltaspaces"))
        self.recording = Recording(self.fs)
        self.ring_a = KeyRing("default", KEY_A, ref_key_id("default", KEY_A))
        self.backend = EncryptingBackend(self.recording, self.ring_a)

    def path(self, key: str) -> str:
        return os.path.join(self.root, "b", "deltaspaces", *key.split("/"))

    def xattr(self, key: str) -> dict:
        return json.loads(os.getxattr(self.path(key), XATTR_NAME))

    def raw(self, key: str) -> bytes:
        with open(self.path(key), "rb") as f:
            return f.read()

    async def put(self, key: str, data: bytes, backend=None, step: int = 50000, **changes):
        writer = await (backend or self.backend).open_write("b", key)
        for i in range(0, len(data), step):
            await writer.write(data[i:i + step])
        meta = meta_for(key, data, **changes)
        await writer.commit(meta)
        return meta

    async def read(self, key: str, offset: int = 0, length: Optional[int] = None, backend=None,
                   size: int = 7000) -> Optional[bytes]:
        source = await (backend or self.backend).open_read("b", key, offset, length)
        if source is None:
            return None
        out = []
        try:
            while True:
                data = await source.read(size)
                if not data:
                    return b"".join(out)
                out.append(data)
        finally:
            source.close()

    async def assertReadFails(self, key: str, text: str, backend=None, offset: int = 0,
                              length: Optional[int] = None) -> EncryptionError:
        try:
            got = await self.read(key, offset, length, backend)
        except EncryptionError as e:
            self.assertIn(text, str(e))
            return e
        self.fail(f"read of {key} returned {len(got or b'')} bytes instead of failing with {text!r}")

    def plant(self, key: str, blob: bytes, meta: Optional[ObjectMetadata]) -> None:
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(blob)
        if meta is not None:
            os.setxattr(path, XATTR_NAME, meta.to_json())

    @inline
    async def test_writes_are_chunked_ciphertext_with_markers(self):
        for size in SIZES:
            data = (MARKER * (size // len(MARKER) + 1))[:size]
            key = f"obj-{size}"
            await self.put(key, data)
            raw = self.raw(key)
            self.assertEqual(len(raw), ref_wire_size(size))
            self.assertNotIn(MARKER, raw)
            user = self.xattr(key)["user_metadata"]
            self.assertEqual(user["dg-encrypted"], "aes-256-gcm-chunked-v1")
            self.assertEqual(user["dg-encryption-key-id"], ref_key_id("default", KEY_A))
            self.assertEqual(self.xattr(key)["file_size"], size)
            self.assertTrue(ref_decrypt(KEY_A, raw, size) == data)
            self.assertTrue(await self.read(key) == data)
            stored = await self.backend.stat("b", key)
            self.assertEqual(stored.metadata.file_size, size)

    @inline
    async def test_stale_markers_from_the_caller_are_replaced(self):
        meta = await self.put("x", b"abc", **{"user_metadata": {
            "dg-encrypted": "aes-256-gcm-v1", "dg-encryption-key-id": "bogus", "keep": "me"}})
        self.assertEqual(meta.user_metadata["keep"], "me")
        user = self.xattr("x")["user_metadata"]
        self.assertEqual(user, {"keep": "me", "dg-encrypted": "aes-256-gcm-chunked-v1",
                                "dg-encryption-key-id": self.ring_a.key_id})
        plain = EncryptingBackend(self.fs, KeyRing("default"))
        await self.put("y", MARKER, backend=plain, user_metadata={
            "dg-encrypted": "aes-256-gcm-chunked-v1", "dg-encryption-key-id": "bogus"})
        self.assertEqual(self.raw("y"), MARKER)
        self.assertNotIn("user_metadata", self.xattr("y"))
        self.assertEqual(await self.read("y", backend=plain), MARKER)

    @inline
    async def test_reference_chunked_blob_reads_through_the_backend(self):
        for size in SIZES:
            data = plaintext(size, 11)
            key = f"ref-{size}"
            self.plant(key, ref_encrypt(KEY_A, data), meta_for(key, data, user_metadata={
                "dg-encrypted": "aes-256-gcm-chunked-v1", "dg-encryption-key-id": "rust-gen"}))
            ring = KeyRing("default", KEY_A, "rust-gen")
            got = await self.read(key, backend=EncryptingBackend(self.fs, ring))
            self.assertTrue(got == data, size)

    @inline
    async def test_reference_single_shot_blob_reads_through_the_backend(self):
        ring = KeyRing("default", KEY_A, "rust-gen")
        backend = EncryptingBackend(self.fs, ring)
        for size in SIZES:
            data = plaintext(size, 12)
            key = f"single-{size}"
            self.plant(key, ref_single(KEY_A, data), meta_for(key, data, user_metadata={
                "dg-encrypted": "aes-256-gcm-v1", "dg-encryption-key-id": "rust-gen"}))
            self.assertTrue(await self.read(key, backend=backend) == data, size)
            if size > 10:
                for off, n in ((0, 1), (1, size - 1), (size // 2, 3), (size - 1, 1)):
                    got = await self.read(key, off, n, backend=backend)
                    self.assertTrue(got == data[off:off + n], (size, off, n))
        # an unstamped single-shot blob (pre-v0.9) uses the primary key
        self.plant("old", ref_single(KEY_A, b"old data"), meta_for("old", b"old data",
                   user_metadata={"dg-encrypted": "aes-256-gcm-v1"}))
        self.assertEqual(await self.read("old", backend=backend), b"old data")
        # a tampered single-shot blob
        blob = bytearray(ref_single(KEY_A, b"tampered"))
        blob[-3] ^= 1
        self.plant("bad", bytes(blob), meta_for("bad", b"tampered", user_metadata={
            "dg-encrypted": "aes-256-gcm-v1", "dg-encryption-key-id": "rust-gen"}))
        await self.assertReadFails("bad", "decryption failed (wrong key or tampered data)",
                                   backend=backend)

    @inline
    async def test_single_shot_delta_uses_the_delta_size(self):
        """A delta blob's plaintext size is delta_size, not the original's file_size."""
        delta = plaintext(70000, 13)
        meta = meta_for("v.tar.delta", b"original", note=DELTA, ref_sha256="0" * 64,
                        delta_size=len(delta), delta_cmd="",
                        user_metadata={"dg-encrypted": "aes-256-gcm-chunked-v1",
                                       "dg-encryption-key-id": self.ring_a.key_id})
        self.assertEqual(blob_size(meta), len(delta))
        self.plant("v.tar.delta", ref_encrypt(KEY_A, delta), meta)
        self.assertTrue(await self.read("v.tar.delta") == delta)
        ref = meta_for("reference.bin", b"r" * 10, note=REFERENCE, source_name="v.tar")
        self.assertEqual(blob_size(ref), 10)

    @inline
    async def test_ranges_at_chunk_boundaries(self):
        size = 3 * 65536 + 5
        data = plaintext(size, 14)
        await self.put("big", data)
        points = sorted({0, 1, 65535, 65536, 65537, 131071, 131072, 131073, 196607, 196608,
                         196609, size - 2, size - 1})
        for off in points:
            for n in (1, 2, 65535, 65536, 65537, size):
                n = min(n, size - off)
                got = await self.read("big", off, n, size=4093)
                self.assertTrue(got == data[off:off + n], (off, n))

    @inline
    async def test_ranges_read_only_the_chunks_they_need(self):
        size = 3 * 65536 + 5  # chunks 0..3, chunk 3 is final
        data = plaintext(size, 15)
        await self.put("big", data)
        frame = 65556

        async def reads_for(off, n):
            self.recording.reads.clear()
            self.recording.bytes_read[0] = 0
            got = await self.read("big", off, n)
            self.assertTrue(got == data[off:off + n], (off, n))
            return list(self.recording.reads), self.recording.bytes_read[0]

        reads, nbytes = await reads_for(65536 + 10, 100)  # inside chunk 1
        self.assertEqual(reads, [("big", 0, 16), ("big", 16 + frame, frame)])
        self.assertLessEqual(nbytes, 16 + frame)
        reads, nbytes = await reads_for(65530, 20)  # chunks 0 and 1
        self.assertEqual(reads, [("big", 0, 16), ("big", 16, 2 * frame)])
        reads, nbytes = await reads_for(size - 3, 3)  # only the final chunk
        self.assertEqual(reads[0], ("big", 0, 16))
        self.assertEqual(reads[1][:2], ("big", 16 + 3 * frame))
        self.assertLessEqual(nbytes, 16 + 4 + 5 + 16)
        reads, nbytes = await reads_for(2 * 65536, 65536 + 5)  # chunks 2 and 3
        self.assertEqual(reads[1][:2], ("big", 16 + 2 * frame))
        self.assertLessEqual(nbytes, 16 + frame + 25)

    @inline
    async def test_ranged_read_of_a_tampered_chunk_fails(self):
        size = 3 * 65536 + 5
        data = plaintext(size, 16)
        await self.put("big", data)
        path = self.path("big")
        with open(path, "r+b") as f:
            f.seek(16 + 2 * 65556 + 4 + 7)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 1]))
        # chunk 1 is intact; chunk 2 is not
        self.assertTrue(await self.read("big", 65536, 10) == data[65536:65546])
        await self.assertReadFails("big", "chunk 2 decryption failed", offset=2 * 65536 + 3,
                                   length=10)
        await self.assertReadFails("big", "chunk 2 decryption failed")

    @inline
    async def test_wrong_key_and_rotation(self):
        data = plaintext(100000, 17)
        await self.put("obj", data)
        a = self.ring_a.key_id
        other = EncryptingBackend(self.fs, KeyRing("default", KEY_B, "gen-b"))
        err = await self.assertReadFails("obj", f"object was encrypted with key id '{a}', but "
                                                "this backend is configured with key id 'gen-b'",
                                         backend=other)
        self.assertIn("no legacy-shim match either", str(err))
        await self.assertReadFails("obj", "configured with key id 'gen-b'", backend=other,
                                   offset=70000, length=10)
        # the same key id but different key bytes: an AEAD failure, never wrong bytes
        liar = EncryptingBackend(self.fs, KeyRing("default", KEY_B, a))
        await self.assertReadFails("obj", "chunk 0 decryption failed", backend=liar)
        await self.assertReadFails("obj", "chunk 1 decryption failed", backend=liar,
                                   offset=70000, length=10)
        # the shim
        shim = EncryptingBackend(self.fs, KeyRing("default", KEY_B, "gen-b", KEY_A, a))
        self.assertTrue(await self.read("obj", backend=shim) == data)
        self.assertTrue(await self.read("obj", 70000, 10, backend=shim) == data[70000:70010])
        await self.put("new", data, backend=shim)
        self.assertEqual(self.xattr("new")["user_metadata"]["dg-encryption-key-id"], "gen-b")
        self.assertTrue(ref_decrypt(KEY_B, self.raw("new"), len(data)) == data)
        # mode none with the shim: old objects read, writes are plaintext
        none_shim = EncryptingBackend(self.fs, KeyRing("default", legacy_key=KEY_A,
                                                       legacy_key_id=a))
        self.assertTrue(await self.read("obj", backend=none_shim) == data)
        await self.put("plain", MARKER, backend=none_shim)
        self.assertEqual(self.raw("plain"), MARKER)
        await self.assertReadFails("new", "but this backend has NO encryption key configured",
                                   backend=none_shim)
        # mode none without anything
        none = EncryptingBackend(self.fs, KeyRing("default"))
        await self.assertReadFails("obj", f"object was encrypted with key id '{a}', but this "
                                          "backend has NO encryption key configured",
                                   backend=none)

    @inline
    async def test_no_key_configured_text(self):
        data = b"secret stuff"
        await self.put("obj", data)
        # drop the key-id stamp: a pre-v0.9 object
        meta = self.xattr("obj")
        del meta["user_metadata"]["dg-encryption-key-id"]
        os.setxattr(self.path("obj"), XATTR_NAME, json.dumps(meta).encode())
        self.assertEqual(await self.read("obj"), data)
        for ring in (KeyRing("default"), KeyRing("default", legacy_key=KEY_A, legacy_key_id="x")):
            await self.assertReadFails("obj", NO_KEY, backend=EncryptingBackend(self.fs, ring))
        # aes256-gcm-proxy with key_id pinned but the key missing
        await self.put("pinned", data, backend=EncryptingBackend(
            self.fs, KeyRing("default", KEY_A, "pinned-id")))
        err = await self.assertReadFails("pinned", NO_KEY, backend=EncryptingBackend(
            self.fs, KeyRing("default", None, "pinned-id")))
        self.assertEqual(str(err), NO_KEY)

    @inline
    async def test_stripped_xattrs(self):
        data = plaintext(100000, 18)
        await self.put("obj", data)
        os.removexattr(self.path("obj"), XATTR_NAME)
        stored = await self.backend.stat("b", "obj")
        self.assertIsNone(stored.metadata)
        for ring in (self.ring_a, KeyRing("default")):
            err = await self.assertReadFails("obj", STRIPPED,
                                             backend=EncryptingBackend(self.fs, ring))
            self.assertEqual(str(err), (
                "object body begins with chunked-encryption magic but metadata has no "
                "dg-encrypted marker — xattrs may have been stripped during backup/restore. "
                "Refusing to serve ciphertext as plaintext."))
        # an ordinary unmarked object still reads
        self.plant("plain", b"just bytes", None)
        self.assertEqual(await self.read("plain"), b"just bytes")

    @inline
    async def test_stripped_xattrs_ranged_read(self):
        """A range of a stripped object must not be ciphertext served as plaintext either."""
        data = plaintext(100000, 19)
        await self.put("obj", data)
        raw = self.raw("obj")
        os.removexattr(self.path("obj"), XATTR_NAME)
        try:
            got = await self.read("obj", 100, 50)
        except EncryptionError as e:
            self.assertIn(STRIPPED, str(e))
            return
        self.assertNotEqual(got, raw[100:150], "a ranged read served ciphertext as plaintext")


    @inline
    async def test_unknown_marker(self):
        self.plant("odd", b"whatever", meta_for("odd", b"whatever", user_metadata={
            "dg-encrypted": "rot13"}))
        await self.assertReadFails("odd", "unknown encryption marker")

    @inline
    async def test_trailing_bytes_on_disk_do_not_fail_a_read(self):
        data = plaintext(70000, 20)
        await self.put("obj", data)
        with open(self.path("obj"), "ab") as f:
            f.write(b"trailing junk")
        self.assertTrue(await self.read("obj") == data)
        self.assertTrue(await self.read("obj", 65536, 10) == data[65536:65546])

    @inline
    async def test_truncated_file_on_disk_fails(self):
        data = plaintext(3 * 65536 + 5, 21)
        await self.put("obj", data)
        os.truncate(self.path("obj"), 16 + 2 * 65556)
        await self.assertReadFails("obj", "stream truncated before chunk 2")
        await self.assertReadFails("obj", "truncated", offset=3 * 65536, length=5)

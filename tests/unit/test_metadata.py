"""The user.dg.metadata record, byte-compatible with the Rust proxy.

Storage fact sheet §2.1/§2.2: compact JSON, struct field order then the
flattened ``note`` tag and its variant fields, optional fields omitted when
empty, ``created_at`` RFC 3339 with a Z. Records the Rust proxy wrote (9
fractional digits, ``direct``, ``ref_key``, unknown fields) must read back; a
damaged record is a MetadataError, never anything else.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from hypothesis import HealthCheck, example, given, settings, strategies as st
from twisted.trial import unittest

from dgproxy.storage.metadata import (
    DELTA, EMPTY_MD5, INTERNAL_REFERENCE_NAME, PASSTHROUGH, REFERENCE, REFERENCE_NAME, XATTR_NAME,
    MetadataError, ObjectMetadata, from_s3_headers, header_text, header_value, to_s3_headers)

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

SHA_FILE = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
SHA_REF = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
MD5 = "5d41402abc4b2a76b9719d911017c592"
WHEN = datetime(2026, 7, 10, 12, 34, 56, 123456, tzinfo=timezone.utc)
TOOL = "deltaglider_proxy/1.19.0"


def delta_meta(**changes):
    base = ObjectMetadata(
        tool=TOOL, original_name="app.zip", file_sha256=SHA_FILE, file_size=52428800, md5=MD5,
        created_at=WHEN, note=DELTA, content_type="application/zip",
        user_metadata={"build": "42"}, ref_path="reference.bin", ref_sha256=SHA_REF,
        delta_size=61234, delta_cmd="xdelta3 -e -9 -s reference.bin app.zip app.zip.delta")
    return base.with_changes(**changes)


def rust_record(**fields):
    """A record as the Rust proxy writes it (serde_json::to_vec), field by field."""
    doc = {"tool": TOOL, "original_name": "app.zip", "file_sha256": SHA_FILE,
           "file_size": 52428800, "md5": MD5, "created_at": "2026-07-10T12:34:56.123456789Z",
           "note": "passthrough"}
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not _DROP},
                      separators=(",", ":")).encode()


_DROP = object()


def keys_in_order(raw: bytes):
    return [k for k, _ in json.loads(raw, object_pairs_hook=lambda pairs: pairs)]


class ToJsonTests(unittest.TestCase):
    def test_constants(self):
        self.assertEqual(XATTR_NAME, "user.dg.metadata")
        self.assertEqual(REFERENCE_NAME, "reference.bin")
        self.assertEqual(INTERNAL_REFERENCE_NAME, "__reference__")

    def test_fact_sheet_delta_example_exactly(self):
        expected = (
            '{"tool":"deltaglider_proxy/1.19.0","original_name":"app.zip",'
            f'"file_sha256":"{SHA_FILE}","file_size":52428800,'
            f'"md5":"{MD5}","created_at":"2026-07-10T12:34:56.123456Z",'
            '"content_type":"application/zip","user_metadata":{"build":"42"},'
            f'"note":"delta","ref_path":"reference.bin","ref_sha256":"{SHA_REF}",'
            '"delta_size":61234,'
            '"delta_cmd":"xdelta3 -e -9 -s reference.bin app.zip app.zip.delta"}')
        self.assertEqual(delta_meta().to_json(), expected.encode())

    def test_reference_record(self):
        meta = ObjectMetadata(tool=TOOL, original_name=INTERNAL_REFERENCE_NAME,
                              file_sha256=SHA_REF, file_size=10, md5=MD5, created_at=WHEN,
                              note=REFERENCE, source_name="releases/v1.0/app.zip")
        raw = meta.to_json()
        self.assertEqual(keys_in_order(raw), ["tool", "original_name", "file_sha256", "file_size",
                                              "md5", "created_at", "note", "source_name"])
        self.assertTrue(raw.endswith(b',"note":"reference","source_name":"releases/v1.0/app.zip"}'))

    def test_passthrough_record_has_no_variant_fields(self):
        meta = ObjectMetadata(tool=TOOL, original_name="README.txt", file_sha256=SHA_FILE,
                              file_size=0, md5=EMPTY_MD5, created_at=WHEN, note=PASSTHROUGH)
        raw = meta.to_json()
        self.assertEqual(keys_in_order(raw), ["tool", "original_name", "file_sha256", "file_size",
                                              "md5", "created_at", "note"])
        self.assertTrue(raw.endswith(b',"note":"passthrough"}'))

    def test_multipart_etag_position(self):
        raw = delta_meta(note=PASSTHROUGH, multipart_etag='"ab12-3"').to_json()
        self.assertEqual(keys_in_order(raw)[:9],
                         ["tool", "original_name", "file_sha256", "file_size", "md5",
                          "multipart_etag", "created_at", "content_type", "user_metadata"])
        self.assertIn(b'"multipart_etag":"\\"ab12-3\\""', raw)

    def test_empty_optionals_are_omitted(self):
        raw = delta_meta(note=PASSTHROUGH, content_type=None, user_metadata={},
                         multipart_etag=None).to_json()
        for name in (b"content_type", b"user_metadata", b"multipart_etag", b"ref_path",
                     b"source_name", b"delta_size"):
            self.assertNotIn(name, raw)

    def test_compact_and_utf8(self):
        raw = delta_meta(user_metadata={"k": "caf\u00e9 \U0001F600"}).to_json()
        self.assertNotIn(b": ", raw)
        self.assertNotIn(b", ", raw.replace(b"xdelta3 -e -9 -s", b""))
        self.assertIn("caf\u00e9 \U0001F600".encode("utf-8"), raw)
        raw.decode("utf-8")

    def test_created_at_is_utc_with_z(self):
        plus2 = timezone(timedelta(hours=2))
        raw = delta_meta(created_at=datetime(2026, 7, 10, 14, 0, 0, tzinfo=plus2)).to_json()
        stamp = json.loads(raw)["created_at"]
        self.assertRegex(stamp, r"^2026-07-10T12:00:00(\.\d{1,9})?Z$")

    def test_etag(self):
        self.assertEqual(delta_meta().etag, f'"{MD5}"')
        self.assertEqual(delta_meta(multipart_etag='"ab12-3"').etag, '"ab12-3"')
        self.assertEqual(delta_meta(multipart_etag="ab12-3").etag, '"ab12-3"')


class FromJsonTests(unittest.TestCase):
    def test_rust_delta_record(self):
        raw = rust_record(content_type="application/zip", user_metadata={"build": "42"},
                          note="delta", ref_path="reference.bin", ref_sha256=SHA_REF,
                          delta_size=61234, delta_cmd="xdelta3 -e -9 -s reference.bin a b")
        meta = ObjectMetadata.from_json(raw)
        self.assertEqual(meta.note, DELTA)
        self.assertEqual(meta.created_at, WHEN)  # 9 digits truncated to microseconds
        self.assertEqual(meta.created_at.tzinfo, timezone.utc)
        self.assertEqual((meta.file_size, meta.md5, meta.file_sha256),
                         (52428800, MD5, SHA_FILE))
        self.assertEqual((meta.ref_path, meta.ref_sha256, meta.delta_size),
                         ("reference.bin", SHA_REF, 61234))
        self.assertEqual(meta.content_type, "application/zip")
        self.assertEqual(dict(meta.user_metadata), {"build": "42"})
        self.assertEqual(meta.etag, f'"{MD5}"')

    def test_rust_reference_record(self):
        meta = ObjectMetadata.from_json(rust_record(
            original_name="__reference__", note="reference", source_name="releases/v1.0/app.zip"))
        self.assertEqual((meta.note, meta.source_name), (REFERENCE, "releases/v1.0/app.zip"))
        self.assertEqual(meta.original_name, INTERNAL_REFERENCE_NAME)

    def test_rust_passthrough_record(self):
        meta = ObjectMetadata.from_json(rust_record())
        self.assertEqual(meta.note, PASSTHROUGH)
        self.assertIsNone(meta.content_type)
        self.assertEqual(dict(meta.user_metadata), {})
        self.assertIsNone(meta.multipart_etag)

    def test_direct_is_passthrough(self):
        self.assertEqual(ObjectMetadata.from_json(rust_record(note="direct")).note, PASSTHROUGH)

    def test_ref_key_alias(self):
        meta = ObjectMetadata.from_json(rust_record(note="delta", ref_key="reference.bin",
                                                    ref_sha256=SHA_REF, delta_size=5,
                                                    delta_cmd="x"))
        self.assertEqual(meta.ref_path, "reference.bin")

    def test_multipart_etag(self):
        meta = ObjectMetadata.from_json(rust_record(multipart_etag='"ab12-3"'))
        self.assertEqual(meta.etag, '"ab12-3"')

    def test_unknown_fields_tolerated(self):
        meta = ObjectMetadata.from_json(rust_record(future_field=1, nested={"a": [1, 2]},
                                                    dg_encrypted="aes256-gcm-proxy"))
        self.assertEqual(meta.file_size, 52428800)

    def test_timestamp_forms(self):
        cases = {
            "2026-07-10T12:34:56Z": WHEN.replace(microsecond=0),
            "2026-07-10T12:34:56.1Z": WHEN.replace(microsecond=100000),
            "2026-07-10T12:34:56.123Z": WHEN.replace(microsecond=123000),
            "2026-07-10T12:34:56.123456Z": WHEN,
            "2026-07-10T12:34:56.123456789Z": WHEN,
            "2026-07-10T14:34:56.123456+02:00": WHEN,
            "2026-07-10T10:04:56.123456-02:30": WHEN,
        }
        for text, expected in cases.items():
            meta = ObjectMetadata.from_json(rust_record(created_at=text))
            self.assertEqual(meta.created_at, expected, text)
            self.assertEqual(meta.created_at.utcoffset(), timedelta(0))

    def test_python_tool_record_with_user_metadata_values_not_strings(self):
        meta = ObjectMetadata.from_json(rust_record(tool="deltaglider/6.1.1",
                                                    user_metadata={"n": 1}))
        self.assertEqual(dict(meta.user_metadata), {"n": "1"})

    def test_missing_required_fields(self):
        for name in ("tool", "original_name", "file_sha256", "file_size", "md5", "created_at",
                     "note"):
            self.assertRaises(MetadataError, ObjectMetadata.from_json,
                              rust_record(**{name: _DROP}))

    def test_delta_needs_its_fields(self):
        full = dict(note="delta", ref_path="reference.bin", ref_sha256=SHA_REF, delta_size=5,
                    delta_cmd="x")
        ObjectMetadata.from_json(rust_record(**full))
        for name in ("ref_sha256", "delta_size"):
            self.assertRaises(MetadataError, ObjectMetadata.from_json,
                              rust_record(**dict(full, **{name: _DROP})))

    def test_bad_values(self):
        for fields in ({"note": "chain"}, {"note": None}, {"created_at": "yesterday"},
                       {"created_at": "2026-13-45T00:00:00Z"}, {"file_size": -1},
                       {"file_size": "big"}, {"file_size": None}, {"file_size": [1]},
                       {"user_metadata": ["a"]}, {"note": "delta", "ref_sha256": "x",
                                                  "delta_size": "n/a"}):
            self.assertRaises(MetadataError, ObjectMetadata.from_json, rust_record(**fields))

    def test_not_a_json_object(self):
        for raw in (b"", b"xattr_test_ok", b"[]", b"null", b"42", b'"str"', b"\xff\xfe\x00",
                    b'{"tool":', b"\x00" * 8):
            self.assertRaises(MetadataError, ObjectMetadata.from_json, raw)

    def test_non_finite_sizes_are_metadata_errors(self):
        for value in (b"Infinity", b"-Infinity", b"NaN", b"1e999"):
            raw = rust_record(file_size=0).replace(b'"file_size":0', b'"file_size":' + value)
            self.assertRaises(MetadataError, ObjectMetadata.from_json, raw)


    def test_out_of_range_timestamps_are_metadata_errors(self):
        for stamp in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
            self.assertRaises(MetadataError, ObjectMetadata.from_json,
                              rust_record(created_at=stamp))


    def test_deeply_nested_json_is_a_metadata_error(self):
        self.assertRaises(MetadataError, ObjectMetadata.from_json, b"[" * 100000)
        self.assertRaises(MetadataError, ObjectMetadata.from_json,
                          b'{"user_metadata":' + b"[" * 5000 + b"]" * 5000 + b"}")



# --- properties -----------------------------------------------------------------

_TEXT = st.text(max_size=30)
_NONEMPTY = st.text(min_size=1, max_size=30)
_STAMPS = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 30),
                       timezones=st.just(timezone.utc))


@st.composite
def metadata(draw):
    note = draw(st.sampled_from([PASSTHROUGH, DELTA, REFERENCE]))
    variant = {}
    if note == DELTA:
        variant = dict(ref_path=draw(st.just(REFERENCE_NAME) | _NONEMPTY),
                       ref_sha256=draw(_TEXT), delta_size=draw(st.integers(0, 2 ** 64 - 1)),
                       delta_cmd=draw(_TEXT))
    elif note == REFERENCE:
        variant = dict(source_name=draw(_TEXT))
    return ObjectMetadata(
        tool=draw(_TEXT), original_name=draw(_TEXT), file_sha256=draw(_TEXT),
        file_size=draw(st.integers(0, 2 ** 64 - 1)), md5=draw(_TEXT),
        created_at=draw(_STAMPS), note=note,
        content_type=draw(st.none() | _NONEMPTY),
        user_metadata=draw(st.dictionaries(_TEXT, _TEXT, max_size=4)),
        multipart_etag=draw(st.none() | _NONEMPTY), **variant)


_JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10))
_JSON = st.recursive(_JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=10)
_FIELDS = ["tool", "original_name", "file_sha256", "file_size", "md5", "created_at", "note",
           "content_type", "user_metadata", "multipart_etag", "source_name", "ref_path",
           "ref_key", "ref_sha256", "delta_size", "delta_cmd"]


@st.composite
def damaged_records(draw):
    """A valid-looking record with some fields replaced by arbitrary JSON values."""
    doc = json.loads(rust_record(note=draw(st.sampled_from(["delta", "reference", "direct",
                                                            "passthrough"])),
                                 ref_sha256=SHA_REF, delta_size=1, source_name="x"))
    for name in draw(st.lists(st.sampled_from(_FIELDS), max_size=4)):
        if draw(st.booleans()):
            doc.pop(name, None)
        else:
            doc[name] = draw(_JSON | st.sampled_from(["2026-07-10T12:34:56Z", "delta", "direct",
                                                      "-1", 1e300, float("inf")]))
    return json.dumps(doc).encode()


class PropertyTests(unittest.TestCase):
    @SETTINGS
    @given(metadata())
    def test_round_trip(self, meta):
        raw = meta.to_json()
        back = ObjectMetadata.from_json(raw)
        self.assertEqual(back, meta)
        self.assertEqual(back.to_json(), raw)
        self.assertEqual(back.etag, meta.etag)
        self.assertRegex(json.loads(raw)["created_at"],
                         r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")

    @SETTINGS
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes_raise_only_metadata_error(self, raw):
        try:
            ObjectMetadata.from_json(raw)
        except MetadataError:
            pass

    @SETTINGS
    @given(damaged_records())
    @example(rust_record().replace(b'"file_size":52428800', b'"file_size":Infinity'))
    def test_damaged_records_raise_only_metadata_error(self, raw):
        try:
            meta = ObjectMetadata.from_json(raw)
        except MetadataError:
            return
        self.assertGreaterEqual(meta.file_size, 0)
        self.assertIn(meta.note, (PASSTHROUGH, DELTA, REFERENCE))



class S3HeaderTests(unittest.TestCase):
    """Metadata as C{x-amz-meta-*} headers on an S3 backend: a key may hold any
    character, and its name goes into C{dg-original-name} (its deltaspace into
    C{dg-ref-key}); on the wire only printable ASCII survives every service."""

    def test_printable_ascii_goes_as_it_is(self):
        for value in ("app-1.0.tar", "", "a b=c?d", "=?not-a-word"):
            self.assertEqual(header_value(value), value)

    def test_anything_else_is_an_encoded_word(self):
        self.assertEqual(header_value("r\u00e9sum\u00e9.pdf"), "=?UTF-8?B?csOpc3Vtw6kucGRm?=")
        self.assertEqual(header_value("a\x01b"), "=?UTF-8?B?YQFi?=")
        self.assertEqual(header_value("c\rd"), "=?UTF-8?B?Yw1k?=")

    def test_words_aws_writes_are_read(self):
        self.assertEqual(header_text("=?utf-8?b?Y2Fmw6k=?="), "caf\u00e9")
        for kept in ("=?UTF-8?B?***?=", "=?UTF-8?B?/w==?=", "=?ISO-8859-1?B?6Q==?=", "plain"):
            self.assertEqual(header_text(kept), kept)

    @SETTINGS
    @given(st.text(max_size=60))
    def test_any_text_round_trips_in_printable_ascii(self, value):
        sent = header_value(value)
        self.assertRegex(sent, r"^[\x20-\x7e]*$")
        self.assertEqual(header_text(sent), value)

    @SETTINGS
    @given(name=st.text(min_size=1, max_size=40), prefix=st.text(max_size=20),
           user=st.dictionaries(st.text("abcdefghij-", min_size=1, max_size=8),
                                st.text(max_size=20), max_size=3))
    def test_metadata_survives_the_wire(self, name, prefix, user):
        """Through headers as an HTTP/1.1 peer carries them (bytes, read back
        as Latin-1), the names and values come back exactly."""
        meta = delta_meta(original_name=name, user_metadata=user)
        key = f"{prefix}/{name}.delta"
        headers = to_s3_headers(meta, key)
        received = {k: v.encode("ascii").decode("latin-1") for k, v in headers.items()}
        back = from_s3_headers(received, 61234, WHEN)
        self.assertEqual(back.original_name, name)
        self.assertEqual(back.user_metadata, user)
        deltaspace = key.rpartition("/")[0]
        self.assertEqual(header_text(received["x-amz-meta-dg-ref-key"]),
                         f"{deltaspace}/{REFERENCE_NAME}" if deltaspace else REFERENCE_NAME)

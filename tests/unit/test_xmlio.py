"""S3 XML in and out: client bodies are parsed safely, responses parse back.

Client bodies (DeleteObjects, CreateBucketConfiguration) may be malformed or
hostile (entity expansion, external entities); every such body is a 400
MalformedXML. Rendered documents must be well-formed and carry names verbatim
(or URL-encoded with encoding-type=url).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from urllib.parse import unquote
from xml.sax.saxutils import escape

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial import unittest

from dgproxy.s3 import xmlio
from dgproxy.s3.errors import S3Error

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
WHEN = datetime(2024, 1, 10, 12, 0, 0, 123456, tzinfo=timezone.utc)


def delete_body(keys, quiet=None, ns=True, decl=True):
    objs = "".join(f"<Object><Key>{k}</Key></Object>" for k in keys)
    q = f"<Quiet>{quiet}</Quiet>" if quiet is not None else ""
    attr = ' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"' if ns else ""
    head = '<?xml version="1.0" encoding="UTF-8"?>\n' if decl else ""
    return f"{head}<Delete{attr}>{q}{objs}</Delete>".encode("utf-8")


def malformed(test, fn, body):
    e = test.assertRaises(S3Error, fn, body)
    test.assertEqual((e.code, e.status), ("MalformedXML", 400), body[:80])


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<Delete><Object><Key>&lol9;</Key></Object></Delete>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Delete><Object><Key>&xxe;</Key></Object></Delete>"""

EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE Delete SYSTEM "http://127.0.0.1:1/evil.dtd">
<Delete><Object><Key>a</Key></Object></Delete>"""

PARAMETER_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY % p SYSTEM "http://127.0.0.1:1/x"> %p;]>
<Delete><Object><Key>a</Key></Object></Delete>"""

INTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY k "secret-key">]>
<Delete><Object><Key>&k;</Key></Object></Delete>"""

ATTACKS = [BILLION_LAUGHS, EXTERNAL_ENTITY, PARAMETER_ENTITY, INTERNAL_ENTITY]


class ParseDeleteTests(unittest.TestCase):
    def test_valid_without_namespace(self):
        self.assertEqual(xmlio.parse_delete(delete_body(["a", "b/c"], ns=False)),
                         (False, ["a", "b/c"]))

    def test_valid_with_namespace_and_quiet(self):
        self.assertEqual(xmlio.parse_delete(delete_body(["a"], quiet="true")), (True, ["a"]))
        self.assertEqual(xmlio.parse_delete(delete_body(["a"], quiet="false")), (False, ["a"]))
        self.assertEqual(xmlio.parse_delete(delete_body(["a"], quiet="True", decl=False)),
                         (True, ["a"]))

    def test_version_ids_and_other_children_are_ignored(self):
        body = (b'<Delete><Object><Key>k</Key><VersionId>v1</VersionId></Object>'
                b'<Unknown/><Object><Key>j</Key></Object></Delete>')
        self.assertEqual(xmlio.parse_delete(body), (False, ["k", "j"]))

    def test_keys_are_unescaped_and_kept_verbatim(self):
        body = delete_body(["a&amp;b", "&lt;x&gt;", " spaced ", "cr&#13;lf&#10;", "\u00e9t\u00e9",
                            "&#x1F600;", "q&quot;&apos;"])
        self.assertEqual(xmlio.parse_delete(body)[1],
                         ["a&b", "<x>", " spaced ", "cr\rlf\n", "\u00e9t\u00e9", "\U0001F600",
                          "q\"'"])

    def test_order_and_duplicates_preserved(self):
        self.assertEqual(xmlio.parse_delete(delete_body(["b", "a", "b"]))[1], ["b", "a", "b"])

    def test_thousand_keys_allowed(self):
        keys = [f"k{i}" for i in range(1000)]
        self.assertEqual(xmlio.parse_delete(delete_body(keys))[1], keys)

    def test_more_than_thousand_keys(self):
        malformed(self, xmlio.parse_delete, delete_body([f"k{i}" for i in range(1001)]))

    def test_malformed(self):
        for body in (b"", b"   \n", b"<Delete>", b"not xml", b"<Other/>",
                     b"<Delete></Delete>", b"<Delete><Object></Object></Delete>",
                     b"<Delete><Object><Key>a</Key></Object>", b"\xff\xfe<Delete/>",
                     b"<Delete><Object><Key>a</Key></Object></Delete><Delete/>",
                     b"<?xml version='1.0' encoding='bogus'?><Delete/>",
                     b"<Delete><Object><Key>\x01</Key></Object></Delete>"):
            malformed(self, xmlio.parse_delete, body)

    def test_entity_attacks(self):
        for body in ATTACKS:
            malformed(self, xmlio.parse_delete, body)

    def test_external_dtd_is_never_loaded(self):
        dtd = self.mktemp()
        with open(dtd, "w") as f:
            f.write('<!ENTITY leak "LEAKED-FROM-DTD">')
        for body in (EXTERNAL_DTD,
                     b'<?xml version="1.0"?><!DOCTYPE Delete SYSTEM "file://'
                     + os.path.abspath(dtd).encode() + b'">'
                     b"<Delete><Object><Key>&leak;</Key></Object></Delete>"):
            try:
                _, keys = xmlio.parse_delete(body)
            except S3Error as e:
                self.assertEqual(e.code, "MalformedXML")
            else:
                self.assertNotIn("LEAKED", "".join(keys))

    @SETTINGS
    @given(st.binary(max_size=200)
           | st.lists(st.sampled_from([b"<Delete>", b"</Delete>", b"<Object>", b"</Object>",
                                       b"<Key>", b"</Key>", b"a", b"&amp;", b"&x;", b"<!--",
                                       b"-->", b"<![CDATA[", b"]]>", b"<Quiet>true</Quiet>"]),
                      max_size=12).map(b"".join))
    def test_arbitrary_bodies_parse_or_are_malformed(self, body):
        try:
            quiet, keys = xmlio.parse_delete(body)
        except S3Error as e:
            self.assertEqual(e.code, "MalformedXML")
            return
        self.assertIsInstance(quiet, bool)
        self.assertTrue(1 <= len(keys) <= 1000)
        self.assertTrue(all(isinstance(k, str) for k in keys))


class ParseCreateBucketTests(unittest.TestCase):
    def test_empty_body(self):
        self.assertIsNone(xmlio.parse_create_bucket(b""))
        self.assertIsNone(xmlio.parse_create_bucket(b"  \n"))

    def test_location_constraint(self):
        body = (b'<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                b"<LocationConstraint>eu-west-1</LocationConstraint></CreateBucketConfiguration>")
        self.assertEqual(xmlio.parse_create_bucket(body), "eu-west-1")
        self.assertEqual(xmlio.parse_create_bucket(body.replace(
            b' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"', b"")), "eu-west-1")

    def test_without_constraint(self):
        self.assertIsNone(xmlio.parse_create_bucket(b"<CreateBucketConfiguration/>"))

    def test_malformed(self):
        for body in (b"<CreateBucketConfiguration>", b"<Other/>", b"junk", b"\x00\x01"):
            malformed(self, xmlio.parse_create_bucket, body)

    def test_entity_attacks(self):
        for body in ATTACKS:
            malformed(self, xmlio.parse_create_bucket,
                      body.replace(b"Delete", b"CreateBucketConfiguration"))


# --- rendering -----------------------------------------------------------------------

# Characters XML 1.0 can carry in element content, except CR (see below).
_XML_TEXT = st.lists(
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"),
                                   blacklist_characters="\ufffe\uffff"), max_size=6)
    | st.sampled_from(["\t", "\n", "&", "<", ">", '"', "'", "]]>", "&amp;", "&#13;", "<!--"]),
    max_size=8).map("".join)


def listing(keys, prefixes=(), url=False):
    body = "".join(xmlio.contents(k, WHEN, '"etag"', 12, url) for k in keys)
    body += xmlio.common_prefixes(prefixes, url)
    return ET.fromstring(xmlio.document("ListBucketResult", body))


class RenderTests(unittest.TestCase):
    def test_document_shape(self):
        raw = xmlio.document("ListBucketResult", xmlio.el("Name", "b"))
        self.assertTrue(raw.startswith(b'<?xml version="1.0" encoding="UTF-8"?>'))
        root = ET.fromstring(raw)
        self.assertEqual(root.tag, NS + "ListBucketResult")
        self.assertEqual(root.find(NS + "Name").text, "b")

    def test_list_buckets(self):
        root = ET.fromstring(xmlio.list_buckets([("alpha", WHEN), ("b&c", WHEN)]))
        self.assertEqual(root.tag, NS + "ListAllMyBucketsResult")
        names = [b.find(NS + "Name").text for b in root.iter(NS + "Bucket")]
        self.assertEqual(names, ["alpha", "b&c"])
        self.assertEqual(root.find(f"{NS}Buckets/{NS}Bucket/{NS}CreationDate").text,
                         "2024-01-10T12:00:00.123Z")
        self.assertIsNotNone(root.find(f"{NS}Owner/{NS}ID"))

    def test_contents_fields(self):
        root = listing(["a<&>b"])
        c = root.find(NS + "Contents")
        self.assertEqual(c.find(NS + "Key").text, "a<&>b")
        self.assertEqual(c.find(NS + "ETag").text, '"etag"')
        self.assertEqual(c.find(NS + "Size").text, "12")
        self.assertEqual(c.find(NS + "LastModified").text, "2024-01-10T12:00:00.123Z")
        self.assertEqual(c.find(NS + "StorageClass").text, "STANDARD")

    def test_timestamps_are_utc(self):
        plus2 = timezone(timedelta(hours=2))
        self.assertEqual(xmlio.iso8601(datetime(2024, 1, 10, 14, 0, 0, 5000, tzinfo=plus2)),
                         "2024-01-10T12:00:00.005Z")

    def test_common_prefixes(self):
        root = listing([], ["a/", "x&y/"])
        self.assertEqual([p.find(NS + "Prefix").text for p in root.iter(NS + "CommonPrefixes")],
                         ["a/", "x&y/"])

    def test_url_encoding(self):
        root = listing(["a b/c+d%"], ["p q/"], url=True)
        self.assertEqual(root.find(f"{NS}Contents/{NS}Key").text, "a%20b/c%2Bd%25")
        self.assertEqual(root.find(f"{NS}CommonPrefixes/{NS}Prefix").text, "p%20q/")

    def test_carriage_return_survives(self):
        # XML parsers normalise a literal CR to LF; S3 sends &#13; so keys with
        # CR round-trip (AWS "XML related object key constraints").
        root = listing(["a\rb", "c\r\nd"], ["p\r/"])
        self.assertEqual([k.text for k in root.iter(NS + "Key")], ["a\rb", "c\r\nd"])
        self.assertEqual(root.find(f"{NS}CommonPrefixes/{NS}Prefix").text, "p\r/")


    @SETTINGS
    @given(st.lists(_XML_TEXT, max_size=5), st.lists(_XML_TEXT, max_size=3))
    def test_rendered_names_parse_back(self, keys, prefixes):
        root = listing(keys, prefixes)
        self.assertEqual([k.text or "" for k in root.iter(NS + "Key")], keys)
        self.assertEqual([p.text or "" for p in root.iter(NS + "Prefix")], prefixes)

    @SETTINGS
    @given(st.lists(st.text(max_size=30), max_size=5))
    def test_url_encoded_names_parse_back_for_any_key(self, keys):
        root = listing(keys, url=True)
        self.assertEqual([unquote(k.text or "") for k in root.iter(NS + "Key")], keys)

    @SETTINGS
    @given(_XML_TEXT)
    def test_el_escapes_any_value(self, value):
        root = ET.fromstring(xmlio.document("R", xmlio.el("V", value)))
        self.assertEqual(root.find(NS + "V").text or "", value)


class FastFormattingTests(unittest.TestCase):
    """The hand-made formats a listing uses per key equal the library ones."""

    @given(st.datetimes(min_value=datetime(1000, 1, 2), max_value=datetime(9999, 12, 30),
                        timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=2)),
                                                   timezone(timedelta(hours=-9, minutes=-30))])))
    def test_iso8601_is_strftimes(self, when):
        """(glibc's %Y drops the zeros of years before 1000; ours keeps four digits.)"""
        utc = when.astimezone(timezone.utc)
        self.assertEqual(xmlio.iso8601(when), utc.strftime("%Y-%m-%dT%H:%M:%S.")
                         + f"{utc.microsecond // 1000:03d}Z")

    @given(st.text())
    def test_xml_text_is_escapes(self, text):
        self.assertEqual(xmlio.xml_text(text), escape(text, {"\r": "&#13;"}))

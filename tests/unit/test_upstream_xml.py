"""Parsing an S3 service's XML answers (dgproxy.storage.s3.parse_xml).

The answers come over the network from a service dgproxy does not control:
whatever arrives, parsing either gives the document or raises ParseError,
quickly, without expanding entities or reading files."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

from hypothesis import given, strategies as st
from twisted.trial import unittest

from dgproxy.storage.s3 import parse_xml

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
LISTING = (b'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns='
           b'"http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><IsTruncated>false'
           b'</IsTruncated><Contents><Key>caf\xc3\xa9 &amp; co.tar</Key><Size>12</Size>'
           b'</Contents></ListBucketResult>')

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<Error><Code>&lol3;</Code></Error>"""

EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE e [<!ENTITY secret SYSTEM "file:///etc/passwd">]><Error><Code>&secret;</Code></Error>"""


class ParseXmlTests(unittest.TestCase):
    def test_an_s3_answer_parses(self):
        root = parse_xml(LISTING)
        self.assertEqual(root.find(NS + "Contents").findtext(NS + "Key"), "café & co.tar")
        self.assertEqual(parse_xml(b"\xef\xbb\xbf<Error><Code>SlowDown</Code></Error>")
                         .findtext("Code"), "SlowDown")
        self.assertEqual(parse_xml(b"<?xml version='1.0' encoding='us-ascii'?><A>x</A>").text, "x")

    def test_documents_with_a_dtd_are_refused(self):
        for body in (BILLION_LAUGHS, EXTERNAL, b'<!DOCTYPE x SYSTEM "http://example/x.dtd"><x/>'):
            self.assertRaises(ET.ParseError, parse_xml, body)

    def test_encodings_that_could_hide_a_dtd_are_refused(self):
        for body in (BILLION_LAUGHS.decode().encode("utf-16"),
                     BILLION_LAUGHS.decode().encode("utf-32"),
                     '<?xml version="1.0" encoding="cp037"?><x/>'.encode("cp037"),
                     b'<?xml version="1.0" encoding="cp037"?><x/>',
                     b'<?xml version="1.0" encoding="ISO-8859-1"?><x/>'):
            self.assertRaises(ET.ParseError, parse_xml, body)

    def test_an_entity_without_a_dtd_is_an_error(self):
        self.assertRaises(ET.ParseError, parse_xml, b"<Error><Code>&lol;</Code></Error>")

    @given(st.binary(max_size=400))
    def test_any_bytes_parse_or_raise_parse_error(self, body):
        started = time.monotonic()
        try:
            parse_xml(body)
        except ET.ParseError:
            pass
        self.assertLess(time.monotonic() - started, 1.0)

    @given(st.text(max_size=200))
    def test_any_text_in_an_element_round_trips(self, text):
        text = "".join(c for c in text if c in "\t\n" or (" " <= c <= "\ud7ff")
                       or ("\ue000" <= c <= "\ufffd") or c >= "\U00010000")
        body = b"<Error><Message>" + text.replace("&", "&amp;").replace("<", "&lt;").replace(
            "\r", "&#13;").encode("utf-8") + b"</Message></Error>"
        self.assertEqual(parse_xml(body).findtext("Message") or "", text)

"""Parsing an S3 service's XML answers (dgproxy.storage.s3client.parse_xml).

The answers come over the network from a service dgproxy does not control:
whatever arrives, parsing either gives the document or raises ParseError,
quickly, without expanding entities or reading files."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

from hypothesis import given, strategies as st
from twisted.trial import unittest

from dgproxy.storage.s3client import parse_xml

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
        self.assertEqual(root.find("Contents").findtext("Key"), "café & co.tar")
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


def _names(root: ET.Element) -> list:
    return [(el.tag, (el.text or "").strip()) for el in root.iter()]


PAGE = ('<ListBucketResult{root}><Name>b</Name>{inner}<IsTruncated>false</IsTruncated>'
        '<Contents><Key>a&amp;b</Key><Size>3</Size><ETag>&quot;e&quot;</ETag></Contents>'
        '</ListBucketResult>')


class NamespaceTests(unittest.TestCase):
    """Whatever namespace a service declares, the elements have bare names,
    so a listing from AWS, from a service that declares none, or from Google
    Cloud Storage's XML API reads the same."""

    def test_the_namespaces_services_send_read_alike(self):
        want = _names(parse_xml(PAGE.format(root="", inner="").encode()))
        self.assertEqual(want[0], ("ListBucketResult", ""))
        for root in (' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"',
                     " xmlns='http://doc.s3.amazonaws.com/2006-03-01'",  # GCS
                     ' xmlns = "urn:x"  id="1"', ' id="1" xmlns="urn:x"'):
            self.assertEqual(_names(parse_xml(PAGE.format(root=root, inner="").encode())), want,
                             root)
        prefixed = ('<s3:ListBucketResult xmlns:s3="urn:x"><s3:Name>b</s3:Name>'
                    '<s3:IsTruncated>false</s3:IsTruncated><s3:Contents><s3:Key>a&amp;b</s3:Key>'
                    '<s3:Size>3</s3:Size><s3:ETag>&quot;e&quot;</s3:ETag></s3:Contents>'
                    '</s3:ListBucketResult>')
        self.assertEqual(_names(parse_xml(prefixed.encode())), want)
        declared = '<?xml version="1.0" encoding="UTF-8"?>\n' + PAGE.format(
            root=' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"', inner="")
        self.assertEqual(_names(parse_xml(declared.encode())), want)

    def test_an_inner_default_namespace_is_taken_off_too(self):
        body = PAGE.format(root=' xmlns="urn:a"', inner='<Owner xmlns="urn:b"><ID>1</ID></Owner>')
        names = [tag for tag, _ in _names(parse_xml(body.encode()))]
        self.assertIn("Owner", names)
        self.assertIn("ID", names)
        self.assertFalse([t for t in names if t.startswith("{")], names)

    def test_xmlns_in_text_is_only_text(self):
        body = PAGE.format(root=' xmlns="urn:a"', inner="<Prefix>xmlns=&quot;x&quot;</Prefix>")
        root = parse_xml(body.encode())
        self.assertEqual(root.findtext("Prefix"), 'xmlns="x"')
        self.assertEqual(root.findtext("Contents/Key"), "a&b")

    @given(st.sampled_from(["", ' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"',
                            " xmlns='urn:gcs'", ' xmlns:p="urn:p"']),
           st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")),
                            max_size=12), max_size=5))
    def test_keys_survive_any_namespace(self, root, keys):
        contents = "".join(f"<Contents><Key>{k.replace('&', '&amp;').replace('<', '&lt;')}</Key>"
                           "</Contents>" for k in keys)
        body = f"<ListBucketResult{root}>{contents}</ListBucketResult>".encode()
        self.assertEqual([c.findtext("Key") or "" for c in parse_xml(body).iter("Contents")],
                         [k.replace("\r", "\n") for k in keys])

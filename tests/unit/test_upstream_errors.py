"""How an S3 backend's error answer becomes the client's (dgproxy.s3.errors.from_upstream).

The code and message come from the service's response body, so they are
hostile input: whatever they hold, the client gets a well-formed S3 error."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hypothesis import given, strategies as st
from twisted.trial import unittest

from dgproxy.s3.errors import from_upstream, render_error


class FromUpstreamTests(unittest.TestCase):
    def test_throttling_keeps_its_code(self):
        for code in ("SlowDown", "ServiceUnavailable"):
            e = from_upstream(503, code, "Please reduce your request rate.")
            self.assertEqual((e.status, e.code, e.message),
                             (503, code, "Please reduce your request rate."))

    def test_a_503_without_a_body_is_slow_down(self):
        e = from_upstream(503, "HTTP503", "")
        self.assertEqual((e.status, e.code), (503, "SlowDown"))
        self.assertTrue(e.message)

    def test_errors_about_the_request_pass_through(self):
        for status, code in ((400, "InvalidRequest"), (400, "KeyTooLongError"),
                             (400, "EntityTooLarge"), (411, "MissingContentLength"),
                             (416, "InvalidRange"), (409, "OperationAborted")):
            e = from_upstream(status, code, "why")
            self.assertEqual((e.status, e.code, e.message), (status, code, "why"))

    def test_refusals_of_dgproxys_credentials_and_kms_key_are_internal(self):
        for status, code in ((403, "AccessDenied"), (403, "InvalidAccessKeyId"),
                             (403, "SignatureDoesNotMatch"), (403, "RequestTimeTooSkewed"),
                             (400, "AuthorizationHeaderMalformed"), (400, "ExpiredToken"),
                             (403, "SomethingNew"), (401, "Unauthorized"),
                             (400, "KMS.DisabledException"), (400, "KMS.NotFoundException")):
            e = from_upstream(status, code, "details")
            self.assertEqual((e.status, e.code), (500, "InternalError"), code)

    def test_service_failures_and_bodiless_answers_are_internal(self):
        for status, code in ((500, "InternalError"), (501, "NotImplemented"),
                             (502, "HTTP502"), (400, "HTTP400"), (404, "HTTP404")):
            self.assertEqual(from_upstream(status, code, "").code, "InternalError", code)

    def test_a_code_that_is_not_a_code_is_not_passed_on(self):
        for code in ("<b>", "Invalid Request", "", "1abc", "x" * 65, "Bad\nCode"):
            self.assertEqual(from_upstream(400, code, "m").code, "InternalError", repr(code))

    def test_long_messages_are_cut(self):
        self.assertEqual(len(from_upstream(400, "InvalidRequest", "m" * 10_000).message), 512)

    @given(st.integers(min_value=100, max_value=999), st.text(max_size=80), st.text(max_size=600))
    def test_anything_renders_as_well_formed_s3_xml(self, status, code, message):
        e = from_upstream(status, code, message)
        if 400 <= status < 500 and status not in (401, 403, 407):
            self.assertIn(e.status, (status, 500))
        else:
            self.assertIn(e.status, (500, 503) if status == 503 else (500,))
        root = ET.fromstring(render_error(e, "/bucket/key", "REQ1"))
        self.assertEqual(root.findtext("Code"), e.code)
        self.assertTrue(e.code)

"""The streamed S3 PUT writer: the last chunk waits for commit.

A body's checks (Content-MD5, signed SHA-256, checksum headers) end with its
last byte. Until the service has every byte of the declared length it stores
nothing, so holding the latest chunk back until commit means an aborted upload
can never complete upstream, however the client's bytes were split."""

from datetime import datetime, timezone

from twisted.internet import defer, task
from twisted.trial import unittest

from dgproxy.storage.interface import BackendUnavailable
from dgproxy.storage.s3 import _PushBody, _StreamingWriter
from dgproxy.storage.metadata import ObjectMetadata


class _Consumer:
    def __init__(self):
        self.data = []

    def write(self, data: bytes) -> None:
        self.data.append(data)


class _Client:
    read_timeout = 30

    def __init__(self):
        self.reactor = task.Clock()


class _Backend:
    name = "fake"

    def __init__(self):
        self.client = _Client()


class StreamingWriterTests(unittest.TestCase):
    def make(self, length: int):
        body = _PushBody(length)
        consumer = _Consumer()
        body.startProducing(consumer)
        response = defer.Deferred()
        self.backend = _Backend()
        return _StreamingWriter(self.backend, "bkt", "k", body, response), consumer, response

    def test_last_chunk_is_held_until_commit(self):
        writer, consumer, response = self.make(9)
        for chunk in (b"abc", b"def", b"ghi"):
            self.successResultOf(writer.write(chunk))
        self.assertEqual(b"".join(consumer.data), b"abcdef")

    def test_abort_never_sends_the_last_chunk(self):
        writer, consumer, response = self.make(6)
        self.successResultOf(writer.write(b"abc"))
        self.successResultOf(writer.write(b"def"))
        writer.abort()
        self.assertEqual(b"".join(consumer.data), b"abc")
        self.assertTrue(response.called)  # cancelled: the connection is cut

    def test_commit_sends_everything_and_returns_the_etag(self):
        writer, consumer, response = self.make(6)
        self.successResultOf(writer.write(b"abc"))
        self.successResultOf(writer.write(b"def"))

        class Answer:
            code = 200
            length = 0
            headers = None

        from twisted.web.http_headers import Headers
        answer = Answer()
        answer.headers = Headers({b"etag": [b'"0123456789abcdef0123456789abcdef"']})
        d = defer.ensureDeferred(writer.commit(_meta()))
        self.assertEqual(b"".join(consumer.data), b"abcdef")
        response.callback(answer)
        self.assertEqual(self.successResultOf(d), "0123456789abcdef0123456789abcdef")

    def test_an_upstream_that_never_answers_is_given_up(self):
        writer, consumer, response = self.make(6)
        self.successResultOf(writer.write(b"abc"))
        self.successResultOf(writer.write(b"def"))
        d = defer.ensureDeferred(writer.commit(_meta()))
        self.assertNoResult(d)
        self.backend.client.reactor.advance(30)
        self.failureResultOf(d, BackendUnavailable)


    def test_an_upstream_that_stops_taking_the_body_is_given_up(self):
        writer, consumer, response = self.make(9)
        self.successResultOf(writer.write(b"abc"))
        writer._body.pauseProducing()  # the connection to the service is full
        d = writer.write(b"def")  # sends the held b"abc", then waits
        self.assertNoResult(d)
        self.backend.client.reactor.advance(29)
        self.assertNoResult(d)
        self.backend.client.reactor.advance(1)
        self.successResultOf(d)  # released: the writer gave up
        self.failureResultOf(writer.write(b"ghi"), BackendUnavailable)
        self.assertTrue(response.called)  # the upstream request is cancelled
        response.addErrback(lambda f: None)

def _meta() -> ObjectMetadata:
    return ObjectMetadata(tool="test", original_name="k", file_sha256="", file_size=6, md5="",
                          created_at=datetime.now(timezone.utc))

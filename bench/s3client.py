"""A minimal streaming S3 client for the benchmark.

The same client talks to dgproxy and to SeaweedFS, so that the ratio of the
two numbers says something about the servers and not about two different
clients. It is deliberately cheap on the client side:

- requests are signed with botocore's C{SigV4Auth} and
  C{x-amz-content-sha256: UNSIGNED-PAYLOAD}, so the client never hashes the
  body to sign it;
- a PUT body is streamed from a file with C{socket.sendfile} (zero-copy from
  the page cache); the body is never held in memory;
- a GET body is read into one reusable 1 MiB buffer and discarded, or fed to
  an incremental MD5 when the caller asks for verification;
- one keep-alive connection is reused; (re)connecting and signing happen
  before the clock starts, so the timed part is the request on the wire and
  the server's work.

Besides PUT/GET it speaks just enough S3 for the other bench sections:
ListObjectsV2 (to add up what a server stored), the multipart calls
(parts are sent with C{sendfile} from an offset of a source file), and a PUT
of a small in-memory body (the concurrency section).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import quote
from xml.etree import ElementTree

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
READ_CHUNK = 1024 * 1024
IDLE_RECONNECT = 5.0  # seconds a kept-alive connection may sit idle before reuse
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def _query(params: dict) -> str:
    return "&".join(quote(k, safe="~") + "=" + quote(v, safe="~") for k, v in sorted(params.items()))


class S3RequestError(Exception):
    def __init__(self, method: str, path: str, status: int, body: bytes):
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:500]!r}")
        self.status = status
        self.body = body


@dataclass
class Result:
    seconds: float
    nbytes: int
    etag: str = ""
    md5: str = ""  # hex MD5 of the GET body, when asked for


class S3Client:
    """Path-style S3 over one persistent http.client connection."""

    def __init__(self, host: str, port: int, access_key: str, secret_key: str,
                 region: str = "us-east-1", timeout: float = 300.0):
        self.host = host
        self.port = port
        self.netloc = f"{host}:{port}"
        self.timeout = timeout
        self._signer = SigV4Auth(Credentials(access_key, secret_key), "s3", region)
        self._conn: Optional[http.client.HTTPConnection] = None
        self._last_used = time.monotonic()
        self._buf = bytearray(READ_CHUNK)
        self.connects = 0  # TCP connections opened (1 while keep-alive holds)

    # -- connection and signing ---------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        # A connection left idle for a while may have been closed by the
        # server's idle timeout: start afresh (before any clock starts).
        if self._conn is not None and time.monotonic() - self._last_used > IDLE_RECONNECT:
            self.close()
        if self._conn is None or self._conn.sock is None:
            self.close()
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._conn.connect()
            self.connects += 1
        self._last_used = time.monotonic()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _signed_headers(self, method: str, path: str, extra: Optional[dict] = None) -> dict:
        headers = {"x-amz-content-sha256": UNSIGNED_PAYLOAD}
        headers.update(extra or {})
        req = AWSRequest(method=method, url=f"http://{self.netloc}{path}", headers=headers)
        self._signer.add_auth(req)
        return dict(req.headers.items())

    @staticmethod
    def path(bucket: str, key: str = "") -> str:
        return "/" + quote(bucket) + ("/" + quote(key, safe="/~") if key else "")

    def _start(self, method: str, path: str, headers: dict) -> http.client.HTTPConnection:
        conn = self._connection()
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        return conn

    @staticmethod
    def _early_answer(conn: http.client.HTTPConnection) -> tuple[int, bytes]:
        try:
            resp = conn.getresponse()
            return resp.status, resp.read()
        except Exception as e:
            return 0, f"(no response: {e!r})".encode()

    def _finish(self, resp: http.client.HTTPResponse) -> None:
        self._last_used = time.monotonic()
        if resp.will_close:
            self.close()

    # -- small requests (not timed) ------------------------------------------
    def request(self, method: str, path: str, ok=(200, 204), body: bytes = b"",
                extra: Optional[dict] = None) -> tuple[int, bytes]:
        """One small request; C{path} may carry a query string (it is signed)."""
        headers = self._signed_headers(method, path, {"Content-Length": str(len(body)),
                                                      **(extra or {})})
        try:
            conn = self._start(method, path, headers)
            if body:
                conn.send(body)
            resp = conn.getresponse()
            data = resp.read()
        except (ConnectionError, http.client.HTTPException):
            self.close()
            raise
        self._finish(resp)
        if ok and resp.status not in ok:
            raise S3RequestError(method, path, resp.status, data)
        return resp.status, data

    def create_bucket(self, bucket: str) -> None:
        status, body = self.request("PUT", self.path(bucket), ok=None)
        if status != 200 and b"BucketAlreadyOwnedByYou" not in body:
            raise S3RequestError("PUT", self.path(bucket), status, body)

    def delete_object(self, bucket: str, key: str) -> None:
        self.request("DELETE", self.path(bucket, key))

    def list_objects(self, bucket: str, prefix: str = "") -> list[tuple[str, int]]:
        """(key, size) of every object under C{prefix} (ListObjectsV2, all pages)."""
        out: list[tuple[str, int]] = []
        token = None
        while True:
            query = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
            if token:
                query["continuation-token"] = token
            _, body = self.request("GET", self.path(bucket) + "?" + _query(query), ok=(200,))
            root = ElementTree.fromstring(body)
            for c in root.iter(S3_NS + "Contents"):
                out.append((c.findtext(S3_NS + "Key") or "", int(c.findtext(S3_NS + "Size") or 0)))
            token = root.findtext(S3_NS + "NextContinuationToken")
            if (root.findtext(S3_NS + "IsTruncated") or "false") != "true" or not token:
                return out

    # -- multipart ----------------------------------------------------------------
    def create_multipart(self, bucket: str, key: str) -> str:
        _, body = self.request("POST", self.path(bucket, key) + "?uploads", ok=(200,),
                               extra={"Content-Type": "application/octet-stream"})
        upload_id = ElementTree.fromstring(body).findtext(S3_NS + "UploadId")
        if not upload_id:
            raise IOError(f"CreateMultipartUpload {bucket}/{key}: no UploadId in {body[:300]!r}")
        return upload_id

    def upload_part(self, bucket: str, key: str, upload_id: str, number: int, filename: str,
                    offset: int, length: int) -> Result:
        """UploadPart from C{filename}[offset:offset+length] (sendfile); timed like put_file."""
        query = _query({"partNumber": str(number), "uploadId": upload_id})
        return self.put_file(bucket, key, filename, offset=offset, length=length, query=query)

    def complete_multipart(self, bucket: str, key: str, upload_id: str,
                           parts: list[tuple[int, str]]) -> Result:
        """CompleteMultipartUpload, timed from the first byte of the request to the
        last byte of the answer (which may arrive after keep-alive whitespace)."""
        xml = "<CompleteMultipartUpload>" + "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>\"{e}\"</ETag></Part>" for n, e in parts
        ) + "</CompleteMultipartUpload>"
        body = xml.encode()
        path = self.path(bucket, key) + "?" + _query({"uploadId": upload_id})
        headers = self._signed_headers("POST", path, {"Content-Length": str(len(body)),
                                                      "Content-Type": "application/xml"})
        self._connection()
        t0 = time.perf_counter()
        try:
            conn = self._start("POST", path, headers)
            conn.send(body)
            resp = conn.getresponse()
            data = resp.read()
        except (ConnectionError, http.client.HTTPException):
            self.close()
            raise
        t1 = time.perf_counter()
        self._finish(resp)
        root = None
        try:
            root = ElementTree.fromstring(data.strip())
        except ElementTree.ParseError:
            pass
        if resp.status != 200 or root is None or root.tag.endswith("Error"):
            raise S3RequestError("POST", path, resp.status, data.strip())
        etag = (root.findtext(S3_NS + "ETag") or "").strip('"')
        return Result(t1 - t0, 0, etag=etag)

    # -- timed transfers ----------------------------------------------------
    def put_file(self, bucket: str, key: str, filename: str, offset: int = 0,
                 length: Optional[int] = None, query: str = "") -> Result:
        """PUT the file (or C{length} bytes of it from C{offset}) as one object;
        returns wall time and the ETag."""
        size = os.path.getsize(filename) - offset if length is None else length
        path = self.path(bucket, key) + ("?" + query if query else "")
        headers = self._signed_headers("PUT", path, {
            "Content-Length": str(size), "Content-Type": "application/octet-stream"})
        self._connection()
        with open(filename, "rb") as f:
            t0 = time.perf_counter()
            try:
                conn = self._start("PUT", path, headers)
                try:
                    sent = conn.sock.sendfile(f, offset, size)
                except ConnectionError as e:
                    # The server answered early and closed (an error): show its answer.
                    status, body = self._early_answer(conn)
                    self.close()
                    raise S3RequestError("PUT", path, status, body) from e
                if sent != size:
                    raise IOError(f"sendfile sent {sent} of {size} bytes")
                resp = conn.getresponse()
                body = resp.read()
            except (ConnectionError, http.client.HTTPException):
                self.close()
                raise
            t1 = time.perf_counter()
        self._finish(resp)
        if resp.status != 200:
            raise S3RequestError("PUT", path, resp.status, body)
        return Result(t1 - t0, size, etag=(resp.getheader("ETag") or "").strip('"'))

    def put_bytes(self, bucket: str, key: str, data: bytes) -> Result:
        """PUT a small in-memory body; the headers and the body go out in one
        send. Timed from the first byte of the request to the last of the answer."""
        path = self.path(bucket, key)
        headers = self._signed_headers("PUT", path, {
            "Content-Length": str(len(data)), "Content-Type": "application/octet-stream"})
        self._connection()
        t0 = time.perf_counter()
        try:
            conn = self._connection()
            conn.putrequest("PUT", path, skip_accept_encoding=True)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders(data)
            resp = conn.getresponse()
            body = resp.read()
        except (ConnectionError, http.client.HTTPException, OSError):
            self.close()
            raise
        t1 = time.perf_counter()
        self._finish(resp)
        if resp.status != 200:
            raise S3RequestError("PUT", path, resp.status, body)
        return Result(t1 - t0, len(data), etag=(resp.getheader("ETag") or "").strip('"'))

    def get(self, bucket: str, key: str, md5: bool = False,
            sink: Optional[Callable[[memoryview], None]] = None,
            byte_range: Optional[tuple[int, int]] = None) -> Result:
        """GET the object (or bytes C{first}-C{last} of it, a 206), reading
        1 MiB at a time and discarding it.

        With C{md5=True} the bytes are also fed to an incremental MD5, and
        with C{sink} to that callable (that cost is then inside the timing)."""
        path = self.path(bucket, key)
        extra = None if byte_range is None else {"Range": "bytes=%d-%d" % byte_range}
        headers = self._signed_headers("GET", path, extra)
        self._connection()
        view = memoryview(self._buf)
        digest = hashlib.md5() if md5 else None
        total = 0
        t0 = time.perf_counter()
        try:
            resp = self._start("GET", path, headers).getresponse()
            if resp.status != (200 if byte_range is None else 206):
                body = resp.read()
                self._finish(resp)
                raise S3RequestError("GET", path, resp.status, body)
            while True:
                n = resp.readinto(view)
                if not n:
                    break
                total += n
                if digest is not None:
                    digest.update(view[:n])
                if sink is not None:
                    sink(view[:n])
        except (ConnectionError, http.client.HTTPException):
            self.close()
            raise
        t1 = time.perf_counter()
        length = resp.getheader("Content-Length")
        self._finish(resp)
        if length is not None and int(length) != total:
            raise IOError(f"GET {path}: Content-Length {length} but read {total} bytes")
        return Result(t1 - t0, total, etag=(resp.getheader("ETag") or "").strip('"'),
                      md5=digest.hexdigest() if digest is not None else "")

    def get_slowly(self, bucket: str, key: str, rate: float, seconds: float) -> int:
        """Start a GET, read at about C{rate} bytes/s for C{seconds}, then drop
        the connection mid-body (a slow client that goes away). Returns the
        bytes read."""
        path = self.path(bucket, key)
        headers = self._signed_headers("GET", path)
        view = memoryview(self._buf)[:64 * 1024]
        total = 0
        try:
            resp = self._start("GET", path, headers).getresponse()
            if resp.status != 200:
                raise S3RequestError("GET", path, resp.status, resp.read())
            t0 = time.perf_counter()
            while True:
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds:
                    break
                ahead = total / rate - elapsed
                if ahead > 0:
                    time.sleep(min(ahead, 0.01))
                    continue
                n = resp.readinto(view)
                if not n:
                    break
                total += n
        finally:
            self.close()  # abandons the rest of the body
        return total

"""Server-side AWS Signature Version 4 verification for S3.

Pure functions over a L{SignedRequest}: no Twisted, no I/O, no clock (the
caller passes C{now}), so every rule here is testable against botocore as the
oracle. The caller maps an L{AuthFailure} to its C{error} for the client and
its C{reason} for C{deltaglider_auth_failures_total}; the client never learns
whether the key, the user or the signature was wrong.

Header values must reach here as text decoded from latin-1 (what botocore's
http.client puts on the wire), because the canonical request is UTF-8 of the
same text botocore signed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Mapping, Optional
from urllib.parse import quote, unquote_to_bytes

from dgproxy.s3.errors import (
    AccessDenied, InvalidArgument, RequestTimeTooSkewed, S3Error)
from dgproxy.wire import parse_http_date

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING_VALUES = (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_PRESIGNED_EXPIRY = 604800  # 7 days, as AWS
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_SIG = re.compile(r"[0-9a-f]{64}")
_AMZ_DATE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
_SAFE = "-_.~"  # with alphanumerics: the RFC 3986 unreserved set S3 leaves alone


@dataclass(frozen=True)
class SignedRequest:
    """What verification needs of a request, exactly as the client sent it."""
    method: str
    raw_path: bytes   # percent-encoded as sent, no query
    raw_query: bytes  # after '?', may be b""
    headers: Mapping[str, list[str]]  # lowercase names -> raw values


class AuthFailure(Exception):
    """Authentication failed: C{reason} is the metric label, C{error} the reply."""

    def __init__(self, reason: str, error: S3Error):
        super().__init__(f"{reason}: {error.code}")
        self.reason = reason
        self.error = error


@dataclass(frozen=True)
class ChunkSigning:
    """What the aws-chunked decoder needs to check the chunk signature chain."""
    signing_key: bytes
    amz_date: str
    scope: str
    seed_signature: str


@dataclass(frozen=True)
class AuthResult:
    access_key_id: str
    payload_hash: str  # 64-hex, UNSIGNED-PAYLOAD or a STREAMING-* value
    presigned: bool
    chunk_signing: Optional[ChunkSigning]


# -- canonical forms --------------------------------------------------------

def _encode(data: bytes, safe: str = _SAFE) -> str:
    """Percent-encode every byte but unreserved ones (uppercase hex)."""
    return quote(data, safe=safe)


def canonical_uri(raw_path: bytes) -> str:
    """S3 rules: decode, re-encode each byte but unreserved and '/'; S3 does
    not collapse '//' nor resolve '.'/'..', so neither do we."""
    return _encode(unquote_to_bytes(raw_path or b"/"), _SAFE + "/") or "/"


def _decode_query_part(part: bytes) -> bytes:
    # '+' means space. botocore's S3 client sends %20, but a request signed
    # from AWSRequest(params=...) goes out through urlencode ("a b" -> "a+b")
    # while being signed as "a%20b"; a real '+' is always sent as %2B. AWS
    # S3 reads '+' the same way. The S3 layer must decode the query alike.
    return unquote_to_bytes(part.replace(b"+", b" "))


def parse_query(raw_query: bytes) -> list[tuple[bytes, bytes]]:
    """Decoded (name, value) pairs in order; a bare name has value b""."""
    pairs = []
    for segment in raw_query.split(b"&"):
        if not segment:
            continue
        name, _, value = segment.partition(b"=")
        pairs.append((_decode_query_part(name), _decode_query_part(value)))
    return pairs


def canonical_query(pairs: list[tuple[bytes, bytes]], exclude: Optional[bytes] = None) -> str:
    """Encode each name and value, sort by name then value, join with '&'."""
    encoded = sorted((_encode(n), _encode(v)) for n, v in pairs if n != exclude)
    return "&".join(f"{n}={v}" for n, v in encoded)


def _trim(value: str) -> str:
    return " ".join(value.split())


def canonical_headers(headers: Mapping[str, list[str]], signed: list[str]) -> str:
    lines = []
    for name in signed:
        values = headers.get(name, [])
        lines.append(f"{name}:{','.join(_trim(v) for v in values)}\n")
    return "".join(lines)


@functools.lru_cache(maxsize=64)
def signing_key(secret: str, date: str, region: str, service: str = "s3") -> bytes:
    """The derived key (four HMACs); it changes once a day, so it is kept."""
    key = hmac.new(("AWS4" + secret).encode("utf-8"), date.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def hmac_hex(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def _string_to_sign(amz_date: str, scope: str, canonical_request: str) -> str:
    digest = hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


# -- parsing ----------------------------------------------------------------

def _header(req: SignedRequest, name: str) -> Optional[str]:
    values = req.headers.get(name)
    return values[0] if values else None


def _query_value(pairs: list[tuple[bytes, bytes]], name: bytes) -> Optional[str]:
    found = [v for n, v in pairs if n == name]
    if not found:
        return None
    if len(found) > 1:
        raise AuthFailure("invalid_presigned", InvalidArgument(
            f"Duplicate query parameter {name.decode()}"))
    return found[0].decode("utf-8", "replace")


def is_anonymous(req: SignedRequest) -> bool:
    """No Authorization header and no X-Amz-Algorithm query key."""
    if req.headers.get("authorization"):
        return False
    return not any(n == b"X-Amz-Algorithm" for n, _ in parse_query(req.raw_query))


@dataclass(frozen=True)
class _Credential:
    access_key_id: str
    date: str
    region: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/s3/aws4_request"


def _parse_credential(value: str, reason: str, what: str) -> _Credential:
    parts = value.rsplit("/", 4)
    if (len(parts) != 5 or not parts[0] or not re.fullmatch(r"\d{8}", parts[1])
            or not parts[2] or parts[3] != "s3" or parts[4] != "aws4_request"):
        raise AuthFailure(reason, InvalidArgument(
            f"{what}: credential scope must be <key>/<yyyymmdd>/<region>/s3/aws4_request"))
    return _Credential(parts[0], parts[1], parts[2])


def _parse_signed_headers(value: str, reason: str) -> list[str]:
    names = value.split(";")
    if any(not n or n != n.strip().lower() for n in names):
        raise AuthFailure(reason, InvalidArgument("Invalid SignedHeaders"))
    if "host" not in names:
        raise AuthFailure(reason, InvalidArgument("SignedHeaders must include host"))
    return names


def _parse_amz_date(value: str, reason: str) -> datetime:
    if not _AMZ_DATE.fullmatch(value):
        raise AuthFailure(reason, InvalidArgument(f"Invalid X-Amz-Date: {value}"))
    try:  # fields by position: the pattern fixed them (strptime is slow)
        return datetime(int(value[0:4]), int(value[4:6]), int(value[6:8]), int(value[9:11]),
                        int(value[11:13]), int(value[13:15]), tzinfo=timezone.utc)
    except ValueError:
        raise AuthFailure(reason, InvalidArgument(f"Invalid X-Amz-Date: {value}")) from None


def _request_time(req: SignedRequest) -> tuple[str, datetime]:
    """The signing timestamp (x-amz-date wins over Date) in both forms."""
    amz = _header(req, "x-amz-date")
    if amz is not None:
        when = _parse_amz_date(amz.strip(), "missing_header")
        return amz.strip(), when
    date = _header(req, "date")
    if date is None:
        raise AuthFailure("missing_header", AccessDenied(
            "AWS authentication requires a valid Date or x-amz-date header"))
    when = parse_http_date(date)
    if when is None:
        raise AuthFailure("missing_header", InvalidArgument(f"Invalid Date header: {date}"))
    return when.strftime(AMZ_DATE_FORMAT), when


def _parse_authorization(value: str) -> tuple[_Credential, list[str], str]:
    bad = AuthFailure("missing_header", InvalidArgument("Invalid Authorization header format"))
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise bad
    fields: dict[str, str] = {}
    for item in rest.split(","):
        name, eq, val = item.strip().partition("=")
        if not eq or name in fields:
            raise bad
        fields[name] = val.strip()
    if set(fields) != {"Credential", "SignedHeaders", "Signature"}:
        raise bad
    cred = _parse_credential(fields["Credential"], "missing_header",
                             "Invalid Authorization header format")
    signed = _parse_signed_headers(fields["SignedHeaders"], "missing_header")
    return cred, signed, fields["Signature"]


def _payload_hash(req: SignedRequest) -> str:
    values = req.headers.get("x-amz-content-sha256") or []
    if len(values) > 1:
        raise AuthFailure("missing_header", InvalidArgument(
            "x-amz-content-sha256 must be sent once"))
    if not values:
        return UNSIGNED_PAYLOAD
    value = values[0].strip()
    if value == UNSIGNED_PAYLOAD or value in STREAMING_VALUES or _HEX64.fullmatch(value):
        return value
    if value.startswith("STREAMING-"):
        raise AuthFailure("missing_header", InvalidArgument(
            f"Unsupported x-amz-content-sha256 value {value}"))
    raise AuthFailure("missing_header", InvalidArgument(
        "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, a STREAMING- value "
        "or a valid sha256 value"))


# -- verification -----------------------------------------------------------

def _utc(now: datetime) -> datetime:
    return now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now


def _secret(lookup_secret: Callable[[str], Optional[str]], akid: str) -> str:
    secret = lookup_secret(akid)  # may itself raise AuthFailure (user_disabled)
    if secret is None:
        raise AuthFailure("invalid_access_key", AccessDenied())
    return secret


def _check_signature(given: str, key: bytes, string_to_sign: str) -> str:
    expected = hmac_hex(key, string_to_sign)
    given_b = given.encode("utf-8", "replace")
    if not hmac.compare_digest(expected.encode("ascii"), given_b):
        raise AuthFailure("invalid_signature", AccessDenied())
    return expected


def _canonical_request(req: SignedRequest, path: str, query: str,
                       signed: list[str], payload_hash: str) -> str:
    return "\n".join([req.method.upper(), path, query,
                      canonical_headers(req.headers, signed),
                      ";".join(signed), payload_hash])


def _verify_candidates(req: SignedRequest, query: str, signed: list[str],
                       payload_hash: str, key: bytes, amz_date: str,
                       scope: str, given: str) -> str:
    """Check against the S3-canonical path, then the path exactly as sent.

    The second form admits clients (curl --aws-sigv4, hand-rolled signers)
    that sign characters such as '!' or '+' unencoded; both forms name the
    same decoded key, so accepting either gives an attacker nothing.
    """
    paths = [canonical_uri(req.raw_path)]
    raw = (req.raw_path or b"/").decode("utf-8", "replace")
    if raw != paths[0]:
        paths.append(raw)
    failure = None
    for path in paths:
        cr = _canonical_request(req, path, query, signed, payload_hash)
        try:
            return _check_signature(given, key, _string_to_sign(amz_date, scope, cr))
        except AuthFailure as e:
            failure = e
    raise failure  # type: ignore[misc]


def _verify_header(req, lookup_secret, now, skew) -> AuthResult:
    values = req.headers.get("authorization") or []
    if len(values) != 1:
        raise AuthFailure("missing_header", InvalidArgument("Invalid Authorization header format"))
    cred, signed, given = _parse_authorization(values[0])
    payload_hash = _payload_hash(req)
    amz_date, when = _request_time(req)
    if cred.date != amz_date[:8]:
        raise AuthFailure("missing_header", InvalidArgument(
            "Credential scope date does not match the request date"))
    if abs((_utc(now) - when).total_seconds()) > skew:
        raise AuthFailure("clock_skew", RequestTimeTooSkewed())
    secret = _secret(lookup_secret, cred.access_key_id)
    key = signing_key(secret, cred.date, cred.region)
    query = canonical_query(parse_query(req.raw_query))
    signature = _verify_candidates(req, query, signed, payload_hash, key,
                                   amz_date, cred.scope, given)
    chunk = None
    if payload_hash in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER):
        chunk = ChunkSigning(key, amz_date, cred.scope, signature)
    return AuthResult(cred.access_key_id, payload_hash, False, chunk)


def _verify_presigned(req, pairs, lookup_secret, now, skew) -> AuthResult:
    reason = "invalid_presigned"
    algorithm = _query_value(pairs, b"X-Amz-Algorithm")
    if algorithm != ALGORITHM:
        raise AuthFailure(reason, InvalidArgument(f"Unsupported X-Amz-Algorithm {algorithm}"))
    credential = _query_value(pairs, b"X-Amz-Credential")
    given = _query_value(pairs, b"X-Amz-Signature")
    if not credential or not given or "/" not in credential:
        raise AuthFailure(reason, AccessDenied())
    cred = _parse_credential(credential, reason, "Invalid credential scope format")
    amz_date = _query_value(pairs, b"X-Amz-Date")
    if amz_date is None:
        raise AuthFailure(reason, InvalidArgument("X-Amz-Date is required for presigned URLs"))
    when = _parse_amz_date(amz_date, reason)
    if cred.date != amz_date[:8]:
        raise AuthFailure(reason, InvalidArgument(
            "Credential scope date does not match X-Amz-Date"))
    expires_s = _query_value(pairs, b"X-Amz-Expires")
    if expires_s is None:
        raise AuthFailure(reason, InvalidArgument("X-Amz-Expires is required for presigned URLs"))
    if not expires_s.isdigit() or len(expires_s) > 9 or int(expires_s) < 1:
        raise AuthFailure(reason, InvalidArgument(f"Invalid X-Amz-Expires: {expires_s}"))
    expires = int(expires_s)
    if expires > MAX_PRESIGNED_EXPIRY:
        raise AuthFailure(reason, InvalidArgument(
            f"X-Amz-Expires={expires} exceeds maximum of {MAX_PRESIGNED_EXPIRY} seconds (7 days)"))
    signed_s = _query_value(pairs, b"X-Amz-SignedHeaders")
    if signed_s is None:
        raise AuthFailure(reason, InvalidArgument("X-Amz-SignedHeaders is required"))
    signed = _parse_signed_headers(signed_s, reason)
    now = _utc(now)
    if (when - now).total_seconds() > skew:
        raise AuthFailure("clock_skew", RequestTimeTooSkewed())
    if now > when + timedelta(seconds=expires):
        raise AuthFailure("expired_presigned", AccessDenied("Request has expired"))
    secret = _secret(lookup_secret, cred.access_key_id)
    key = signing_key(secret, cred.date, cred.region)
    query = canonical_query(pairs, exclude=b"X-Amz-Signature")
    _verify_candidates(req, query, signed, UNSIGNED_PAYLOAD, key, amz_date, cred.scope, given)
    return AuthResult(cred.access_key_id, UNSIGNED_PAYLOAD, True, None)


def verify(req: SignedRequest, lookup_secret: Callable[[str], Optional[str]],
           now: datetime, clock_skew_seconds: int) -> AuthResult:
    """Authenticate C{req}; raise L{AuthFailure} unless its signature holds.

    C{lookup_secret} maps an access key id to its secret, or None when the
    key is unknown; it may raise L{AuthFailure} itself (e.g. C{user_disabled}).
    """
    pairs = parse_query(req.raw_query)
    presigned = any(n == b"X-Amz-Algorithm" for n, _ in pairs)
    has_header = bool(req.headers.get("authorization"))
    if presigned and has_header:
        raise AuthFailure("missing_header", InvalidArgument(
            "Only one auth mechanism allowed: Authorization header or X-Amz-Algorithm query"))
    if presigned:
        return _verify_presigned(req, pairs, lookup_secret, now, clock_skew_seconds)
    if has_header:
        return _verify_header(req, lookup_secret, now, clock_skew_seconds)
    raise AuthFailure("missing_header", AccessDenied())

"""HTTP/1.1 wire helpers shared by the server edge and the S3 client: message
heads fed apart from bodies, and HTTP dates.

Twisted's HTTP parsers are line receivers: each header line is split off the
front of everything buffered, so a read that holds the headers *and* 1 MiB of
body copies that megabyte once per header line. Handing them the head and the
body as two pieces keeps the cost to one copy.
"""

from __future__ import annotations

from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Callable, Optional

HEAD_END = b"\r\n\r\n"
BIG_READ = 64 * 1024


def feed_head_apart(data: bytes, feed: Callable[[bytes], object]) -> None:
    """Call C{feed} with C{data}; a large read that ends a message head is fed
    as the head, then the rest (what follows may be a body, in raw mode)."""
    if len(data) > BIG_READ:
        end = data.find(HEAD_END, 0, BIG_READ)
        if end >= 0:
            end += len(HEAD_END)
            feed(data[:end])
            rest = data[end:]
            if rest:
                feed(rest)
            return
    feed(data)


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBERS = {name: i + 1 for i, name in enumerate(_MONTHS)}


def format_http_date(when: datetime) -> str:
    """RFC 7231's IMF-fixdate (C{Sun, 06 Nov 1994 08:49:37 GMT}), in UTC."""
    w = when.astimezone(timezone.utc)
    return (f"{_DAYS[w.weekday()]}, {w.day:02d} {_MONTHS[w.month - 1]} {w.year:04d} "
            f"{w.hour:02d}:{w.minute:02d}:{w.second:02d} GMT")


def parse_http_date(value: Optional[str]) -> Optional[datetime]:
    """An HTTP date in UTC, or None. IMF-fixdate, the form every server sends
    today, is read directly; the obsolete forms go through C{email.utils}."""
    if not value:
        return None
    v = value.strip()
    if len(v) == 29 and v.endswith(" GMT") and v[3:5] == ", ":
        try:
            return datetime(int(v[12:16]), _MONTH_NUMBERS[v[8:11]], int(v[5:7]),
                            int(v[17:19]), int(v[20:22]), int(v[23:25]), tzinfo=timezone.utc)
        except (KeyError, ValueError):
            return None
    try:
        parsed = parsedate_to_datetime(v)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.astimezone(timezone.utc)
    except OverflowError:
        return None

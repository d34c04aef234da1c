"""Log output: a level filter per namespace, and text or JSON lines.

C{DGP_LOG_LEVEL} is either one level (C{info}) or a list like
C{dgproxy=debug,dgproxy.auth=trace,twisted=warn}; a bare level in the list
sets the default. C{DGP_LOG_FORMAT=json} writes one JSON object per line
(time, level, namespace, message and the event's own fields).
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO

from twisted.logger import (
    FileLogObserver, FilteringLogObserver, ILogObserver, LogLevel, LogLevelFilterPredicate,
    formatEvent, formatEventAsClassicLogText, formatTime)
from zope.interface import implementer

_LEVELS = {"trace": LogLevel.debug, "debug": LogLevel.debug, "info": LogLevel.info,
           "warn": LogLevel.warn, "warning": LogLevel.warn, "error": LogLevel.error,
           "critical": LogLevel.critical}


class LogLevelError(ValueError):
    pass


def parse_levels(spec: str) -> tuple[LogLevel, dict[str, LogLevel]]:
    """(default level, {namespace: level}) from a DGP_LOG_LEVEL value."""
    default = LogLevel.info
    per_namespace: dict[str, LogLevel] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, eq, level = item.rpartition("=")
        level = level.strip().lower()
        if level not in _LEVELS:
            raise LogLevelError(f"unknown log level {level!r} in {spec!r}")
        if eq:
            per_namespace[name.strip()] = _LEVELS[level]
        else:
            default = _LEVELS[level]
    return default, per_namespace


_SKIP = {"log_format", "log_level", "log_namespace", "log_time", "log_logger", "log_source",
         "log_system", "log_io", "log_text", "log_legacy", "log_failure", "log_trace",
         "log_flattened", "format", "message", "isError", "system", "time", "dg_line"}


# An event may carry its message already rendered under this key (the access
# log does: one line per request, where Twisted's formatting is the main cost).
RENDERED = "dg_line"


class _Clock:
    """Twisted's timestamp text, made once per second instead of per line."""

    def __init__(self):
        self._second = None
        self._text = "-"

    def __call__(self, when) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second, self._text = second, formatTime(second)
        return self._text


def _classic_text(clock: _Clock):
    """Twisted's classic line, C{time [namespace#level] message}."""

    def format_event(event: dict):
        line = event.get(RENDERED)
        if line is None or "log_failure" in event:
            return formatEventAsClassicLogText(event, formatTime=clock)
        level = event.get("log_level")
        system = event.get("log_system") or (
            f"{event.get('log_namespace', '-')}#{level.name if level else '-'}")
        return f"{clock(event.get('log_time'))} [{system}] {line}\n"

    return format_event


@implementer(ILogObserver)
class JSONLinesObserver:
    """One compact JSON object per event, per line."""

    def __init__(self, out: IO[str]):
        self._out = out

    def __call__(self, event: dict) -> None:
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", time.time())))
                    + "Z",
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", "-"),
            "message": event.get(RENDERED) or formatEvent(event),
        }
        for key, value in event.items():
            if key in _SKIP or key.startswith("_"):
                continue
            if isinstance(value, (str, int, float, bool)) or value is None:
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._out.flush()


def make_observer(level_spec: str, fmt: str, out: IO[str] = None) -> ILogObserver:
    out = out or sys.stdout
    default, per_namespace = parse_levels(level_spec)
    predicate = LogLevelFilterPredicate(defaultLogLevel=default)
    for namespace, level in per_namespace.items():
        predicate.setLogLevelForNamespace(namespace, level)
    sink = (JSONLinesObserver(out) if fmt == "json"
            else FileLogObserver(out, _classic_text(_Clock())))
    return FilteringLogObserver(sink, [predicate])

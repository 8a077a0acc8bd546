"""Units settled after the response: the per-request :class:`UnitsMeter` and the readers
that take the units from the response itself (:func:`usage_from_json`,
:func:`usage_from_sse`).

::

    @app.post("/chat")
    @metered("feature:tokens", units=estimate, overage="cap")   # reserves the estimate
    async def chat(request: Request) -> StreamingResponse:
        usage = usage_of(request)                  # FastAPI: a parameter `usage: Usage`
        async def tokens():
            async for token in model(...):
                usage.add(1)                       # while the stream runs
                yield token
        return StreamingResponse(tokens())          # settled at its end: the actual units

The meter lives in the request's :class:`~usage_middleware.meter.Meter` (in the ASGI
scope), never in a ContextVar, so the body iterator of a streaming response reaches it
by closure. Values are checked at the call: the app's own code gets the error.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from .errors import ConfigurationError
from .models import MAX_UNITS

__all__ = [
    "MAX_BODY",
    "ResponseUsage",
    "UnitsMeter",
    "usage_from_json",
    "usage_from_sse",
]

logger = logging.getLogger("usage_middleware")

#: The most bytes a response reader keeps: a JSON body (whole) or one SSE line. A larger
#: body or line is not read (logged); the units then are what the app reported, else the
#: estimate.
MAX_BODY: Final = 1 << 20


class UnitsMeter:
    """What one request actually used, per metered feature, as the app reports it.

    Get it with :func:`~usage_middleware.usage_of` (a function of the ``Request`` or
    ``WebSocket``) or the FastAPI parameter type ``Usage``. A feature nothing was
    reported for is charged its estimate (the units reserved).

    Methods take ``(feature, units)``, or ``(units)`` alone when the request meters one
    feature.

    Raises (at the call, in the app's code):
        TypeError: units that are not an int (``bool`` included).
        ValueError: negative units, a total above ``MAX_UNITS``, a feature this request
            does not meter (or meters with ``clobber=True``: fixed units only), a feature
            left out while the request meters several.
        RuntimeError: a report after the request's units were settled.
    """

    __slots__ = ("_features", "_values", "frozen")

    def __init__(self, features: Callable[[], Mapping[str, object]]) -> None:
        self._features = features
        self._values: dict[str, int] = {}
        #: Set when the units were settled (the final body is going out): no more reports.
        self.frozen = False

    def set(self, feature: str | int, units: int | None = None) -> None:
        """Report that the request used ``units`` of ``feature`` in all (replaces)."""
        name, value = self._args("set", feature, units)
        self._values[name] = value

    def add(self, feature: str | int, units: int | None = None) -> None:
        """Add ``units`` (>= 0) to what the request used of ``feature`` so far."""
        name, value = self._args("add", feature, units)
        total = self._values.get(name, 0) + value
        if total > MAX_UNITS:
            raise ValueError(
                f"usage.add({name!r}, {value}): the total {total} exceeds MAX_UNITS ({MAX_UNITS})"
            )
        self._values[name] = total

    def get(self, feature: str | None = None) -> int | None:
        """The units reported for ``feature`` so far, or ``None`` (its estimate is charged)."""
        name = self._feature("get", feature)
        return self._values.get(name)

    @property
    def features(self) -> tuple[str, ...]:
        """The features this request meters (reports for others are refused)."""
        return tuple(self._features())

    def reported(self, feature: str) -> int | None:
        """The units reported for ``feature`` (no checks: for the middleware)."""
        return self._values.get(feature)

    def record(self, feature: str, units: int) -> None:
        """Set ``feature``'s units from a response reader (checked by the caller)."""
        if not self.frozen:
            self._values[feature] = units

    def _feature(self, op: str, feature: str | None) -> str:
        features = self._features()
        if feature is None:
            if len(features) == 1:
                return next(iter(features))
            if not features:
                raise ValueError(
                    f"usage.{op}(...): this request meters no feature (is the route "
                    "@metered, or under a Metered dependency?)"
                )
            raise ValueError(
                f"usage.{op}(...): this request meters {sorted(features)}; name the feature, "
                f"e.g. usage.{op}({sorted(features)[0]!r}, units)"
            )
        if feature not in features:
            raise ValueError(
                f"usage.{op}({feature!r}, ...): this request does not meter {feature!r}"
                + (f"; it meters {sorted(features)}" if features else "")
            )
        spec = features[feature]
        if getattr(spec, "clobber", False):
            raise ValueError(
                f"usage.{op}({feature!r}, ...): {feature!r} is metered with clobber=True, "
                "which charges fixed units; drop clobber=True to report actual units"
            )
        return feature

    def _args(self, op: str, feature: str | int, units: int | None) -> tuple[str, int]:
        if self.frozen:
            raise RuntimeError(
                f"usage.{op}(...): this request's units were already settled (its response "
                "ended); report units before the last body chunk"
            )
        value: object
        if units is None and not isinstance(feature, str):
            name, value = self._feature(op, None), feature
        else:
            if not isinstance(feature, str):
                raise TypeError(f"usage.{op}(feature, units): feature must be a str")
            name, value = self._feature(op, feature), units
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"usage.{op}({name!r}, {value!r}): units must be an int, got {type(value).__name__}"
            )
        if not 0 <= value <= MAX_UNITS:
            raise ValueError(
                f"usage.{op}({name!r}, {value}): units must be from 0 to MAX_UNITS ({MAX_UNITS})"
            )
        return name, value

    def __repr__(self) -> str:
        return f"UnitsMeter({self._values!r})"


# -- reading the units from the response -------------------------------------------------


class ResponseUsage:
    """Where ``@metered(..., units_from=...)`` reads a request's actual units in its
    response: :func:`usage_from_json` or :func:`usage_from_sse`.

    Attributes:
        kind: ``"json"`` or ``"sse"``.
        path: the dotted path of the units in the JSON document (``usage.total_tokens``).
    """

    __slots__ = ("kind", "path", "steps")

    def __init__(self, kind: str, path: str) -> None:
        if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
            raise ConfigurationError(
                f"usage_from_{kind}(path=...) must be a dotted path such as "
                f"'usage.total_tokens', got {path!r}"
            )
        self.kind = kind
        self.path = path
        self.steps = tuple(path.split("."))

    def reader(self, headers: Any) -> _Reader | None:
        """A reader for a response with these ``http.response.start`` headers, or ``None``
        when its content type is not the one read (JSON, ``text/event-stream``)."""
        content_type = b""
        for name, value in headers:
            if name.lower() == b"content-type":
                content_type = bytes(value).lower()
                break
        media = content_type.split(b";", 1)[0].strip()
        if self.kind == "sse":
            return _SseReader(self.steps) if media == b"text/event-stream" else None
        if media == b"application/json" or media.endswith(b"+json"):
            return _JsonReader(self.steps)
        return None

    def __repr__(self) -> str:
        return f"usage_from_{self.kind}({self.path!r})"


def usage_from_json(path: str = "usage.total_tokens") -> ResponseUsage:
    """Read the actual units from a JSON response body's field at ``path`` (OpenAI's
    ``usage.total_tokens`` by default).

    The body is read as it passes (at most :data:`MAX_BODY` bytes kept, only for
    ``application/json`` and ``+json`` responses); a body without an int there, or too
    large, leaves the units to what the app reported, else the estimate (logged).
    """
    return ResponseUsage("json", path)


def usage_from_sse(path: str = "usage.total_tokens") -> ResponseUsage:
    """Read the actual units from the usage an SSE stream carries: the last ``data:``
    event whose JSON has an int at ``path`` (OpenAI's final chunk, sent before
    ``data: [DONE]`` with ``stream_options={"include_usage": true}``).

    Parsed line by line as the stream passes, never buffered (one line of at most
    :data:`MAX_BODY` bytes is kept); only ``text/event-stream`` responses. A stream with
    no such event leaves the units to what the app reported, else the estimate.
    """
    return ResponseUsage("sse", path)


def _dig(document: object, steps: tuple[str, ...]) -> int | None:
    for step in steps:
        if not isinstance(document, dict):
            return None
        document = document.get(step)
    if isinstance(document, bool) or not isinstance(document, int):
        return None
    if not 0 <= document <= MAX_UNITS:
        logger.warning("usage_middleware: the response reports %r units; ignored", document)
        return None
    return document


class _Reader:
    """Reads one response's body chunks; :meth:`feed` returns units when it found some."""

    __slots__ = ("steps",)

    def __init__(self, steps: tuple[str, ...]) -> None:
        self.steps = steps

    def feed(self, chunk: bytes, final: bool) -> int | None:
        raise NotImplementedError


class _JsonReader(_Reader):
    __slots__ = ("body", "overflow")

    def __init__(self, steps: tuple[str, ...]) -> None:
        super().__init__(steps)
        self.body = bytearray()
        self.overflow = False

    def feed(self, chunk: bytes, final: bool) -> int | None:
        if not self.overflow:
            if len(self.body) + len(chunk) > MAX_BODY:
                self.overflow = True
                self.body = bytearray()
                logger.warning(
                    "usage_middleware: a JSON response is larger than %d bytes; its units "
                    "are not read from it",
                    MAX_BODY,
                )
            else:
                self.body += chunk
        if not final or self.overflow:
            return None
        try:
            document = json.loads(self.body)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            logger.warning("usage_middleware: a JSON response could not be parsed for its units")
            return None
        units = _dig(document, self.steps)
        if units is None:
            logger.info("usage_middleware: a JSON response has no units at its usage path")
        return units


#: An SSE line ends with CR, LF or CRLF (HTML, "Server-sent events", the stream's grammar).
_EOL: Final = re.compile(rb"[\r\n]")


class _SseReader(_Reader):
    __slots__ = ("line", "needle", "skipping")

    def __init__(self, steps: tuple[str, ...]) -> None:
        super().__init__(steps)
        self.needle = json.dumps(steps[0]).encode()
        self.line = bytearray()
        self.skipping = False  # the current line is too long to keep: skip to its end

    def feed(self, chunk: bytes, final: bool) -> int | None:
        found: int | None = None
        start = 0
        has_cr = b"\r" in chunk  # CR, LF or CRLF end a line (CRLF: one empty line more)
        while True:
            if has_cr:
                match = _EOL.search(chunk, start)
                end = -1 if match is None else match.start()
            else:
                end = chunk.find(b"\n", start)
            if end < 0:
                rest = chunk[start:]
                if not self.skipping:
                    if len(self.line) + len(rest) > MAX_BODY:
                        self.skipping, self.line = True, bytearray()
                    else:
                        self.line += rest
                break
            if self.skipping:
                self.skipping = False
            else:
                self.line += chunk[start:end]
                units = self._line(bytes(self.line))
                if units is not None:
                    found = units
            self.line = bytearray()
            start = end + 1
        if final and self.line and not self.skipping:
            units = self._line(bytes(self.line))
            if units is not None:
                found = units
        return found

    def _line(self, line: bytes) -> int | None:
        if not line.startswith(b"data:"):
            return None  # event:, id:, comments, blank lines
        data = line[5:].strip()
        if not data.startswith(b"{") or self.needle not in data:
            return None  # [DONE], other payloads, chunks without the usage key: not parsed
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            return None
        return _dig(document, self.steps)

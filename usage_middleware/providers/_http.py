"""HTTP details the remote providers share."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

__all__ = ["retry_after"]


def retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from a response's ``Retry-After`` header (RFC 9110 §10.2.3).

    Accepts delta-seconds or an HTTP date; returns ``None`` when the header is absent or
    unreadable, and never a negative or non-finite number.
    """
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - datetime.now(UTC)).total_seconds())
    return max(0.0, seconds) if math.isfinite(seconds) else None

"""``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header): a retry is charged once.

A metered request that carries ``Idempotency-Key`` claims the key for its customer and
route (method, path and a digest of the query) before anything is reserved, with a
fingerprint of the request (:func:`body_fingerprint`: the SHA-256 of its body; the route
holds the rest). The provider
keeps the claims (:meth:`~usage_middleware.provider.Provider.claim_key` and
``finish_key``): ledgers in their own storage, every other provider in the process
(:class:`KeyClaims`). A claim is:

* ``"new"``: nobody used the key within :data:`KEY_TTL`; the request is metered as usual,
  and when it is charged the key is kept for :data:`KEY_TTL` seconds as ``charged``
  (not charged: the claim is dropped, so the client's retry is metered again);
* ``"charged"``: a request with the key was charged within :data:`KEY_TTL`: this one is
  served again (the endpoint runs) and not charged again;
* ``"busy"``: a request with the key is still in flight: 409 problem+json;
* ``"mismatch"``: the key was used (charged, or in flight) for a request with another
  body: 422 problem+json, the endpoint does not run (a key is no free pass for other
  requests).

The body is read (and kept for the endpoint) only for requests carrying the header; one
longer than :data:`MAX_BODY` bytes is refused with 413 (fingerprinting without it would let
any large request ride on a charged key).

A claim whose request never finished (its process died) expires after
:data:`IN_FLIGHT_TTL` seconds.

The header's value is a Structured Field string (``Idempotency-Key: "8e03978e-40d5"``);
an unquoted token is accepted too. 1 to :data:`MAX_KEY_LENGTH` printable ASCII
characters; anything else, or the header sent twice, is refused with 400.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final, Literal

__all__ = [
    "IN_FLIGHT_TTL",
    "KEY_TTL",
    "MAX_BODY",
    "MAX_KEY_LENGTH",
    "KeyClaim",
    "KeyClaims",
    "body_fingerprint",
    "parse_idempotency_key",
]

#: What :meth:`Provider.claim_key` answers (see the module docstring).
KeyClaim = Literal["new", "charged", "busy", "mismatch"]

#: Seconds a charged key is kept: a retry within them is not charged again (24 hours).
KEY_TTL: Final = 24 * 3600.0
#: Seconds an in-flight claim lives when its request never finishes (a process died).
IN_FLIGHT_TTL: Final = 300.0
#: The longest key accepted (characters).
MAX_KEY_LENGTH: Final = 255
#: The largest body (bytes) of a request with an ``Idempotency-Key``: longer ones get 413.
MAX_BODY: Final = 1024 * 1024

_HEADER: Final = b"idempotency-key"


def parse_idempotency_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The request's ``Idempotency-Key`` (unquoted), or ``None`` without one.

    Raises:
        ValueError: the header is sent more than once, empty, longer than
            :data:`MAX_KEY_LENGTH`, or not printable ASCII (the message says which).
    """
    found: bytes | None = None
    for name, value in headers:
        if name == _HEADER:
            if found is not None:
                raise ValueError("the Idempotency-Key header is sent more than once")
            found = value
    if found is None:
        return None
    raw = found.strip(b" \t")
    if len(raw) >= 2 and raw[:1] == b'"' and raw[-1:] == b'"':  # a Structured Field string
        raw = raw[1:-1]
        if b'"' in raw or b"\\" in raw:
            raise ValueError("the Idempotency-Key must be a plain quoted string")
        allowed = range(0x20, 0x7F)
    else:
        allowed = range(0x21, 0x7F)
    if not raw:
        raise ValueError("the Idempotency-Key is empty")
    if len(raw) > MAX_KEY_LENGTH:
        raise ValueError(f"the Idempotency-Key is longer than {MAX_KEY_LENGTH} characters")
    if any(byte not in allowed for byte in raw):
        raise ValueError("the Idempotency-Key must be printable ASCII")
    return raw.decode("ascii")


def body_fingerprint(body: bytes) -> str:
    """The fingerprint a claim records: the SHA-256 of the request body, 64 hex characters.

    (Method, path and query are the claim's route already.) Never empty: a claim stored
    without a fingerprint (by an older version) matches no request.
    """
    return hashlib.sha256(body).hexdigest()


class KeyClaims:
    """Claims kept in this process's memory (the providers' default).

    At most ``max_keys`` keys; the oldest go first beyond that, and expired ones are
    dropped as new ones arrive. Not shared between worker processes.
    """

    __slots__ = ("_keys", "clock", "max_keys")

    def __init__(self, max_keys: int = 100_000, clock: object = None) -> None:
        self.max_keys = max_keys
        self.clock = time.monotonic if clock is None else clock
        #: ``(customer, route, key) -> (charged, expires, fingerprint)``, oldest first.
        self._keys: OrderedDict[tuple[str, str, str], tuple[bool, float, str]] = OrderedDict()

    def claim(self, customer: str, route: str, key: str, fingerprint: str = "") -> KeyClaim:
        """Claim ``key`` for a request of ``fingerprint`` (see the module docstring)."""
        now: float = self.clock()  # type: ignore[operator]
        keys = self._keys
        while keys:  # expired first (the oldest expire first)
            oldest, (_, expires, _) = next(iter(keys.items()))
            if expires > now and len(keys) < self.max_keys:
                break
            del keys[oldest]
        entry = keys.get((customer, route, key))
        if entry is not None and entry[1] > now:
            if entry[2] != fingerprint:
                return "mismatch"
            return "charged" if entry[0] else "busy"
        keys[(customer, route, key)] = (False, now + IN_FLIGHT_TTL, fingerprint)
        keys.move_to_end((customer, route, key))
        return "new"

    def finish(
        self, customer: str, route: str, key: str, *, charged: bool, fingerprint: str = ""
    ) -> None:
        """Keep ``key`` (for requests of ``fingerprint``) as charged for :data:`KEY_TTL`
        seconds, or drop the claim."""
        if charged:
            now: float = self.clock()  # type: ignore[operator]
            self._keys[(customer, route, key)] = (True, now + KEY_TTL, fingerprint)
            self._keys.move_to_end((customer, route, key))
        else:
            self._keys.pop((customer, route, key), None)

"""In-process fakes of ARES's partner API and of Clerk's OAuth-token endpoint.

They follow ``/work/shared/reference/ares.md``:

* ARES ``GET /v1/user`` (§2): ``Authorization: Bearer <user token>``; 200
  ``{"message": "Success", "user": {"id", "email", "credits"}}``, or (``shape="top"``, the
  form ChatEBT's login code reads) the same fields at the top level. Errors: 401
  ``{"error": "No token provided"}`` without a header, 401 ``{"error": "Invalid token"}``
  for an unknown or revoked token, 403 ``{"error": "Token expired"}`` for an expired one
  (``expired_status=401`` gives the page's other reading: 401 ``Invalid token``).
* ARES ``POST /v1/partner/usage`` (§3): the same bearer, JSON ``{client_id, usage,
  credits}``, all required; ``usage`` a string, ``credits`` a number. The credits are
  deducted from the user; 200 ``{"message": "Success", "usage": {...}}``.
  **Assumptions** (the reference says these are unknown): a missing or mistyped field is
  400 ``{"error": "Missing required fields"}``; a user with fewer credits than asked is
  :data:`INSUFFICIENT_STATUS` (402) ``{"error": "Insufficient credits"}``; the fields
  inside ``usage`` are invented (the provider must not rely on them).
* Clerk ``GET /v1/users/{user_id}/oauth_access_tokens/{provider}`` (§1): the Clerk
  secret key as bearer (else 401); the wire provider is ``oauth_custom_ares``; a bare JSON
  list of ``{object, token, provider, scopes, expires_at, ...}``, or ``{"data": [...],
  "total_count": n}`` with ``?paginated=true``; ``expires_at`` in seconds or (``ms=True``)
  milliseconds. Clerk refreshes an expired ARES token transparently (it knows the
  expiry, not a revocation); a user whose refresh token is gone gets 422
  ``oauth_token_retrieval_error``; an unknown user 404 ``resource_not_found``. Error bodies
  are ``{"errors": [{"message", "long_message", "code"}], "clerk_trace_id"}``.

Anything a client sends that the reference does not allow is also recorded in
``violations`` (tests assert it empty). Failures are scripted per endpoint with
:meth:`FakeAres.fail_next` / :meth:`FakeClerk.fail_next`: a status code, an exception, or
``"timeout_after_charge"`` (the charge happens, then the answer is lost).
"""

from __future__ import annotations

import json
import math
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

import httpx

__all__ = [
    "ARES_URL",
    "CLERK_SECRET",
    "CLERK_URL",
    "CLIENT_ID",
    "INSUFFICIENT_STATUS",
    "Charge",
    "FakeAres",
    "FakeClerk",
    "transport",
]

ARES_URL = "https://oauth.joinares.com"
CLERK_URL = "https://api.clerk.com"
CLERK_SECRET = "sk_test_FAKE_clerk_secret_key_do_not_log"
CLIENT_ID = "partner-app-client-id"
#: ASSUMPTION: the status ARES answers a usage POST the user cannot pay for (unknown, §5).
INSUFFICIENT_STATUS = 402

Failure = (
    int | BaseException | type[BaseException] | httpx.Response | Literal["timeout_after_charge"]
)


@dataclass
class FakeUser:
    """An ARES user: ``credits`` left (a number)."""

    id: str
    email: str
    credits: float


@dataclass(frozen=True)
class Charge:
    """One accepted ``POST /v1/partner/usage``: what was deducted from whom."""

    user_id: str
    client_id: str
    usage: str
    credits: float


@dataclass
class _Token:
    user_id: str
    expires_at: float
    revoked: bool = False


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def _raise(item: BaseException | type[BaseException], request: httpx.Request) -> None:
    if isinstance(item, type):
        if issubclass(item, httpx.RequestError):
            raise item("scripted failure", request=request)
        raise item("scripted failure")
    raise item


@dataclass
class FakeAres:
    """ARES's ``/v1/user`` and ``/v1/partner/usage``, in memory (see the module docstring).

    Attributes:
        users: ARES users by id.
        charges: every accepted usage POST, in order.
        requests: every request received (for asserting bytes on the wire).
        violations: things a client sent that the reference does not allow.
    """

    shape: Literal["nested", "top"] = "nested"
    expired_status: Literal[401, 403] = 403
    client_ids: frozenset[str] | None = frozenset({CLIENT_ID})
    clock: Callable[[], float] = time.time
    users: dict[str, FakeUser] = field(default_factory=dict)
    charges: list[Charge] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    malformed: Literal["not-json", "no-credits", "credits-string"] | None = None
    _tokens: dict[str, _Token] = field(default_factory=dict)
    _script: dict[str, deque[Failure]] = field(default_factory=dict)

    # -- set-up ---------------------------------------------------------------------------

    def add_user(self, user_id: str | None = None, *, credits: float = 0, email: str = "") -> str:
        """Create (or reset) a user with ``credits``; returns the user id (a UUID by default)."""
        uid = user_id or str(uuid.uuid4())
        self.users[uid] = FakeUser(uid, email or f"{uid[:8]}@users.test", credits)
        return uid

    def issue_token(self, user_id: str, *, ttl: float = 1800.0) -> str:
        """A new access token for ``user_id``, valid ``ttl`` seconds (ChatEBT's 1800 s guess)."""
        if user_id not in self.users:
            self.add_user(user_id)
        token = f"ares_at_{secrets.token_hex(16)}"
        self._tokens[token] = _Token(user_id, self.clock() + ttl)
        return token

    def expire(self, token: str) -> None:
        """Make ``token`` expired: ARES answers 403 ``Token expired`` (or 401, see above)."""
        self._tokens[token].expires_at = self.clock() - 1

    def revoke(self, token: str) -> None:
        """Make ``token`` unknown to ARES: 401 ``Invalid token`` (Clerk does not notice)."""
        self._tokens[token].revoked = True

    def token_state(self, token: str) -> Literal["valid", "expired", "invalid"]:
        info = self._tokens.get(token)
        if info is None or info.revoked:
            return "invalid"
        return "expired" if info.expires_at <= self.clock() else "valid"

    def expires_at(self, token: str) -> float:
        return self._tokens[token].expires_at

    def fail_next(self, path: str, *items: Failure) -> None:
        """Answer the next requests to ``path`` (``/v1/user`` or ``/v1/partner/usage``) so."""
        self._script.setdefault(path, deque()).extend(items)

    # -- reading ------------------------------------------------------------------------------

    def credits(self, user_id: str) -> float:
        return self.users[user_id].credits

    def charged(self, user_id: str, usage: str | None = None) -> float:
        """Credits deducted from ``user_id`` by accepted usage POSTs (for one ``usage`` label)."""
        return sum(
            c.credits
            for c in self.charges
            if c.user_id == user_id and (usage is None or c.usage == usage)
        )

    def posts(self) -> list[dict[str, Any]]:
        """The JSON bodies of every usage POST received (accepted or not)."""
        return [json.loads(r.content) for r in self.requests if r.url.path == "/v1/partner/usage"]

    # -- the HTTP side --------------------------------------------------------------------

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        script = self._script.get(path)
        after_charge = False
        if script:
            item = script.popleft()
            if item == "timeout_after_charge":
                after_charge = True
            elif isinstance(item, int):
                return _json(item, {"error": "Internal Server Error"})
            elif isinstance(item, httpx.Response):
                return item  # something else answered: nothing charged
            else:
                _raise(item, request)
        if path == "/v1/user":
            if request.method != "GET":
                return _json(404, {"error": "Not found"})
            return self._user(request)
        if path == "/v1/partner/usage":
            if request.method != "POST":
                return _json(404, {"error": "Not found"})
            response = self._usage(request)
            if after_charge:
                raise httpx.ReadTimeout("scripted timeout after the charge", request=request)
            return response
        return _json(404, {"error": "Not found"})

    def _auth(self, request: httpx.Request) -> FakeUser | httpx.Response:
        header = request.headers.get("authorization")
        if not header:
            return _json(401, {"error": "No token provided"})
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or not token:
            self.violations.append(f"Authorization header is not 'Bearer <token>': {scheme!r}")
            return _json(401, {"error": "No token provided"})
        state = self.token_state(token)
        if state == "invalid":
            return _json(401, {"error": "Invalid token"})
        if state == "expired":
            if self.expired_status == 401:
                return _json(401, {"error": "Invalid token"})
            return _json(403, {"error": "Token expired"})
        return self.users[self._tokens[token].user_id]

    def _user(self, request: httpx.Request) -> httpx.Response:
        user = self._auth(request)
        if isinstance(user, httpx.Response):
            return user
        if self.malformed == "not-json":
            return httpx.Response(200, text="<html>502 Bad Gateway</html>")
        fields: dict[str, Any] = {"id": user.id, "email": user.email, "credits": user.credits}
        if self.malformed == "no-credits":
            del fields["credits"]
        elif self.malformed == "credits-string":
            fields["credits"] = str(user.credits)
        if self.shape == "top":
            return _json(200, {"message": "Success", **fields})
        return _json(200, {"message": "Success", "user": fields})

    def _usage(self, request: httpx.Request) -> httpx.Response:
        user = self._auth(request)
        if isinstance(user, httpx.Response):
            return user
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            self.violations.append("usage POST without Content-Type: application/json")
        try:
            body = json.loads(request.content)
        except ValueError:
            self.violations.append("usage POST body is not JSON")
            return _json(400, {"error": "Missing required fields"})
        bad = _check_usage_body(body)
        if bad:
            self.violations.append(bad)
            return _json(400, {"error": "Missing required fields"})
        if self.client_ids is not None and body["client_id"] not in self.client_ids:
            return _json(400, {"error": "Invalid client_id"})  # ASSUMPTION (unknown, §5)
        credits = float(body["credits"])
        if credits > user.credits:
            return _json(INSUFFICIENT_STATUS, {"error": "Insufficient credits"})  # ASSUMPTION
        user.credits -= credits
        self.charges.append(Charge(user.id, body["client_id"], body["usage"], credits))
        return _json(
            200,
            {
                "message": "Success",
                # ASSUMPTION: the fields of "usage" are unknown (§3, §5).
                "usage": {"id": str(uuid.uuid4()), "usage": body["usage"], "credits": credits},
            },
        )


def _check_usage_body(body: object) -> str | None:
    if not isinstance(body, dict):
        return "usage POST body is not a JSON object"
    for key in ("client_id", "usage", "credits"):
        if key not in body:
            return f"usage POST body misses {key!r}"
    if not isinstance(body["client_id"], str) or not body["client_id"]:
        return "client_id must be a non-empty string"
    if not isinstance(body["usage"], str) or not body["usage"]:
        return "usage must be a non-empty string (a description, not a quantity)"
    credits = body["credits"]
    if isinstance(credits, bool) or not isinstance(credits, int | float):
        return f"credits must be a JSON number, got {type(credits).__name__}"
    if not math.isfinite(credits) or credits <= 0:
        return f"credits must be a positive number, got {credits!r}"
    extra = set(body) - {"client_id", "usage", "credits"}
    if extra:
        return f"usage POST body has fields the reference does not list: {sorted(extra)}"
    return None


def _clerk_error(status: int, code: str, message: str, long_message: str) -> httpx.Response:
    return _json(
        status,
        {
            "errors": [{"message": message, "long_message": long_message, "code": code}],
            "clerk_trace_id": secrets.token_hex(8),
        },
    )


@dataclass
class _Link:
    ares_user_id: str
    token: str | None = None
    can_refresh: bool = True


@dataclass
class FakeClerk:
    """Clerk's ``GET /v1/users/{user_id}/oauth_access_tokens/{provider}`` over a :class:`FakeAres`.

    Attributes:
        links: Clerk user id -> the ARES account the user signed in with.
        requests: every request received.
        violations: things a client sent that the reference does not allow.
    """

    ares: FakeAres
    secret_key: str = CLERK_SECRET
    ms: bool = False
    token_ttl: float = 1800.0
    links: dict[str, _Link] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    _script: deque[Failure] = field(default_factory=deque)

    def connect(self, clerk_user_id: str, *, credits: float = 0, ttl: float | None = None) -> str:
        """Sign ``clerk_user_id`` in with a new ARES account holding ``credits``.

        Returns the ARES user id. Its first token is issued now, valid ``ttl`` seconds.
        """
        ares_id = self.ares.add_user(credits=credits)
        link = _Link(ares_id)
        link.token = self.ares.issue_token(ares_id, ttl=self.token_ttl if ttl is None else ttl)
        self.links[clerk_user_id] = link
        return ares_id

    def token(self, clerk_user_id: str) -> str:
        """The ARES token Clerk currently holds for the user."""
        token = self.links[clerk_user_id].token
        assert token is not None
        return token

    def lose_refresh_token(self, clerk_user_id: str) -> None:
        """Clerk can no longer refresh this user's token: 422 once it has expired."""
        self.links[clerk_user_id].can_refresh = False

    def fail_next(self, *items: Failure) -> None:
        self._script.extend(items)

    @property
    def calls(self) -> int:
        return len(self.requests)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self._script:
            item = self._script.popleft()
            if isinstance(item, int):
                return _clerk_error(item, "internal_clerk_error", "Oops", "Something went wrong")
            if item != "timeout_after_charge":
                _raise(item, request)
        if request.headers.get("authorization") != f"Bearer {self.secret_key}":
            return _clerk_error(
                401,
                "authentication_invalid",
                "Invalid authentication",
                "The provided secret key is invalid.",
            )
        parts = request.url.raw_path.decode("ascii").split("?")[0].split("/")
        # ["", "v1", "users", "{user_id}", "oauth_access_tokens", "{provider}"]
        if (
            request.method != "GET"
            or len(parts) != 6
            or parts[1:3] != ["v1", "users"]
            or parts[4] != "oauth_access_tokens"
        ):
            return _clerk_error(404, "resource_not_found", "not found", "Resource not found")
        user_id, provider = unquote(parts[3]), unquote(parts[5])
        if provider != "oauth_custom_ares":
            self.violations.append(f"provider segment {provider!r} is not 'oauth_custom_ares'")
            return _json(200, [])
        link = self.links.get(user_id)
        if link is None:
            return _clerk_error(404, "resource_not_found", "not found", "Resource not found")
        items = []
        if link.token is not None:
            if self.ares.token_state(link.token) == "expired":
                if not link.can_refresh:
                    return _clerk_error(
                        422,
                        "oauth_token_retrieval_error",
                        "Failed to retrieve OAuth token",
                        "The OAuth access token could not be refreshed.",
                    )
                link.token = self.ares.issue_token(link.ares_user_id, ttl=self.token_ttl)
            expires = self.ares.expires_at(link.token)
            items.append(
                {
                    "object": "oauth_access_token",
                    "external_account_id": f"eac_{link.ares_user_id[:8]}",
                    "provider_user_id": link.ares_user_id,
                    "token": link.token,
                    "provider": "oauth_custom_ares",
                    "public_metadata": {},
                    "label": None,
                    "scopes": ["read", "write"],
                    "expires_at": int(expires * 1000) if self.ms else int(expires),
                }
            )
        if request.url.params.get("paginated") == "true":
            return _json(200, {"data": items, "total_count": len(items)})
        return _json(200, items)


def transport(ares: FakeAres, clerk: FakeClerk | None = None) -> httpx.MockTransport:
    """One MockTransport routing ``oauth.joinares.com`` to ARES and ``api.clerk.com`` to Clerk.

    Any other host fails like an unreachable server (``httpx.ConnectError``).
    """

    def route(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host == httpx.URL(ARES_URL).host:
            return ares.handler(request)
        if clerk is not None and host == httpx.URL(CLERK_URL).host:
            return clerk.handler(request)
        raise httpx.ConnectError(f"no fake server for host {host!r}", request=request)

    return httpx.MockTransport(route)

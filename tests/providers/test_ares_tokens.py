"""Token sources for ARES: bearer header, async callable, Clerk (reference ares.md §1)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from asgiref.typing import HTTPScope

from tests.support.ares_fake import CLERK_SECRET, CLERK_URL, FakeAres, FakeClerk, transport
from usage_middleware.errors import (
    ConfigurationError,
    PermanentProviderError,
    RetryableProviderError,
)
from usage_middleware.providers.tokens import (
    AccessToken,
    BearerTokenSource,
    CallableTokenSource,
    ClerkTokenSource,
)


def scope_with(*headers: tuple[bytes, bytes]) -> HTTPScope:
    scope: dict[str, Any] = {"type": "http", "headers": list(headers)}
    return scope  # type: ignore[return-value]


def clerk_source(ares: FakeAres, clerk: FakeClerk, **kwargs: Any) -> ClerkTokenSource:
    client = httpx.AsyncClient(transport=transport(ares, clerk))
    return ClerkTokenSource(secret_key=CLERK_SECRET, client=client, **kwargs)


def test_access_token_repr_hides_the_secret() -> None:
    """repr() and str() of an AccessToken never show the token."""
    token = AccessToken("s3cr3t-token-value", 123.0)
    assert "s3cr3t" not in repr(token)
    assert "s3cr3t" not in str(token)
    assert "123.0" in repr(token)


async def test_bearer_reads_authorization_header() -> None:
    """BearerTokenSource takes the token after 'Bearer ' (scheme case-insensitive)."""
    source = BearerTokenSource()
    scope = scope_with((b"authorization", b"bEaReR   tok-123  "))
    assert await source.get("u1", scope) == AccessToken("tok-123")
    assert source.request_bound is True


async def test_bearer_without_header_scope_or_scheme_is_none() -> None:
    """No header, no scope, another scheme or an empty token give None."""
    source = BearerTokenSource()
    assert await source.get("u1", None) is None
    assert await source.get("u1", scope_with()) is None
    assert await source.get("u1", scope_with((b"authorization", b"Basic dXNlcjo="))) is None
    assert await source.get("u1", scope_with((b"authorization", b"Bearer "))) is None


async def test_bearer_custom_header_without_scheme() -> None:
    """A custom header with scheme=None carries the bare token."""
    source = BearerTokenSource(header="X-Ares-Token", scheme=None)
    scope = scope_with((b"authorization", b"Bearer app-jwt"), (b"x-ares-token", b"ares-tok"))
    assert await source.get("u1", scope) == AccessToken("ares-tok")


async def test_callable_source_with_and_without_scope() -> None:
    """CallableTokenSource passes the scope only to functions that take it."""

    async def by_customer(customer: str) -> str:
        return f"tok-{customer}"

    async def by_scope(customer: str, scope: HTTPScope | None) -> str | None:
        return None if scope is None else "from-scope"

    one = CallableTokenSource(by_customer)
    two = CallableTokenSource(by_scope)
    assert await one.get("a") == AccessToken("tok-a")
    assert one.request_bound is False
    assert await two.get("a", scope_with()) == AccessToken("from-scope")
    assert await two.get("a", None) is None
    assert two.request_bound is True


def test_callable_source_refuses_sync_function() -> None:
    """A plain function is a ConfigurationError at construction."""
    with pytest.raises(ConfigurationError):
        CallableTokenSource(lambda customer: "x")  # type: ignore[arg-type,return-value]


async def test_callable_source_wraps_errors_without_their_message() -> None:
    """A failing token function becomes a ProviderError that does not repeat its message."""

    async def broken(customer: str) -> str:
        raise RuntimeError("secret-in-message")

    async def wrong(customer: str) -> int:
        return 42

    with pytest.raises(RetryableProviderError) as info:
        await CallableTokenSource(broken).get("a")
    assert "secret-in-message" not in str(info.value)
    assert isinstance(info.value.original_error, RuntimeError)
    with pytest.raises(PermanentProviderError):
        await CallableTokenSource(wrong).get("a")  # type: ignore[arg-type]


async def test_callable_refresh_function_is_used_on_refresh() -> None:
    """refresh= is called after a rejection; returning the rejected token gives None."""
    calls: list[str] = []

    async def get(customer: str) -> str:
        return "old"

    async def refresh(customer: str) -> str:
        calls.append(customer)
        return "new" if len(calls) == 1 else "old"

    source = CallableTokenSource(get, refresh=refresh)
    assert await source.refresh("a", AccessToken("old")) == AccessToken("new")
    assert await source.refresh("a", AccessToken("old")) is None


def test_clerk_needs_a_secret_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CLERK_SECRET_KEY or secret_key= construction fails; the env var is read."""
    monkeypatch.delenv("CLERK_SECRET_KEY", raising=False)
    with pytest.raises(ConfigurationError):
        ClerkTokenSource()
    monkeypatch.setenv("CLERK_SECRET_KEY", "sk_env_value")
    source = ClerkTokenSource()
    assert "sk_env_value" not in repr(source)
    assert source.wire_provider == "oauth_custom_ares"


async def test_clerk_wire_request_and_token() -> None:
    """Clerk is asked GET /v1/users/{id}/oauth_access_tokens/oauth_custom_ares with the key."""
    ares = FakeAres()
    clerk = FakeClerk(ares)
    clerk.connect("user_2abc", credits=10)
    source = clerk_source(ares, clerk)
    token = await source.get("user_2abc")
    assert token is not None and token.value == clerk.token("user_2abc")
    request = clerk.requests[-1]
    path = "/v1/users/user_2abc/oauth_access_tokens/oauth_custom_ares"
    assert str(request.url) == f"{CLERK_URL}{path}"
    assert request.headers["authorization"] == f"Bearer {CLERK_SECRET}"
    assert clerk.violations == []
    await source.aclose()


@pytest.mark.parametrize("ms", [False, True])
async def test_clerk_expires_at_seconds_or_ms(ms: bool) -> None:
    """expires_at in seconds or milliseconds both become Unix seconds."""
    ares = FakeAres()
    clerk = FakeClerk(ares, ms=ms)
    clerk.connect("u")
    token = await clerk_source(ares, clerk).get("u")
    assert token is not None and token.expires_at is not None
    assert abs(token.expires_at - ares.expires_at(clerk.token("u"))) < 1.0


async def test_clerk_paginated_body_is_accepted() -> None:
    """A {"data": [...], "total_count"} body (?paginated=true) is read like the bare list."""
    ares = FakeAres()
    clerk = FakeClerk(ares)
    clerk.connect("u")

    def paginated(request: httpx.Request) -> httpx.Response:
        url = request.url.copy_add_param("paginated", "true")
        return clerk.handler(httpx.Request("GET", url, headers=request.headers))

    client = httpx.AsyncClient(transport=httpx.MockTransport(paginated))
    source = ClerkTokenSource(secret_key=CLERK_SECRET, client=client)
    token = await source.get("u")
    assert token is not None and token.value == clerk.token("u")


async def test_clerk_caches_until_shortly_before_expiry() -> None:
    """A long-lived token is fetched once; one expiring within the margin is not cached."""
    ares = FakeAres()
    clerk = FakeClerk(ares)
    clerk.connect("long", ttl=1800)
    clerk.connect("short", ttl=10)
    source = clerk_source(ares, clerk, refresh_margin=30)
    await source.get("long")
    await source.get("long")
    assert clerk.calls == 1
    await source.get("short")
    await source.get("short")
    assert clerk.calls == 3


async def test_clerk_concurrent_lookups_make_one_call() -> None:
    """Concurrent get() for one user share one Clerk call (single-flight)."""
    ares = FakeAres()
    clerk = FakeClerk(ares)
    clerk.connect("u")
    source = clerk_source(ares, clerk)
    tokens = await asyncio.gather(*(source.get("u") for _ in range(20)))
    assert len(set(tokens)) == 1
    assert clerk.calls == 1


async def test_clerk_refresh_returns_new_token_after_expiry() -> None:
    """After ARES expired the token, refresh() gets Clerk's refreshed (new) token."""
    ares = FakeAres()
    clerk = FakeClerk(ares)
    clerk.connect("u")
    source = clerk_source(ares, clerk)
    first = await source.get("u")
    assert first is not None
    ares.expire(first.value)
    second = await source.refresh("u", first)
    assert second is not None and second != first
    assert ares.token_state(second.value) == "valid"
    assert await source.get("u") == second


async def test_clerk_refresh_of_unchanged_token_is_none() -> None:
    """When Clerk hands back the rejected (revoked) token, refresh() gives None."""
    ares = FakeAres()
    clerk = FakeClerk(ares)
    clerk.connect("u")
    source = clerk_source(ares, clerk)
    first = await source.get("u")
    assert first is not None
    ares.revoke(first.value)
    assert await source.refresh("u", first) is None


async def test_clerk_no_token_cases_are_none() -> None:
    """Unknown user (404), no connection ([]) and 422 oauth_token_retrieval_error give None."""
    ares = FakeAres()
    clerk = FakeClerk(ares)
    clerk.connect("stuck")
    clerk.lose_refresh_token("stuck")
    ares.expire(clerk.token("stuck"))
    source = clerk_source(ares, clerk)
    assert await source.get("nobody") is None
    assert await source.get("stuck") is None
    other = clerk_source(ares, clerk, provider="custom_other")
    clerk.connect("u")
    assert await other.get("u") is None
    clerk.violations.clear()  # the other provider name was deliberate


async def test_clerk_errors_are_typed_and_hide_the_key(caplog: pytest.LogCaptureFixture) -> None:
    """A bad key is permanent, 5xx and network errors retryable; no key in errors or logs."""
    caplog.set_level(logging.DEBUG)
    ares = FakeAres()
    clerk = FakeClerk(ares)
    clerk.connect("u")
    bad = ClerkTokenSource(
        secret_key="sk_wrong_key_value",
        client=httpx.AsyncClient(transport=transport(ares, clerk)),
    )
    with pytest.raises(PermanentProviderError) as permanent:
        await bad.get("u")
    assert permanent.value.status == 401 and permanent.value.code == "authentication_invalid"
    source = clerk_source(ares, clerk)
    clerk.fail_next(503, httpx.ConnectError)
    with pytest.raises(RetryableProviderError) as down:
        await source.get("u")
    assert down.value.status == 503
    with pytest.raises(RetryableProviderError):
        await source.get("u")
    text = " ".join([str(permanent.value), str(down.value), caplog.text])
    assert "sk_wrong_key_value" not in text and CLERK_SECRET not in text

"""Tenant isolation in the example service: device tokens on the WebSocket, SSE and HTTP, the Origin
allow-list, and the legacy and open modes. Every cross-tenant attempt must be refused before any data
flows, and a legitimate device of the targeted restaurant must notice nothing."""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from examples.restaurant_app import Settings, create_app
from examples.restaurant_app.__main__ import RedactTokens, main
from examples.restaurant_app.auth import (
    LEEWAY,
    MAX_TOKEN_LENGTH,
    AccessPolicy,
    TokenError,
    bearer_token,
    mint_token,
    verify_token,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from tests.example.conftest import TEST_SECRET, Running, StartService
from tests.example.restaurant_support import assert_nothing_queued, strip_envelope, welcome
from tests.support import MS, connect, recv_json

VICTIM = "victim-1"
ATTACKER = "attacker-1"
OTHER_SECRET = "another-secret-0123456789abcdef0123456789"
ORIGIN = "https://waitlist.example.com"


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


@dataclass(frozen=True)
class Attempt:
    """A credential an attacker might present for the victim's restaurant, and how it must be refused."""

    name: str
    token: str | None
    reason: str
    status: int


def attempts() -> list[Attempt]:
    """Every way in we refuse, against ``VICTIM``, with the service's secret ``TEST_SECRET``."""
    now = time.time()
    own = mint_token(TEST_SECRET, ATTACKER, device_id="attacker-device")
    header, _, signature = own.split(".")
    victim_claims = {**_claims(own), "restaurant_id": VICTIM}
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    unsigned_claims = {"sub": "x", "iat": int(now), "exp": int(now) + 600}
    return [
        Attempt("no token", None, "token required", 401),
        # The attacker's own token, its payload edited to name the victim: the signature no longer matches.
        Attempt("tampered payload", f"{header}.{_b64(victim_claims)}.{signature}", "invalid token", 401),
        Attempt(
            "tampered signature",
            ".".join((*mint_token(TEST_SECRET, VICTIM).split(".")[:2], flipped)),
            "invalid token",
            401,
        ),
        Attempt("signed with another secret", mint_token(OTHER_SECRET, VICTIM), "invalid token", 401),
        Attempt("expired", mint_token(TEST_SECRET, VICTIM, ttl=3600, now=now - 7200), "token expired", 401),
        Attempt(
            "alg none",
            f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(victim_claims)}.",
            "invalid token",
            401,
        ),
        Attempt(
            "no restaurant_id claim",
            jwt.encode(unsigned_claims, TEST_SECRET, algorithm="HS256"),
            "invalid token",
            401,
        ),
        Attempt("garbage", "not-a-token", "invalid token", 401),
        Attempt("token of another restaurant", own, "token is for another restaurant", 403),
    ]


ATTEMPT_IDS = [attempt.name for attempt in attempts()]


async def assert_refused(url: str, reason: str | None = None, **options: Any) -> None:
    """The WebSocket is closed with 4003 (and ``reason``) before any frame, welcome included."""
    async with await connect(url, **options) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await recv_json(ws)
    assert closed.value.rcvd is not None, "closed without a close frame"
    assert closed.value.rcvd.code == 4003, closed.value.rcvd
    if reason is not None:
        assert closed.value.rcvd.reason == reason


async def _victim_guest(service: Running) -> dict[str, Any]:
    response = await service.http.post(
        f"/restaurants/{VICTIM}/guests",
        json={"guestName": "Grace Hopper", "partySize": 2, "phone": "+15550123"},
    )
    assert response.status_code == 201, response.text
    guest: dict[str, Any] = response.json()
    return guest


async def _victim_table(service: Running) -> dict[str, Any]:
    response = await service.http.post(f"/restaurants/{VICTIM}/tables", json={"name": "T1", "capacity": 2})
    assert response.status_code == 201, response.text
    table: dict[str, Any] = response.json()
    return table


def _victim_requests(guest_id: str, table_id: str) -> list[tuple[str, str, Any]]:
    base = f"/restaurants/{VICTIM}"
    return [
        ("GET", f"{base}/guests", None),
        ("GET", f"{base}/guests/{guest_id}", None),
        ("POST", f"{base}/guests", {"guestName": "Mallory", "partySize": 9}),
        ("PUT", f"{base}/guests/{guest_id}", {"status": "cancelled"}),
        ("DELETE", f"{base}/guests/{guest_id}", None),
        ("GET", f"{base}/tables", None),
        ("GET", f"{base}/tables/{table_id}", None),
        ("POST", f"{base}/tables", {"name": "X", "capacity": 1}),
        ("PUT", f"{base}/tables/{table_id}", {"status": "out_of_service"}),
        (
            "POST",
            "/transactions/atomic",
            {
                "restaurant_id": VICTIM,
                "operations": [
                    {"op": "update_guest", "guest_id": guest_id, "changes": {"status": "no_show"}}
                ],
            },
        ),
    ]


def _auth_header(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token is not None else {}


# -- WebSocket and SSE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", attempts(), ids=ATTEMPT_IDS)
async def test_websocket_refuses_every_cross_tenant_attempt(service: Running, attempt: Attempt) -> None:
    async with await connect(service.ws_url(VICTIM)) as device:
        await welcome(device)
        # In the query (browsers) and in the Authorization header (native apps).
        await assert_refused(service.ws_url(VICTIM, token=attempt.token), attempt.reason)
        await assert_refused(
            service.ws_url(VICTIM, token=None), attempt.reason, additional_headers=_auth_header(attempt.token)
        )
        # The victim's device is still subscribed, alone, and gets the next event.
        health = (await service.http.get("/health")).json()
        assert health["websocket"]["restaurants"] == {VICTIM: 1}
        guest = await _victim_guest(service)
        event, _ = strip_envelope(await recv_json(device))
        assert event["type"] == "guest_created"
        assert event["guest_id"] == guest["id"]


async def test_valid_tokens_open_the_websocket_by_query_or_header(service: Running) -> None:
    token = service.token(VICTIM, device_id="tablet-7")
    async with await connect(service.ws_url(VICTIM, token=token)) as by_query:
        assert (await welcome(by_query))["channel"] == f"restaurant:{VICTIM}"
        headers = {"Authorization": f"Bearer {token}"}
        async with await connect(service.ws_url(VICTIM, token=None), additional_headers=headers) as by_header:
            await welcome(by_header)
            guest = await _victim_guest(service)
            for ws in (by_query, by_header):
                event, _ = strip_envelope(await recv_json(ws))
                assert event["guest_id"] == guest["id"]
    # A valid token does not open another restaurant, whatever the query says.
    await assert_refused(service.ws_url(ATTACKER, token=token), "token is for another restaurant")


async def test_sse_needs_a_token_for_its_restaurant(service: Running) -> None:
    anonymous = httpx.AsyncClient(base_url=f"http://{service.address}", timeout=10)
    async with anonymous:
        for attempt in attempts():
            params = {"restaurant_id": VICTIM, **({"token": attempt.token} if attempt.token else {})}
            response = await anonymous.get("/realtime/sse", params=params)
            assert response.status_code == 403, (attempt.name, response.text)
            assert response.text == attempt.reason
        params = {"restaurant_id": VICTIM, "token": service.token(VICTIM)}
        async with anonymous.stream("GET", "/realtime/sse", params=params) as stream:
            assert stream.status_code == 200
            async for line in stream.aiter_lines():
                assert line.startswith("data: "), line
                assert json.loads(line.removeprefix("data: "))["type"] == "welcome"
                break


async def test_connections_end_when_their_token_expires(service: Running) -> None:
    # Accepted now (within the leeway), no longer accepted 3 s from now (generous: CI machines are busy).
    token = service.token(VICTIM, ttl=60, now=time.time() - 60 - LEEWAY + 3)
    async with await connect(service.ws_url(VICTIM)) as lasting:
        await welcome(lasting)
        async with await connect(service.ws_url(VICTIM, token=token)) as expiring:
            await welcome(expiring)
            started = time.monotonic()
            with pytest.raises(ConnectionClosed) as closed:
                await recv_json(expiring, timeout=10_000 * MS)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4003, "token expired")
            assert time.monotonic() - started < 8
        anonymous = httpx.AsyncClient(base_url=f"http://{service.address}", timeout=10)
        token = service.token(VICTIM, ttl=60, now=time.time() - 60 - LEEWAY + 3)
        params = {"restaurant_id": VICTIM, "token": token}
        async with anonymous, anonymous.stream("GET", "/realtime/sse", params=params) as stream:
            lines = [line async for line in stream.aiter_lines() if line]  # ends at expiry, saying why
            assert json.loads(lines[0].removeprefix("data: "))["type"] == "welcome"
            assert lines[1:2] == [": closed 4003 token expired"] and lines[2].startswith("retry: ")
            assert len(lines) == 3
        # The connection opened with a lasting token is untouched.
        await assert_nothing_queued(lasting)
        await assert_refused(service.ws_url(VICTIM, token=token), "token expired")


# -- HTTP -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", attempts(), ids=ATTEMPT_IDS)
async def test_http_refuses_every_cross_tenant_attempt(service: Running, attempt: Attempt) -> None:
    guest = await _victim_guest(service)
    table = await _victim_table(service)
    guests_before = (await service.http.get(f"/restaurants/{VICTIM}/guests")).json()["guests"]
    async with await connect(service.ws_url(VICTIM)) as device:
        await welcome(device)
        for method, path, body in _victim_requests(guest["id"], table["id"]):
            response = await service.http.request(
                method, path, json=body, headers=_auth_header(attempt.token), auth=None
            )
            assert response.status_code == attempt.status, (method, path, response.text)
            assert response.json() == {"detail": attempt.reason}
            assert "Grace" not in response.text
            if attempt.status == 401:
                assert response.headers["www-authenticate"].startswith("Bearer")
        # Nothing was written, nothing was broadcast.
        await assert_nothing_queued(device)
    assert (await service.http.get(f"/restaurants/{VICTIM}/guests")).json()["guests"] == guests_before
    tables = (await service.http.get(f"/restaurants/{VICTIM}/tables")).json()["tables"]
    assert [t["id"] for t in tables] == [table["id"]]
    assert tables[0]["status"] == "available"


async def test_http_authentication_comes_before_validation(service: Running) -> None:
    # An unauthenticated caller learns nothing from the body's validation errors...
    response = await service.http.post("/transactions/atomic", json={"bogus": True}, auth=None)
    assert response.status_code == 401
    response = await service.http.post(f"/restaurants/{VICTIM}/guests", json={}, auth=None)
    assert response.status_code == 401
    # ...an authenticated one gets them; the restaurant check of an atomic body follows its validation.
    own = _auth_header(service.token(ATTACKER))
    response = await service.http.post("/transactions/atomic", json={"bogus": True}, headers=own)
    assert response.status_code == 422
    response = await service.http.post(
        "/transactions/atomic",
        json={"restaurant_id": VICTIM, "operations": [{"op": "create_guest", "guest": {"guestName": "M"}}]},
        headers=own,
    )
    assert response.status_code == 422
    body = {
        "restaurant_id": VICTIM,
        "operations": [{"op": "create_guest", "guest": {"guestName": "M", "partySize": 1}}],
    }
    response = await service.http.post("/transactions/atomic", json=body, headers=own)
    assert response.status_code == 403


async def test_health_and_docs_stay_open(service: Running) -> None:
    for path in ("/health", "/openapi.json"):
        response = await service.http.get(path, auth=None)
        assert response.status_code == 200, path
    assert (await service.http.get("/health")).json()["auth"] == "tokens"
    schemes = (await service.http.get("/openapi.json")).json()["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer"


# -- Origin allow-list ------------------------------------------------------------------------------------


async def test_foreign_origins_are_refused_when_an_allow_list_is_set(start_service: StartService) -> None:
    service = await start_service(settings=Settings(token_secret=TEST_SECRET, allowed_origins=(ORIGIN,)))
    url = service.ws_url(VICTIM)
    for origin in ("https://evil.example", "http://waitlist.example.com", "null", ORIGIN + ":8443"):
        await assert_refused(url, "origin not allowed", origin=origin)
    async with await connect(url, origin=ORIGIN) as browser:
        await welcome(browser)
    async with await connect(url) as native_app:  # sends no Origin
        await welcome(native_app)
    # The allow-list adds to the token check, it does not replace it.
    await assert_refused(service.ws_url(VICTIM, token=None), "token required", origin=ORIGIN)


# -- legacy and open modes --------------------------------------------------------------------------------


async def test_legacy_mode_lets_bare_urls_in_but_still_checks_tokens(
    start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="examples.restaurant_app")
    settings = Settings(token_secret=TEST_SECRET, allow_legacy_unauthenticated=True)
    service = await start_service(settings=settings)
    assert any(
        r.levelno == logging.WARNING and "RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED" in r.getMessage()
        for r in caplog.records
    )
    async with await connect(service.ws_url(VICTIM, token=None)) as legacy_device:
        await welcome(legacy_device)
        response = await service.http.post(
            f"/restaurants/{VICTIM}/guests", json={"guestName": "Old App", "partySize": 1}, auth=None
        )
        assert response.status_code == 201
        event, _ = strip_envelope(await recv_json(legacy_device))
        assert event["type"] == "guest_created"
    assert any(
        r.levelno == logging.WARNING
        and f"legacy unauthenticated websocket to restaurant {VICTIM}" in r.getMessage()
        for r in caplog.records
    )
    assert (await service.http.get("/health")).json()["auth"] == "tokens+legacy"
    # A request that presents a token still needs a valid one, for its restaurant.
    for attempt in attempts()[1:]:
        await assert_refused(service.ws_url(VICTIM, token=attempt.token), attempt.reason)
        response = await service.http.get(
            f"/restaurants/{VICTIM}/guests", headers=_auth_header(attempt.token), auth=None
        )
        assert response.status_code == attempt.status, attempt.name


async def test_open_mode_runs_without_tokens_and_says_so(
    start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="examples.restaurant_app")
    service = await start_service(settings=Settings(allow_legacy_unauthenticated=True))
    assert any("AUTHENTICATION DISABLED" in r.getMessage() for r in caplog.records)
    async with await connect(service.ws_url(VICTIM)) as ws:
        await welcome(ws)
    assert (await service.http.get(f"/restaurants/{VICTIM}/tables")).status_code == 200
    assert (await service.http.get("/health")).json()["auth"] == "open"


def test_no_secret_and_no_legacy_flag_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="RESTAURANT_TOKEN_SECRET"):
        create_app(Settings())


# -- tokens, settings and the command line ----------------------------------------------------------------


def test_tokens_carry_the_device_and_its_restaurant() -> None:
    token = mint_token(TEST_SECRET, VICTIM, device_id="tablet-1", ttl=60, now=1_900_000_000)
    assert _claims(token) == {
        "sub": "tablet-1",
        "restaurant_id": VICTIM,
        "iat": 1_900_000_000,
        "exp": 1_900_000_060,
    }
    device = verify_token(TEST_SECRET, mint_token(TEST_SECRET, VICTIM, device_id="tablet-1"))
    assert (device.device_id, device.restaurant_id) == ("tablet-1", VICTIM)
    assert device.expires_at - device.issued_at == 3600
    assert verify_token(TEST_SECRET, mint_token(TEST_SECRET, VICTIM)).device_id.startswith("device-")
    with pytest.raises(TokenError, match="invalid token"):
        verify_token(TEST_SECRET, "x" * (MAX_TOKEN_LENGTH + 1))
    bad_type = jwt.encode({"sub": "d", "restaurant_id": ["r"], "iat": 1, "exp": 2**40}, TEST_SECRET, "HS256")
    with pytest.raises(TokenError, match="invalid token"):
        verify_token(TEST_SECRET, bad_type)
    with pytest.raises(ValueError, match="restaurant id"):
        mint_token(TEST_SECRET, "bad id!")
    with pytest.raises(ValueError, match="ttl"):
        mint_token(TEST_SECRET, VICTIM, ttl=0)
    with pytest.raises(ValueError, match="ttl"):
        mint_token(TEST_SECRET, VICTIM, ttl=float("inf"))
    for iat, exp in ((0, 10**400), (1, 2**41), (-5, 2**35)):
        odd = jwt.PyJWS().encode(
            json.dumps({"sub": "d", "restaurant_id": VICTIM, "iat": iat, "exp": exp}).encode(), TEST_SECRET
        )
        with pytest.raises(TokenError, match="invalid token"):
            verify_token(TEST_SECRET, odd)


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    for value in (None, "", "Bearer", "Bearer ", "Basic abc", "abc"):
        assert bearer_token(value) is None, value


def test_access_policy_modes() -> None:
    strict = AccessPolicy(Settings(token_secret=TEST_SECRET))
    assert strict.mode == "tokens"
    with pytest.raises(TokenError, match="token required"):
        strict.authenticate(None)
    legacy = AccessPolicy(Settings(token_secret=TEST_SECRET, allow_legacy_unauthenticated=True))
    assert legacy.authenticate(None) is None
    with pytest.raises(TokenError):
        legacy.authenticate("garbage")
    assert AccessPolicy(Settings(allow_legacy_unauthenticated=True)).authenticate("garbage") is None


def test_security_settings_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "RESTAURANT_TOKEN_SECRET": TEST_SECRET,
            "RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED": "1",
            "RESTAURANT_ALLOWED_ORIGINS": f" {ORIGIN}/ , http://localhost:3000",
        }
    )
    assert settings.token_secret == TEST_SECRET
    assert settings.allow_legacy_unauthenticated is True
    assert settings.allowed_origins == (ORIGIN, "http://localhost:3000")
    assert TEST_SECRET not in repr(settings)
    assert Settings.from_env({}).auth_mode == "unconfigured"
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Settings.from_env({"RESTAURANT_TOKEN_SECRET": "short"})
    with pytest.raises(ValueError, match="RESTAURANT_ALLOWED_ORIGINS"):
        Settings.from_env({"RESTAURANT_ALLOWED_ORIGINS": "waitlist.example.com"})
    with pytest.raises(ValueError, match="RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED"):
        Settings.from_env({"RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED": "please"})


def test_token_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RESTAURANT_TOKEN_SECRET", TEST_SECRET)
    main(["token", "--restaurant", VICTIM, "--ttl", "120", "--device", "kiosk"])
    device = verify_token(TEST_SECRET, capsys.readouterr().out.strip())
    assert (device.device_id, device.restaurant_id) == ("kiosk", VICTIM)
    assert device.expires_at - device.issued_at == 120
    monkeypatch.delenv("RESTAURANT_TOKEN_SECRET")
    with pytest.raises(SystemExit) as exited:
        main(["token", "--restaurant", VICTIM])
    assert exited.value.code == 2
    assert "RESTAURANT_TOKEN_SECRET is not set" in capsys.readouterr().err


def test_tokens_are_redacted_from_logged_urls() -> None:
    record = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5000", "/realtime?restaurant_id=r1&token=eyJ.abc.def&epoch=e"),
        None,
    )
    assert RedactTokens().filter(record)
    assert record.getMessage() == (
        '127.0.0.1:5000 - "WebSocket /realtime?restaurant_id=r1&token=***&epoch=e" [accepted]'
    )


# -- hostile tokens (property-based) ----------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
_claim_values = st.one_of(_json_values, st.just(VICTIM), st.integers(0, 2**40))


@settings(max_examples=300, deadline=None)
@given(
    claims=st.dictionaries(
        st.sampled_from(["sub", "restaurant_id", "iat", "exp", "nbf", "aud", "iss", "x"]), _claim_values
    )
)
def test_any_claims_signed_with_the_secret_verify_or_raise_token_error(claims: dict[str, Any]) -> None:
    """Even a token signed with the secret, with claims of any type and value, never crashes the check."""
    # Signed as raw JSON: jwt.encode would refuse some of these claims before signing them.
    token = jwt.PyJWS().encode(json.dumps(claims).encode(), TEST_SECRET, algorithm="HS256")
    try:
        device = verify_token(TEST_SECRET, token)
    except TokenError:
        return
    assert device.restaurant_id == claims["restaurant_id"] == VICTIM


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0), replacement=st.characters(codec="ascii"), data=st.data())
def test_an_altered_token_is_refused_or_unchanged(
    position: int, replacement: str, data: st.DataObject
) -> None:
    """Changing any character of a valid token either breaks it or (base64 padding bits) changes nothing."""
    token = mint_token(TEST_SECRET, VICTIM, device_id="d1")
    index = position % len(token)
    altered = token[:index] + replacement + token[index + 1 :]
    try:
        device = verify_token(TEST_SECRET, altered)
    except TokenError:
        return
    assert device == verify_token(TEST_SECRET, token)
    garbage = data.draw(st.text(max_size=200))
    with pytest.raises(TokenError):
        verify_token(TEST_SECRET, garbage)

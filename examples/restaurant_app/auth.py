"""Signed device tokens and the access policy built on them (documented in this package's README).

A device token is a JWT signed with HS256 (PyJWT) carrying ``sub`` (the device id), ``restaurant_id`` (the
one restaurant the device belongs to), ``iat`` and ``exp``. With a secret configured, every request for a
restaurant's data needs a valid token for that restaurant: on the realtime endpoints through the library's
``authorize`` hook (refused with close code 4003, or HTTP 403 on SSE), on HTTP through a dependency (401
without a valid token, 403 with a token for another restaurant).
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt

from rtbroadcast import Identity
from rtbroadcast.asgi import ConnectionRequest, Deny

from .config import Settings
from .schemas import RESTAURANT_ID_PATTERN
from .service import CHANNEL_PREFIX

__all__ = [
    "ALGORITHM",
    "AccessPolicy",
    "DeviceClaims",
    "Forbidden",
    "TokenError",
    "bearer_token",
    "mint_token",
    "verify_token",
]

logger = logging.getLogger(__name__)

#: The only algorithm accepted: a token whose header names another (``none``, RS256...) is refused.
ALGORITHM = "HS256"
#: Claims every token must carry.
REQUIRED_CLAIMS = ("sub", "restaurant_id", "iat", "exp")
#: Longer tokens are refused before any parsing.
MAX_TOKEN_LENGTH = 4096
#: Longest ``name`` claim accepted.
MAX_NAME_LENGTH = 100
#: Clock skew tolerated on ``exp`` and ``iat``, in seconds.
LEEWAY = 10.0

_RESTAURANT_ID = re.compile(RESTAURANT_ID_PATTERN)
#: ``iat`` and ``exp`` beyond this (2**40 s: year 36812) are refused, so that they convert to floats.
_MAX_TIMESTAMP = 2**40


class TokenError(Exception):
    """A token is missing, malformed, badly signed or expired; ``reason`` is safe to show the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Forbidden(Exception):
    """A valid token asks for a restaurant it is not bound to."""

    def __init__(self, reason: str = "token is for another restaurant") -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class DeviceClaims:
    """What a verified token says: which device, bound to which restaurant, valid until when."""

    device_id: str
    restaurant_id: str
    issued_at: int
    expires_at: int
    #: the optional ``name`` claim: how other devices see this one (presence); at most 100 characters.
    name: str | None = None


def mint_token(
    secret: str,
    restaurant_id: str,
    *,
    device_id: str | None = None,
    name: str | None = None,
    ttl: float = 3600,
    now: float | None = None,
) -> str:
    """Return a signed device token for ``restaurant_id``, valid for ``ttl`` seconds from ``now``.

    Args:
        secret: the service's ``RESTAURANT_TOKEN_SECRET``.
        restaurant_id: the one restaurant the device may read and change.
        device_id: the ``sub`` claim; a random ``device-...`` id when omitted.
        name: the ``name`` claim, the device's display name (e.g. ``Host stand``); none when omitted.
        ttl: lifetime in seconds.
        now: issue time (Unix seconds); the current time when omitted.

    Raises:
        ValueError: ``restaurant_id`` is not a valid restaurant id, ``name`` is empty or too long, or
            ``ttl`` is not positive.
    """
    if _RESTAURANT_ID.fullmatch(restaurant_id) is None:
        raise ValueError(f"not a valid restaurant id: {restaurant_id!r}")
    if name is not None and not 0 < len(name) <= MAX_NAME_LENGTH:
        raise ValueError(f"name must be 1 to {MAX_NAME_LENGTH} characters, not {len(name)}")
    if not 0 < ttl < _MAX_TIMESTAMP:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": device_id or f"device-{secrets.token_hex(8)}",
        "restaurant_id": restaurant_id,
        "iat": issued,
        "exp": issued + int(ttl),
    }
    if name is not None:
        claims["name"] = name
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str) -> DeviceClaims:
    """Check the signature, the algorithm, the required claims and the expiry of ``token``.

    Raises:
        TokenError: with ``reason`` ``token expired`` or ``invalid token``.
    """
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("invalid token")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": list(REQUIRED_CLAIMS)},
            leeway=LEEWAY,
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("token expired") from None
    except jwt.InvalidTokenError as exc:
        logger.debug("token refused: %s", exc)
        raise TokenError("invalid token") from None
    subject, restaurant_id = claims["sub"], claims["restaurant_id"]
    issued_at, expires_at = int(claims["iat"]), int(claims["exp"])  # PyJWT checked that they are numbers
    name = claims.get("name")
    if (name is not None and (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH)) or (
        not isinstance(subject, str)
        or not isinstance(restaurant_id, str)
        or _RESTAURANT_ID.fullmatch(restaurant_id) is None
        or not 0 <= issued_at <= expires_at <= _MAX_TIMESTAMP
    ):
        raise TokenError("invalid token")
    return DeviceClaims(subject, restaurant_id, issued_at, expires_at, name)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or ``None``."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


class AccessPolicy:
    """Decides, from a request's token, whether it may touch a restaurant.

    Modes (``Settings.auth_mode``):

    - ``tokens``: a valid token bound to the restaurant is required.
    - ``tokens+legacy``: as ``tokens``, but a request with no token at all is let in (the reference's bare
      URLs); a request that does present a token still needs a valid one for the restaurant.
    - ``open``: no secret; nothing is checked (tokens are ignored).

    Raises:
        ValueError: the settings configure neither a secret nor the legacy mode.
    """

    def __init__(self, settings: Settings) -> None:
        if settings.auth_mode == "unconfigured":
            raise ValueError(
                "no RESTAURANT_TOKEN_SECRET configured: set one (at least 32 bytes), or set "
                "RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED=1 to run without authentication, or run "
                "`python -m examples.restaurant_app --demo`, which generates a secret and prints tokens"
            )
        self.mode = settings.auth_mode
        self._secret = settings.token_secret
        self._legacy = settings.allow_legacy_unauthenticated

    def authenticate(self, token: str | None) -> DeviceClaims | None:
        """The device a request's token names; ``None`` when the mode lets a token-less request in.

        Raises:
            TokenError: a token is required and missing, or the one given is not valid.
        """
        if self._secret is None:
            return None
        if token is None:
            if self._legacy:
                return None
            raise TokenError("token required")
        return verify_token(self._secret, token)

    def check(self, token: str | None, restaurant_id: str) -> DeviceClaims | None:
        """Authenticate and check that the device belongs to ``restaurant_id``.

        Raises:
            TokenError: as :meth:`authenticate`.
            Forbidden: the token is bound to another restaurant.
        """
        device = self.authenticate(token)
        require_restaurant(device, restaurant_id)
        return device

    def authorize(self, request: ConnectionRequest, channel: str) -> bool | Deny:
        """The realtime endpoints' ``authorize`` hook: the token from ``?token=`` or ``Authorization``."""
        token = realtime_token(request)
        restaurant_id = channel.removeprefix(CHANNEL_PREFIX)
        try:
            device = self.check(token, restaurant_id)
        except (TokenError, Forbidden) as exc:
            logger.info(
                "refused %s to restaurant %s from %s: %s",
                request.transport,
                restaurant_id,
                _client(request),
                exc.reason,
            )
            return Deny(exc.reason)
        if device is None and self.mode == "tokens+legacy":
            logger.warning(
                "legacy unauthenticated %s to restaurant %s from %s",
                request.transport,
                restaurant_id,
                _client(request),
            )
        return True

    def identify(self, request: ConnectionRequest) -> Identity | None:
        """The realtime endpoints' ``authenticate`` hook: the device of a valid token, until it expires.

        rtbroadcast closes the connection (4003 ``token expired``) when ``expires_at`` passes; the device
        reconnects, and resumes, with a fresh token. A missing or invalid token gives ``None``: the
        ``authorize`` hook refuses it then, with the reason (after the channel is known to be valid).
        """
        token = realtime_token(request)
        if self._secret is None or token is None:
            return None
        try:
            device = verify_token(self._secret, token)
        except TokenError:
            return None
        expires = datetime.fromtimestamp(device.expires_at + LEEWAY, UTC)
        return Identity(device.device_id, tags=frozenset({device.restaurant_id}), expires_at=expires)


def realtime_token(request: ConnectionRequest) -> str | None:
    """The token of a realtime request: ``?token=`` (browsers), else ``Authorization: Bearer``."""
    return request.query.get("token") or bearer_token(request.headers.get("authorization"))


def require_restaurant(device: DeviceClaims | None, restaurant_id: str) -> None:
    """Raise :class:`Forbidden` unless ``device`` is ``None`` (no check) or bound to ``restaurant_id``."""
    if device is not None and device.restaurant_id != restaurant_id:
        raise Forbidden()


def _client(request: ConnectionRequest) -> str:
    return f"{request.client[0]}:{request.client[1]}" if request.client else "unknown"

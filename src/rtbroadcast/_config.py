"""Checks for configuration values, so that a mistake fails where the object is created.

Every check raises :class:`~rtbroadcast.ConfigurationError` naming the option, what it got and what it
takes. Python's own comparisons would let ``NaN`` through (``nan <= 0`` is false) and turn ``"25"`` into a
``TypeError`` far from the mistake; these do neither.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from .errors import ConfigurationError

__all__ = [
    "count",
    "did_you_mean",
    "is_seconds",
    "optional_count",
    "optional_seconds",
    "parse_query",
    "redact_url",
    "seconds",
    "wait_seconds",
]


def did_you_mean(name: str, known: Collection[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the known name closest to ``name``, or ``""``.

    A name one typing mistake away (a letter dropped, added, replaced, or two swapped) is always found;
    otherwise difflib's closest match, if it is close enough.
    """
    candidates = sorted(known)
    close = [k for k in candidates if _one_mistake_apart(name, k)]
    close = close or difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _one_mistake_apart(a: str, b: str) -> bool:
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        differ = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        if len(differ) == 1:
            return True
        i, j = differ[0], differ[-1]
        return len(differ) == 2 and j == i + 1 and a[i] == b[j] and a[j] == b[i]
    shorter, longer = sorted((a, b), key=len)
    return any(longer[:i] + longer[i + 1 :] == shorter for i in range(len(longer)))


def is_seconds(value: object) -> bool:
    """Return whether ``value`` is a duration: a finite number greater than 0, not a ``bool``."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def seconds(name: str, value: object) -> float:
    """Check a duration in seconds: a finite number greater than 0.

    Raises:
        ConfigurationError: anything else, ``bool``, ``NaN`` and infinity included.
    """
    if is_seconds(value):
        return value  # type: ignore[return-value]
    raise ConfigurationError(f"{name} must be a finite number of seconds > 0, not {value!r}")


def wait_seconds(name: str, value: object) -> float:
    """Check how long to wait: a finite number of seconds, 0 included.

    Raises:
        ConfigurationError: anything else, ``bool``, negative numbers, ``NaN`` and infinity included.
    """
    if is_seconds(value) or (isinstance(value, int | float) and not isinstance(value, bool) and value == 0):
        return value  # type: ignore[return-value]
    raise ConfigurationError(f"{name} must be a finite number of seconds >= 0, not {value!r}")


def optional_seconds(name: str, value: object) -> float | None:
    """Check a duration in seconds, or ``None``.

    Raises:
        ConfigurationError: neither ``None`` nor a finite number greater than 0.
    """
    if value is None or is_seconds(value):
        return value  # type: ignore[return-value]
    raise ConfigurationError(f"{name} must be a finite number of seconds > 0 or None, not {value!r}")


def count(name: str, value: object, *, minimum: int) -> int:
    """Check a whole number of at least ``minimum``.

    Raises:
        ConfigurationError: anything else, ``bool`` and ``float`` included.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    raise ConfigurationError(f"{name} must be an integer >= {minimum}, not {value!r}")


def optional_count(name: str, value: object, *, minimum: int) -> int | None:
    """Check a whole number of at least ``minimum``, or ``None``.

    Raises:
        ConfigurationError: neither ``None`` nor such a number.
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    raise ConfigurationError(f"{name} must be an integer >= {minimum} or None, not {value!r}")


def redact_url(url: str) -> str:
    """Return ``url`` with its password, if any, replaced by ``***`` (for messages, logs and stats)."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{host}"))


def parse_query(
    where: str, query: str, options: Mapping[str, Callable[[str], Any]], *, help: str = ""
) -> dict[str, Any]:
    """Read the options of a URL's query string, each converted by its entry in ``options``.

    Args:
        where: how messages name the URL (``"memory://"``).
        query: the query string, without ``?``.
        options: option name -> converter from text; a converter raises ``ValueError`` on a bad value.
        help: appended to the message about an unknown option (where the options are listed).

    Raises:
        ConfigurationError: an option is unknown (with the closest known name), given twice, or its value
            does not convert.
    """
    values: dict[str, Any] = {}
    for key, text in parse_qsl(query, keep_blank_values=True):
        if key not in options:
            known = ", ".join(sorted(options))
            raise ConfigurationError(
                f"unknown {where} option {key!r}{did_you_mean(key, options)}; known options: {known}{help}"
            )
        if key in values:
            raise ConfigurationError(f"{where} option {key!r} is given twice")
        try:
            values[key] = options[key](text)
        except (TypeError, ValueError, ConfigurationError) as exc:
            raise ConfigurationError(f"invalid value {text!r} for {where} option {key!r}: {exc}") from None
    return values

"""Configuration of the example service from environment variables."""

from __future__ import annotations

import pytest
from examples.restaurant_app import Settings
from examples.restaurant_app.config import DEFAULT_DATABASE_URL
from examples.restaurant_app.db import normalize_database_url


def test_defaults_and_overrides() -> None:
    assert Settings.from_env({}) == Settings()
    assert Settings().database_url == DEFAULT_DATABASE_URL
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://app@db/restaurants",
            "BROADCAST_URL": "redis://cache:6379/0",
            "HEARTBEAT_INTERVAL": "15",
            "DEMO": "yes",
            "LOG_LEVEL": "debug",
            "MAX_BODY_SIZE": "65536",
            "OUTBOX_RETENTION": "0",
        }
    )
    assert settings.outbox_retention == 0.0
    assert Settings().outbox_retention == 3600.0
    assert Settings.from_env({"OUTBOX_RETENTION": "86400"}).outbox_retention == 86400.0
    assert settings.max_body_size == 65536
    assert Settings().max_body_size == 1024 * 1024
    assert settings.broadcast_url == "redis://cache:6379/0"
    assert settings.heartbeat_interval == 15.0
    assert settings.demo is True
    assert settings.log_level == "DEBUG"
    assert normalize_database_url(settings.database_url).drivername == "postgresql+asyncpg"
    assert normalize_database_url("sqlite:///x.db").drivername == "sqlite+aiosqlite"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HEARTBEAT_INTERVAL", "soon"),
        ("HEARTBEAT_TIMEOUT", "-1"),
        ("HEARTBEAT_INTERVAL", "nan"),
        ("HEARTBEAT_TIMEOUT", "inf"),
        ("DEMO", "maybe"),
        ("LOG_LEVEL", "LOUD"),
        ("MAX_BODY_SIZE", "1MB"),
        ("MAX_BODY_SIZE", "0"),
        ("OUTBOX_RETENTION", "-1"),
        ("OUTBOX_RETENTION", "nan"),
        ("OUTBOX_RETENTION", "inf"),
        ("OUTBOX_RETENTION", "a day"),
    ],
)
def test_bad_values_are_refused_with_the_variable_named(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})


def test_a_nonsense_outbox_retention_is_refused_when_built_directly() -> None:
    with pytest.raises(ValueError, match="OUTBOX_RETENTION must be a finite number of seconds >= 0"):
        Settings(outbox_retention=-5)

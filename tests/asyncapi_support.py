"""Validate AsyncAPI documents against the official AsyncAPI 3.0.0 JSON Schema vendored in tests/data."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource

ASYNCAPI_SCHEMA = Path(__file__).parent / "data" / "asyncapi" / "3.0.0.json"


def _no_retrieval(uri: str) -> Resource[Any]:
    raise NoSuchResource(ref=uri)  # the vendored schema bundles every definition: never touch the network


@functools.cache
def asyncapi_validator() -> jsonschema.Draft7Validator:
    """Return a validator for AsyncAPI 3.0.0 documents."""
    schema = json.loads(ASYNCAPI_SCHEMA.read_text())
    registry: Registry[Any] = Registry(retrieve=_no_retrieval)
    return jsonschema.Draft7Validator(schema, registry=registry)


def asyncapi_errors(document: dict[str, Any]) -> list[str]:
    """Return what makes ``document`` an invalid AsyncAPI 3.0.0 document (empty when it is valid)."""
    return [f"{list(e.absolute_path)}: {e.message[:300]}" for e in asyncapi_validator().iter_errors(document)]

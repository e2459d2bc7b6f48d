"""The example service's OpenAPI document matches what the server does: schemathesis, on a live server.

The service runs on a real uvicorn server (SQLite and PostgreSQL, through the suite's fixtures); schemathesis
loads ``/openapi.json`` from it over the network and sends generated requests, each with a valid device token
for the restaurant it names. Every operation gets schema-valid (positive) and schema-violating (negative)
cases: first schemathesis's coverage cases (boundary values, nulls, missing and unexpected fields, methods the
path does not take), then generated ones. Every response goes through all of schemathesis's checks: no 500,
responses, status codes and ``Allow`` as documented, valid data accepted, invalid data rejected,
authentication enforced. The generated examples are bounded and derandomized, so a run is reproducible and
takes about 10 s per database on an idle machine.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import hypothesis
import pytest
import schemathesis
from examples.restaurant_app.auth import mint_token
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode

from tests.example.conftest import FALLBACK_RESTAURANT, Running

pytestmark = pytest.mark.anyio

#: Generated examples per operation and generation mode (the coverage cases come on top).
MAX_EXAMPLES = 10
#: What one database's run may take, in seconds: a guard against a hang, not a benchmark (a run takes about
#: 10 s on an idle machine, 20 to 50 s on a loaded one).
TIME_BUDGET = 120.0
#: Failures reported per operation and phase (the first ones; the rest are usually the same bug).
MAX_REPORTED = 3


def _restaurant(case: schemathesis.Case) -> str:
    """The restaurant a case is about: its path's, or its atomic body's."""
    restaurant = (case.path_parameters or {}).get("restaurant_id")
    if restaurant is None and isinstance(case.body, dict):
        restaurant = case.body.get("restaurant_id")
    return restaurant if isinstance(restaurant, str) else FALLBACK_RESTAURANT


def _auth(secret: str, case: schemathesis.Case) -> dict[str, str]:
    """A valid device token for the case's restaurant, as tests/example/conftest.py's ``DeviceAuth``."""
    try:
        token = mint_token(secret, _restaurant(case))
    except ValueError:  # not a valid restaurant id: any token will do, the route refuses the id first
        token = mint_token(secret, FALLBACK_RESTAURANT)
    return {"Authorization": f"Bearer {token}"}


class _Run:
    """One schemathesis run against a live server: the failures it found and the statuses it saw."""

    def __init__(self, base_url: str, secret: str) -> None:
        self.base_url = base_url
        self.secret = secret
        self.failures: list[str] = []
        self.statuses: Counter[int] = Counter()
        self.deadline = time.monotonic() + TIME_BUDGET

    def send(self, case: schemathesis.Case) -> None:
        """Send ``case`` and run every check on its response (raises on a failed check)."""
        response = case.call_and_validate(
            base_url=self.base_url, headers=_auth(self.secret, case), timeout=10
        )
        self.statuses[response.status_code] += 1

    def run(self) -> None:
        schema = schemathesis.openapi.from_url(f"{self.base_url}/openapi.json", timeout=10)
        for result in schema.get_all_operations():
            operation = result.ok()
            if time.monotonic() > self.deadline:
                self.failures.append(f"the {TIME_BUDGET:.0f} s budget was spent before {operation.label}")
                return
            self.coverage(schema, operation)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                self.fuzz(operation, mode)

    def coverage(self, schema: Any, operation: schemathesis.APIOperation) -> None:
        generation = schema.config.generation_for(operation=operation, phase="coverage")
        reported = 0
        for case in schema.iter_coverage_cases(
            operation, generation_modes=list(GenerationMode), generation_config=generation
        ):
            try:
                self.send(case)
            except (Exception, BaseExceptionGroup) as exc:  # a failed check: its case and curl command
                reported += 1
                if reported <= MAX_REPORTED:
                    self.failures.append(f"{operation.label} (coverage):\n{exc}")

    def fuzz(self, operation: schemathesis.APIOperation, mode: GenerationMode) -> None:
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis.settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
        )
        def check(case: schemathesis.Case) -> None:
            self.send(case)

        try:
            check()
        except hypothesis.errors.Unsatisfiable:
            # Nothing to make invalid: the operation takes no parameters and no body.
            assert mode is GenerationMode.NEGATIVE, operation.label
        except (Exception, BaseExceptionGroup) as exc:  # a failed check: its case and curl command
            self.failures.append(f"{operation.label} ({mode.value}):\n{exc}")


async def test_the_openapi_document_matches_the_server(service: Running) -> None:
    assert service.settings.token_secret is not None
    run = _Run(f"http://{service.address}", service.settings.token_secret)
    await asyncio.to_thread(run.run)
    assert not run.failures, "\n\n".join(run.failures)
    # The tokens worked: valid cases reached the routes (were every answer a 401, every check would pass).
    assert run.statuses[200] and run.statuses[201] and run.statuses[404], run.statuses


async def test_405_names_every_method_of_the_path(service: Running) -> None:
    """Starlette named the methods of the first route on the path only (``Allow: GET`` on a guest)."""
    for path, allowed in (
        (f"/restaurants/{FALLBACK_RESTAURANT}/guests/g1", "DELETE, GET, PUT"),
        (f"/restaurants/{FALLBACK_RESTAURANT}/guests", "GET, POST"),
        (f"/restaurants/{FALLBACK_RESTAURANT}/tables/t1", "GET, PUT"),
    ):
        response = await service.http.request("PATCH", path, json={})
        assert response.status_code == 405, path
        assert response.headers["allow"] == allowed, path

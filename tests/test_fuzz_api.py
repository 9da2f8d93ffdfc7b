"""Schemathesis fuzzes the server's own OpenAPI schema: whatever it sends, no 5xx comes back."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from server_util import Server  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A tiny context keeps every fuzzed generation short.
    s = Server("--dtype", "float32", "--kv-cache-gb", "0.05", "--max-model-len", "48",
               data_dir=str(tmp_path_factory.mktemp("fuzz"))).wait_ready()
    yield s
    s.stop()


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call(timeout=60)
    assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"

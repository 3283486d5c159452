"""schemathesis against /openapi.json of a real server: bounded, seeded, 0 server errors and 0 schema mismatches.

Every operation gets up to ``EXAMPLES`` generated cases (about 300 in all). The checks: no 5xx, only documented status
codes, documented content types and headers, bodies that match the documented schema.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .server_process import ServerProcess

EXAMPLES = 50
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("fuzz") / "data", max_upload_mb=2) as srv:
        yield srv
    assert not [line for line in srv.log_lines() if "Traceback" in line or '"level":"error"' in line]


def test_every_operation_conforms(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures: list[str] = []
    cases = 0
    for found in schema.get_all_operations():
        operation = found.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def run(case):
            nonlocal cases
            cases += 1
            try:
                case.call_and_validate(base_url=server.url, checks=CHECKS)
            except Exception as exc:  # noqa: BLE001 - collected and reported together below
                failures.append(f"{case.operation.label}: {str(exc)[:400]}")

        run()
    assert failures == [], "\n".join(sorted(set(failures))[:20])
    assert cases >= 280

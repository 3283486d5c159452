"""The PostgreSQL guard of tests/databases.py: a session with the variable set that ran no PostgreSQL test fails."""

from __future__ import annotations

import pytest

INNER_TEST = """
def test_uses_a_database(database_url):
    assert database_url
"""


def test_guard_fails_a_session_whose_postgres_half_did_not_run(pytester: pytest.Pytester, monkeypatch):
    pytester.makepyfile(test_inner=INNER_TEST)
    monkeypatch.setenv("DHR_TEST_POSTGRES_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    result = pytester.runpytest_inprocess("-p", "tests.databases", "-k", "sqlite")
    result.assert_outcomes(passed=1, deselected=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*DHR_TEST_POSTGRES_URL is set but no test ran on PostgreSQL (1 database tests*"])


def test_guard_is_quiet_without_the_variable(pytester: pytest.Pytester, monkeypatch):
    pytester.makepyfile(test_inner=INNER_TEST)
    monkeypatch.delenv("DHR_TEST_POSTGRES_URL", raising=False)
    result = pytester.runpytest_inprocess("-p", "tests.databases")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.OK

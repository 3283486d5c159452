"""Replica-safe shared state: the read-through cache with a version check, and two stores as two replicas."""

from __future__ import annotations

import time

import pytest

from service.storage import InspectionStore, ProductProfile
from service.storage.shared import ReadThroughCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_copy_is_used_until_max_age_then_version_checked():
    clock, db = FakeClock(), {"version": 1, "value": "a"}
    cache = ReadThroughCache(5.0, clock=clock)

    def read():
        return cache.get("k", lambda: db["version"], lambda: (db["version"], db["value"]))

    assert read() == "a" and (cache.loads, cache.checks) == (1, 0)
    db.update(version=2, value="b")  # changed elsewhere
    clock.now += 4.999
    assert read() == "a" and (cache.loads, cache.checks) == (1, 0)  # within the bound: the copy
    clock.now += 0.001
    assert read() == "b" and (cache.loads, cache.checks) == (2, 1)  # bound reached: version differs -> reload
    clock.now += 5.0
    assert read() == "b" and (cache.loads, cache.checks) == (2, 2)  # same version: no reload
    clock.now += 1.0
    assert read() == "b" and (cache.loads, cache.checks) == (2, 2)  # checked 1 s ago: the copy
    db.update(version=3, value="c")
    cache.invalidate("k")  # the change was made through this replica
    assert read() == "c" and cache.loads == 3


def test_zero_max_age_checks_every_read_and_negative_is_refused():
    db = {"version": 1}
    cache = ReadThroughCache(0.0)
    for _ in range(3):
        assert cache.get("k", lambda: db["version"], lambda: (db["version"], "v")) == "v"
    assert (cache.loads, cache.checks) == (1, 2)
    with pytest.raises(ValueError, match="max_age_s"):
        ReadThroughCache(-1)


def test_a_profile_changed_through_one_replica_is_used_by_the_other_within_the_bound(database_url, tmp_path):
    bound = 0.5
    a = InspectionStore(database_url, tmp_path / "art", refresh_s=bound)
    b = InspectionStore(database_url, tmp_path / "art", refresh_s=bound)
    a.put_product(ProductProfile(name="cap", image_threshold=0.6, pixel_threshold=0.4, image_score="reference"))
    assert b.current_product("cap").image_threshold == 0.6
    assert b.current_product("none") is None

    changed_at = time.monotonic()
    a.put_product(ProductProfile(name="cap", image_threshold=0.2, pixel_threshold=0.4, image_score="reference"))
    assert a.current_product("cap").image_threshold == 0.2  # the writing replica: at once
    seen = []
    while (t := b.current_product("cap").image_threshold) != 0.2:
        seen.append(t)
        assert time.monotonic() - changed_at < bound + 0.25, "the other replica kept the old profile too long"
        time.sleep(0.02)
    assert set(seen) <= {0.6}
    a.close()
    b.close()

"""Three-zone verdicts at the zone boundaries: ok < review <= review < reject <= defect."""

from __future__ import annotations

import math

import pytest

from service.inspection import VERDICTS, Thresholds, verdict


def test_zone_boundaries():
    th = Thresholds(image=0.6, review=0.4)
    below = math.nextafter(0.4, 0.0)
    assert [verdict(s, th) for s in (0.0, below, 0.4, 0.5, math.nextafter(0.6, 0.0), 0.6, 1.0)] == [
        "ok",
        "ok",
        "review",
        "review",
        "review",
        "defect",
        "defect",
    ]


def test_equal_thresholds_give_the_two_verdicts_of_before():
    for th in (Thresholds(image=0.5), Thresholds(image=0.5, review=0.5)):
        assert [verdict(s, th) for s in (math.nextafter(0.5, 0.0), 0.5, 0.9)] == ["ok", "defect", "defect"]
    assert VERDICTS == ("ok", "review", "defect")


def test_thresholds_out_of_order_are_refused():
    with pytest.raises(ValueError, match="review threshold 0.7 must not exceed the reject threshold 0.6"):
        Thresholds(image=0.6, review=0.7)

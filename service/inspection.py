"""What one inspection decides and produces, named once for every layer: verdicts, thresholds, artefact kinds.

No dependencies: the engine, storage, API, CLI and evaluation import these names; ``Literal`` types, OpenAPI enums,
argparse choices and database checks derive from the tuples below.

Decision rule for an image score ``s`` (of the chosen variant, see ``service.model.IMAGE_SCORES``)::

    verdict = "defect"  if s >= thresholds.image         (the reject threshold)
              "review"  if thresholds.review <= s < thresholds.image
              "ok"      otherwise

written as zones (:meth:`Thresholds.zones`): the verdict is the last zone whose lower bound ``s`` reaches, "ok"
below every bound. ``review`` defaults to ``image`` (an empty review zone: the two verdicts ok / defect); a
calibrated product sets it lower so that parts near the decision go to a person.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

VERDICTS = ("ok", "review", "defect")  # in order of increasing score
Verdict = Literal[VERDICTS]
ARTEFACT_KINDS = ("overlay", "heatmap", "mask")  # the PNGs of an inspection (rendered from what is stored)
ArtefactKind = Literal[ARTEFACT_KINDS]
# What each PNG kind is rendered from (stored kinds): the float16 map, and for the overlay the original too.
RENDERED_FROM = {"overlay": ("map", "original"), "heatmap": ("map",), "mask": ("map",)}


def viewable_kinds(stored: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The PNG kinds an inspection can show: those stored as PNGs (first layout, or the overlay kept when
    originals are not) and those renderable from its stored kinds (:data:`RENDERED_FROM`)."""
    return tuple(k for k in ARTEFACT_KINDS if k in stored or set(RENDERED_FROM[k]) <= set(stored))


REJECTED = VERDICTS[1:]  # every verdict but "ok": the part is taken off the line
# A person's review of an inspection: confirm_defect / false_reject judge a rejected part, escape is an ok part that
# later proved defective. Decision -> the verdicts it applies to.
DECISION_VERDICTS = {"confirm_defect": REJECTED, "false_reject": REJECTED, "escape": VERDICTS[:1]}
REVIEW_DECISIONS = tuple(DECISION_VERDICTS)
ReviewDecision = Literal[REVIEW_DECISIONS]


@dataclass(frozen=True)
class Thresholds:
    """How one image is judged: ``image`` (reject) and ``review`` on the image score, ``pixel`` on the map (mask).

    ``review`` None means equal to ``image``. Raises ValueError when ``review > image`` (thresholds out of order).
    """

    image: float = 0.5
    pixel: float = 0.5
    review: float | None = None

    def __post_init__(self):
        if self.review is not None and not self.review <= self.image:
            raise ValueError(f"review threshold {self.review} must not exceed the reject threshold {self.image}")

    @property
    def review_bound(self) -> float:
        """Lower bound of the review zone (``image`` when no review zone is set)."""
        return self.image if self.review is None else self.review

    def zones(self) -> tuple[tuple[float, Verdict], ...]:
        """``(lower bound, verdict)`` of every zone above "ok", by increasing bound."""
        return ((self.review_bound, "review"), (self.image, "defect"))


def verdict(score: float, thresholds: Thresholds) -> Verdict:
    """The verdict of ``score``: the last zone of ``thresholds.zones()`` whose bound it reaches, else "ok"."""
    result: Verdict = VERDICTS[0]
    for bound, name in thresholds.zones():
        if score >= bound:
            result = name
    return result

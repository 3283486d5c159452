"""Shared fixtures: the reference-parity golden data and the tiny random CLIP it was made with."""

from __future__ import annotations

import numpy as np
import pytest

from .paths import FIXTURES, REF_PROMPTS, TINY_CLIP

pytest_plugins = ["tests.databases", "tests.s3_server", "pytester"]


@pytest.fixture(scope="session")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "expected.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def tiny_clip():
    from service.model import load_backbone

    return load_backbone(TINY_CLIP)


@pytest.fixture(scope="session")
def ref_checkpoint():
    from service.model import load_checkpoint

    return load_checkpoint(REF_PROMPTS)

"""Prediction of a float16 map in [0, 1] coarse to fine, exact on every machine (version 3 of the stored map).

Every float16 in [0, 1] is k * 2^-24 for an integer k, so ``x = map * 2^24`` holds integers, exactly, in float64.
Pixels are coded in this order::

    grid      rows and columns 0, S, 2S, ... (S = GRID = 32)
    levels    for s = S, S/2, ..., 2 (h = s/2), three passes fill the pixels whose (row, col) mod s is
              A (0, h), then B (h, 0), then C (h, h), from those already known ((0, 0) mod s, then A, then B)

A pass predicts each of its pixels from the known pixels within +-REACH * h (its taps, grouped by their class:
row and column mod s; a tap beyond the edge reads the nearest pixel of its class)::

    P = sum_k w_k x[row + di_k, col + dj_k]              w_k integers, FRACTION fraction bits
    pred = float16(clip(P * 2^-(24 + FRACTION), 0, 1))   IEEE round to nearest even
    r = bits(map) - bits(pred)  (mod 2^16)               mostly 0: pred is the right float16

Every product and partial sum is an integer below 2^50, so P is exact in float64 in any order of summation (one
``cv2.filter2D`` per class) and the decoder forms the same prediction on any machine. The weights are fitted per
map and pass (least squares on a subsample of the pass, with sum w = 1) and stored with the map. The map is smooth,
so it is interpolated in value, not in float16 bit patterns (whose slope halves at every power of two).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

GRID = 16  # stride of the coarsest grid
REACH = 3  # taps lie within +-REACH * h of the pixel predicted
FRACTION = 16  # fraction bits of the weights
MAX_WEIGHT = 1 << 20  # |w| bound: 40 taps * 2^20 * 2^24 < 2^50, exact in float64
FIT_SAMPLES = 2048  # about this many pixels of a pass fit its weights
BLAS_ROWS = 128  # 41 x 41 x 128 multiply-adds: one thread in OpenBLAS (threshold 4 x 65536)
PAD = 3  # class arrays are padded by their edge values: shifts reach 2 classes, plus 1 for a longer target
_SCALE = float(1 << 24)  # float16 in [0, 1] -> integer
_UNSCALE = 2.0 ** -(24 + FRACTION)

Group = tuple[tuple[int, int], list[tuple[int, int]]]  # class (a, c) mod s, shifts (qi, qj) in class pixels


@dataclass(frozen=True)
class Pass:
    """One pass: pixels (r0 + i s, c0 + j s), i, j < shape, of a map, predicted from groups of taps."""

    s: int
    r0: int
    c0: int
    groups: list[Group]
    shape: tuple[int, int]

    @property
    def n_taps(self) -> int:
        return sum(len(shifts) for _, shifts in self.groups)

    def target(self, a: np.ndarray) -> np.ndarray:
        return a[self.r0 :: self.s, self.c0 :: self.s]


def _groups(s: int, r0: int, c0: int, known: list[tuple[int, int]]) -> list[Group]:
    """The taps of a pass by class: (di, dj) within +-REACH h (h = s/2) whose pixel (r0 + di, c0 + dj) is of a
    known class (a, c) lies (qi, qj) = ((r0 + di - a) / s, (c0 + dj - c) / s) pixels of that class away."""
    h = s // 2
    reach = range(-REACH * h, REACH * h + 1, h)
    offsets = [(di, dj) for di in reach for dj in reach]
    return [
        (
            (a, c),
            [
                ((r0 + di - a) // s, (c0 + dj - c) // s)
                for di, dj in offsets
                if ((r0 + di) % s, (c0 + dj) % s) == (a, c)
            ],
        )
        for a, c in known
    ]


@lru_cache(maxsize=16)
def passes(height: int, width: int) -> tuple[Pass, ...]:
    """The passes after the grid, in coding order; passes and tap classes with no pixel are left out (computed once
    per map shape: every map of a preset has the same)."""
    out = []
    s = GRID
    while s > 1:
        h = s // 2
        known = [(0, 0)]
        for r0, c0 in ((0, h), (h, 0), (h, h)):
            if r0 < height and c0 < width:
                shape = (len(range(r0, height, s)), len(range(c0, width, s)))
                out.append(Pass(s, r0, c0, _groups(s, r0, c0, known), shape))
                known.append((r0, c0))
        s = h
    return tuple(out)


def _scaled(f16: np.ndarray) -> np.ndarray:
    """float16 values in [0, 1] -> the integers x = value * 2^24, exact in float64."""
    return f16.astype(np.float64) * _SCALE


def _padded(x: np.ndarray, s: int, a: int, c: int, cache: dict) -> np.ndarray:
    """x[a::s, c::s] padded by PAD edge values on every side (cached: a class is complete once a tap reads it)."""
    if (s, a, c) not in cache:
        cache[s, a, c] = np.pad(x[a::s, c::s], PAD, mode="edge")
    return cache[s, a, c]


def fit(x: np.ndarray, p: Pass, cache: dict) -> np.ndarray:
    """Integer weights (w * 2^FRACTION, in tap order) of the least-squares fit of the pass's pixels of x.

    On a subsample, with m the mean of the taps at each pixel, D_k = tap_k - m and y = x - m: minimise
    |y - D v|^2 + lam |v|^2 (normal equations; lam a 1e-9 share of the trace keeps a flat map solvable), then
    w_k = v_k + (1 - sum v) / K, so that sum w = 1 and a constant map is predicted exactly.
    """
    step = max(1, int(np.ceil((p.shape[0] * p.shape[1] / FIT_SAMPLES) ** 0.5)))
    rows, cols = np.arange(0, p.shape[0], step) + PAD, np.arange(0, p.shape[1], step) + PAD
    columns = []
    for (a, c), shifts in p.groups:
        padded = _padded(x, p.s, a, c, cache)
        at = (rows[:, None] * padded.shape[1] + cols[None, :]).reshape(-1, 1)
        columns.append(padded.ravel()[at + np.array([qi * padded.shape[1] + qj for qi, qj in shifts])])
    design = np.concatenate(columns, axis=1)  # (n, K)
    mean = design.mean(axis=1, keepdims=True)
    aug = np.concatenate([design - mean, p.target(x)[::step, ::step].reshape(-1, 1) - mean], axis=1)  # [D | y]
    # [D | y]^T [D | y] in blocks of BLAS_ROWS rows: each product stays under OpenBLAS's threading threshold (its
    # idle threads would otherwise spin for a while after every call, a core's worth at a service's rate)
    normal = sum(aug[i : i + BLAS_ROWS].T @ aug[i : i + BLAS_ROWS] for i in range(0, aug.shape[0], BLAS_ROWS))
    gram, rhs = normal[:-1, :-1], normal[:-1, -1]
    gram[np.diag_indices_from(gram)] += 1e-9 * np.trace(gram) / p.n_taps + 1e-12
    v = np.linalg.solve(gram, rhs)
    w = v + (1.0 - v.sum()) / p.n_taps
    return np.clip(np.rint(w * (1 << FRACTION)), -MAX_WEIGHT, MAX_WEIGHT).astype(np.int64)


def predict(x: np.ndarray, p: Pass, weights: np.ndarray, cache: dict) -> np.ndarray:
    """uint16 bit patterns of the pass's predictions (module docstring), shape ``p.shape``."""
    total = np.zeros(p.shape, np.float64)
    at = 0
    for (a, c), shifts in p.groups:
        q = np.array(shifts)  # (k, 2): (qi, qj) of each tap of the class
        lo = q.min(axis=0)
        kernel = np.zeros(tuple(q.max(axis=0) - lo + 1), np.float64)
        kernel[q[:, 0] - lo[0], q[:, 1] - lo[1]] = weights[at : at + len(q)]
        at += len(q)
        out = cv2.filter2D(_padded(x, p.s, a, c, cache), cv2.CV_64F, kernel, anchor=(-int(lo[1]), -int(lo[0])))
        total += out[PAD : PAD + p.shape[0], PAD : PAD + p.shape[1]]
    return np.clip(total * _UNSCALE, 0.0, 1.0).astype(np.float16).view(np.uint16)


def residuals(score_map: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(H, W) float16 in [0, 1] -> int16 residuals of each pass (raveled) and its weights, in coding order; the
    grid is not included (it is coded apart)."""
    bits = score_map.view(np.uint16)
    x = _scaled(score_map)
    streams, weights, cache = [], [], {}
    for p in passes(*score_map.shape):
        w = fit(x, p, cache)
        streams.append((p.target(bits).astype(np.int32) - predict(x, p, w, cache)).astype(np.int16).ravel())
        weights.append(w)
    return streams, weights


def reconstruct(grid_bits: np.ndarray, height: int, width: int, r: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Inverse of :func:`residuals`: the grid's uint16 bits, the residuals of the passes in order (int32) and all
    weights -> (H, W) float16."""
    bits = np.zeros((height, width), np.uint16)
    bits[::GRID, ::GRID] = grid_bits
    x = np.zeros((height, width), np.float64)
    x[::GRID, ::GRID] = _scaled(grid_bits.view(np.float16))
    at, cache = 0, {}
    for p in passes(height, width):
        w, weights = weights[: p.n_taps], weights[p.n_taps :]
        pred = predict(x, p, w, cache)
        b = ((pred + r[at : at + pred.size].reshape(p.shape)) & 0xFFFF).astype(np.uint16)
        bits[p.r0 :: p.s, p.c0 :: p.s] = b
        x[p.r0 :: p.s, p.c0 :: p.s] = _scaled(b.view(np.float16))
        at += pred.size
    return bits.view(np.float16)


def n_weights(height: int, width: int) -> int:
    return sum(p.n_taps for p in passes(height, width))

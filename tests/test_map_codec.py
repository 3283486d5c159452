"""The stored map codec (``service.engine.map_codec``): exact float16 bits back for every kind of map, the forms of
records already written (versions 1 and 2) still decode, every form is pinned byte for byte, the prediction of
version 3 is exact integer arithmetic, real maps fit the disk budget, damage is a ValueError."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from service.engine import map_pyramid
from service.engine.decode import decode_image, views_for
from service.engine.map_codec import decode_map, encode_map, encode_map_v1, encode_map_v2
from service.model import build_model, load_backbone, load_checkpoint, stack_views

from .paths import REAL_DEFECTS, REF_PROMPTS, TINY_CLIP

# a 3 x 4 map (0, 1, 0.5, the smallest subnormal, ...) as main's encoder wrote it before version 2 (commit 71af160)
SMALL = np.array([[0, 1, 0.5, 2**-24], [0.3, 0.7, 1e-5, 0.25], [0.125, 0.999, 0.001, 0.0]], np.float16)
SMALL_V1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000004000000060800000000c15260a9000000274944415478016360a860cf67c8cccbbc"
    "c6c0c9a7d4c7c0c0f0ff2fc3acd4c7eb186626493d040082a50a4ecd86b4cd0000000049454e44ae426082"
)
SMALL_V2 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000004000000010800000000dc57501100000024646845730200000003789c2b67cfcfcc"
    "cbbcc6c9a7d4f7fbd78fa909f7564e8915bd030072970b1658d945990000000d49444154785e6350be7efd3a00059b02a9c5f827e2"
    "0000000049454e44ae426082"
)
SMALL_V3 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000004000000010800000000dc575011000000b864684573030000000300000004789c"
    "6360100d6520090b3090865928c4dcb994e0ffffffb191821918388449c1ffffff7df1ff9f560d03c3dd540836def8ffffff990c"
    "0c6c6b21d8f43803c3ca4d40b3a340988181af07e82f6ea05c162a9ba79981815f0e28d68ecc06eaf104610606612f907a2c7c5f"
    "1006f23db1f11918182ffeffffdb8781815d1882d1f9cc8a4037ec078a5f8660743e0f30ce25e340fad0d841407604269be50730"
    "5c1e41d884f9f90c8c7fe57d01e33d8e691621865d0000000d494441547801633056306000000191008439eb0a82000000004945"
    "4e44ae426082"
)
# the real photos whose maps (tiny CLIP, preset mvtec) version 2 stored largest: 118 KB, 115 KB and 114 KB
LARGEST_V2 = (
    "magnetic_tile/train/good/exp2_num_187533.jpg",
    "magnetic_tile/test/good/exp6_num_1012.jpg",
    "magnetic_tile/test/good/exp5_num_241403.jpg",
)


def _version(blob: bytes) -> int:
    return blob[blob.index(b"dhEs") + 4]


def _maps() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    every = np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16)  # every float16 in [0, 1]
    y, x = np.mgrid[0:448, 0:448] / 448.0
    return {
        "zeros": np.zeros((672, 672), np.float16),
        "ones": np.ones((448, 448), np.float16),
        "constant": np.full((5, 7), 0.37, np.float16),
        "one pixel": np.array([[2**-24]], np.float16),
        "subnormals": np.arange(1, 0x400, dtype=np.uint16)[: 31 * 33].reshape(31, 33).view(np.float16),
        "every float16 in [0, 1]": every[: 117 * 131].reshape(117, 131),
        "same, shuffled": rng.permutation(every)[:4096].reshape(64, 64),
        "noise, all 2^16 patterns": rng.integers(0, 1 << 16, (100, 98), dtype=np.uint16).view(np.float16),
        "alternating 0 / 1": (np.indices((50, 50)).sum(0) % 2).astype(np.float16),
        "smooth 448": (0.3 + 0.2 * np.sin(6 * x) * np.cos(4 * y)).astype(np.float16),
        "smooth, odd sizes": (0.5 + 0.4 * np.sin(9 * x[:333, :61]) * y[:333, :61]).astype(np.float16),
        "smooth with a step": (0.2 + 0.5 * (x > 0.5) + 0.1 * y).astype(np.float16),
        "a row": np.linspace(0, 1, 97, dtype=np.float16)[None, :],
        "a column": np.linspace(1, 0, 70, dtype=np.float16)[:, None],
        "-0.0 and 1.0": np.array([[-0.0, 1.0], [1.0, -0.0]], np.float16),
    }


@pytest.mark.parametrize("name", list(_maps()))
def test_every_map_comes_back_bit_for_bit(name):
    m = _maps()[name]
    for encode in (encode_map, encode_map_v2, encode_map_v1):
        back = decode_map(encode(m))
        assert back.dtype == np.float16 and back.shape == m.shape
        assert np.array_equal(back.view(np.uint16), m.view(np.uint16)), (name, encode.__name__)


def test_maps_in_0_1_are_written_in_version_3_others_in_version_2():
    versions = {name: _version(encode_map(m)) for name, m in _maps().items()}
    assert {name for name, v in versions.items() if v == 2} == {"noise, all 2^16 patterns", "-0.0 and 1.0"}
    assert set(versions.values()) == {2, 3}


def test_records_of_every_form_still_decode_and_every_form_is_pinned():
    # a change of these bytes needs a new version, not an edit of these lines
    assert (encode_map_v1(SMALL), encode_map_v2(SMALL), encode_map(SMALL)) == (SMALL_V1, SMALL_V2, SMALL_V3)
    for blob in (SMALL_V1, SMALL_V2, SMALL_V3):
        assert np.array_equal(decode_map(blob).view(np.uint16), SMALL.view(np.uint16))


def test_each_form_is_smaller_than_the_one_before_on_a_smooth_map():
    y, x = np.mgrid[0:672, 0:672] / 672.0
    smooth = (0.3 + 0.2 * np.sin(6 * x) * np.cos(4 * y)).astype(np.float32)
    assert (len(encode_map(smooth)), len(encode_map_v2(smooth)), len(encode_map_v1(smooth))) == (41786, 53646, 86295)


def test_flat_areas_cost_next_to_nothing():
    """A flat map's digits are all zero: deflated as runs, not with Huffman codes only (at least a bit per byte)."""
    y, x = np.mgrid[0:672, 0:672] / 672.0
    blob = (0.08 + 0.82 * np.exp(-((x - 0.62) ** 2 + (y - 0.4) ** 2) / (2 * 0.05**2))).astype(np.float16)
    flat = np.full((672, 672), 0.2, np.float16)
    sizes = [len(encode_map(flat)), len(encode_map_v2(flat)), len(encode_map(blob)), len(encode_map_v2(blob))]
    assert sizes == [248, 767, 11509, 15653]  # the blob: the stand-in model's map of bench/harness.py


def test_the_prediction_is_exact_integer_arithmetic_at_the_largest_weights_and_values():
    """filter2D over a class equals the int64 sum of w_k * x[clamped tap] (exact: every term is below 2^44)."""
    rng = np.random.default_rng(3)
    height, width = 37, 29
    x = rng.integers(0, 1 << 24, (height, width)).astype(np.float64)  # every value at most 2^24: float16 in [0, 1]
    for p in map_pyramid.passes(height, width):
        weights = rng.choice([-map_pyramid.MAX_WEIGHT, map_pyramid.MAX_WEIGHT - 1, 7, 0], p.n_taps)
        reference = np.zeros(p.shape, np.int64)
        rows, cols = np.arange(p.shape[0]), np.arange(p.shape[1])  # pixel (r0 + i s, c0 + j s) of the pass
        k = 0
        for (a, c), shifts in p.groups:
            n_rows, n_cols = len(range(a, height, p.s)), len(range(c, width, p.s))
            for qi, qj in shifts:  # the tap: pixel (a + (i + qi) s, c + (j + qj) s), clamped to its class
                i = np.clip(rows + qi, 0, n_rows - 1) * p.s + a
                j = np.clip(cols + qj, 0, n_cols - 1) * p.s + c
                reference += int(weights[k]) * x[np.ix_(i, j)].astype(np.int64)
                k += 1
        want = np.clip(reference * 2.0 ** -(24 + map_pyramid.FRACTION), 0, 1).astype(np.float16).view(np.uint16)
        assert np.array_equal(map_pyramid.predict(x, p, weights, {}), want), (p.s, p.r0, p.c0)


def test_real_maps_of_the_largest_kind_stay_well_inside_the_disk_budget():
    """At preset mvtec (672 x 672) version 2 needed 114-118 KB for these maps, over the 100 KB an inspection may
    add to its original; version 3 brings them back exactly in under 60 KB."""
    clip, info = load_backbone(TINY_CLIP)
    model, _ = build_model(clip, load_checkpoint(REF_PROMPTS), preset="mvtec", backbone_info=info)
    views = [views_for(decode_image((REAL_DEFECTS / name).read_bytes(), name), model.cfg.preset) for name in LARGEST_V2]
    maps = model(*stack_views(views)).anomaly_map.clamp(0, 1).numpy().astype(np.float16)
    for name, m in zip(LARGEST_V2, maps, strict=True):
        blob = encode_map(m)
        assert np.array_equal(decode_map(blob).view(np.uint16), m.view(np.uint16)), name
        assert _version(blob) == 3 and len(blob) < 60 * 1024 < 0.55 * len(encode_map_v2(m)), (name, len(blob))


def _with_chunk(data: bytes, kind: bytes, payload: bytes) -> bytes:
    """``data`` with the payload of its ``kind`` chunk replaced (CRC recomputed)."""
    at = data.index(kind) - 4
    size = int.from_bytes(data[at : at + 4], "big")
    framed = len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")
    return data[:at] + framed + data[at + 12 + size :]


def test_damaged_maps_are_a_value_error():
    escapes = SMALL_V2[SMALL_V2.index(b"dhEs") + 4 : SMALL_V2.index(b"IDAT") - 8]
    v3 = SMALL_V3[SMALL_V3.index(b"dhEs") + 4 : SMALL_V3.index(b"IDAT") - 8]
    side = zlib.decompress(v3[9:])
    bad = {
        "not an 8-bit grey PNG": [b"", b"GIF89a", SMALL_V2[:-5], SMALL_V3[:-5]],
        "deflate": [_with_chunk(SMALL_V2, b"IDAT", b"\x78\x9c\x00"), _with_chunk(SMALL_V3, b"dhEs", v3[:9] + b"\x78")],
        "does not hold": [
            _with_chunk(SMALL_V2, b"dhEs", b"\x02\x00\x00\x00\x07" + escapes[5:]),
            _with_chunk(SMALL_V3, b"dhEs", b"\x03\x00\x00\x00\x09\x00\x00\x00\x04" + v3[9:]),
        ],
        "escapes but": [
            _with_chunk(SMALL_V2, b"dhEs", escapes[:5] + zlib.compress(b"\x00\x01")),
            _with_chunk(SMALL_V3, b"dhEs", v3[:9] + zlib.compress(side + b"\x00\x01")),
        ],
        "hold no": [_with_chunk(SMALL_V3, b"dhEs", v3[:9] + zlib.compress(side[:100]))],
        "pixels": [_with_chunk(SMALL_V3, b"dhEs", b"\x03\x00\x00\x00\x00\x00\x00\x00\x04" + v3[9:])],
        "unknown version": [_with_chunk(SMALL_V3, b"dhEs", b"\x07" + v3[1:])],
    }
    for message, blobs in bad.items():
        for blob in blobs:
            with pytest.raises(ValueError, match=message):
                decode_map(blob)

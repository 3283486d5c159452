"""The stored map codec (``service.engine.stored``): exact float16 bits back for every kind of map, the first form
(version 1) of records already written still decodes, the current form is pinned byte for byte, damage is a
ValueError."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from service.engine.stored import decode_map, encode_map, encode_map_v1

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
    }


@pytest.mark.parametrize("name", list(_maps()))
def test_every_map_comes_back_bit_for_bit(name):
    m = _maps()[name]
    for encode in (encode_map, encode_map_v1):
        back = decode_map(encode(m))
        assert back.dtype == np.float16 and back.shape == m.shape
        assert np.array_equal(back.view(np.uint16), m.view(np.uint16)), (name, encode.__name__)


def test_records_of_the_first_form_still_decode_and_the_current_form_is_pinned():
    assert np.array_equal(decode_map(SMALL_V1).view(np.uint16), SMALL.view(np.uint16))
    assert encode_map_v1(SMALL) == SMALL_V1
    assert encode_map(SMALL) == SMALL_V2  # a change of these bytes needs a new version, not an edit of this line
    assert np.array_equal(decode_map(SMALL_V2).view(np.uint16), SMALL.view(np.uint16))


def test_the_current_form_is_smaller_than_the_first_on_a_smooth_map():
    y, x = np.mgrid[0:672, 0:672] / 672.0
    smooth = (0.3 + 0.2 * np.sin(6 * x) * np.cos(4 * y)).astype(np.float32)
    assert (len(encode_map(smooth)), len(encode_map_v1(smooth))) == (53646, 86295)


def _with_chunk(data: bytes, kind: bytes, payload: bytes) -> bytes:
    """``data`` with the payload of its ``kind`` chunk replaced (CRC recomputed)."""
    at = data.index(kind) - 4
    size = int.from_bytes(data[at : at + 4], "big")
    framed = len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")
    return data[:at] + framed + data[at + 12 + size :]


def test_damaged_maps_are_a_value_error():
    escapes = SMALL_V2[SMALL_V2.index(b"dhEs") + 4 : SMALL_V2.index(b"IDAT") - 8]
    bad = {
        "not an 8-bit grey PNG": [b"", b"GIF89a", SMALL_V2[:-5]],
        "deflate": [_with_chunk(SMALL_V2, b"IDAT", b"\x78\x9c\x00")],
        "does not hold": [_with_chunk(SMALL_V2, b"dhEs", b"\x02\x00\x00\x00\x07" + escapes[5:])],
        "escapes but": [_with_chunk(SMALL_V2, b"dhEs", escapes[:5] + zlib.compress(b"\x00\x01"))],
    }
    for message, blobs in bad.items():
        for blob in blobs:
            with pytest.raises(ValueError, match=message):
                decode_map(blob)

"""Disk per inspection: the stored forms of the T x T anomaly map, measured on the real photos.

For every ``--every``-th photo of ``../shared/data/real_defects`` the tiny fixture CLIP (reference prompts) makes the
service map at each ``--presets`` geometry; each candidate form of that map is encoded, decoded back and compared
with the float16 map bit for bit ("lossless" means every float16 value comes back)::

    npy f16         np.save of the float16 map                                   (T*T*2 + 128 bytes)
    png16 bits L1   16-bit grey PNG of the float16 bit patterns, OpenCV filters, zlib level 1
    png16 bits L9   the same at zlib level 9 (adaptive filters: the smallest plain PNG of the bits)
    png16 x65535    16-bit grey PNG of round(map * 65535), level 9 (not float16: small values collapse)
    coded v1        service.engine.map_codec.encode_map_v1 (the first stored form): second differences of the bits,
                    zigzag, high and low byte planes, deflate RLE
    coded v2        service.engine.map_codec.encode_map_v2 (the second): the same residuals as base-6 digits, three
                    vertically adjacent ones per byte, larger ones escaped to a side stream, deflate level 3
    coded v3        service.engine.map_codec.encode_map (stored now): predicted coarse to fine in value by
                    service.engine.map_pyramid (exact integer arithmetic, weights fitted per map), residuals as
                    base-3 digits, five per byte

It prints one Markdown table: median and largest bytes, median encode and decode ms, and the share of photos whose
inspection (original + map) stays within the original's size + 100 KB (the database row, about 1 KB, comes on top).

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python bench/map_storage.py --every 2
"""

from __future__ import annotations

import argparse
import io
import time

import cv2
import numpy as np
import torch

from service.engine.decode import decode_image, views_for
from service.engine.map_codec import decode_map, encode_map, encode_map_v1, encode_map_v2
from service.model import build_model, load_backbone, load_checkpoint, stack_views
from tests.paths import REAL_DEFECTS, REF_PROMPTS, TINY_CLIP

BUDGET = 100 * 1024  # bytes allowed on top of the original


def _png16(a: np.ndarray, level: int) -> bytes:
    return cv2.imencode(".png", a, [cv2.IMWRITE_PNG_COMPRESSION, level])[1].tobytes()


def _unpng16(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def _npy(m: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, m, allow_pickle=False)
    return buf.getvalue()


FORMS = {  # name -> (encode float16 map -> bytes, decode bytes -> float16 map)
    "npy f16": (_npy, lambda b: np.load(io.BytesIO(b))),
    "png16 bits L1": (lambda m: _png16(m.view(np.uint16), 1), lambda b: _unpng16(b).view(np.float16)),
    "png16 bits L9": (lambda m: _png16(m.view(np.uint16), 9), lambda b: _unpng16(b).view(np.float16)),
    "png16 x65535": (
        lambda m: _png16(np.rint(m.astype(np.float64) * 65535).astype(np.uint16), 9),
        lambda b: (_unpng16(b) / 65535.0).astype(np.float16),
    ),
    "coded v1": (encode_map_v1, decode_map),
    "coded v2": (encode_map_v2, decode_map),
    "coded v3 (stored)": (encode_map, decode_map),
}


def measure(preset: str, photos: list) -> list[str]:
    clip, info = load_backbone(TINY_CLIP)
    model, _ = build_model(clip, load_checkpoint(REF_PROMPTS), preset=preset, backbone_info=info)
    sizes = {name: [] for name in FORMS}
    ms = {name: [] for name in FORMS}
    decode_ms = {name: [] for name in FORMS}
    lossless = dict.fromkeys(FORMS, True)
    within = dict.fromkeys(FORMS, 0)
    for path in photos:
        data = path.read_bytes()
        views = views_for(decode_image(data, path.name), model.cfg.preset)
        with torch.inference_mode():
            m = model(*stack_views([views])).anomaly_map.clamp(0, 1).float().numpy()[0].astype(np.float16)
        for name, (enc, dec) in FORMS.items():
            t0 = time.perf_counter()
            blob = enc(m)
            ms[name].append(1000 * (time.perf_counter() - t0))
            sizes[name].append(len(blob))
            t0 = time.perf_counter()
            back = dec(blob)
            decode_ms[name].append(1000 * (time.perf_counter() - t0))
            lossless[name] &= bool(np.array_equal(back.view(np.uint16), m.view(np.uint16)))
            within[name] += len(blob) <= BUDGET
    t = model.cfg.preset.target_size
    return [
        f"| {preset} ({t}x{t}) | {name} | {'yes' if lossless[name] else 'no'} | {np.median(sizes[name]) / 1024:.1f} "
        f"| {max(sizes[name]) / 1024:.1f} | {np.median(ms[name]):.1f} | {np.median(decode_ms[name]):.1f} "
        f"| {within[name]}/{len(photos)} |"
        for name in FORMS
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=2, help="use every n-th photo")
    parser.add_argument("--presets", default="mvtec,fast")
    args = parser.parse_args()
    torch.set_num_threads(1)
    photos = sorted(p for p in REAL_DEFECTS.rglob("*.jpg") if "ground_truth" not in p.parts)[:: args.every]
    originals = [p.stat().st_size / 1024 for p in photos]
    print(f"{len(photos)} photos, JPEG originals median {np.median(originals):.1f} KB, largest {max(originals):.1f} KB")
    print("| preset | form | lossless f16 | median KB | max KB | encode ms | decode ms | <= original + 100 KB |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        print("\n".join(measure(preset, photos)))


if __name__ == "__main__":
    main()

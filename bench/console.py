"""Server-side render time of the console's pages on a database of 100,000 inspections (target: <= 200 ms each).

Fills a temporary SQLite database (the service's default store) with ``--rows`` inspections spread over the last
``--days`` days: 5 products, 3 lines, verdicts by ``--defect-share`` (the rest ok), 3 defect regions each, and one
review on every reject older than a day (so the review queue must skip the reviewed ones: its worst case). Rows are
bulk-inserted (one transaction per 10,000) rather than through ``InspectionStore.add``, which fsyncs per record. One
product (bottle) gets a profile, ``--references`` reference images and a calibration, so its product page draws the
calibration's histograms and the gallery (its first and last page; a reference thumbnail is timed on its first GET,
which renders and caches it, and cached); another (cable) has none, so its page reads the reviewed scores of its
newest 5,000 inspections instead. Then an app with no model (weights absent: the pages do not need one) answers,
in-process through Starlette's TestClient (routing, middleware, SQL, Jinja2), ``--repeat`` GETs of each page after one
warm-up, and the median / p95 / max wall time per page is printed with its ratio to the 200 ms target.

    nice -n 10 .venv/bin/python bench/console.py                 # 100,000 rows, 20 repeats per page
    .venv/bin/python bench/console.py --rows 10000 --repeat 5     # quick look
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from service.api import Settings, create_app  # noqa: E402
from service.api.console.views import GALLERY_PAGE  # noqa: E402
from service.engine.calibration import calibrate  # noqa: E402
from service.storage import InspectionStore, ProductProfile, new_inspection_id  # noqa: E402
from service.storage.models import CalibrationRecord, InspectionRow, ReferenceImage, utcnow  # noqa: E402
from service.storage.reviews import ReviewRow  # noqa: E402

TARGET_MS = 200.0
PRODUCTS = ("bottle", "cable", "capsule", "hazelnut", "screw")
LINES = ("L1", "L2", "L3")
CHUNK = 10_000


def fill(store: InspectionStore, rows: int, days: float, defect_share: float, seed: int = 0) -> dict:
    """Insert ``rows`` inspections (and reviews of old rejects); returns counts for the report."""
    rng = random.Random(seed)
    now = utcnow()
    span_s = days * 86400.0
    stamps = sorted(now - timedelta(seconds=rng.random() * span_s) for _ in range(rows))
    day_ago = now - timedelta(days=1)
    model = {"backbone": "ViT-L-14-336px.pt", "prompts": "bench", "preset": "mvtec", "precision": "fp32"}
    region = {"bbox": [40, 52, 31, 18], "area": 430, "area_ratio": 0.0017, "max_score": 0.91, "mean_score": 0.74}
    n_reviews = n_defect = 0
    for start in range(0, rows, CHUNK):
        batch, reviews = [], []
        for at in stamps[start : start + CHUNK]:
            defect = rng.random() < defect_share
            rid = new_inspection_id(at)
            batch.append(
                {
                    "id": rid,
                    "created_at": at,
                    "product": rng.choice(PRODUCTS),
                    "line": rng.choice(LINES),
                    "part_id": f"P-{rng.randrange(10**8):08d}",
                    "filename": "part.jpg",
                    "width": 700,
                    "height": 700,
                    "score": rng.uniform(0.5, 1.0) if defect else rng.uniform(0.0, 0.5),
                    "threshold": 0.5,
                    "verdict": "defect" if defect else "ok",
                    "image_score": "reference",
                    "pixel_threshold": 0.5,
                    "defect_area_ratio": 0.005 if defect else 0.0,
                    "regions": [{**region, "polygon": [[40, 52], [71, 52], [71, 70]]}] * 3 if defect else [],
                    "model": model,
                    "timing_ms": {"decode": 12.0, "inference": 80.0, "postprocess": 20.0},
                    "artefacts": ["heatmap", "mask", "overlay"],
                }
            )
            n_defect += defect
            if defect and at < day_ago:
                reviews.append(
                    {
                        "inspection_id": rid,
                        "created_at": at + timedelta(minutes=5),
                        "decision": rng.choice(("confirm_defect", "false_reject")),
                        "note": "",
                        "reviewer": "bench",
                        "role": "open",
                    }
                )
        with store._sessions() as session, session.begin():
            session.execute(insert(InspectionRow), batch)
            if reviews:
                session.execute(insert(ReviewRow), reviews)
        n_reviews += len(reviews)
    return {"rows": rows, "defects": n_defect, "reviews": n_reviews, "newest": batch[-1]["id"]}


def add_knowledge(store: InspectionStore, product: str, references: int, seed: int = 0) -> list[str]:
    """Give ``product`` a profile, ``references`` reference images (700x700 JPEGs; placeholder features: the pages
    never read them) and a calibration of 1,000 good and 100 defect scores; returns the references' ids."""
    rng = np.random.default_rng(seed)
    profile = store.put_product(
        ProductProfile(name=product, image_threshold=0.5, pixel_threshold=0.5, image_score="reference")
    )
    items = []
    for i in range(references):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        ref = ReferenceImage(
            product=product,
            filename=f"good-{i}.jpg",
            sha256=f"{i:064x}",
            width=700,
            height=700,
            nbytes=buf.tell(),
            model_key="bench",
        )
        items.append((ref, buf.getvalue(), b"features"))
    refs = store.add_references(items)
    maps = [rng.uniform(0.0, 0.4, (24, 24)) for _ in range(10)]
    cal = calibrate(rng.beta(2, 8, 1000), maps, "reference", defect_scores=rng.beta(8, 2, 100), review_frr=0.05)
    record = CalibrationRecord(version=cal.version, product=product, memory_version=None, content=cal.to_dict())
    store.put_calibration(record, replace(profile, image_threshold=cal.reject_threshold))
    return [r.id for r in refs]


def time_gets(client: TestClient, urls: list[str]) -> list[float]:
    """Wall time in ms of one GET of each URL (each must answer 200)."""
    out = []
    for url in urls:
        t0 = time.perf_counter()
        r = client.get(url)
        out.append((time.perf_counter() - t0) * 1000.0)
        assert r.status_code == 200, (url, r.status_code, r.text[:300])
    return out


def time_get(client: TestClient, url: str, repeat: int) -> list[float]:
    time_gets(client, [url])  # warm-up (template compile, SQLite page cache, a thumbnail's rendering)
    return time_gets(client, [url] * repeat)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--defect-share", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--references", type=int, default=130, help="reference images of the calibrated product")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dhr-console-bench-") as tmp:
        data = Path(tmp) / "data"
        t0 = time.perf_counter()
        with InspectionStore(f"sqlite:///{data / 'inspections.db'}", data) as store:
            facts = fill(store, args.rows, args.days, args.defect_share)
            refs = add_knowledge(store, "bottle", args.references)
        print(
            f"filled {facts['rows']} inspections ({facts['defects']} defects, {facts['reviews']} reviewed) "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        settings = Settings(_env_file=None, data_dir=data, backbone=str(Path(tmp) / "absent.pt"), warmup=False)
        pages = {
            "line view": "/ui",
            "line view, product+line filter": "/ui?product=screw&line=L2",
            "live fragment (polled)": "/ui/live",
            "review queue": "/ui/queue",
            "inspection page": f"/ui/inspections/{facts['newest']}",
            f"product page (calibrated, {args.references} refs)": "/ui/products/bottle",
            "product page, last gallery page": f"/ui/products/bottle?page={-(-args.references // GALLERY_PAGE)}",
            "product page (reviewed scores)": "/ui/products/cable",
            "reference thumbnail (cached)": f"/ui/products/bottle/references/{refs[0]}.jpg",
        }
        first_gets = [f"/ui/products/bottle/references/{r}.jpg" for r in refs[1 : 1 + args.repeat]]
        with TestClient(create_app(settings)) as client:
            print(f"{'page':34s} {'median ms':>10s} {'p95 ms':>8s} {'max ms':>8s} {'median/target':>14s}")
            worst = 0.0
            timings = {name: time_get(client, url, args.repeat) for name, url in pages.items()}
            timings["reference thumbnail, first GET"] = time_gets(client, first_gets)  # renders 700 px, caches
            for name, ms in timings.items():
                ms = sorted(ms)
                median, p95 = statistics.median(ms), ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
                worst = max(worst, median)
                print(f"{name:34s} {median:10.1f} {p95:8.1f} {ms[-1]:8.1f} {median / TARGET_MS:14.2f}")
    print(f"worst median {worst:.1f} ms vs target {TARGET_MS:.0f} ms: {'OK' if worst <= TARGET_MS else 'OVER'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Server-side SVG for the console: score histograms with threshold lines (the product page's calibration plot).

One drawing, ``histogram_svg``, of binned counts over bin edges ``e_0 < ... < e_B``; each series is drawn as bars
scaled to its own largest bin, so a small defect sample stays visible next to many good parts. Two sources:

- ``stored_calibration_plot``: the histograms a product's calibration kept (``service.engine.calibration``). At
  the calibration's own reject threshold its measured rates are exact; at any other threshold ``t`` they are
  estimated from the bins, counts spread evenly in each bin:
  ``FRR(t) = sum_b good_b * clip((e_(b+1) - t) / (e_(b+1) - e_b), 0, 1) / sum_b good_b``, escape rate
  ``1 - `` the same sum over the defect bins.
- ``calibration_plot``: raw scores (the reviewed inspections), counted in ``bins`` equal bins over [0, 1] (a score
  of exactly 1 in the last one, others clipped into [0, 1]); ``FRR = #{good >= t} / #good``, escape rate
  ``#{defect < t} / #defect`` (None without scores).
"""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup, escape

SERIES_COLOURS = {"good": "#2e7d32", "defect": "#c62828", "unreviewed": "#9e9e9e"}
LINE_COLOUR = "#1565c0"


@dataclass(frozen=True)
class Plot:
    svg: Markup
    false_reject_rate: float | None
    escape_rate: float | None
    measured: bool = True  # False: rates estimated from histogram bins (the threshold moved since calibration)


def histogram(scores: list[float], bins: int) -> list[int]:
    """Counts of ``scores`` (clipped to [0, 1]) in ``bins`` equal bins over [0, 1]."""
    counts = [0] * bins
    for s in scores:
        counts[min(bins - 1, max(0, int(min(max(s, 0.0), 1.0) * bins)))] += 1
    return counts


def rate_at_or_above(scores: list[float], threshold: float) -> float | None:
    return sum(s >= threshold for s in scores) / len(scores) if scores else None


def binned_rate_at_or_above(edges: list[float], counts: list[int], threshold: float) -> float | None:
    """Share of the binned sample at or above ``threshold``, counts spread evenly in each bin (module doc)."""
    total = sum(counts)
    if not total:
        return None
    bins = zip(edges[:-1], edges[1:], counts, strict=True)
    above = sum(c * min(1.0, max(0.0, (hi - threshold) / (hi - lo))) for lo, hi, c in bins)
    return above / total


def histogram_svg(
    edges: list[float],
    series: dict[str, tuple[list[int], int]],
    thresholds: dict[str, float],
    width: int = 600,
    height: int = 220,
) -> Markup:
    """SVG of ``series`` (name -> (counts per bin of ``edges``, sample size)) with a dashed line per threshold."""
    pad_l, pad_r, pad_t, pad_b = 34, 10, 22, 28
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    lo, hi = edges[0], edges[-1]

    def x_of(v: float) -> float:
        return pad_l + plot_w * (min(max(v, lo), hi) - lo) / (hi - lo)

    names = [n for n, (counts, _) in series.items() if any(counts)]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}"'
        ' role="img" aria-label="score histograms with thresholds" class="chart">',
        f'<rect x="{pad_l}" y="{pad_t}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#bbb"/>',
    ]
    for k, name in enumerate(names):
        counts, n = series[name]
        top = max(counts)
        colour = SERIES_COLOURS.get(name, "#555")
        for b, c in enumerate(counts):
            if c:
                x0, x1 = x_of(edges[b]), x_of(edges[b + 1])
                w = (x1 - x0) / len(names)
                h = plot_h * c / top
                parts.append(
                    f'<rect x="{x0 + k * w:.1f}" y="{pad_t + plot_h - h:.1f}" width="{w:.1f}" height="{h:.1f}" '
                    f'fill="{colour}" fill-opacity="0.75"><title>{escape(name)}: {c}</title></rect>'
                )
        parts.append(
            f'<text x="{pad_l + 6 + 130 * k}" y="14" font-size="12" fill="{colour}">{escape(name)} (n={n})</text>'
        )
    for j, (label, t) in enumerate(thresholds.items()):
        x = x_of(t)
        parts.append(
            f'<line x1="{x:.1f}" y1="{pad_t}" x2="{x:.1f}" y2="{pad_t + plot_h}" stroke="{LINE_COLOUR}" '
            f'stroke-width="2" stroke-dasharray="{4 + 3 * j} 3"/>'
            f'<text x="{x + 3:.1f}" y="{pad_t + 12 + 12 * j}" font-size="11" fill="{LINE_COLOUR}">'
            f"{escape(label)} {t:.3f}</text>"
        )
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        v = lo + q * (hi - lo)
        parts.append(f'<text x="{x_of(v):.1f}" y="{height - 10}" font-size="11" text-anchor="middle">{v:.3g}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def calibration_plot(series: dict[str, list[float]], thresholds: dict[str, float], bins: int = 25) -> Plot:
    """Histograms of raw scores (name -> scores) over [0, 1]; rates at the first threshold."""
    edges = [i / bins for i in range(bins + 1)]
    svg = histogram_svg(edges, {n: (histogram(s, bins), len(s)) for n, s in series.items()}, thresholds)
    threshold = next(iter(thresholds.values()), None)
    frr = rate_at_or_above(series.get("good", []), threshold) if threshold is not None else None
    defects = series.get("defect", [])
    escape_rate = 1.0 - rate_at_or_above(defects, threshold) if defects and threshold is not None else None
    return Plot(svg, frr, escape_rate)


def stored_calibration_plot(content: dict, thresholds: dict[str, float]) -> Plot:
    """The calibration's histograms (``Calibration.to_dict()``); rates at the first threshold (module doc)."""
    edges, good, defect = content["histogram_edges"], content["good_histogram"], content["defect_histogram"]
    svg = histogram_svg(edges, {"good": (good, content["n_good"]), "defect": (defect, content["n_defect"])}, thresholds)
    threshold = next(iter(thresholds.values()))
    if threshold == content["reject_threshold"]:
        return Plot(svg, content["good_frr"], content["escape_rate"])
    above = binned_rate_at_or_above(edges, defect, threshold)
    return Plot(svg, binned_rate_at_or_above(edges, good, threshold), None if above is None else 1.0 - above, False)

"""Server-side SVG for the console: score histograms with threshold lines (the product page's calibration plot).

Histogram: scores in [0, 1] are counted in ``bins`` equal bins (a score of exactly 1 falls in the last one); each
series is drawn as bars scaled to its own largest bin, so a small defect sample stays visible next to many good
parts. Estimated false-reject rate at threshold t: ``FRR = #{good scores >= t} / #good`` (None without good
scores); escape rate likewise ``#{defect scores < t} / #defect``.
"""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup, escape

SERIES_COLOURS = {"good": "#2e7d32", "defect": "#c62828", "unreviewed": "#9e9e9e"}
LINE_COLOUR = "#1565c0"


def histogram(scores: list[float], bins: int) -> list[int]:
    """Counts of ``scores`` (clipped to [0, 1]) in ``bins`` equal bins over [0, 1]."""
    counts = [0] * bins
    for s in scores:
        counts[min(bins - 1, max(0, int(min(max(s, 0.0), 1.0) * bins)))] += 1
    return counts


def rate_at_or_above(scores: list[float], threshold: float) -> float | None:
    return sum(s >= threshold for s in scores) / len(scores) if scores else None


@dataclass(frozen=True)
class Plot:
    svg: Markup
    false_reject_rate: float | None
    escape_rate: float | None


def calibration_plot(
    series: dict[str, list[float]], thresholds: dict[str, float], bins: int = 25, width: int = 600, height: int = 220
) -> Plot:
    """Histogram SVG of each series in ``series`` (name -> scores) with a vertical line per threshold."""
    pad_l, pad_r, pad_t, pad_b = 34, 10, 22, 28
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    names = [n for n in series if series[n]]
    bar_w = plot_w / bins / max(1, len(names))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}"'
        ' role="img" aria-label="score histograms with thresholds" class="chart">',
        f'<rect x="{pad_l}" y="{pad_t}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#bbb"/>',
    ]
    for k, name in enumerate(names):
        counts = histogram(series[name], bins)
        top = max(counts) or 1
        colour = SERIES_COLOURS.get(name, "#555")
        for i, c in enumerate(counts):
            if c:
                h = plot_h * c / top
                x = pad_l + i * plot_w / bins + k * bar_w
                parts.append(
                    f'<rect x="{x:.1f}" y="{pad_t + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                    f'fill="{colour}" fill-opacity="0.75"><title>{escape(name)}: {c}</title></rect>'
                )
        parts.append(
            f'<text x="{pad_l + 6 + 130 * k}" y="14" font-size="12" fill="{colour}">'
            f"{escape(name)} (n={len(series[name])})</text>"
        )
    for j, (label, t) in enumerate(thresholds.items()):
        x = pad_l + plot_w * min(max(t, 0.0), 1.0)
        parts.append(
            f'<line x1="{x:.1f}" y1="{pad_t}" x2="{x:.1f}" y2="{pad_t + plot_h}" stroke="{LINE_COLOUR}" '
            f'stroke-width="2" stroke-dasharray="{4 + 3 * j} 3"/>'
            f'<text x="{x + 3:.1f}" y="{pad_t + 12 + 12 * j}" font-size="11" fill="{LINE_COLOUR}">'
            f"{escape(label)} {t:.3f}</text>"
        )
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = pad_l + plot_w * v
        parts.append(f'<text x="{x:.1f}" y="{height - 10}" font-size="11" text-anchor="middle">{v:g}</text>')
    parts.append("</svg>")
    threshold = next(iter(thresholds.values()), None)
    frr = rate_at_or_above(series.get("good", []), threshold) if threshold is not None else None
    defects = series.get("defect", [])
    escape_rate = 1.0 - rate_at_or_above(defects, threshold) if defects and threshold is not None else None
    return Plot(Markup("".join(parts)), frr, escape_rate)

"""The validation-score histogram as inline SVG: genuine vs impostor densities and the threshold.

Plain SVG text keeps the page free of plotting libraries and of any CDN. The root element carries
`data-x0`/`data-x1` (the scores at the plot's left and right edges) and `data-left`/`data-width`
(their pixel positions), so the page can mark a new score on the same axis.
"""

from __future__ import annotations

from html import escape

import numpy as np

WIDTH, HEIGHT = 640, 260
LEFT, RIGHT, TOP, BOTTOM = 48, 16, 28, 36
GENUINE, IMPOSTOR, THRESHOLD = "#2b8a3e", "#c92a2a", "#1c7ed6"


def _bars(scores: np.ndarray, edges: np.ndarray, to_x, to_y, color: str, label: str) -> str:
    density, _ = np.histogram(scores, bins=edges, density=True)
    rects = []
    for left, right, value in zip(edges[:-1], edges[1:], density):
        if value > 0:
            x, y = to_x(left), to_y(value)
            rects.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{to_x(right) - x:.1f}" '
                         f'height="{to_y(0) - y:.1f}"/>')
    return f'<g class="{label}" fill="{color}" fill-opacity="0.45">{"".join(rects)}</g>'


def histogram_svg(scores: np.ndarray, issame: np.ndarray, threshold: float | None, bins: int = 40) -> str:
    """SVG of per-class score densities (each class integrates to 1, so few genuine pairs still show)."""
    scores, issame = np.asarray(scores, dtype=np.float64), np.asarray(issame, dtype=bool)
    marks = scores if threshold is None else np.r_[scores, threshold]
    lo, hi = float(marks.min()), float(marks.max())
    pad = max(0.02, 0.05 * (hi - lo))
    lo, hi = max(-1.0, lo - pad), min(1.0, hi + pad)
    edges = np.linspace(lo, hi, bins + 1)
    peak = max(np.histogram(scores[mask], bins=edges, density=True)[0].max()
               for mask in (issame, ~issame) if mask.any())
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def to_x(s: float) -> float:
        return LEFT + (s - lo) / (hi - lo) * plot_w

    def to_y(d: float) -> float:
        return TOP + plot_h - d / peak * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="histogram" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" data-x0="{lo:.6f}" data-x1="{hi:.6f}" data-left="{LEFT}" '
        f'data-width="{plot_w}" data-top="{TOP}" data-height="{plot_h}" font-family="sans-serif" font-size="11">',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>',
    ]
    for label, mask, color in (("impostor", ~issame, IMPOSTOR), ("genuine", issame, GENUINE)):
        if mask.any():
            parts.append(_bars(scores[mask], edges, to_x, to_y, color, label))
    for tick in np.linspace(lo, hi, 6):
        parts.append(f'<text x="{to_x(tick):.1f}" y="{HEIGHT - BOTTOM + 14}" text-anchor="middle">{tick:.2f}</text>')
    parts.append(f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle">cosine score</text>')
    parts.append(f'<text x="14" y="{TOP + plot_h / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {TOP + plot_h / 2:.1f})">density</text>')
    counts = f"genuine ({int(issame.sum())})", f"impostor ({int((~issame).sum())})"
    for i, (text, color) in enumerate(zip(counts, (GENUINE, IMPOSTOR))):
        x = LEFT + 8 + i * 130
        parts.append(f'<rect x="{x}" y="8" width="10" height="10" fill="{color}" fill-opacity="0.6"/>'
                     f'<text x="{x + 14}" y="17">{escape(text)}</text>')
    if threshold is not None:
        x = to_x(threshold)
        parts.append(f'<line id="threshold-line" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}" '
                     f'stroke="{THRESHOLD}" stroke-width="2" stroke-dasharray="5 3"/>'
                     f'<text x="{x + 4:.1f}" y="{TOP + 12}" fill="{THRESHOLD}">threshold {threshold:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)

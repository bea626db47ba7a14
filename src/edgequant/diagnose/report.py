"""Rendering of an `AnalysisReport`: a terminal table and a self-contained HTML page.

The HTML page carries its plots as inline SVG and its style inline, with no scripts
and no external resources, so it opens offline and can be attached to a ticket.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.files import write_atomic
from .results import VERDICT_FINE, VERDICT_OUTSIDE, Fidelity, LayerSensitivity

# Rows shown in the terminal; the HTML page lists every layer.
TEXT_LAYERS = 20
# An input or layer output with more of its evaluation values beyond the calibrated range gets a warning.
OUTSIDE_WARNING_PCT = 1.0

ONLY8_COLOUR = "#2f6db5"
KEEP16_COLOUR = "#e07b24"
WEIGHT_COLOUR = "#2e8b57"
WEIGHT_LIGHT = "#9fd3b4"
OUTPUT_COLOUR = "#7b4ea3"
WARN_COLOUR = "#c62828"
HIGHLIGHT = "#fff3c4"
TEXT_HEADERS = [
    "rank",
    "layer",
    "kind",
    "only 8-bit",
    "only 16-bit",
    "max |w|",
    "max/median",
    "w zero at 8b %",
    "output range",
]
LAYER_HEADERS = [
    "rank",
    "layer",
    "kind",
    "SQNR only 8-bit",
    "SQNR only 16-bit",
    "max |w|",
    "median |w|",
    "w zero at 8 bit %",
    "output range",
    "outside range %",
]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _fidelity_rows(report: AnalysisReport) -> list[list[str]]:
    rows = [["float", "-", "100.00", _pct(report.float_accuracy), "reference"]]
    runs: list[tuple[Fidelity, str]] = [(report.int16, "all 16 bit"), (report.int8, "all 8 bit")]
    if report.recommended is not None and report.recommended_high_precision:
        how = "simulated" if report.recommended.simulated else "PTQ model"
        n = len(report.recommended_high_precision)
        runs.append((report.recommended, f"{n} layer{'s' if n > 1 else ''} in 16 bit ({how})"))
    for f, note in runs:
        rows.append([f.scheme, f"{f.sqnr_db:.2f}", _pct(f.top1_agreement), _pct(f.top1_accuracy), note])
    return rows


def _hints(report: AnalysisReport) -> list[str]:
    hints = []
    if report.input_outside_range_pct > OUTSIDE_WARNING_PCT:
        hints.append(
            f"{report.input_outside_range_pct:.1f} % of the model input values in the evaluation data lie outside "
            "the range seen in calibration: do both go through the same preprocessing (normalization, scaling)?"
        )
    if report.dead_channels:
        where = ", ".join(f"{name} {channels}" for name, channels in list(report.dead_channels.items())[:4])
        hints.append(
            f"dead channels (BN running variance ~0) in {len(report.dead_channels)} layer(s): {where}. Their "
            "weights only multiply zeros and were zeroed before quantizing; retrain with a lower learning rate "
            "to get them back (docs/guidelines.md#dead-channel)."
        )
    clipped = [layer for layer in report.layers if layer.output_outside_range_pct > OUTSIDE_WARNING_PCT]
    if clipped:
        names = ", ".join(layer.name for layer in sorted(clipped, key=lambda x: x.position)[:5])
        hints.append(
            f"{len(clipped)} layer output{'s exceed' if len(clipped) > 1 else ' exceeds'} its calibrated range "
            "on the evaluation data "
            f"(first: {names}); calibrate on data like the data you evaluate on."
        )
    return hints


def _range(s: LayerSensitivity, digits: int = 3) -> str:
    if not math.isfinite(s.output_min):
        return "-"  # the layer's output is not quantized on its own
    return f"[{s.output_min:.{digits}g}, {s.output_max:.{digits}g}]"


def _abs_max(s: LayerSensitivity) -> float:
    return max(abs(s.weight_min), abs(s.weight_max))


def _ratio(s: LayerSensitivity) -> str:
    """max |w| / median |w|: how far the largest weights sit above the typical one."""
    return f"{_abs_max(s) / s.weight_abs_median:.0f}" if s.weight_abs_median > 0 else "-"


def recommendation_code(report: AnalysisReport) -> str:
    """The line a user pastes to get the recommended mixed-precision scheme."""
    names = ", ".join(f'"{n}"' for n in report.recommended_high_precision)
    return f'scheme = eq.get_scheme("{report.scheme}").with_high_precision([{names}])'


def _recommendation_text(report: AnalysisReport) -> str:
    if report.recommended is None:
        return "No mixed-precision recommendation: 16 bit already misses the target, so fix that first."
    if not report.recommended_high_precision:
        return f"No layer needs 16 bit: {report.scheme} meets the target."
    n = len(report.recommended_high_precision)
    met = "meets the target" if report.target_met else "still misses the target"
    text = f"Keep {n} layer{'s' if n > 1 else ''} in 16 bit ({met}):\n  {recommendation_code(report)}"
    if not report.target_met and n == len(report.layers):
        text += (
            "\n  Every conv / linear layer is in 16 bit here; the residual adds, multiplies and pools stay"
            f" 8-bit in mixed precision and hold it back. Fix: the 16-bit scheme {report.scheme_16bit!r}."
        )
    return text


def render_text(report: AnalysisReport) -> str:
    """The report as a terminal table."""
    out = [
        f"edgequant analysis of {report.scheme} (16-bit reference: {report.scheme_16bit})",
        f"calibration: {report.calibration_samples} samples, evaluation: {report.eval_samples} samples, "
        f"per-layer sweep: first {report.sweep_samples}",
        "",
        _table(["run", "SQNR dB", "top-1 agreement %", "top-1 accuracy %", ""], _fidelity_rows(report)),
        "",
        f"Verdict: {report.verdict}",
        f"  (close to float means {report.target})",
    ]
    out += [f"  Note: {h}" for h in _hints(report)]
    shown = report.layers[:TEXT_LAYERS]
    out += [
        "",
        "Layers, most sensitive first. Model output SQNR (dB, sweep samples) with only this layer in 8 bit",
        f"(rest float), and with only this layer in 16 bit (rest 8 bit; all 8 bit: {report.sweep_int8_sqnr_db:.2f}, "
        f"all 16 bit: {report.sweep_int16_sqnr_db:.2f}):",
        _table(
            TEXT_HEADERS,
            [
                [
                    str(s.rank),
                    s.name,
                    s.kind,
                    f"{s.sqnr_only_8bit_db:.2f}",
                    f"{s.sqnr_keep_16bit_db:.2f}",
                    f"{_abs_max(s):.3g}",
                    _ratio(s),
                    f"{s.weight_zero_8bit_pct:.1f}",
                    _range(s),
                ]
                for s in shown
            ],
        ),
    ]
    if len(report.layers) > len(shown):
        out.append(f"... {len(report.layers) - len(shown)} more layers: report.save('report.html') lists them all")
    out += ["", _recommendation_text(report)]
    return "\n".join(out)


# ---- HTML ---------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; margin: 24px;
       color: #1d1d1f; background: #ffffff; max-width: 1200px; }
h1 { font-size: 22px; margin-bottom: 4px; }
h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; font-size: 13px; }
.verdict { padding: 12px 16px; border-radius: 6px; font-size: 16px; font-weight: 600; margin: 16px 0 8px; }
.fine { background: #e3f4e6; border-left: 6px solid #2e8b57; }
.quant { background: #fff1de; border-left: 6px solid #e07b24; }
.outside { background: #fde6e6; border-left: 6px solid #c62828; }
.note { color: #8a4b00; font-size: 14px; margin: 4px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e6e6e6; text-align: right; white-space: nowrap; }
th { background: #f4f4f6; }
td.name, th.name { text-align: left; font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; }
td.text, th.text { text-align: left; }
tr.chosen td { background: #fff3c4; }
pre { background: #f4f4f6; padding: 10px 12px; border-radius: 4px; font-size: 13px; white-space: pre-wrap; }
.scroll { overflow-x: auto; }
.legend span { display: inline-block; margin-right: 18px; font-size: 13px; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 5px; vertical-align: -1px; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _log_axis(values: list[float]) -> tuple[float, float]:
    """Decade bounds (log10) covering the positive values."""
    positive = [v for v in values if v > 0 and math.isfinite(v)] or [1.0]
    return math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)) + 1e-9)


def _linear_axis(values: list[float], include_zero: bool = True) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)] or [0.0]
    low, high = min(finite), max(finite)
    if include_zero:
        low, high = min(low, 0.0), max(high, 0.0)
    if high - low < 1e-9:
        high = low + 1.0
    pad = 0.05 * (high - low)
    return low - (pad if low < 0 else 0.0), high + pad


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(step))
    step = min((m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= step), default=step)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


class _Panel:
    """One column of the layer figure: an x axis and a title."""

    def __init__(self, x: float, width: float, title: str, low: float, high: float, log: bool) -> None:
        self.x, self.width, self.title, self.low, self.high, self.log = x, width, title, low, high, log

    def at(self, value: float) -> float:
        if self.log:
            value = math.log10(max(value, 10.0**self.low))
        value = min(max(value, self.low), self.high)
        return self.x + (value - self.low) / (self.high - self.low) * self.width

    def axis(self, top: float, bottom: float) -> list[str]:
        parts = [
            f'<text x="{self.x + self.width / 2:.1f}" y="{top - 30:.1f}" text-anchor="middle" '
            f'font-size="12" font-weight="600">{_esc(self.title)}</text>'
        ]
        if self.log:
            ticks = [float(e) for e in range(int(self.low), int(self.high) + 1)]
            labels = [f"1e{int(t)}" if abs(t) > 2 else f"{10.0**t:g}" for t in ticks]
            positions = [self.at(10.0**t) for t in ticks]
        else:
            ticks = _ticks(self.low, self.high)
            labels = [f"{t:g}" for t in ticks]
            positions = [self.at(t) for t in ticks]
        for pos, label in zip(positions, labels, strict=True):
            parts.append(
                f'<line x1="{pos:.1f}" y1="{top - 4:.1f}" x2="{pos:.1f}" y2="{bottom:.1f}" stroke="#e3e3e3"/>'
                f'<text x="{pos:.1f}" y="{top - 8:.1f}" text-anchor="middle" font-size="10" fill="#555">'
                f"{label}</text>"
            )
        return parts


def _bar(panel: _Panel, span: tuple[float, float], y: float, height: float, colour: str, tip: str) -> str:
    x0, x1 = sorted((panel.at(span[0]), panel.at(span[1])))
    return (
        f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0, 1.0):.1f}" height="{height:.1f}" fill="{colour}">'
        f"<title>{_esc(tip)}</title></rect>"
    )


def _vertical(x: float, top: float, bottom: float, dash: str, tip: str) -> str:
    return (
        f'<line x1="{x:.1f}" y1="{top - 4:.1f}" x2="{x:.1f}" y2="{bottom:.1f}" stroke="#222" '
        f'stroke-dasharray="{dash}"><title>{_esc(tip)}</title></line>'
    )


def layer_figure(report: AnalysisReport) -> str:
    """One SVG with a row per layer (network order): sensitivity bars, weight and output ranges."""
    layers: list[LayerSensitivity] = sorted(report.layers, key=lambda s: s.position)
    chosen = set(report.recommended_high_precision)
    row, top, name_width, panel_width, gap = 16.0, 56.0, 230.0, 210.0, 26.0
    gains = [s.sqnr_keep_16bit_db - report.sweep_int8_sqnr_db for s in layers]
    only8 = [s.sqnr_only_8bit_db for s in layers] + [report.sweep_int8_sqnr_db]
    weights = [_abs_max(s) for s in layers] + [s.weight_abs_median for s in layers]
    outputs = [max(abs(s.output_min), abs(s.output_max)) for s in layers if math.isfinite(s.output_min)]
    axes = [
        ("SQNR, only this layer 8 bit (dB)", _linear_axis(only8), False),
        ("SQNR gain, only this 16 bit (dB)", _linear_axis(gains), False),
        ("weights: median |w| and max |w|", _log_axis(weights), True),
        ("output: max |y| calibrated", _log_axis(outputs), True),
    ]
    only8_panel, gain_panel, weight_panel, output_panel = panels = [
        _Panel(name_width + i * (panel_width + gap), panel_width, title, *bounds, log=log)
        for i, (title, bounds, log) in enumerate(axes)
    ]
    width = name_width + 4 * panel_width + 3 * gap + 16
    bottom = top + row * len(layers)
    height = bottom + 12
    parts = [
        f'<svg width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
        'font-family="DejaVu Sans, Arial, sans-serif" style="max-width: 100%; height: auto">',
        f'<rect x="0" y="0" width="{width:.0f}" height="{height:.0f}" fill="#ffffff"/>',
    ]
    for panel in panels:
        parts += panel.axis(top, bottom)
    for i, s in enumerate(layers):
        y = top + i * row
        bar_y, bar_h = y + 3, row - 6
        if s.name in chosen:
            parts.append(f'<rect x="0" y="{y:.1f}" width="{width:.0f}" height="{row:.1f}" fill="{HIGHLIGHT}"/>')
        parts.append(
            f'<text x="{name_width - 8:.1f}" y="{y + row - 4:.1f}" text-anchor="end" font-size="11" '
            f'font-weight="{700 if s.name in chosen else 400}" font-family="DejaVu Sans Mono, monospace">'
            f"{_esc(s.name)}<title>{_esc(f'#{s.rank}: {s.name} ({s.kind})')}</title></text>"
        )
        tip = f"{s.name}: {s.sqnr_only_8bit_db:.2f} dB with only this layer in 8 bit"
        parts.append(_bar(only8_panel, (only8_panel.low, s.sqnr_only_8bit_db), bar_y, bar_h, ONLY8_COLOUR, tip))
        tip = f"{s.name}: {gains[i]:+.2f} dB when only this layer is kept in 16 bit"
        parts.append(_bar(gain_panel, (0.0, gains[i]), bar_y, bar_h, KEEP16_COLOUR, tip))
        floor = 10.0**weight_panel.low
        tip = f"{s.name}: max |w| = {_abs_max(s):.4g}"
        parts.append(_bar(weight_panel, (floor, _abs_max(s)), y + 6, row - 12, WEIGHT_LIGHT, tip))
        tip = f"{s.name}: median |w| = {s.weight_abs_median:.4g}; {s.weight_zero_8bit_pct:.1f} % round to 0 at 8 bit"
        parts.append(_bar(weight_panel, (floor, s.weight_abs_median), bar_y, bar_h, WEIGHT_COLOUR, tip))
        if math.isfinite(s.output_min):
            colour = WARN_COLOUR if s.output_outside_range_pct > OUTSIDE_WARNING_PCT else OUTPUT_COLOUR
            tip = (
                f"{s.name}: output range {_range(s, 4)}, "
                f"{s.output_outside_range_pct:.2f} % of evaluation values outside"
            )
            span = (10.0**output_panel.low, max(abs(s.output_min), abs(s.output_max)))
            parts.append(_bar(output_panel, span, bar_y, bar_h, colour, tip))
    tip = f"all layers 8 bit: {report.sweep_int8_sqnr_db:.2f} dB"
    parts.append(_vertical(only8_panel.at(report.sweep_int8_sqnr_db), top, bottom, "4 3", tip))
    parts.append(_vertical(gain_panel.at(0.0), top, bottom, "none", "no gain"))
    parts.append("</svg>")
    return "\n".join(parts)


def _html_table(
    headers: list[str], rows: list[list[str]], text_columns: set[int], highlighted: set[int] | None = None
) -> str:
    """A table whose `text_columns` are left-aligned (the first of them in monospace: names)."""
    first = min(text_columns)

    def cell(tag: str, i: int, value: str) -> str:
        cls = (' class="name"' if i == first else ' class="text"') if i in text_columns else ""
        return f"<{tag}{cls}>{_esc(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = []
    for r, values in enumerate(rows):
        cls = ' class="chosen"' if highlighted and r in highlighted else ""
        body.append(f"<tr{cls}>" + "".join(cell("td", i, v) for i, v in enumerate(values)) + "</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def render_html(report: AnalysisReport) -> str:
    """The report as one self-contained HTML page."""
    kind = {VERDICT_FINE: "fine", VERDICT_OUTSIDE: "outside"}.get(report.verdict, "quant")
    chosen = set(report.recommended_high_precision)
    layer_rows = [
        [
            str(s.rank),
            s.name,
            s.kind,
            f"{s.sqnr_only_8bit_db:.2f}",
            f"{s.sqnr_keep_16bit_db:.2f}",
            f"{_abs_max(s):.4g}",
            f"{s.weight_abs_median:.4g}",
            f"{s.weight_zero_8bit_pct:.1f}",
            _range(s, 4),
            f"{s.output_outside_range_pct:.2f}",
        ]
        for s in report.layers
    ]
    legend = "".join(
        f'<span><i class="swatch" style="background:{c}"></i>{_esc(t)}</span>'
        for c, t in (
            (ONLY8_COLOUR, "only this layer in 8 bit, the rest float (dashed: every layer 8 bit)"),
            (KEEP16_COLOUR, "gain when only this layer is kept in 16 bit"),
            (WEIGHT_COLOUR, "median |w| (light: max |w|)"),
            (OUTPUT_COLOUR, "largest calibrated |output|"),
            (WARN_COLOUR, f"output beyond its calibrated range on > {OUTSIDE_WARNING_PCT:g} % of evaluation values"),
        )
    )
    recommendation = _esc(_recommendation_text(report).split("\n")[0])
    code = f"<pre>{_esc(recommendation_code(report))}</pre>" if report.recommended_high_precision else ""
    notes = "".join(f'<p class="note">{_esc(h)}</p>' for h in _hints(report))
    layer_table = _html_table(
        LAYER_HEADERS, layer_rows, {1, 2}, {i for i, s in enumerate(report.layers) if s.name in chosen}
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>edgequant analysis: {_esc(report.scheme)}</title>
<style>{_CSS}</style></head>
<body>
<h1>Quantization analysis: {_esc(report.scheme)}</h1>
<p class="meta">16-bit reference: {_esc(report.scheme_16bit)} &middot; calibration: {report.calibration_samples}
samples &middot; evaluation: {report.eval_samples} samples &middot; per-layer sweep: first {report.sweep_samples}
samples</p>
<div class="verdict {kind}">{_esc(report.verdict)}</div>
<p class="meta">Close to float means {_esc(report.target)}.</p>
{notes}
<h2>Output fidelity against float</h2>
{_html_table(["run", "SQNR dB", "top-1 agreement %", "top-1 accuracy %", ""], _fidelity_rows(report), {0, 4})}
<h2>Mixed precision</h2>
<p>{recommendation}</p>
{code}
<h2>Layers in network order</h2>
<p class="legend">{legend}</p>
<p class="meta">Highlighted rows: the recommended 16-bit layers. Hover a bar for its value.</p>
{layer_figure(report)}
<h2>Layers, most sensitive first</h2>
{layer_table}
</body></html>
"""


@dataclass
class AnalysisReport:
    """What `analyze` found; `print(report)` for a table, `report.save("report.html")` for plots."""

    scheme: str
    scheme_16bit: str
    calibration_samples: int
    eval_samples: int
    sweep_samples: int
    target: str
    float_accuracy: float | None
    int16: Fidelity
    int8: Fidelity
    verdict: str
    input_outside_range_pct: float
    sweep_int8_sqnr_db: float
    sweep_int16_sqnr_db: float
    layers: list[LayerSensitivity] = field(default_factory=list)
    recommended_high_precision: list[str] = field(default_factory=list)
    recommended: Fidelity | None = None
    target_met: bool = False
    # Output channels whose BN saw a constant, by conv: zeroed before quantizing (see batchnorm.py).
    dead_channels: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain data for JSON: numbers, strings, lists; a missing value (NaN) becomes None."""
        return _json_safe(asdict(self))

    def __str__(self) -> str:
        return render_text(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a self-contained HTML page (inline SVG plots, no scripts, opens offline)."""
        return write_atomic(path, render_html(self).encode("utf-8"))


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value

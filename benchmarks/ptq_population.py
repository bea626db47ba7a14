"""PTQ over a population of checkpoints: ours and the strongest peers, side by side, in one run.

    make bench-peers                                            # once: .venv-peers with the peers
    .venv-peers/bin/python benchmarks/ptq_population.py         # the whole population, every peer
    .venv/bin/python benchmarks/ptq_population.py --peers none  # ours only (no peer environment)
    ... --models resnet18 --recipes default high_lr --configs default no_bias_correction
    ... --peers none --configs default signed    # unsigned 8-bit activations against all-int8
    ... --peers none --configs default mse minmax mean_max --torch-eval   # activation range estimators
    ... --configs default per_channel     # int8_pow2_dw also with per-channel weights on every conv
    ... --recipes short seed1_no_ls --configs default per_channel free_scales --output ptq_population_heldout

One figure per architecture, from one recipe, proves little: on a model trained the way the
method's authors train, every method sits at float. The population here is every model of
`--models` trained with every recipe of `--recipes` (edgequant.demo.training.RECIPES: default,
high learning rate, Adam without weight decay, short, another seed without label
smoothing), each cached in ~/.cache/edgequant after its first training.

Every method gets the same 128 calibration images (the first of the training split, in
order) and is measured on its exported file in onnxruntime on the 360 test images:
- top-1 %, and its drop from the float model's top-1 (the accuracy that decides);
- agreement %: test images whose top-1 class equals the float model's;
- SQNR dB: 10 log10(sum f^2 / sum (q - f)^2) over the logits q against float f. Top-1
  saturates on digits; SQNR does not, and separates methods that tie on top-1. Pooled over
  all images, it is decided by the few images with the largest logits; "image SQNR" is the
  median over images of each image's own SQNR, where each image counts once;
  (`--torch-eval` measures ours in eval mode instead: the integer model that the export is
  held to, bit for bit for power-of-2 schemes; for sweeps of our own recipes);
- which images change class (`changed_images`): lost and won against the labels, and whether
  they are the float model's small-margin or its large-logit images;
- seconds: float model to quantized model (our `calibrate()`, each peer's own recipe),
  export excluded, and the ratio of ours to onnxruntime quantize_static (MinMax).

Each checkpoint also gets our int16 PTQ's SQNR on the calibration images themselves (no
range is exceeded there, so only the 16-bit rounding counts): a float model that turns a
16-bit step into a large output change (seen on under-trained efficientnet checkpoints, where
one 16-bit quantizer alone costs 20 dB) cannot be held by any 8-bit PTQ. The summary and the
targets are given over the whole population and again over the checkpoints whose int16 SQNR
is at least QUANTIZABLE_DB.

Scheme families: ours int8_pow2 (power-of-2, per-tensor) is compared with the peers' power-of-2
per-tensor variants (Brevitas, MCT); int8_pow2_dw with their power-of-2 per-channel ones, which
are per channel on every conv, not only the depthwise ones (`--configs per_channel` gives ours
that granularity too); int8 (free scales, per-channel weights) with every peer's per-channel
variant. Results are written after every checkpoint to benchmarks/results/ptq_population.json,
and a rerun with `--resume` skips the checkpoints already there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, save, table

import edgequant as eq
from edgequant.demo.data import digits_tensors
from edgequant.demo.training import RECIPES, float_digits_model
from edgequant.diagnose.analysis import sqnr_db
from edgequant.export.runtime import run_onnx, session

MODELS = ["resnet18", "mobilenet_v2", "regnet_x_400mf", "mobilenet_v3_small", "efficientnet_b0", "mnasnet0_5"]
POPULATION_RECIPES = ["default", "high_lr", "adam_no_wd", "short", "seed1_no_ls"]
SCHEMES = ["int8_pow2", "int8_pow2_dw", "int8"]
CALIB_IMAGES = 128
# Our PTQ recipes to compare, as edits of the default PTQConfig or of the scheme (the default decides
# the targets). "signed" is every 8-bit activation on the int8 grid, as before unsigned_activations.
CONFIGS: dict[str, dict] = {
    "default": {},
    "signed": {"unsigned_activations": False},
    "ceil": {"weight_exponent": "ceil"},
    "no_bias_correction": {"bias_correction": False},
    "minmax": {"range_estimator": "minmax"},
    "mse": {"range_estimator": "mse"},
    "sample_mse": {"range_estimator": "sample_mse"},
    "mean_max": {"range_estimator": "mean_max"},
    "percentile": {"range_estimator": "percentile"},
    "adaround": {"adaround": True},
    "equalize": {"equalize": True},
    # Power-of-2 weight scales per output channel of every conv: the granularity of MCT's and
    # Brevitas' per-channel power-of-2 variants, which int8_pow2_dw (per channel for depthwise
    # convs only, as TDA4VM runs them) is otherwise held to.
    "per_channel": {"weight_granularity": "per_channel"},
    # int8_pow2 with free (float) scales: what the power-of-2 constraint alone costs.
    "free_scales": {"power_of_2": False},
}
# Configs that differ from the default only on some schemes run on those alone.
CONFIG_SCHEMES = {"per_channel": ("int8_pow2_dw",), "equalize": ("int8",), "free_scales": ("int8_pow2",)}
# Which peer variants (per_channel, power_of_2) a scheme of ours is compared with.
FAMILY = {"int8_pow2": (False, True), "int8_pow2_dw": (True, True), "int8": (True, False)}
# Entropy is left out by default: through quantize_static 1.32 it equals MinMax (benchmarks/peers.md).
DEFAULT_PEERS = ["ort MinMax", "ort Percentile", "torchao", "brevitas", "mct", "aimet", "nncf"]
TIMING_REFERENCE = "ort MinMax"
# Peer variants left out, with the reason: MCT's per-channel free-scale PTQ takes 107 s on a resnet18
# here (its per-channel threshold search), 40x onnxruntime; MCT is held to ours in the power-of-2 families.
SKIPPED_VARIANTS = {("mct", True, False)}
if os.environ.get("EDGEQUANT_POPULATION_FAST"):
    # A shorter run: Brevitas' free-scale per-channel variant (16 s a checkpoint; Brevitas is held
    # to ours in the power-of-2 families) goes too. AIMET (34 s) is left out with --peers.
    SKIPPED_VARIANTS.add(("brevitas", True, False))


def metrics(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict:
    """top-1 %, agreement with float %, SQNR dB of quantized `logits` against float `reference`.

    "sqnr_db" pools the squared errors of all images, so the few images with the largest
    logits decide it; "image_sqnr_db" is the median over images of each image's own SQNR,
    where every image counts once.
    """
    per_image = np.array([sqnr_db(f, q) for f, q in zip(reference, logits, strict=True)])
    return {
        "top1": 100.0 * float((logits.argmax(1) == labels).float().mean()),
        "agreement": 100.0 * float((logits.argmax(1) == reference.argmax(1)).float().mean()),
        "sqnr_db": sqnr_db(reference, logits),
        "image_sqnr_db": float(np.median(per_image)),
    } | changed_images(logits, reference, labels, per_image)


def changed_images(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, per_image: np.ndarray) -> dict:
    """Which images change class, and whether they are the float model's small-margin or large-logit ones.

    "lost" / "won": right in float and wrong quantized, and the reverse. For the images that
    change class: the highest percentile, among all images, of their float margin (top logit
    minus the second) and of their float logit norm, and their median image SQNR.
    """
    changed = (logits.argmax(1) != reference.argmax(1)).numpy()
    right_float, right_quant = reference.argmax(1) == labels, logits.argmax(1) == labels
    top2 = reference.topk(2, dim=1).values
    percentile = lambda v: v.argsort().argsort().float().numpy() / max(len(v) - 1, 1)  # noqa: E731
    found = {
        "lost": int((right_float & ~right_quant).sum()),
        "won": int((~right_float & right_quant).sum()),
        "changed": int(changed.sum()),
    }
    if changed.any():
        found |= {
            "changed_margin_percentile": float(percentile(top2[:, 0] - top2[:, 1])[changed].max()),
            "changed_norm_percentile": float(percentile(reference.norm(dim=1))[changed].max()),
            "changed_image_sqnr_db": float(np.median(per_image[changed])),
        }
    return found


SCHEME_FIELDS = {f.name for f in fields(eq.Scheme)}


def variant(config_name: str, scheme: str) -> tuple[eq.Scheme, eq.PTQConfig]:
    """The scheme and PTQConfig of one of CONFIGS."""
    edits = CONFIGS[config_name]
    scheme_edits = {k: v for k, v in edits.items() if k in SCHEME_FIELDS}
    config_edits = {k: v for k, v in edits.items() if k not in SCHEME_FIELDS}
    return replace(eq.get_scheme(scheme), **scheme_edits), replace(eq.PTQConfig(), **config_edits)


def ours(
    model, scheme: str | eq.Scheme, config: eq.PTQConfig, calib: torch.Tensor, test: torch.Tensor, work: Path | None
) -> tuple:
    """Our PTQ: calibrate, export, then the exported file's logits in onnxruntime.

    Without `work` the logits come from the module's eval mode, the integer model the
    export is checked against (a sweep of recipes saves the export that way).
    """
    example = calib[:32]
    start = time.perf_counter()
    qmodel = eq.PTQModule(model, (example,), scheme, config)
    qmodel.calibrate([(x,) for x in calib.split(32)], progress=False)
    seconds = time.perf_counter() - start
    if work is None:
        with torch.no_grad():
            return torch.cat([qmodel(x) for x in test.split(120)]), seconds
    path = work / f"ours_{eq.get_scheme(scheme).name}.onnx"
    qmodel.export(path)
    sess = session(str(path))
    logits = torch.cat([torch.from_numpy(run_onnx(sess, (x,))[0]) for x in test.split(120)])
    return logits, seconds


def run_checkpoint(name: str, recipe: str, args: argparse.Namespace, peers: dict) -> list[dict]:
    model = float_digits_model(name, recipe=recipe).eval()
    images, labels = digits_tensors("test")
    calib = digits_tensors("train")[0][:CALIB_IMAGES]
    with torch.no_grad():
        reference = model(images)
    base = {"model": name, "recipe": recipe}
    float_top1 = metrics(reference, reference, labels)["top1"]
    # How far the float model itself amplifies a 16-bit step: our int16 PTQ in eval mode, on the
    # calibration images (whose ranges it has seen: no clipping, only the 16-bit rounding).
    int16_logits, _ = ours(model, "int16", eq.PTQConfig(), calib, calib, None)
    with torch.no_grad():
        int16_db = metrics(int16_logits, model(calib), labels[: len(calib)])["sqnr_db"]
    float_row = {"method": "float", "scheme": "-", "top1": float_top1, "agreement": 100.0, "sqnr_db": np.inf}
    rows = [base | float_row | {"int16_sqnr_db": int16_db}]
    with tempfile.TemporaryDirectory() as tmp:
        for config_name in args.configs:
            method = "edgequant" if config_name == "default" else f"edgequant {config_name}"
            for scheme in args.schemes:
                if scheme not in CONFIG_SCHEMES.get(config_name, SCHEMES):
                    continue
                row = base | {"method": method, "scheme": scheme}
                try:
                    work = None if args.torch_eval else Path(tmp)
                    logits, seconds = ours(model, *variant(config_name, scheme), calib, images, work)
                    row |= metrics(logits, reference, labels) | {"seconds": seconds}
                except Exception as error:  # a failure is a result to report
                    row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                rows.append(row)
        for peer_name, peer in peers.items():
            for per_channel, power_of_2 in peer.variants:
                if (per_channel, power_of_2) not in FAMILY.values():
                    continue
                if (peer_name, per_channel, power_of_2) in SKIPPED_VARIANTS:
                    continue
                row = base | {"method": peer_name, "per_channel": per_channel, "power_of_2": power_of_2}
                try:
                    quantized = peer(model, calib, per_channel, power_of_2)
                    with torch.no_grad():
                        logits = torch.cat([quantized(x) for x in images.split(120)])
                    row |= metrics(logits, reference, labels) | {"seconds": quantized.seconds}
                except Exception as error:
                    row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                rows.append(row)
    for row in rows:
        if "top1" in row:
            row["drop"] = float_top1 - row["top1"]
    return rows


def family_rows(rows: list[dict], scheme: str) -> list[dict]:
    """Our rows of `scheme` and the peer rows of its family."""
    per_channel, power_of_2 = FAMILY[scheme]
    return [
        r
        for r in rows
        if r.get("scheme") == scheme or (r.get("per_channel") == per_channel and r.get("power_of_2") == power_of_2)
    ]


def checkpoint_table(rows: list[dict]) -> str:
    out = []
    for scheme in SCHEMES:
        chosen = family_rows(rows, scheme)
        if not chosen:
            continue
        body = [
            [
                r["method"],
                r.get("top1", "error"),
                r.get("drop", "-"),
                r.get("agreement", "-"),
                r.get("sqnr_db", "-"),
                r.get("image_sqnr_db", "-"),
                r.get("seconds", "-"),
                r.get("error", "")[:80],
            ]
            for r in chosen
        ]
        out.append(
            f"{scheme} family\n"
            + table(["method", "top-1", "drop", "agree", "SQNR dB", "image SQNR dB", "s", "error"], body)
        )
    return "\n\n".join(out)


def quantizable(rows: list[dict]) -> list[dict]:
    """The rows of checkpoints whose int16 quantization stays within QUANTIZABLE_DB of float."""
    keep = {
        (r["model"], r["recipe"])
        for r in rows
        if r["method"] == "float" and r.get("int16_sqnr_db", np.inf) >= QUANTIZABLE_DB
    }
    return [r for r in rows if (r["model"], r["recipe"]) in keep]


def _median(values: Iterable[float]) -> float:
    """The median, nan for none (result files from before a metric existed lack it)."""
    present = [v for v in values if not np.isnan(v)]
    return statistics.median(present) if present else float("nan")


def summary(rows: list[dict]) -> tuple[str, list[dict]]:
    """Worst-case and median top-1 drop, median SQNR and time ratio per method and scheme family."""
    timing = {
        (r["model"], r["recipe"]): r["seconds"]
        for r in rows
        if r["method"] == TIMING_REFERENCE and r.get("per_channel") and "seconds" in r
    }
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["method"] == "float":
            continue
        family = r.get("scheme") or next(
            (s for s, v in FAMILY.items() if v == (r.get("per_channel"), r.get("power_of_2"))), "?"
        )
        groups.setdefault((family, r["method"]), []).append(r)
    out = []
    for (family, method), members in sorted(groups.items()):
        done = [r for r in members if "top1" in r]
        drops = [r["drop"] for r in done]
        ratios = [r["seconds"] / timing[k] for r in done if (k := (r["model"], r["recipe"])) in timing]
        out.append(
            {
                "family": family,
                "method": method,
                "checkpoints": len(done),
                "failed": len(members) - len(done),
                "worst_drop": max(drops) if drops else float("nan"),
                "median_drop": statistics.median(drops) if drops else float("nan"),
                "median_sqnr_db": statistics.median(r["sqnr_db"] for r in done) if done else float("nan"),
                "worst_sqnr_db": min((r["sqnr_db"] for r in done), default=float("nan")),
                "median_image_sqnr_db": _median(r.get("image_sqnr_db", np.nan) for r in done),
                "max_time_ratio": max(ratios) if ratios else float("nan"),
            }
        )
    headers = [
        "family",
        "method",
        "n",
        "failed",
        "worst drop",
        "median drop",
        "median SQNR",
        "worst SQNR",
        "median image SQNR",
        f"max s / {TIMING_REFERENCE}",
    ]
    keys = [
        "family",
        "method",
        "checkpoints",
        "failed",
        "worst_drop",
        "median_drop",
        "median_sqnr_db",
        "worst_sqnr_db",
        "median_image_sqnr_db",
        "max_time_ratio",
    ]
    return table(headers, [[s[k] for k in keys] for s in out]), out


# A checkpoint whose int16 PTQ logits are below this SQNR amplifies a 16-bit step (1/65536 of a
# range) into a large output change: no 8-bit PTQ can hold it, whatever the method. Such
# checkpoints are summarized apart as well as within the whole population.
QUANTIZABLE_DB = 40.0
# Targets of the default recipe over the population (worst-case, median top-1 drop in points).
TARGETS = {"int8_pow2": (1.0, 0.3), "int8_pow2_dw": (1.0, 0.3), "int8": (0.5, 0.2)}
# Peers of the same family a scheme is held to: power-of-2 ones for power-of-2 schemes.
POW2_PEERS = ("brevitas", "mct")


def _peer_comparison(rows: list[dict], scheme: str, method: str) -> list[str]:
    """Per checkpoint, `method` (one of ours) against the best peer of the scheme's family."""
    checks = (
        ("top1", 0.0, "", "top-1 >= best peer"),
        ("sqnr_db", 0.5, " dB", "SQNR >= best peer - 0.5 dB"),
        ("image_sqnr_db", 0.5, " dB", "median image SQNR >= best peer - 0.5 dB"),
    )
    short: dict[str, list[str]] = {metric: [] for metric, *_ in checks}
    compared = dict.fromkeys(short, 0)
    for key in sorted({(r["model"], r["recipe"]) for r in rows}):
        members = [r for r in family_rows(rows, scheme) if (r["model"], r["recipe"]) == key and "top1" in r]
        ours = next((r for r in members if r["method"] == method), None)
        peers = [r for r in members if not r["method"].startswith("edgequant")]
        if scheme != "int8":
            peers = [r for r in peers if r["method"] in POW2_PEERS]
        for metric, margin, unit, _ in checks:
            # Result files from before a metric existed lack it: those checkpoints are not compared on it.
            measured = [r for r in peers if metric in r]
            if ours is None or metric not in ours or not measured:
                continue
            compared[metric] += 1
            best = max(measured, key=lambda r: r[metric])
            if ours[metric] < best[metric] - margin:
                short[metric].append(
                    f"{key[0]}@{key[1]} ({ours[metric]:.2f} < {best['method']} {best[metric]:.2f}{unit})"
                )
    return [
        f"  {method}: {label} on {compared[metric] - len(short[metric])} of {compared[metric]}; "
        f"short: {', '.join(short[metric]) or 'none'}"
        for metric, _, _, label in checks
        if compared[metric]
    ]


def versus_peers(rows: list[dict], stats: list[dict]) -> str:
    """The targets: our default's drops, and per checkpoint each of our configs against the best peer."""
    lines = []
    for scheme, (worst, median) in TARGETS.items():
        ours_stats = next((s for s in stats if s["family"] == scheme and s["method"] == "edgequant"), None)
        if ours_stats is None:
            continue
        met = ours_stats["worst_drop"] <= worst and ours_stats["median_drop"] <= median
        lines.append(
            f"- {scheme}: worst drop {ours_stats['worst_drop']:.2f} (target {worst}), median "
            f"{ours_stats['median_drop']:.2f} (target {median}): {'met' if met else 'NOT met'}; "
            f"max calibration time / {TIMING_REFERENCE}: {ours_stats['max_time_ratio']:.2f} (target 3)"
        )
        methods = sorted(
            {r["method"] for r in rows if r.get("scheme") == scheme and r["method"].startswith("edgequant")}
        )
        for method in methods:
            lines += _peer_comparison(rows, scheme, method)
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """Per checkpoint: float, int16 SQNR, and for int8_pow2 and int8 ours against the best peer of the family."""
    lines = [
        "| checkpoint | float | int16 SQNR (calib.) | int8_pow2 ours | best pow2 peer | int8 ours | best int8 peer |",
        "|---|---|---|---|---|---|---|",
    ]

    def best(members: list[dict]) -> str:
        if not members:
            return "-"
        top = max(members, key=lambda r: r["top1"])
        loud = max(members, key=lambda r: r["sqnr_db"])
        return f"{top['top1']:.2f} ({top['method']}) / {loud['sqnr_db']:.1f} dB ({loud['method']})"

    for key in sorted({(r["model"], r["recipe"]) for r in rows}):
        mine = [r for r in rows if (r["model"], r["recipe"]) == key]
        float_row = next(r for r in mine if r["method"] == "float")
        cells = [
            f"{key[0]}@{key[1]}",
            f"{float_row['top1']:.2f}",
            f"{float_row.get('int16_sqnr_db', float('nan')):.1f} dB",
        ]
        for scheme in ("int8_pow2", "int8"):
            members = [r for r in family_rows(mine, scheme) if "top1" in r]
            ours = next((r for r in members if r["method"] == "edgequant"), None)
            peers = [r for r in members if not r["method"].startswith("edgequant")]
            if scheme != "int8":
                peers = [r for r in peers if r["method"] in POW2_PEERS]
            cells.append(f"{ours['top1']:.2f} / {ours['sqnr_db']:.1f} dB" if ours else "-")
            cells.append(best(peers))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_summary(stats: list[dict]) -> str:
    """The per-method summary (from `summary`), ours first in each family."""
    lines = [
        "| family | method | checkpoints | worst drop | median drop | median SQNR dB | worst SQNR dB "
        "| median image SQNR dB | max time / ort MinMax |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(SCHEMES)}
    for s in sorted(stats, key=lambda s: (order.get(s["family"], 9), s["method"] != "edgequant", s["method"])):
        lines.append(
            f"| {s['family']} | {s['method']} | {s['checkpoints']} | {s['worst_drop']:.2f} | {s['median_drop']:.2f} "
            f"| {s['median_sqnr_db']:.1f} | {s['worst_sqnr_db']:.1f} | {s.get('median_image_sqnr_db', np.nan):.1f} "
            f"| {s['max_time_ratio']:.2f} |"
        )
    return "\n".join(lines)


def paired(rows: list[dict], method: str, other: str) -> str:
    """`method` against `other` on the same checkpoints, per scheme: how often and how much its SQNR is higher."""
    lines = []
    for scheme in SCHEMES:
        by = {
            m: {
                (r["model"], r["recipe"]): r
                for r in rows
                if r["method"] == m and r.get("scheme") == scheme and "top1" in r
            }
            for m in (method, other)
        }
        keys = [k for k in by[method] if k in by[other]]
        if not keys:
            continue
        a, b = by[method], by[other]
        gains = [a[k]["sqnr_db"] - b[k]["sqnr_db"] for k in keys]
        top1 = [a[k]["top1"] - b[k]["top1"] for k in keys]
        lines.append(
            f"| {scheme} | {sum(g > 0 for g in gains)} of {len(keys)} | {statistics.median(gains):+.2f} dB "
            f"({min(gains):+.2f}, {max(gains):+.2f}) | {max(b[k]['drop'] for k in keys):.2f} -> "
            f"{max(a[k]['drop'] for k in keys):.2f} | {statistics.median(b[k]['drop'] for k in keys):.2f} -> "
            f"{statistics.median(a[k]['drop'] for k in keys):.2f} | {min(top1):+.2f}, {max(top1):+.2f} |"
        )
    header = (
        f"| scheme | SQNR higher: {method} | median dSQNR (min, max) | worst drop {other} -> {method} "
        f"| median drop | top-1 change (min, max) |\n|---|---|---|---|---|---|"
    )
    return header + "\n" + "\n".join(lines) if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--recipes", nargs="+", default=POPULATION_RECIPES, choices=sorted(RECIPES))
    parser.add_argument("--schemes", nargs="+", default=SCHEMES, choices=SCHEMES)
    parser.add_argument("--configs", nargs="+", default=["default"], choices=sorted(CONFIGS))
    parser.add_argument("--peers", nargs="+", default=DEFAULT_PEERS, help="peer names (peers.py), or 'none'")
    parser.add_argument("--output", default="ptq_population", help="result file name in benchmarks/results")
    parser.add_argument(
        "--torch-eval", action="store_true", help="measure ours in eval mode (the integer model) instead of exporting"
    )
    parser.add_argument("--resume", action="store_true", help="keep the checkpoints already in the result file")
    parser.add_argument(
        "--markdown", action="store_true", help="print the result file's tables and target checks, and exit"
    )
    args = parser.parse_args()
    if args.markdown:
        rows = json.loads((RESULTS / f"{args.output}.json").read_text())["rows"]
        print(markdown_table(rows))
        for population in (rows, quantizable(rows)):
            stats = summary(population)[1]
            print(f"\n{len({(r['model'], r['recipe']) for r in population})} checkpoints:")
            print(markdown_summary(stats))
            print(versus_peers(population, stats))
        if "signed" in args.configs:
            print("\nunsigned (edgequant) against all-int8 (edgequant signed) activations:")
            print(paired(rows, "edgequant", "edgequant signed"))
        return
    peers: dict = {}
    if args.peers != ["none"]:
        from peers import PEERS, UNAVAILABLE

        for name in args.peers:
            if name in PEERS:
                peers[name] = PEERS[name]
            else:
                print(f"peer {name!r} not available here: {UNAVAILABLE.get(name, 'unknown peer')}", flush=True)
    command = " ".join(["python", *sys.argv])
    rows: list[dict] = []
    result_file = RESULTS / f"{args.output}.json"
    if args.resume and result_file.exists():
        rows = json.loads(result_file.read_text())["rows"]
    done = {(r["model"], r["recipe"]) for r in rows}
    for name in args.models:
        for recipe in args.recipes:
            if (name, recipe) in done:
                continue
            start = time.perf_counter()
            checkpoint = run_checkpoint(name, recipe, args, peers)
            rows.extend(checkpoint)
            print(
                f"\n## {name} @ {recipe} (float top-1 {checkpoint[0]['top1']:.2f}, "
                f"int16 SQNR {checkpoint[0]['int16_sqnr_db']:.1f} dB; "
                f"{time.perf_counter() - start:.0f} s)\n{checkpoint_table(checkpoint)}",
                flush=True,
            )
            save(args.output, command, rows)
    sensitive = sorted(
        f"{r['model']}@{r['recipe']} ({r['int16_sqnr_db']:.1f} dB)"
        for r in rows
        if r["method"] == "float" and r.get("int16_sqnr_db", np.inf) < QUANTIZABLE_DB
    )
    text, stats = summary(rows)
    print(f"\n## summary over all {len({(r['model'], r['recipe']) for r in rows})} checkpoints\n{text}")
    print(f"\n## targets, all checkpoints\n{versus_peers(rows, stats)}")
    subset = quantizable(rows)
    sub_text, sub_stats = summary(subset)
    print(
        f"\n## summary over the {len({(r['model'], r['recipe']) for r in subset})} checkpoints with int16 SQNR >= "
        f"{QUANTIZABLE_DB:g} dB (left out: {', '.join(sensitive) or 'none'})\n{sub_text}"
    )
    print(f"\n## targets, those checkpoints\n{versus_peers(subset, sub_stats)}")
    for stat in stats:
        stat["population"] = "all"
    for stat in sub_stats:
        stat["population"] = f"int16 >= {QUANTIZABLE_DB:g} dB"
    summary_file = save(args.output + "_summary", command, stats + sub_stats)
    print(f"\nresults: {save(args.output, command, rows)}, {summary_file}")


if __name__ == "__main__":
    main()

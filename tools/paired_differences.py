"""Differences to a baseline paired by seed, of final values and of validation-loss curves, and their drawing.

One implementation for tools/compare_runs.py and the study tools. A gap of 0.01 between two arms is invisible on
a loss axis that spans the first steps (8 down to 4.7), and the seed-to-seed spread of each arm is several times
that gap; but the runs of one seed see the same batches, so the difference seed by seed removes the common part
and shows the gap with its real uncertainty.

A curve is a pair of lists (tokens, validation losses) at a run's evaluations; a set of runs is a dict from seed
(or any key shared with the baseline's runs) to its value or curve.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

Curve = tuple[Sequence[float], Sequence[float]]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none); NaNs are left out."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def t_quantile_975(dof: int) -> float:
    """Student's t 97.5% quantile (two-sided 95%)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, dof))
    except ImportError:  # scipy comes with scikit-learn; a table for the few pairs a study has, else normal
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
        return table.get(dof, 1.96)


def seed_pairs(method: Mapping[Any, Any], baseline: Mapping[Any, Any]) -> list[tuple[Any, Any]]:
    """(method key, baseline key) for the seeds both have; with none shared, one run against one run is paired
    anyway, so two single runs of different seeds still compare (their difference then carries data-order noise)."""
    shared = sorted(set(method) & set(baseline))
    if shared:
        return [(seed, seed) for seed in shared]
    if len(method) == 1 and len(baseline) == 1:
        return [(next(iter(method)), next(iter(baseline)))]
    return []


def paired_difference(method: Mapping[Any, float], baseline: Mapping[Any, float]) -> dict[str, float]:
    """Seed-by-seed differences method - baseline of one number per run: mean, sd, n and a 95% CI."""
    diffs = [method[m] - baseline[b] for m, b in seed_pairs(method, baseline)
             if not math.isnan(method[m]) and not math.isnan(baseline[b])]
    mean, sd = mean_std(diffs)
    half = t_quantile_975(len(diffs) - 1) * sd / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return {"mean": mean, "sd": sd, "pairs": len(diffs), "ci_low": mean - half, "ci_high": mean + half}


def common_tokens(curves: Sequence[Curve]) -> list[float]:
    """The token counts at which every curve was evaluated, ascending."""
    if not curves:
        return []
    shared = set(curves[0][0])
    for tokens, _ in curves[1:]:
        shared &= set(tokens)
    return sorted(shared)


def curve_difference(method: Mapping[Any, Curve], baseline: Mapping[Any, Curve]) -> dict | None:
    """method - baseline validation loss at the evaluations both runs of every seed pair reached.

    Per point: mean, sample sd (0 for one pair), min and max over the pairs; `final` is the last common point.
    None when no seed pairs or no common evaluation."""
    pairs = seed_pairs(method, baseline)
    tokens = common_tokens([method[m] for m, _ in pairs] + [baseline[b] for _, b in pairs])
    if not tokens:
        return None
    per_seed = {}
    for m, b in pairs:
        at_method, at_baseline = dict(zip(*method[m])), dict(zip(*baseline[b]))
        per_seed[m] = [at_method[t] - at_baseline[t] for t in tokens]
    columns = list(zip(*per_seed.values()))  # one tuple of per-pair differences per token count
    stats = [mean_std(column) for column in columns]
    out = {"pairs": len(pairs), "seeds": list(per_seed), "tokens": tokens, "per_seed": per_seed,
           "mean": [m for m, _ in stats], "sd": [s for _, s in stats],
           "min": [min(c) for c in columns], "max": [max(c) for c in columns]}
    out["final"] = {key: out[key][-1] for key in ("tokens", "mean", "sd", "min", "max")} | {"pairs": len(pairs)}
    return out


def band(difference: Mapping[str, Sequence[float]], kind: str) -> tuple[list[float], list[float]]:
    """Lower and upper edge: mean ± sd ("sd") or the pairs' min and max ("range")."""
    if kind == "sd":
        return ([m - s for m, s in zip(difference["mean"], difference["sd"])],
                [m + s for m, s in zip(difference["mean"], difference["sd"])])
    if kind == "range":
        return list(difference["min"]), list(difference["max"])
    raise ValueError(f"band {kind!r}: expected 'sd' or 'range'")


def tail_limits(series: Sequence[tuple[Sequence[float], Sequence[float]]], skip: float = 0.2,
                include: Sequence[float] = ()) -> tuple[float, float] | None:
    """y-limits covering every series from `skip` of the largest x on, plus `include`, with a 5% margin: the first
    steps' losses would otherwise set the scale and flatten the part where runs differ."""
    end = max((max(x) for x, _ in series if len(x)), default=None)
    if end is None:
        return None
    values = [y for x, ys in series for t, y in zip(x, ys) if t >= skip * end and math.isfinite(y)] + list(include)
    if not values:
        return None
    low, high = min(values), max(values)
    margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.01
    return low - margin, high + margin


def draw_curves(ax, curves: Mapping[str, Mapping[Any, Curve]], colors: Mapping[str, str],
                spread: bool = True, extra: Sequence[Curve] = ()) -> None:
    """Validation loss per config (mean over its seeds at their common evaluations, with the seeds' range when
    `spread`), y-range over the last 80% of training; `extra` curves (e.g. training loss) count for the range."""
    drawn: list[Curve] = list(extra)
    for name, runs in curves.items():
        tokens = common_tokens(list(runs.values()))
        if not tokens:
            continue
        at = [dict(zip(*curve)) for curve in runs.values()]
        values = [[a[t] for a in at] for t in tokens]
        mean = [statistics.fmean(v) for v in values]
        label = f"{name} validation" + (f", mean of {len(runs)} seeds" if len(runs) > 1 else "")
        ax.plot(tokens, mean, "o-", ms=3, color=colors[name], label=label)
        drawn.append((tokens, mean))
        if spread and len(runs) > 1:
            low, high = [min(v) for v in values], [max(v) for v in values]
            ax.fill_between(tokens, low, high, color=colors[name], alpha=0.2, lw=0)
            drawn += [(tokens, low), (tokens, high)]
    limits = tail_limits(drawn)
    if limits:
        ax.set_ylim(*limits)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    ax.set_title("loss (y-range: the last 80% of training)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def draw_differences(ax, differences: Mapping[str, dict], baseline: str, colors: Mapping[str, str],
                     kind: str = "sd") -> None:
    """One line per config: mean of its seed-paired differences to the baseline, a band (`kind`, see `band`) where
    there are several pairs, and the zero line (the baseline itself); y-range over the last 80% of training."""
    ax.axhline(0.0, color="k", lw=1.0, label=f"{baseline} (baseline)")
    drawn: list[Curve] = []
    for name, d in differences.items():
        final = d["final"]
        spread = f" ± {final['sd']:.4f} sd" if kind == "sd" else f" [{final['min']:+.4f}, {final['max']:+.4f}]"
        pairs = f"{d['pairs']} seed pairs" if d["pairs"] > 1 else "1 run each"
        label = f"{name}: final {final['mean']:+.4f}" + (spread if d["pairs"] > 1 else "") + f", {pairs}"
        ax.plot(d["tokens"], d["mean"], "o-", ms=3, color=colors[name], label=label)
        drawn.append((d["tokens"], d["mean"]))
        if d["pairs"] > 1:
            low, high = band(d, kind)
            ax.fill_between(d["tokens"], low, high, color=colors[name], alpha=0.15, lw=0)
            drawn += [(d["tokens"], low), (d["tokens"], high)]
    limits = tail_limits(drawn, include=[0.0])
    if limits:
        ax.set_ylim(*limits)
    what = "±1 sd" if kind == "sd" else "min to max"
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(f"validation loss minus {baseline}'s")
    ax.set_title(f"minus {baseline}, paired by seed (mean, band {what} over pairs; y: last 80%)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

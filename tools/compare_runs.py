"""Compare training runs, or configs over seeds: validation loss against tokens, a table, and method vs baseline.

    python tools/compare_runs.py runs/tiny_structmoe runs/tiny_moe_matched --output compare.png
    python tools/compare_runs.py runs/study --baseline tiny_moe_matched --output study.png   # a sweep folder

A RUN_DIR is a run's folder (holding logs/metrics.jsonl and its checkpoints) or its log folder. A folder holding
`tools/sweep.py`'s NAME_sSEED run folders stands for all of them. Runs named NAME_sSEED are grouped by NAME:
mean and sample standard deviation of the final and best validation loss over the seeds, tokens/s and training
time beside them, and a band (the seeds' range) around the mean curve on the plot. With `--baseline NAME`, every
other config that shares seeds with it gets the paired difference of final validation loss (config minus
baseline, seed by seed) with a 95% confidence interval (Student's t over the pairs). The numbers also go to a
JSON file beside the PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config.schema import NeoXArgs  # noqa: E402
from megatron.sizing.params import count_parameters  # noqa: E402


def find_metrics(run_dir: Path) -> Path:
    for candidate in (run_dir / "metrics.jsonl", run_dir / "logs" / "metrics.jsonl"):
        if candidate.is_file() and candidate.stat().st_size:
            return candidate
    raise FileNotFoundError(f"{run_dir}: no non-empty metrics.jsonl (looked in {run_dir} and {run_dir / 'logs'})")


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_config(run_dir: Path) -> Path | None:
    """The resolved config.yml of the run's newest checkpoint, if there is one."""
    for folder in (run_dir, run_dir.parent):
        steps = sorted(folder.glob("global_step*/config.yml"), key=lambda p: int(p.parent.name[len("global_step"):]))
        if steps:
            return steps[-1]
    return None


def ema(values: list[float], smoothing: float) -> list[float]:
    out, current = [], None
    for v in values:
        current = v if current is None else smoothing * current + (1 - smoothing) * v
        out.append(current)
    return out


def summarize(run_dir: Path) -> dict:
    records = read_records(find_metrics(run_dir))
    train = [r for r in records if "loss" in r and "tokens" in r]
    evals = [r for r in records if "val/loss" in r]
    tokens_at = {r["step"]: r["tokens"] for r in train}
    tokens_per_step = train[-1]["tokens"] / train[-1]["step"] if train else 0
    config_name, seed = name_and_seed(run_dir)
    summary = {
        "name": run_dir.name if run_dir.name != "logs" else run_dir.parent.name,
        "config": config_name,
        "seed": seed,
        "train": ([r["tokens"] for r in train], [r["loss"] for r in train]),
        "val": ([tokens_at.get(r["step"], r["step"] * tokens_per_step) for r in evals], [r["val/loss"] for r in evals]),
        "final_val": evals[-1]["val/loss"] if evals else math.nan,
        "best_val": min((r["val/loss"] for r in evals), default=math.nan),
        "tokens_per_sec": sum(r["tokens_per_sec"] for r in train) / len(train) if train else math.nan,
        # training time as the interval records saw it (tokens / tokens per second), evaluation excluded
        "train_seconds": sum((b["tokens"] - a["tokens"]) / b["tokens_per_sec"] for a, b in zip([{"tokens": 0}]
                             + train[:-1], train) if b.get("tokens_per_sec")) if train else math.nan,
        "total": None,
        "active": None,
    }
    config = find_config(run_dir)
    if config is not None:
        import yaml

        counts = count_parameters(NeoXArgs.from_dict(yaml.safe_load(config.read_text())))
        summary["total"], summary["active"] = counts.total, counts.active
    return summary


RUN_NAME = re.compile(r"^(?P<name>.+)_s(?P<seed>\d+)$")


def expand(paths: list[Path]) -> list[Path]:
    """Run folders: each path itself, or the NAME_sSEED run folders inside a sweep folder."""
    runs = []
    for path in paths:
        children = sorted(p for p in path.iterdir() if p.is_dir() and RUN_NAME.match(p.name)) if path.is_dir() else []
        has_metrics = any((path / sub / "metrics.jsonl").is_file() for sub in ("", "logs"))
        runs += [path] if has_metrics or not children else children
    return runs


def name_and_seed(run_dir: Path) -> tuple[str, int | None]:
    name = run_dir.name if run_dir.name != "logs" else run_dir.parent.name
    match = RUN_NAME.match(name)
    return (match["name"], int(match["seed"])) if match else (name, None)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
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


def paired_difference(method: dict[int, float], baseline: dict[int, float]) -> dict[str, float]:
    """Seed-by-seed differences method - baseline over the seeds both have: mean, sd, n and a 95% CI."""
    diffs = [method[s] - baseline[s] for s in sorted(set(method) & set(baseline))
             if not math.isnan(method[s]) and not math.isnan(baseline[s])]
    mean, sd = mean_std(diffs)
    half = t_quantile_975(len(diffs) - 1) * sd / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return {"mean": mean, "sd": sd, "pairs": len(diffs), "ci_low": mean - half, "ci_high": mean + half}


def group(summaries: list[dict], baseline: str | None) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        groups.setdefault(s["config"], []).append(s)
    if baseline is not None and baseline not in groups:
        raise ValueError(f"--baseline {baseline}: not among the configs {sorted(groups)}")
    out = {}
    for name, runs in groups.items():
        final = {s["seed"] if s["seed"] is not None else i: s["final_val"] for i, s in enumerate(runs)}
        entry = {
            "seeds": sorted(s["seed"] for s in runs if s["seed"] is not None),
            "final_val": dict(zip(("mean", "sd"), mean_std(list(final.values())))),
            "best_val": dict(zip(("mean", "sd"), mean_std([s["best_val"] for s in runs]))),
            "tokens_per_sec": mean_std([s["tokens_per_sec"] for s in runs])[0],
            "train_seconds": mean_std([s["train_seconds"] for s in runs])[0],
            "final_val_per_seed": final,
            "total": runs[0]["total"], "active": runs[0]["active"],
        }
        if baseline is not None and name != baseline:
            base = {s["seed"]: s["final_val"] for s in groups[baseline] if s["seed"] is not None}
            entry["minus_baseline"] = paired_difference({k: v for k, v in final.items() if k in base}, base)
        out[name] = entry
    return out


def plot(summaries: list[dict], groups: dict[str, dict], smooth: float, output: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, name in enumerate(groups):
        runs = [s for s in summaries if s["config"] == name]
        color = f"C{i % 10}"
        if len(runs) == 1:
            s = runs[0]
            ax.plot(s["train"][0], ema(s["train"][1], smooth), color=color, alpha=0.35, label=f"{name} train (EMA)")
            ax.plot(s["val"][0], s["val"][1], "o-", color=color, label=f"{name} validation")
            continue
        points = min(len(s["val"][1]) for s in runs)  # the evaluations every seed reached
        x = runs[0]["val"][0][:points]
        curves = [s["val"][1][:points] for s in runs]
        mean = [statistics.fmean(c[j] for c in curves) for j in range(points)]
        ax.plot(x, mean, "o-", color=color, label=f"{name} validation, mean of {len(runs)} seeds")
        ax.fill_between(x, [min(c[j] for c in curves) for j in range(points)],
                        [max(c[j] for c in curves) for j in range(points)], color=color, alpha=0.2)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, or sweep folders of NAME_sSEED runs")
    parser.add_argument("--baseline", default=None, help="config name the others are paired against, seed by seed")
    parser.add_argument("--output", default="compare.png")
    parser.add_argument("--smooth", type=float, default=0.6,
                        help="EMA factor for the training loss records (0 = raw; high values lag behind)")
    opts = parser.parse_args(argv)
    try:
        summaries = [summarize(run) for run in expand(opts.runs)]
        groups = group(summaries, opts.baseline)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"compare_runs: {err}")
    plot(summaries, groups, opts.smooth, opts.output)
    Path(opts.output).with_suffix(".json").write_text(json.dumps(groups, indent=1))

    def millions(n):
        return "-" if n is None else f"{n / 1e6:.2f}M"

    header = f"{'run':<28}{'final val':>10}{'best val':>10}{'final ppl':>11}{'total':>10}{'active':>10}{'tokens/s':>10}"
    print(header)
    print("-" * len(header))
    for s in summaries:
        ppl = math.exp(s["final_val"]) if not math.isnan(s["final_val"]) else math.nan
        print(f"{s['name']:<28}{s['final_val']:>10.4f}{s['best_val']:>10.4f}{ppl:>11.2f}"
              f"{millions(s['total']):>10}{millions(s['active']):>10}{s['tokens_per_sec']:>10.0f}")
    if any(len(g["final_val_per_seed"]) > 1 for g in groups.values()):
        print()
        print(f"{'config':<28}{'seeds':>6}{'final val':>18}{'best val':>18}{'tokens/s':>10}{'train s':>9}"
              + (f"{'minus ' + opts.baseline + ' (95% CI)':>44}" if opts.baseline else ""))
        for name, g in groups.items():
            line = (f"{name:<28}{len(g['final_val_per_seed']):>6}{g['final_val']['mean']:>11.4f} ± "
                    f"{g['final_val']['sd']:.4f}{g['best_val']['mean']:>11.4f} ± {g['best_val']['sd']:.4f}"
                    f"{g['tokens_per_sec']:>10.0f}{g['train_seconds']:>9.0f}")
            d = g.get("minus_baseline")
            if d:
                line += f"{d['mean']:>+16.4f} ({d['ci_low']:+.4f}, {d['ci_high']:+.4f}), {d['pairs']} pairs"
            print(line)
    print(f"plot: {opts.output}")
    return summaries


if __name__ == "__main__":
    main()

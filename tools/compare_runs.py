"""Compare training runs, or configs over seeds: validation loss against tokens, its difference to a baseline, a
table, and method vs baseline.

    python tools/compare_runs.py runs/tiny_structmoe runs/tiny_moe_matched --output compare.png
    python tools/compare_runs.py runs/study --baseline tiny_moe_matched --output study.png   # a sweep folder
    python tools/compare_runs.py --group base=runs/a1,runs/a2 --group method=runs/b1,runs/b2 --output ab.png

A RUN_DIR is a run's folder (holding logs/metrics.jsonl and its checkpoints) or its log folder. A folder holding
`tools/sweep.py`'s NAME_sSEED run folders stands for all of them. Runs named NAME_sSEED are grouped by NAME, and
`--group NAME=DIR,...` groups any folders (their seeds from their checkpoints' configs): mean and sample standard
deviation of the final and best validation loss over the seeds, tokens/s and training time beside them.

The baseline is `--baseline NAME`, else the first config given. The plot's left panel has the curves (a band of
the seeds' range around a config's mean, y-range over the last 80% of training); its right panel has every other
config's validation loss minus the baseline's, seed by seed at the evaluations both reached, as the mean over
seeds with a band (±1 sd, or min to max with `--band range`) and a zero line: the gap between two configs is
usually far smaller than the loss's fall over training. One run against one run of another seed is paired too.
The JSON beside the PNG has, per config, the paired difference of the final validation loss with a 95%
confidence interval (Student's t over the pairs; `minus_baseline`), the per-seed validation curves and the
paired curve difference (`curve_minus_baseline`, its last common evaluation under `final`).

`--tasks TASK[/METRIC],...` adds downstream scores (docs/evaluation.md): a run's last `lm_eval/TASK/METRIC` record
in metrics.jsonl (`eval_tasks` during training), or RUN/eval_tasks.json written by `tools/eval_tasks.py CKPT
--output RUN/eval_tasks.json`, which wins. A bare TASK means each of its metrics. Per config and metric: mean and
sd over the seeds and, against the baseline, the paired difference with its 95% interval (the computation of the
loss's `minus_baseline`), under `tasks` in the JSON, in a table, and in OUTPUT_tasks.png.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config.schema import NeoXArgs  # noqa: E402
from megatron.evaluation.lm_eval_tasks import task_metrics  # noqa: E402
from megatron.sizing.params import count_parameters  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_differences import (  # noqa: E402
    curve_difference,
    draw_curves,
    draw_differences,
    mean_std,
    paired_difference,
    seed_pairs,
)


def find_metrics(run_dir: Path) -> Path:
    for candidate in (run_dir / "metrics.jsonl", run_dir / "logs" / "metrics.jsonl"):
        if candidate.is_file() and candidate.stat().st_size:
            return candidate
    raise FileNotFoundError(f"{run_dir}: no non-empty metrics.jsonl (looked in {run_dir} and {run_dir / 'logs'})")


def read_records(path: Path) -> list[dict]:
    """One JSON object per line. A run killed in the middle of a long record leaves a damaged line, which the
    resumed run's records follow: such lines are skipped with one warning naming them, never silently."""
    records, damaged = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            damaged.append(number)
    if damaged and not records:
        raise ValueError(f"{path}: no JSON records (line {damaged[0]} is not one); expected one JSON object per "
                         "line, as train.py writes metrics.jsonl")
    if damaged:
        print(f"warning: {path}: skipped {len(damaged)} damaged line(s), the first at line {damaged[0]} (a run killed "
              "while writing a record)", file=sys.stderr)
    return records


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
        "tasks": task_scores(run_dir, records),
    }
    config = find_config(run_dir)
    if config is not None:
        import yaml

        resolved = yaml.safe_load(config.read_text())
        counts = count_parameters(NeoXArgs.from_dict(resolved))
        summary["total"], summary["active"] = counts.total, counts.active
        if seed is None:  # a folder not named NAME_sSEED: the seed its checkpoint was trained with
            summary["seed"] = resolved.get("seed")
    return summary


def task_scores(run_dir: Path, records: list[dict]) -> dict[str, float]:
    """{TASK/METRIC: score}: the last `lm_eval/TASK/METRIC` of the run's records, then RUN/eval_tasks.json's."""
    scores = {key.removeprefix("lm_eval/"): value for record in records for key, value in record.items()
              if key.startswith("lm_eval/") and key != "lm_eval/seconds" and isinstance(value, (int, float))}
    for folder in (run_dir, run_dir.parent):
        path = folder / "eval_tasks.json"
        if path.is_file():
            try:
                scores.update(task_metrics(json.loads(path.read_text())))
            except (json.JSONDecodeError, AttributeError) as err:
                raise ValueError(f"{path}: not the JSON tools/eval_tasks.py writes ({err})") from None
            break
    return scores


def wanted_metrics(summaries: list[dict], tasks: list[str]) -> list[str]:
    """The TASK/METRIC names `--tasks` asks for: a name with a metric as it is, a bare task each metric any run
    has for it; a task no run has is an error naming it."""
    found = sorted({metric for s in summaries for metric in s["tasks"]})
    wanted = []
    for task in tasks:
        matches = [m for m in found if m == task or m.startswith(f"{task}/")]
        if not matches:
            raise ValueError(f"--tasks {task}: no run has it (expected lm_eval/{task}/METRIC records in metrics.jsonl "
                             f"or an eval_tasks.json; the runs have {', '.join(found) or 'no task scores'})")
        wanted += [m for m in matches if m not in wanted]
    return wanted


def group_tasks(summaries: list[dict], groups: dict[str, dict], baseline: str, metrics: list[str]) -> None:
    """Adds `tasks` to each config's entry: per metric the seeds' mean and sd, per-seed scores and, against the
    baseline, the seed-paired difference with its 95% interval."""
    per_config: dict[str, list[dict]] = {}
    for s in summaries:
        per_config.setdefault(s["config"], []).append(s)
    for name, runs in per_config.items():
        entry = {}
        for metric in metrics:
            scores = {run_key(s, i): s["tasks"].get(metric, math.nan) for i, s in enumerate(runs)}
            mean, sd = mean_std(list(scores.values()))
            entry[metric] = {"mean": mean, "sd": sd, "per_seed": scores}
            if name != baseline:
                base = {run_key(s, i): s["tasks"].get(metric, math.nan) for i, s in enumerate(per_config[baseline])}
                entry[metric]["minus_baseline"] = paired_difference(scores, base)
        groups[name]["tasks"] = entry


def plot_tasks(groups: dict[str, dict], baseline: str, metrics: list[str], output: Path) -> None:
    """One panel per task metric (each on its own scale): each config's score minus the baseline's, paired by
    seed, as the mean with its 95% interval (two pairs or more) and the pairs as ticks, and the zero line."""
    others = [name for name in groups if name != baseline] or [baseline]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 0.4 + (0.35 * len(others) + 0.6) * len(metrics)),
                             squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        for y, name in enumerate(others):
            color = f"C{list(groups).index(name) % 10}"
            d = groups[name]["tasks"][metric].get("minus_baseline")
            if d is None:  # the baseline alone: nothing to pair
                continue
            error = [[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]] if d["pairs"] > 1 else None
            ax.errorbar(d["mean"], y, xerr=error, fmt="o", color=color, capsize=3)
            scores, base = groups[name]["tasks"][metric]["per_seed"], groups[baseline]["tasks"][metric]["per_seed"]
            pairs = seed_pairs(scores, base)
            ax.plot([scores[m] - base[b] for m, b in pairs], [y] * len(pairs), "|", color=color, ms=10, alpha=0.6)
        ax.axvline(0.0, color="k", lw=1.0)
        ax.set_yticks(range(len(others)), others, fontsize=8)
        ax.set_ylim(len(others) - 0.5, -0.5)
        ax.set_title(f"{metric} minus {baseline}'s", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[-1, 0].set_xlabel("paired by seed: mean with 95% interval; ticks: the seed pairs")
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def print_tasks(groups: dict[str, dict], baseline: str, metrics: list[str]) -> None:
    print(f"\ndownstream tasks: mean ± sd over seeds; minus {baseline}'s, paired by seed (95% CI)")
    print(f"{'task/metric':<40}{'config':<24}{'seeds':>6}{'score':>20}{'minus ' + baseline:>44}")
    for metric in metrics:
        for name, g in groups.items():
            t = g["tasks"][metric]
            line = (f"{metric:<40}{name:<24}{sum(not math.isnan(v) for v in t['per_seed'].values()):>6}"
                    f"{t['mean']:>11.4f} ± {t['sd']:.4f}")
            d = t.get("minus_baseline")
            if d:
                line += f"{d['mean']:>+16.4f} ({d['ci_low']:+.4f}, {d['ci_high']:+.4f}), {d['pairs']} pairs"
            print(line)


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


def run_key(summary: dict, index: int) -> int:
    """A run's key within its config: its seed, else its position (runs without a known seed pair by position)."""
    return summary["seed"] if summary["seed"] is not None else index


def group(summaries: list[dict], baseline: str | None) -> dict[str, dict]:
    """Per config: the seeds' statistics and validation curves; against `baseline`, the paired difference of the
    final validation loss (with a t-interval) and of the validation curves (`curve_minus_baseline`)."""
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        groups.setdefault(s["config"], []).append(s)
    if baseline is not None and baseline not in groups:
        raise ValueError(f"--baseline {baseline}: not among the configs {sorted(groups)}")
    curves = {name: {run_key(s, i): s["val"] for i, s in enumerate(runs)} for name, runs in groups.items()}
    out = {}
    for name, runs in groups.items():
        final = {run_key(s, i): s["final_val"] for i, s in enumerate(runs)}
        entry = {
            "seeds": sorted(s["seed"] for s in runs if s["seed"] is not None),
            "final_val": dict(zip(("mean", "sd"), mean_std(list(final.values())))),
            "best_val": dict(zip(("mean", "sd"), mean_std([s["best_val"] for s in runs]))),
            "tokens_per_sec": mean_std([s["tokens_per_sec"] for s in runs])[0],
            "train_seconds": mean_std([s["train_seconds"] for s in runs])[0],
            "final_val_per_seed": final,
            "total": runs[0]["total"], "active": runs[0]["active"],
            "val_curve_per_seed": {key: [list(tokens), list(losses)] for key, (tokens, losses) in curves[name].items()},
        }
        if baseline is not None and name != baseline:
            base = {run_key(s, i): s["final_val"] for i, s in enumerate(groups[baseline])}
            entry["minus_baseline"] = paired_difference(final, base)
            difference = curve_difference(curves[name], curves[baseline])
            if difference is not None:
                entry["curve_minus_baseline"] = {"baseline": baseline, **difference}
        out[name] = entry
    return out


def plot(summaries: list[dict], groups: dict[str, dict], baseline: str, smooth: float, output: str,
         band: str = "sd") -> None:
    """Left: the curves (validation per config, training EMA per single run); right: each config's validation loss
    minus the baseline's, paired by seed."""
    colors = {name: f"C{i % 10}" for i, name in enumerate(groups)}
    fig, (ax_curves, ax_diff) = plt.subplots(1, 2, figsize=(14, 5))
    train_curves = []
    for name in groups:
        runs = [s for s in summaries if s["config"] == name]
        if len(runs) == 1 and runs[0]["train"][0]:
            tokens, losses = runs[0]["train"][0], ema(runs[0]["train"][1], smooth)
            ax_curves.plot(tokens, losses, color=colors[name], alpha=0.35, label=f"{name} train (EMA)")
            train_curves.append((tokens, losses))
    val_curves = {name: g["val_curve_per_seed"] for name, g in groups.items()}
    draw_curves(ax_curves, val_curves, colors, extra=train_curves)
    differences = {name: g["curve_minus_baseline"] for name, g in groups.items() if "curve_minus_baseline" in g}
    if differences:
        draw_differences(ax_diff, differences, baseline, colors, kind=band)
    else:
        ax_diff.text(0.5, 0.5, "no other config shares evaluations with the baseline", ha="center",
                     transform=ax_diff.transAxes)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def parse_group(text: str) -> tuple[str, list[Path]]:
    """`NAME=DIR,DIR,...` of --group."""
    name, sep, folders = text.partition("=")
    if not sep or not name or not folders:
        raise argparse.ArgumentTypeError(f"--group {text}: expected NAME=DIR,DIR,...")
    return name, [Path(f) for f in folders.split(",") if f]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run folders, or sweep folders of NAME_sSEED runs")
    parser.add_argument("--group", action="append", type=parse_group, default=[], metavar="NAME=DIR,DIR,...",
                        help="runs of one config under NAME (seeds from NAME_sSEED folder names, else checkpoints)")
    parser.add_argument("--baseline", default=None,
                        help="config the others are paired against, seed by seed (default: the first one given)")
    parser.add_argument("--band", choices=("sd", "range"), default="sd",
                        help="band around the mean paired difference: ±1 sd or min to max over the seeds")
    parser.add_argument("--output", default="compare.png")
    parser.add_argument("--smooth", type=float, default=0.6,
                        help="EMA factor for the training loss records (0 = raw; high values lag behind)")
    parser.add_argument("--tasks", default=None, metavar="TASK[/METRIC],...",
                        help="downstream scores to compare (lm_eval/TASK/METRIC records, or RUN/eval_tasks.json)")
    opts = parser.parse_args(argv)
    if not opts.runs and not opts.group:
        parser.error("give run folders, sweep folders or --group NAME=DIR,...")
    try:
        summaries = [summarize(run) for run in expand(opts.runs)]
        for name, folders in opts.group:
            summaries += [summarize(run) | {"config": name} for run in expand(folders)]
        baseline = opts.baseline or summaries[0]["config"]
        groups = group(summaries, baseline)
        metrics = wanted_metrics(summaries, [t.strip() for t in opts.tasks.split(",") if t.strip()]) if opts.tasks \
            else []
        if metrics:
            group_tasks(summaries, groups, baseline, metrics)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"compare_runs: {err}")
    plot(summaries, groups, baseline, opts.smooth, opts.output, opts.band)
    if metrics:
        tasks_plot = Path(opts.output).with_name(Path(opts.output).stem + "_tasks.png")
        plot_tasks(groups, baseline, metrics, tasks_plot)
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
              + f"{'minus ' + baseline + ' (95% CI)':>44}")
        for name, g in groups.items():
            line = (f"{name:<28}{len(g['final_val_per_seed']):>6}{g['final_val']['mean']:>11.4f} ± "
                    f"{g['final_val']['sd']:.4f}{g['best_val']['mean']:>11.4f} ± {g['best_val']['sd']:.4f}"
                    f"{g['tokens_per_sec']:>10.0f}{g['train_seconds']:>9.0f}")
            d = g.get("minus_baseline")
            if d:
                line += f"{d['mean']:>+16.4f} ({d['ci_low']:+.4f}, {d['ci_high']:+.4f}), {d['pairs']} pairs"
            print(line)
    differences = {name: g["curve_minus_baseline"]["final"] for name, g in groups.items()
                   if "curve_minus_baseline" in g}
    if differences:
        print(f"\nvalidation loss minus {baseline}'s at the last evaluation both reached, paired by seed")
        print(f"{'config':<28}{'tokens':>10}{'pairs':>6}{'mean':>10}{'sd':>9}{'min':>10}{'max':>10}")
        for name, d in differences.items():
            print(f"{name:<28}{d['tokens']:>10.0f}{d['pairs']:>6}{d['mean']:>+10.4f}{d['sd']:>9.4f}"
                  f"{d['min']:>+10.4f}{d['max']:>+10.4f}")
    if metrics:
        print_tasks(groups, baseline, metrics)
    print(f"plot: {opts.output}" + (f", {tasks_plot}" if metrics else ""))
    return summaries


if __name__ == "__main__":
    main()

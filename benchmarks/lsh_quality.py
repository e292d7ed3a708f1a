"""Does LSH compression cost quality, and does the compensation recover it? Plain MoE and StructMoE, each with
LSH off, on, and on without compensation, over seeds, on the bundled corpus (EP = 1: the same math as EP > 1).

    python benchmarks/lsh_quality.py                     # 2 models x 3 arms x 3 seeds, 2 runs at a time
    python benchmarks/lsh_quality.py --seeds 1 --jobs 1 --steps 200 --out runs/lsh_quick

Each run is `train.py configs/tiny_{moe,structmoe}.yml` with the arm's keys and `--seed`, in its own folder
under --out; a finished run (its final checkpoint exists) is skipped and an interrupted one resumes, so the
command can be run again after a stop. The LSH arms log the compression rate and, every log interval, the
layer-output error against the exact layer. At the end it prints final validation loss, mean +- standard
deviation over seeds, per arm, and the paired difference to LSH off on the same seeds, and writes a PNG
of validation loss and compression rate over training (--plot) and the numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))  # tools/sweep.py runs the config x seed grid
MODELS = {"moe": "configs/tiny_moe.yml", "structmoe": "configs/tiny_structmoe.yml"}
ARMS = {
    "off": [],
    "on": ["--lsh_compression", "true", "--lsh_error_interval", "20"],
    "no_compensation": ["--lsh_compression", "true", "--lsh_error_compensation", "false",
                        "--lsh_error_interval", "20"],
}


def run_dir(out: Path, model: str, arm: str, seed: int) -> Path:
    return out / f"{model}_{arm}_s{seed}"


def make_runs(opts: argparse.Namespace, seeds: list[int]) -> list:
    from sweep import make_run

    overrides = ["--train_iters", str(opts.steps), "--checkpoint_factor", str(min(200, opts.steps))]
    return [make_run(MODELS[model], seed, opts.out, [*ARMS[arm], *overrides], name=f"{model}_{arm}")
            for seed in seeds for arm in ARMS for model in MODELS]


def read_run(folder: Path) -> dict:
    records = [json.loads(line) for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines() if line]
    evals = {r["step"]: r["val/loss"] for r in records if "val/loss" in r}
    rates: dict[int, list[float]] = {}
    errors: dict[str, list[float]] = {"with": [], "without": []}
    for r in records:
        layer_rates = [v for k, v in r.items() if k.endswith("/lsh_compression_rate")]
        if layer_rates:
            rates[r["step"]] = layer_rates
        for name in errors:
            errors[name] += [v for k, v in r.items() if k.endswith(f"/lsh_error_{name}_compensation")]
    return {"val": evals, "rate": {s: sum(v) / len(v) for s, v in rates.items()}, "errors": errors}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(opts: argparse.Namespace, seeds: list[int]) -> dict:
    summary = {}
    for model in MODELS:
        base = {seed: read_run(run_dir(opts.out, model, "off", seed)) for seed in seeds}
        for arm in ARMS:
            runs = {seed: read_run(run_dir(opts.out, model, arm, seed)) for seed in seeds}
            finals = [runs[s]["val"][max(runs[s]["val"])] for s in seeds]
            diffs = [runs[s]["val"][max(runs[s]["val"])] - base[s]["val"][max(base[s]["val"])] for s in seeds]
            late = [r for s in seeds for step, r in runs[s]["rate"].items() if step > opts.steps // 2]
            summary[f"{model}/{arm}"] = {
                "final_val_loss": mean_std(finals), "paired_difference_to_off": mean_std(diffs),
                "compression_rate_second_half": statistics.mean(late) if late else None,
                "error_with_compensation": statistics.mean(e) if (e := [x for s in seeds for x in
                                                                       runs[s]["errors"]["with"]]) else None,
                "error_without_compensation": statistics.mean(e) if (e := [x for s in seeds for x in
                                                                          runs[s]["errors"]["without"]]) else None,
                "runs": runs,
            }
    return summary


def print_summary(summary: dict, seeds: list[int]) -> None:
    print(f"\nfinal validation loss over {len(seeds)} seeds (mean +- std); paired difference to LSH off, same seeds")
    print(f"{'model/arm':28s} {'val loss':>16s} {'vs off':>17s} {'rate':>7s} {'err w/ comp':>12s} {'err w/o':>8s}")
    for name, row in summary.items():
        (loss, spread), (diff, diff_spread) = row["final_val_loss"], row["paired_difference_to_off"]
        rate, with_c, without = (row[k] for k in ("compression_rate_second_half", "error_with_compensation",
                                                  "error_without_compensation"))
        fmt = (lambda v: "-" if v is None else f"{v:.3f}")
        print(f"{name:28s} {loss:8.4f} +- {spread:.4f} {diff:+8.4f} +- {diff_spread:.4f} {fmt(rate):>7s} "
              f"{fmt(with_c):>12s} {fmt(without):>8s}")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"off": "C0", "on": "C2", "no_compensation": "C3"}
    for name, row in summary.items():
        model, arm = name.split("/")
        runs = list(row["runs"].values())
        steps = sorted(set.intersection(*(set(r["val"]) for r in runs)))
        losses = [[r["val"][s] for r in runs] for s in steps]
        means = [statistics.mean(v) for v in losses]
        spreads = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in losses]
        ax = axes[0 if model == "moe" else 1]
        ax.plot(steps, means, color=colors[arm], label=f"LSH {arm}")
        ax.fill_between(steps, [m - s for m, s in zip(means, spreads)], [m + s for m, s in zip(means, spreads)],
                        color=colors[arm], alpha=0.2)
        ax.set(title=f"{model}: validation loss (mean +- std over seeds)", xlabel="step", ylabel="val loss")
        if arm != "off":
            rate_steps = sorted(set.intersection(*(set(r["rate"]) for r in runs)))
            axes[2].plot(rate_steps, [statistics.mean(r["rate"][s] for r in runs) for s in rate_steps],
                         color=colors[arm], linestyle="-" if model == "moe" else "--", label=f"{model}, {arm}")
    for ax in axes[:2]:
        ax.set_ylim(top=min(ax.get_ylim()[1], 6.0))
        ax.legend()
    axes[2].set(title="compression rate (centroids / rows), mean of layers", xlabel="step", ylabel="rate")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1234, 1235, ...")
    parser.add_argument("--steps", type=int, default=600, help="training steps per run (the configs' own: 600)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at the same time")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "lsh_study")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "lsh_quality.png")
    opts = parser.parse_args()
    seeds = [1234 + i for i in range(opts.seeds)]
    from sweep import run_all

    run_all(make_runs(opts, seeds), opts.jobs, cwd=REPO)
    summary = summarize(opts, seeds)
    print_summary(summary, seeds)
    plot(summary, opts.plot)
    opts.plot.with_suffix(".json").write_text(json.dumps(
        {k: {key: v for key, v in row.items() if key != "runs"} for k, row in summary.items()}, indent=1))
    print(f"wrote {opts.plot} and {opts.plot.with_suffix('.json')}")


if __name__ == "__main__":
    main()

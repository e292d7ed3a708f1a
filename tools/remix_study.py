"""Summarise a Remix-DiT sweep over seeds: final validation loss and Frechet distance per config (mean, spread,
differences paired by seed against a baseline), and the shape of the learned coefficient tables.

Shape legend: N experts (timestep intervals), K bases.

    python tools/remix_study.py runs/remix_study runs/remix_study_noprior --baseline dit_digits \
        --output docs/remix_study.png

Each folder holds `tools/sweep.py` run folders named NAME_sSEED. A config's name is NAME, or NAME@FOLDER when
two folders hold the same NAME (e.g. the same config swept with other overrides). Per config: the last
evaluation's `val/loss`, `val/fd` and per-interval `val/loss_t{i}` of every seed, their mean and sample
standard deviation, and the mean +- standard deviation of the difference to the baseline over the seeds both
have. Remix runs also load their final coefficient table (through `load_pretrained`) and report:
- neighbour ratio: the mean L1 distance between the rows of adjacent experts over the mean L1 distance between
  all pairs of rows (below 1: neighbouring intervals mix alike, the paper's pattern);
- peak near t=0 / near t=T: the mean largest coefficient of the first / last quarter of the experts (the
  paper: more one-hot near t = 0).
Numbers go to a JSON file beside the PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_runs import RUN_NAME  # noqa: E402
from paired_differences import mean_std, paired_difference  # noqa: E402  # one implementation of seed pairing


@dataclass
class SeedRun:
    seed: int
    folder: Path
    step: int
    val_loss: float
    fd: float | None
    interval_losses: list[float]
    coefficients_NK: np.ndarray | None = None


@dataclass
class ConfigRuns:
    name: str
    runs: dict[int, SeedRun] = field(default_factory=dict)

    def values(self, key: str) -> list[float]:
        return [getattr(run, key) for run in self.runs.values() if getattr(run, key) is not None]


def last_evaluation(metrics_path: Path) -> dict:
    """The last record carrying `val/loss` (the final evaluation of the run)."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    evaluations = [r for r in records if "val/loss" in r]
    if not evaluations:
        raise ValueError(f"{metrics_path}: no record with val/loss (did the run evaluate?)")
    return evaluations[-1]


def read_run(folder: Path, seed: int) -> SeedRun:
    metrics = folder / "logs" / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{folder}: no logs/metrics.jsonl")
    record = last_evaluation(metrics)
    intervals = sorted((int(k.removeprefix("val/loss_t")), v) for k, v in record.items()
                       if k.startswith("val/loss_t"))
    return SeedRun(seed, folder, int(record["step"]), float(record["val/loss"]), record.get("val/fd"),
                   [v for _, v in intervals])


def collect(folders: list[Path]) -> dict[str, ConfigRuns]:
    found: dict[str, list[tuple[Path, int, Path]]] = defaultdict(list)
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a folder")
        for run in sorted(folder.iterdir()):
            match = RUN_NAME.match(run.name)
            if match and (run / "logs" / "metrics.jsonl").is_file():
                found[match["name"]].append((folder, int(match["seed"]), run))
    configs: dict[str, ConfigRuns] = {}
    for name, entries in found.items():
        several = len({folder for folder, _, _ in entries}) > 1  # the same config swept in several folders
        for folder, seed, run in entries:
            label = f"{name}@{folder.name}" if several else name
            try:
                configs.setdefault(label, ConfigRuns(label)).runs[seed] = read_run(run, seed)
            except ValueError as err:  # a run still before its first evaluation
                print(f"remix_study: skipped {err}", file=sys.stderr)
    configs = {name: config for name, config in configs.items() if config.runs}
    if not configs:
        raise FileNotFoundError(f"no NAME_sSEED run folders with logs/metrics.jsonl under {[str(f) for f in folders]}")
    return configs


def load_coefficients(run: SeedRun) -> np.ndarray | None:
    """The final [N, K] coefficient table of a Remix run (None for a plain DiT or a run without checkpoints)."""
    from megatron.training.pretrained import load_pretrained

    if not (run.folder / "latest").exists():
        return None
    args, model, _ = load_pretrained(run.folder)
    if getattr(args, "remix_num_basis", 0) == 0:
        return None
    return model.coefficient_table().detach().float().numpy()


def coefficient_shape(coefficients_NK: np.ndarray) -> dict[str, float]:
    """Neighbour ratio and the mean largest coefficient near t = 0 and near t = T (see the module docstring)."""
    n = coefficients_NK.shape[0]
    if n < 3:
        raise ValueError(f"coefficient table with {n} experts: need at least 3 to compare neighbours with others")
    distance_NN = np.abs(coefficients_NK[:, None, :] - coefficients_NK[None, :, :]).sum(-1)
    neighbours = float(np.mean([distance_NN[i, i + 1] for i in range(n - 1)]))
    all_pairs = float(distance_NN[np.triu_indices(n, k=1)].mean())
    peak_N = np.abs(coefficients_NK).max(axis=1)
    quarter = max(1, n // 4)
    return {"neighbour_ratio": neighbours / all_pairs if all_pairs > 0 else float("nan"),
            "peak_near_t0": float(peak_N[:quarter].mean()), "peak_near_tT": float(peak_N[-quarter:].mean())}


def paired(config: ConfigRuns, baseline: ConfigRuns, key: str) -> dict[str, float]:
    def values(runs: ConfigRuns) -> dict[int, float]:
        return {seed: getattr(run, key) for seed, run in runs.runs.items() if getattr(run, key) is not None}

    d = paired_difference(values(config), values(baseline))
    return {"mean": d["mean"], "std": d["sd"], "pairs": d["pairs"]}


def summarise(configs: dict[str, ConfigRuns], baseline: str | None) -> dict:
    if baseline is not None and baseline not in configs:
        raise ValueError(f"--baseline {baseline}: not among the configs {sorted(configs)}")
    summary = {}
    for name, config in configs.items():
        entry: dict = {"seeds": sorted(config.runs), "steps": sorted({r.step for r in config.runs.values()})}
        for key in ("val_loss", "fd"):
            entry[key] = dict(zip(("mean", "std"), mean_std(config.values(key))))
            entry[key]["per_seed"] = {s: getattr(r, key) for s, r in config.runs.items()}
            if baseline is not None and name != baseline:
                entry[key]["minus_baseline"] = paired(config, configs[baseline], key)
        tables = [r.coefficients_NK for r in config.runs.values() if r.coefficients_NK is not None]
        if tables:
            shapes = [coefficient_shape(t) for t in tables]
            entry["coefficients"] = {k: dict(zip(("mean", "std"), mean_std([s[k] for s in shapes])))
                                     for k in shapes[0]}
        intervals = [r.interval_losses for r in config.runs.values() if r.interval_losses]
        if intervals and len({len(i) for i in intervals}) == 1:
            entry["interval_loss_mean"] = np.mean(intervals, axis=0).tolist()
        summary[name] = entry
    return summary


def print_summary(summary: dict, baseline: str | None) -> None:
    print(f"{'config':<44}{'seeds':>6}{'val loss':>18}{'FD':>16}"
          + (f"{'loss - base':>20}{'FD - base':>18}" if baseline else ""))
    for name, e in summary.items():
        line = (f"{name:<44}{len(e['seeds']):>6}{e['val_loss']['mean']:>11.4f} ± {e['val_loss']['std']:.4f}"
                f"{e['fd']['mean']:>10.1f} ± {e['fd']['std']:>4.1f}")
        if baseline and name != baseline:
            dl, df = e["val_loss"]["minus_baseline"], e["fd"]["minus_baseline"]
            line += f"{dl['mean']:>+13.4f} ± {dl['std']:.4f}{df['mean']:>+11.1f} ± {df['std']:>4.1f}"
        print(line)
    shaped = {n: e["coefficients"] for n, e in summary.items() if "coefficients" in e}
    if shaped:
        print(f"\n{'coefficients':<44}{'neighbour ratio':>18}{'peak near t=0':>16}{'peak near t=T':>16}")
        for name, c in shaped.items():
            print(f"{name:<44}{c['neighbour_ratio']['mean']:>11.3f} ± {c['neighbour_ratio']['std']:.3f}"
                  f"{c['peak_near_t0']['mean']:>9.3f} ± {c['peak_near_t0']['std']:.3f}"
                  f"{c['peak_near_tT']['mean']:>9.3f} ± {c['peak_near_tT']['std']:.3f}")


def plot(configs: dict[str, ConfigRuns], summary: dict, baseline: str | None, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(configs)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for ax, key, title in ((axes[0], "val_loss", "validation loss (final)"), (axes[1], "fd", "Frechet distance")):
        means = [summary[n][key]["mean"] for n in names]
        stds = [summary[n][key]["std"] for n in names]
        ax.bar(range(len(names)), means, yerr=stds, color="C0", alpha=0.6, capsize=4)
        for i, n in enumerate(names):
            values = configs[n].values(key)
            ax.scatter([i] * len(values), values, color="k", s=12, zorder=3)
        ax.set_xticks(range(len(names)), [n.replace("_", " ").replace("@", "\n") for n in names], rotation=30,
                      ha="right", fontsize=8)
        ax.set_title(f"{title}: mean ± sd, dots = seeds")
    ax = axes[2]
    base = summary.get(baseline, {}).get("interval_loss_mean") if baseline else None
    for i, n in enumerate(names):
        curve = summary[n].get("interval_loss_mean")
        if curve is None or n == baseline:
            continue
        y = np.array(curve) / np.array(base) if base is not None else np.array(curve)
        ax.plot(range(len(y)), y, marker="o", ms=3, label=n, color=f"C{i % 10}")
    ax.axhline(1.0 if base is not None else 0.0, color="k", lw=0.8)
    ax.set_xlabel("timestep interval (0: t near 0)")
    ax.set_ylabel(f"val loss / {baseline}'s" if base is not None else "val loss")
    ax.set_title("per-interval loss (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="sweep output folders (NAME_sSEED run folders)")
    parser.add_argument("--baseline", default=None, help="config name the differences are paired against")
    parser.add_argument("--output", default="remix_study.png")
    parser.add_argument("--no-coefficients", action="store_true", help="skip loading checkpoints")
    opts = parser.parse_args(argv)
    try:
        configs = collect(opts.folders)
        if not opts.no_coefficients:
            for config in configs.values():
                for run in config.runs.values():
                    run.coefficients_NK = load_coefficients(run)
        summary = summarise(configs, opts.baseline)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"remix_study: {err}")
    output = Path(opts.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot(configs, summary, opts.baseline, output)
    output.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print_summary(summary, opts.baseline)
    print(f"plot: {output}  numbers: {output.with_suffix('.json')}")
    return summary


if __name__ == "__main__":
    main()

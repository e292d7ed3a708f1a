"""Compare training runs: validation loss and smoothed training loss against tokens seen, and a table.

    python tools/compare_runs.py runs/tiny_structmoe runs/tiny_moe_matched --output compare.png

RUN_DIR is a run's folder (holding logs/metrics.jsonl and its checkpoints) or its log folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config.schema import NeoXArgs  # noqa: E402
from megatron.model.param_count import count_parameters  # noqa: E402


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
    summary = {
        "name": run_dir.name if run_dir.name != "logs" else run_dir.parent.name,
        "train": ([r["tokens"] for r in train], [r["loss"] for r in train]),
        "val": ([tokens_at.get(r["step"], r["step"] * tokens_per_step) for r in evals], [r["val/loss"] for r in evals]),
        "final_val": evals[-1]["val/loss"] if evals else math.nan,
        "best_val": min((r["val/loss"] for r in evals), default=math.nan),
        "tokens_per_sec": sum(r["tokens_per_sec"] for r in train) / len(train) if train else math.nan,
        "total": None,
        "active": None,
    }
    config = find_config(run_dir)
    if config is not None:
        import yaml

        counts = count_parameters(NeoXArgs.from_dict(yaml.safe_load(config.read_text())))
        summary["total"], summary["active"] = counts.total, counts.active
    return summary


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--output", default="compare.png")
    parser.add_argument("--smooth", type=float, default=0.6,
                        help="EMA factor for the training loss records (0 = raw; high values lag behind)")
    opts = parser.parse_args(argv)
    try:
        summaries = [summarize(run) for run in opts.runs]
    except FileNotFoundError as err:
        sys.exit(f"compare_runs: {err}")

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, s in enumerate(summaries):
        color = f"C{i}"
        smoothed = ema(s["train"][1], opts.smooth)
        ax.plot(s["train"][0], smoothed, color=color, alpha=0.35, label=f"{s['name']} train (EMA)")
        ax.plot(s["val"][0], s["val"][1], "o-", color=color, label=f"{s['name']} validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(opts.output, dpi=120)

    def millions(n):
        return "-" if n is None else f"{n / 1e6:.2f}M"

    header = f"{'run':<28}{'final val':>10}{'best val':>10}{'final ppl':>11}{'total':>10}{'active':>10}{'tokens/s':>10}"
    print(header)
    print("-" * len(header))
    for s in summaries:
        ppl = math.exp(s["final_val"]) if not math.isnan(s["final_val"]) else math.nan
        print(f"{s['name']:<28}{s['final_val']:>10.4f}{s['best_val']:>10.4f}{ppl:>11.2f}"
              f"{millions(s['total']):>10}{millions(s['active']):>10}{s['tokens_per_sec']:>10.0f}")
    print(f"plot: {opts.output}")
    return summaries


if __name__ == "__main__":
    main()

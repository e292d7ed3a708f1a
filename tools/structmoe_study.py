"""The small-scale studies in one command, each arms x 3 seeds on the bundled corpus, then the tables and plots of
docs/results.md: the StructMoE study (`--study structmoe`, the default) and the routing study (`--study routing`).

    python tools/structmoe_study.py                       # train what is missing (resumes), then analyse
    python tools/structmoe_study.py --study routing       # the routing study, the same way
    python tools/structmoe_study.py --analyse-only        # only the tables and plots from finished runs
    python tools/structmoe_study.py --print               # the training commands, for a cluster
    python tools/structmoe_study.py --redraw              # the figures again from OUT/NAME_study.json alone
    python tools/structmoe_study.py --analyse-only --tasks hellaswag,piqa   # + downstream scores, seed-paired

StructMoE arms (configs/): 1 tiny_moe (plain MoE, StructMoE's 8 experts), 2 tiny_structmoe (entangled), 3
tiny_moe_matched (plain MoE with StructMoE's total parameters), 4 router-free, 5 standalone (non-entangled), 6
StructMoE with a LoRE balancing loss, 7 LoRE count x rank at fixed LoRE parameters (8 x 32 and 128 x 2 beside 32 x
8). Routing arms: plain MoE with the per-micro-batch Switch loss, with the global-batch loss, with the loss-free
bias; StructMoE with no LoRE balancing, the LoRE loss, the LoRE loss-free bias, the global-batch LoRE loss; every
routing arm splits the same 16-sequence batch into 4 micro-batches of 4 (the configs' own setting for the new
arms, an override for the three older ones), so a micro-batch is not the global batch, and trains 250 steps.
Every arm sees the same tokens in the same order for a seed (the batches are a function of seed and step), so
differences are paired seed by seed. Writes OUT/NAME_study.{png,json,md}, OUT/NAME_study_pairs.png and
OUT/NAME_study_lore_load.png, OUT defaulting to docs/results/. NAME_study.png has the arms' mean validation
curves beside the difference panels: each arm's validation loss minus its baseline arm's, seed by seed, as a
mean line with a ±1 sd band. The JSON keeps the per-seed validation curves and the load-entropy curves, so the
figures redraw without the runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from compare_runs import (  # noqa: E402
    expand,
    find_metrics,
    group,
    group_tasks,
    plot_tasks,
    print_tasks,
    read_records,
    summarize,
    wanted_metrics,
)
from paired_differences import curve_difference, draw_curves, draw_differences, paired_difference  # noqa: E402
from sweep import make_run, run_all  # noqa: E402


@dataclass
class Study:
    """Arms (config name: what the arm asks), the paired questions (method, baseline, question: differences are
    method - baseline), the difference panels (baseline arm, the arms drawn minus it), the arms with routed
    LoREs, and overrides every run gets."""

    name: str
    arms: dict[str, str]
    pairs: list[tuple[str, str, str]]
    difference_panels: list[tuple[str, list[str]]]
    lore_arms: list[str]
    overrides: list[str] = field(default_factory=list)


STRUCTMOE = Study(
    "structmoe",
    arms={
        "tiny_moe": "1 plain MoE, 8 experts",
        "tiny_structmoe": "2 StructMoE (entangled)",
        "tiny_moe_matched": "3 matched plain MoE, 18 experts",
        "tiny_structmoe_router_free": "4 router-free",
        "tiny_structmoe_standalone": "5 standalone LoREs",
        "tiny_structmoe_lorebal": "6 StructMoE + LoRE balancing loss",
        "tiny_structmoe_m8r32": "7 M=8 LoREs of rank 32",
        "tiny_structmoe_m128r2": "7 M=128 LoREs of rank 2",
    },
    pairs=[
        ("tiny_structmoe", "tiny_moe_matched", "StructMoE < matched baseline (paper Fig. 2)"),
        ("tiny_structmoe", "tiny_moe", "StructMoE < plain MoE of its expert count"),
        ("tiny_moe_matched", "tiny_moe", "more experts < fewer (parameters help)"),
        ("tiny_structmoe", "tiny_structmoe_standalone", "entangled < standalone (paper Fig. 3)"),
        ("tiny_structmoe_router_free", "tiny_moe_matched", "router-free ~ matched baseline (paper Fig. 4)"),
        ("tiny_structmoe", "tiny_structmoe_router_free", "routed LoREs < router-free"),
        ("tiny_structmoe_lorebal", "tiny_structmoe", "LoRE balancing loss: cost or gain"),
        ("tiny_structmoe_m8r32", "tiny_structmoe", "fewer, larger LoREs (8 x 32 vs 32 x 8)"),
        ("tiny_structmoe_m128r2", "tiny_structmoe", "more, smaller LoREs (128 x 2 vs 32 x 8)"),
    ],
    difference_panels=[  # every other arm appears once
        ("tiny_moe_matched", ["tiny_moe", "tiny_structmoe", "tiny_structmoe_router_free"]),
        ("tiny_structmoe", ["tiny_structmoe_standalone", "tiny_structmoe_lorebal", "tiny_structmoe_m8r32",
                            "tiny_structmoe_m128r2"]),
    ],
    lore_arms=["tiny_structmoe", "tiny_structmoe_lorebal", "tiny_structmoe_m8r32", "tiny_structmoe_m128r2"],
)

ROUTING = Study(
    "routing",
    arms={
        "tiny_moe": "1 plain MoE, Switch loss per micro-batch",
        "tiny_moe_global_lbl": "2 plain MoE, global-batch Switch loss",
        "tiny_moe_loss_free": "3 plain MoE, loss-free bias",
        "tiny_structmoe": "4 StructMoE, no LoRE balancing",
        "tiny_structmoe_lorebal": "5 StructMoE, LoRE loss 0.01 per micro-batch",
        "tiny_structmoe_lore_loss_free": "6 StructMoE, LoRE loss-free bias",
        "tiny_structmoe_lorebal_global": "7 StructMoE, global-batch LoRE loss 0.01",
    },
    pairs=[
        ("tiny_moe_global_lbl", "tiny_moe", "global-batch Switch loss vs per micro-batch"),
        ("tiny_moe_loss_free", "tiny_moe", "loss-free bias vs Switch loss"),
        ("tiny_structmoe_lorebal", "tiny_structmoe", "LoRE loss vs no LoRE balancing"),
        ("tiny_structmoe_lore_loss_free", "tiny_structmoe", "LoRE loss-free bias vs no LoRE balancing"),
        ("tiny_structmoe_lorebal_global", "tiny_structmoe", "global-batch LoRE loss vs no LoRE balancing"),
        ("tiny_structmoe_lorebal_global", "tiny_structmoe_lorebal", "global-batch LoRE loss vs per micro-batch"),
        ("tiny_structmoe_lore_loss_free", "tiny_structmoe_lorebal", "LoRE loss-free bias vs LoRE loss"),
    ],
    difference_panels=[
        ("tiny_moe", ["tiny_moe_global_lbl", "tiny_moe_loss_free"]),
        ("tiny_structmoe", ["tiny_structmoe_lorebal", "tiny_structmoe_lore_loss_free",
                            "tiny_structmoe_lorebal_global"]),
    ],
    lore_arms=["tiny_structmoe", "tiny_structmoe_lorebal", "tiny_structmoe_lore_loss_free",
               "tiny_structmoe_lorebal_global"],
    # 250 steps (0.5M tokens), evaluated every 50: the 21 runs of 4 micro-batches each fit about an hour on 2
    # CPU cores; the configs themselves train 600 steps, as the StructMoE study's arms do
    overrides=["--train_micro_batch_size_per_gpu", "4", "--gradient_accumulation_steps", "4",
               "--train_iters", "250", "--eval_interval", "50"],
)
STUDIES = {study.name: study for study in (STRUCTMOE, ROUTING)}


def load_curves(run_dir: Path, kind: str) -> tuple[list[int], list[float]]:
    """Per log record: step and the mean over MoE layers of `moe/layer*/{kind}_load_entropy`."""
    steps, values = [], []
    for record in read_records(find_metrics(run_dir)):
        layer_values = [v for k, v in record.items()
                        if k.startswith("moe/layer") and k.endswith(f"/{kind}_load_entropy")]
        if layer_values:
            steps.append(record["step"])
            values.append(sum(layer_values) / len(layer_values))
    return steps, values


def pair_table(groups: dict[str, dict], study: Study = STRUCTMOE) -> list[dict]:
    rows = []
    for method, baseline, question in study.pairs:
        if method not in groups or baseline not in groups:
            continue
        diff = paired_difference(groups[method]["final_val_per_seed"], groups[baseline]["final_val_per_seed"])
        excludes_zero = diff["pairs"] > 1 and (diff["ci_low"] > 0 or diff["ci_high"] < 0)
        verdict = ("lower" if diff["mean"] < 0 else "higher") if excludes_zero else "no difference shown"
        rows.append({"method": method, "baseline": baseline, "question": question, **diff, "verdict": verdict})
    return rows


def plot_pairs(rows: list[dict], output: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    for i, row in enumerate(rows):
        half = (row["ci_high"] - row["ci_low"]) / 2 if not math.isnan(row["ci_low"]) else 0.0
        ax.errorbar(row["mean"], i, xerr=half, fmt="o", color="C3" if row["verdict"] != "no difference shown" else "C0",
                    capsize=4)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{r['method']} - {r['baseline']}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("final validation loss difference, paired by seed (mean and 95% CI)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def plot_curves(curves: dict[str, dict], output: Path, study: Study = STRUCTMOE) -> dict[str, dict]:
    """Validation loss per arm (mean over seeds) beside each of the study's difference panels; returns the
    paired curve differences drawn, per arm."""
    panels = study.difference_panels
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(study.arms)}
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(6 * (1 + len(panels)), 5))
    draw_curves(axes[0], {arm: curves[arm] for arm in study.arms if arm in curves}, colors, spread=False)
    drawn: dict[str, dict] = {}
    for ax, (baseline, arms) in zip(axes[1:], panels):
        differences = {arm: curve_difference(curves[arm], curves[baseline]) for arm in arms
                       if arm in curves and baseline in curves}
        differences = {arm: d for arm, d in differences.items() if d is not None}
        if differences:
            draw_differences(ax, differences, baseline, colors)
        drawn |= {arm: {"baseline": baseline, **d} for arm, d in differences.items()}
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return drawn


def load_curves_by_arm(runs: list[Path]) -> dict[str, dict[str, list[list]]]:
    """Per arm and kind ("lore", "expert"): steps and the load entropy's mean over seeds at the steps all logged."""
    by_arm: dict[str, list[Path]] = {}
    for run in runs:
        by_arm.setdefault(run.name.rsplit("_s", 1)[0], []).append(run)
    out: dict[str, dict[str, list[list]]] = {}
    for arm, arm_runs in sorted(by_arm.items()):
        for kind in ("lore", "expert"):
            curves = [c for c in (load_curves(run, kind) for run in arm_runs) if c[0]]
            if curves:
                points = min(len(c[0]) for c in curves)
                mean = [sum(c[1][j] for c in curves) / len(curves) for j in range(points)]
                out.setdefault(arm, {})[kind] = [curves[0][0][:points], mean]
        tables = [v for r in read_records(find_metrics(arm_runs[0])) for k, v in r.items()
                  if k.startswith("moe/layer") and k.endswith("/lore_load")]
        if tables and arm in out:
            out[arm]["num_lores"] = len(tables[0][0])  # M, from a [E][M] load table
    return out


def plot_loads(curves: dict[str, dict[str, list[list]]], output: Path) -> dict[str, dict[str, float]]:
    """LoRE and expert load entropy over training per arm (mean over seeds); returns the final values."""
    finals: dict[str, dict[str, float]] = {}
    fig, (ax_lore, ax_expert) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (arm, kinds) in enumerate(sorted(curves.items())):
        for kind, ax in (("lore", ax_lore), ("expert", ax_expert)):
            if kind in kinds:
                steps, mean = kinds[kind]
                ax.plot(steps, mean, color=f"C{i % 10}", label=arm)
                finals.setdefault(arm, {})[kind] = mean[-1]
        if "lore" in kinds and "num_lores" in kinds:  # a normalised entropy h of M shares: M^h LoREs in effect
            finals[arm]["lores_in_use"] = kinds["num_lores"] ** kinds["lore"][1][-1]
    for ax, title in ((ax_lore, "LoRE load entropy within experts"), (ax_expert, "expert load entropy")):
        ax.set_title(f"{title} (normalised, mean over layers and seeds)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in (ax_lore, ax_expert):
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return finals


def redraw(out: Path, study: Study = STRUCTMOE) -> list[str]:
    """The figures again from OUT/NAME_study.json alone (no runs needed); returns the files written. Analyses
    from before the JSON held curves redraw only the pairs figure."""
    prefix = f"{study.name}_study"
    result = json.loads((out / f"{prefix}.json").read_text())
    written = []
    plot_pairs(result["pairs"], out / f"{prefix}_pairs.png")
    written.append(f"{prefix}_pairs.png")
    curves = {arm: g["val_curve_per_seed"] for arm, g in result["groups"].items() if "val_curve_per_seed" in g}
    if curves:
        plot_curves(curves, out / f"{prefix}.png", study)
        written.append(f"{prefix}.png")
    if result.get("load_curves"):
        plot_loads(result["load_curves"], out / f"{prefix}_lore_load.png")
        written.append(f"{prefix}_lore_load.png")
    return written


def routing_diagnosis(runs: list[Path], sequences: int, study: Study = STRUCTMOE) -> dict[str, dict]:
    """tools/lore_routing.py on the final checkpoint of every routed-LoRE arm's runs (mean over seeds and layers)."""
    from lore_routing import analyse_layer, lore_inputs
    from lsh_calibrate import validation_tokens

    from megatron.training.pretrained import load_pretrained

    out: dict[str, dict] = {}
    for run in runs:
        arm = run.name.rsplit("_s", 1)[0]
        if arm not in study.lore_arms:
            continue
        args, model, _ = load_pretrained(run)
        inputs = lore_inputs(model, validation_tokens(args, sequences))
        layers = [analyse_layer(model.blocks[i].mlp.lore, *inputs[i]) for i in sorted(inputs)]
        for key in ("mean_share", "offset_over_content", "entropy_trained", "entropy_centred"):
            out.setdefault(arm, {}).setdefault(key, []).append(sum(r[key] for r in layers) / len(layers))
    return {arm: {k: sum(v) / len(v) for k, v in values.items()} for arm, values in out.items()}


def millions(count: int | None) -> str:
    return "-" if count is None else f"{count / 1e6:.2f}M"


def markdown(groups: dict[str, dict], rows: list[dict], loads: dict, diagnosis: dict, study: Study = STRUCTMOE
             ) -> str:
    lines = ["| arm | config | seeds | final val loss (mean ± sd) | best val | total params | active params "
             "| tokens/s | training time |", "|---|---|---|---|---|---|---|---|---|"]
    for name, arm in study.arms.items():
        if name not in groups:
            continue
        g = groups[name]
        lines.append(f"| {arm} | `{name}` | {len(g['final_val_per_seed'])} | {g['final_val']['mean']:.4f} ± "
                     f"{g['final_val']['sd']:.4f} | {g['best_val']['mean']:.4f} | {millions(g['total'])} | "
                     f"{millions(g['active'])} | {g['tokens_per_sec']:.0f} | {g['train_seconds'] / 60:.1f} min |")
    lines += ["", "| question | method - baseline | pairs | mean difference | 95% CI | reading |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['question']} | `{r['method']}` - `{r['baseline']}` | {r['pairs']} | {r['mean']:+.4f} | "
                     f"({r['ci_low']:+.4f}, {r['ci_high']:+.4f}) | {r['verdict']} |")
    lines += ["", "| arm | final LoRE load entropy | LoREs in use (M^entropy) | final expert load entropy | "
              "mean share of rows' energy | offset / content | entropy as trained | entropy with input centred |",
              "|---|---|---|---|---|---|---|---|"]
    for arm in study.lore_arms:
        if arm in loads:
            d = diagnosis.get(arm, {})
            cells = [f"{d[k]:.3f}" if k in d else "-" for k in
                     ("mean_share", "offset_over_content", "entropy_trained", "entropy_centred")]
            lore, expert = loads[arm].get("lore", math.nan), loads[arm].get("expert", math.nan)
            in_use = f"{loads[arm]['lores_in_use']:.1f}" if "lores_in_use" in loads[arm] else "-"
            lines.append(f"| `{arm}` | {lore:.3f} | {in_use} | {expert:.3f} | " + " | ".join(cells) + " |")
    plain = [arm for arm in study.arms if arm not in study.lore_arms and arm in loads]
    if plain and study.name == "routing":  # the plain-MoE arms' expert balance too
        lines += ["", "| arm | final expert load entropy |", "|---|---|"]
        lines += [f"| `{arm}` | {loads[arm].get('expert', math.nan):.3f} |" for arm in plain]
    return "\n".join(lines) + "\n"


def evaluate_runs(folders: list[Path], tasks: list[str], limit: float | None, include_path: list[str]) -> None:
    """Each finished run without RUN/eval_tasks.json is evaluated once on the downstream tasks (tools/eval_tasks.py
    on its final checkpoint); a rerun of the analysis reuses the files."""
    import eval_tasks

    names = sorted({task.split("/")[0] for task in tasks})  # TASK/METRIC picks a metric; evaluation takes the task
    for folder in folders:
        if (folder / "eval_tasks.json").is_file():
            continue
        argv = [str(folder), "--tasks", ",".join(names), "--output", str(folder / "eval_tasks.json")]
        argv += ["--limit", str(limit)] if limit is not None else []
        argv += [arg for path in include_path for arg in ("--include_path", path)]
        print(f"evaluating {folder.name} on {', '.join(names)}", flush=True)
        eval_tasks.main(argv)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=sorted(STUDIES), default="structmoe")
    parser.add_argument("--runs", type=Path, default=None, help="the sweep folder (default: runs/NAME_study)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--analyse-only", action="store_true")
    parser.add_argument("--print", action="store_true", help="print the training commands and stop")
    parser.add_argument("--redraw", action="store_true",
                        help="redraw the figures from OUT/NAME_study.json alone (no runs needed)")
    parser.add_argument("--sequences", type=int, default=64,
                        help="held-out sequences for the routing diagnosis of the final checkpoints; 0: none")
    parser.add_argument("--tasks", default=None, metavar="TASK[/METRIC],...",
                        help="downstream scores per arm (docs/evaluation.md): each finished run is evaluated once "
                             "(RUN/eval_tasks.json), then compared seed-paired as the loss is")
    parser.add_argument("--tasks-limit", type=float, default=None, help="documents per task (below 1: a fraction)")
    parser.add_argument("--include-path", action="append", default=[],
                        help="a folder of lm-eval task YAMLs (offline: tests/data/lm_eval_tasks); repeatable")
    opts, overrides = parser.parse_known_args(argv)
    study = STUDIES[opts.study]
    prefix = f"{study.name}_study"
    runs_dir = opts.runs or REPO / "runs" / prefix
    if opts.redraw:
        written = redraw(opts.out, study)
        print(f"redrawn in {opts.out}: {', '.join(written)}")
        if f"{prefix}.png" not in written:
            print("the JSON has no per-seed curves (written by analyses since they were added): "
                  f"{prefix}.png and {prefix}_lore_load.png left as they are")
        return {"redrawn": written}
    configs = [str(REPO / "configs" / f"{name}.yml") for name in study.arms]
    runs = [make_run(config, 1234 + s, runs_dir, study.overrides + overrides)
            for s in range(opts.seeds) for config in configs]
    if opts.print:
        for run in runs:
            print("python train.py " + " ".join(run.argv))
        return {}
    if not opts.analyse_only:
        run_all(runs, opts.jobs)
    finished = [run.folder for run in runs if run.finished]
    if not finished:
        sys.exit(f"{prefix}: no finished runs in {runs_dir}")
    opts.out.mkdir(parents=True, exist_ok=True)
    tasks = [t.strip() for t in (opts.tasks or "").split(",") if t.strip()]
    if tasks:
        evaluate_runs(finished, tasks, opts.tasks_limit, opts.include_path)
    summaries = [summarize(run) for run in expand(finished)]
    baseline = study.difference_panels[0][0]
    if not any(s["config"] == baseline for s in summaries):
        baseline = None
    groups = group(summaries, baseline)
    metrics = []
    if tasks:
        try:
            metrics = wanted_metrics(summaries, tasks)
        except ValueError as err:
            sys.exit(f"{prefix}: {err}")
        task_baseline = baseline or summaries[0]["config"]
        group_tasks(summaries, groups, task_baseline, metrics)
        plot_tasks(groups, task_baseline, metrics, opts.out / f"{prefix}_tasks.png")
    curve_differences = plot_curves({name: g["val_curve_per_seed"] for name, g in groups.items()},
                                    opts.out / f"{prefix}.png", study)
    rows = pair_table(groups, study)
    plot_pairs(rows, opts.out / f"{prefix}_pairs.png")
    load_curves = load_curves_by_arm(finished)
    loads = plot_loads(load_curves, opts.out / f"{prefix}_lore_load.png")
    diagnosis = routing_diagnosis(finished, opts.sequences, study) if opts.sequences else {}
    table = markdown(groups, rows, loads, diagnosis, study)
    (opts.out / f"{prefix}.md").write_text(table)
    result = {"groups": groups, "pairs": rows, "final_loads": loads, "routing_diagnosis": diagnosis,
              "curve_differences": curve_differences, "load_curves": load_curves, "task_metrics": metrics}
    (opts.out / f"{prefix}.json").write_text(json.dumps(result, indent=1))
    print(table)
    if metrics:
        print_tasks(groups, baseline or summaries[0]["config"], metrics)
    print(f"figures and tables in {opts.out}")
    return result


if __name__ == "__main__":
    main()

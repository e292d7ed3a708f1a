"""Remix-DiT's figures from trained runs: the learned mixing coefficients, and every expert's loss over timesteps.

    python tools/plot_remix.py runs/remix_digits_4x20 [runs/dit_digits ...] --output remix.png [--intervals 20]

Per run, (a) the [N, K] coefficient table as an annotated heatmap (local scope: the mean over the remixed linears'
tables) and (b) the validation epsilon MSE with every expert forced on every one of `--intervals` equal timestep
intervals. Images, timesteps and noise are fixed by the run's seed and shared by all experts, so a cell differs
from its neighbours only by the weights. If experts specialise, each is best near its own interval. A plain DiT
run is its one "expert": a baseline row. The numbers go to a JSON file beside the PNG (remix.json).
Cost: N x I x M image forwards (20 x 20 x 64 for configs/remix_digits_4x20.yml: about 25 s on one core).

Shape legend: N experts, K bases, I evaluation intervals, M validation images, C/H/W image dims.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config import ConfigError  # noqa: E402
from megatron.model.dit import DiT, GaussianDiffusion, timestep_interval  # noqa: E402
from megatron.parallel import DistInfo  # noqa: E402
from megatron.training.dit_task import DiTTask, seeded  # noqa: E402
from megatron.training.pretrained import load_pretrained  # noqa: E402


@dataclass
class ValidationDraws:
    """The first M validation images, and per interval one timestep inside it and one noise draw per image."""

    images_MCHW: torch.Tensor
    labels_M: torch.Tensor
    timesteps_IM: torch.Tensor
    noise_IMCHW: torch.Tensor
    intervals: list[tuple[int, int]]


@dataclass
class RunFigures:
    """What one run contributes to the figure and the JSON (coefficients None for a plain DiT)."""

    name: str
    checkpoint: str
    scope: str | None
    coefficients_NK: np.ndarray | None
    losses_NI: np.ndarray
    expert_intervals: list[tuple[int, int]]
    eval_intervals: list[tuple[int, int]]

    def own_expert(self) -> list[int]:
        """Per evaluation interval, the expert whose training interval holds the interval's middle timestep."""
        middles = [(lo + hi - 1) // 2 for lo, hi in self.eval_intervals]
        return [next(n for n, (lo, hi) in enumerate(self.expert_intervals) if lo <= t < hi) for t in middles]

    def best_expert(self) -> list[int]:
        return self.losses_NI.argmin(axis=0).tolist()

    def to_json(self) -> dict:
        own, best = self.own_expert(), self.best_expert()
        own_loss = [float(self.losses_NI[n, i]) for i, n in enumerate(own)]
        return {
            "name": self.name, "checkpoint": self.checkpoint, "scope": self.scope,
            "coefficients": None if self.coefficients_NK is None else self.coefficients_NK.tolist(),
            "expert_intervals": [list(iv) for iv in self.expert_intervals],
            "eval_intervals": [list(iv) for iv in self.eval_intervals],
            "losses": self.losses_NI.tolist(), "own_expert": own, "best_expert": best, "own_loss": own_loss,
            "best_loss": self.losses_NI.min(axis=0).tolist(),
        }


def coefficient_table(model: DiT) -> np.ndarray:
    """[N, K] mixing coefficients as trained (local scope: the mean over the remixed linears)."""
    if model.config.remix is None:
        raise ValueError("coefficient_table: the model is a plain DiT (config.remix is None), it has no coefficients")
    with torch.no_grad():
        return model.coefficient_table().detach().float().cpu().numpy()


def equal_intervals(num_timesteps: int, intervals: int) -> list[tuple[int, int]]:
    """[lo, hi) of `intervals` equal splits of [0, T), as the task's validation splits them."""
    if not 1 <= intervals <= num_timesteps:
        raise ValueError(f"intervals {intervals}: expected 1 <= intervals <= diffusion_steps {num_timesteps}")
    return [(i * num_timesteps // intervals, (i + 1) * num_timesteps // intervals) for i in range(intervals)]


def validation_draws(args, intervals: int, max_images: int) -> ValidationDraws:
    """The run's held-out images (the task's own split) with timesteps and noise drawn from the run's seed.

    The same draws for every expert and every call, so losses compare weights only.
    """
    if max_images < 1:
        raise ValueError(f"max_images {max_images}: expected >= 1")
    # The data only: a remix_init_from run must not need its plain DiT on disk to be evaluated.
    task = DiTTask(args.model_copy(update={"remix_init_from": None}), DistInfo(0, 1, 0, torch.device("cpu")))
    data = task.valid_data
    m = min(max_images, len(data))
    if m == 0:
        raise ValueError(f"image_valid_fraction {args.image_valid_fraction}: the run has no validation images")
    bounds = equal_intervals(args.diffusion_steps, intervals)
    generator = seeded(args.seed, 41, intervals)
    timesteps_IM = torch.stack([torch.randint(lo, hi, (m,), generator=generator) for lo, hi in bounds])
    noise_IMCHW = torch.randn((intervals, *data.images_NCHW[:m].shape), generator=generator)
    return ValidationDraws(data.images_NCHW[:m], data.labels_N[:m], timesteps_IM, noise_IMCHW, bounds)


def expert_interval_losses(args, model: DiT, intervals: int, max_images: int = 64,
                           batch_size: int = 1024) -> np.ndarray:
    """[N, I] validation epsilon MSE with expert n forced at every interval i ([1, I] for a plain DiT).

    Expert n runs as `forward_expert` with its coefficients: the network its timesteps get in training.
    """
    draws = validation_draws(args, intervals, max_images)
    diffusion = GaussianDiffusion(args.diffusion_steps, args.beta_start, args.beta_end, args.learn_sigma)
    remix = model.config.remix
    num_experts = 1 if remix is None else remix.num_experts
    m = draws.images_MCHW.shape[0]
    # all intervals in one flat batch, chunked: [I * M] rows
    x0 = draws.images_MCHW.repeat(intervals, 1, 1, 1)
    y = draws.labels_M.repeat(intervals)
    t = draws.timesteps_IM.reshape(-1)
    noise = draws.noise_IMCHW.reshape(-1, *draws.noise_IMCHW.shape[2:])
    losses_NI = np.zeros((num_experts, intervals))
    was_training = model.training
    model.eval()  # no label dropout
    try:
        with torch.no_grad():
            for n in range(num_experts):
                coeffs_LK = None if remix is None else model.expert_coefficients(n)

                def forced(x_BCHW, t_B, y_B, coeffs_LK=coeffs_LK):
                    return model.forward_expert(x_BCHW, t_B, y_B, coeffs_LK)

                mse = torch.cat([diffusion.training_losses(forced, x0[s:s + batch_size], t[s:s + batch_size],
                                                           y[s:s + batch_size], noise[s:s + batch_size])[0]["mse"]
                                 for s in range(0, x0.shape[0], batch_size)])
                losses_NI[n] = mse.double().view(intervals, m).mean(dim=1).numpy()
    finally:
        model.train(was_training)
    return losses_NI


def analyse(run_dir: Path, intervals: int, max_images: int) -> RunFigures:
    args, model, path = load_pretrained(run_dir)
    if args.model_type != "dit":
        raise ConfigError(f"{run_dir}: model_type {args.model_type} (expected a dit run)")
    remix = model.config.remix
    losses = expert_interval_losses(args, model, intervals, max_images)
    name = run_dir.name if run_dir.name != "logs" else run_dir.parent.name
    if remix is None:
        return RunFigures(name, str(path), None, None, losses, [(0, args.diffusion_steps)],
                          equal_intervals(args.diffusion_steps, intervals))
    return RunFigures(name, str(path), remix.scope, coefficient_table(model), losses,
                      [timestep_interval(n, remix) for n in range(remix.num_experts)],
                      equal_intervals(args.diffusion_steps, intervals))


def plot(runs: list[RunFigures], output: str | Path) -> None:
    """One row per run: coefficients heatmap, loss per expert over timesteps, loss relative to the interval's best."""
    heights = [max(3.5, 0.22 * len(r.expert_intervals) + 1.5) for r in runs]
    fig, axes = plt.subplots(len(runs), 3, figsize=(17, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights, "width_ratios": [1, 1.6, 1.6]})
    for row, run in zip(axes, runs):
        ax_c, ax_l, ax_r = row
        n_experts, n_intervals = run.losses_NI.shape
        expert_labels = [f"{n}: [{lo},{hi})" for n, (lo, hi) in enumerate(run.expert_intervals)]
        # (a) coefficients
        if run.coefficients_NK is None:
            ax_c.axis("off")
            ax_c.text(0.5, 0.5, f"{run.name}\nplain DiT: no coefficients", ha="center", va="center")
        else:
            c = run.coefficients_NK
            image = ax_c.imshow(c, cmap="Blues", vmin=min(0.0, float(c.min())), vmax=max(1.0, float(c.max())),
                                aspect="auto")
            for (n, k), v in np.ndenumerate(c):
                ax_c.text(k, n, f"{v:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if v > 0.6 else "black")
            ax_c.set_xticks(range(c.shape[1]), [f"basis {k}" for k in range(c.shape[1])], fontsize=8)
            ax_c.set_yticks(range(n_experts), expert_labels, fontsize=7)
            scope = "global table" if run.scope == "global" else "local scope: mean over layers"
            ax_c.set_title(f"{run.name}\nmixing coefficients ({scope})", fontsize=9)
            ax_c.set_ylabel("expert: timesteps")
            fig.colorbar(image, ax=ax_c, fraction=0.05)
        # (b) losses: one line per expert over the intervals' middle timesteps
        middles = [(lo + hi - 1) / 2 for lo, hi in run.eval_intervals]
        colours = plt.cm.viridis(np.linspace(0, 1, n_experts))
        for n in range(n_experts):
            ax_l.plot(middles, run.losses_NI[n], color=colours[n], lw=1, label=f"expert {n}" if n_experts > 1 else
                      "plain DiT")
        own = run.own_expert()
        ax_l.plot(middles, [run.losses_NI[n, i] for i, n in enumerate(own)], "k--", lw=1.2, label="own expert")
        ax_l.set_yscale("log")
        ax_l.set_xlabel("timestep (interval middle)")
        ax_l.set_ylabel("validation eps MSE")
        ax_l.set_title(f"{run.name}: each expert forced on every interval", fontsize=9)
        ax_l.grid(alpha=0.3)
        ax_l.legend(fontsize=6, ncol=2 if n_experts > 10 else 1)
        # (c) loss relative to the interval's best expert, log colours: where each expert is good
        if n_experts == 1:
            ax_r.axis("off")
            ax_r.text(0.5, 0.5, f"{run.name}\none network: no experts to compare", ha="center", va="center")
            continue
        relative = run.losses_NI / run.losses_NI.min(axis=0, keepdims=True)
        norm = LogNorm(vmin=1.0, vmax=max(1.01, float(relative.max())))
        image = ax_r.imshow(relative, cmap="magma_r", aspect="auto", norm=norm)
        ax_r.scatter(range(n_intervals), run.best_expert(), marker="o", s=14, facecolors="none", edgecolors="cyan",
                     label="best expert")
        ax_r.scatter(range(n_intervals), own, marker="x", s=14, color="lime", label="own expert")
        ax_r.set_xticks(range(n_intervals), [f"{lo}" for lo, _ in run.eval_intervals], fontsize=6, rotation=90)
        ax_r.set_yticks(range(n_experts), expert_labels, fontsize=7)
        ax_r.set_xlabel("evaluation interval (first timestep)")
        ax_r.set_title("loss / best expert's loss at that interval (log colours)", fontsize=9)
        ax_r.legend(fontsize=6, loc="upper right")
        fig.colorbar(image, ax=ax_r, fraction=0.05)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


def print_table(run: RunFigures) -> None:
    own, best = run.own_expert(), run.best_expert()
    print(f"{run.name} ({run.checkpoint})")
    print(f"{'interval':>12}{'own':>5}{'own loss':>10}{'best':>6}{'best loss':>11}{'own/best':>10}")
    for i, (lo, hi) in enumerate(run.eval_intervals):
        own_loss, best_loss = run.losses_NI[own[i], i], run.losses_NI[best[i], i]
        print(f"{f'[{lo},{hi})':>12}{own[i]:>5}{own_loss:>10.4f}{best[i]:>6}{best_loss:>11.4f}"
              f"{own_loss / best_loss:>10.3f}")
    hits = sum(o == b for o, b in zip(own, best))
    print(f"own expert is the best on {hits}/{len(own)} intervals; mean loss {run.losses_NI.mean():.4f}")


def main(argv: list[str] | None = None) -> list[RunFigures]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="save folders (their `latest`) or global_stepN folders")
    parser.add_argument("--output", default="remix.png")
    parser.add_argument("--intervals", type=int, default=20, help="equal timestep intervals to evaluate on")
    parser.add_argument("--max-images", type=int, default=64,
                        help="validation images per interval (the first M); cost is N x I x M forwards")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default torch's); 1 is faster while other jobs load the machine")
    opts = parser.parse_args(argv)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    try:
        runs = [analyse(run, opts.intervals, opts.max_images) for run in opts.runs]
    except (ConfigError, ValueError, FileNotFoundError) as err:
        sys.exit(f"plot_remix: {err}")
    output = Path(opts.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, output)
    summary = {"intervals": opts.intervals, "max_images": opts.max_images, "runs": [r.to_json() for r in runs]}
    output.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    for run in runs:
        print_table(run)
    print(f"plot: {output}  numbers: {output.with_suffix('.json')}")
    return runs


if __name__ == "__main__":
    main()

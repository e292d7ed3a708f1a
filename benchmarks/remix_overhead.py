"""Remix-DiT's cost against the plain DiT of the same width, measured side by side in one run (ratios are the result).

    python benchmarks/remix_overhead.py              # depth 6, hidden 256, 16x16 images, patch 2 (64 tokens), batch 32
    python benchmarks/remix_overhead.py --repeats 3 --plot remix_overhead.png

Training: one step (forward + backward + AdamW, fp32) of the plain DiT and of Remix-DiTs with K bases and N
experts (one expert per step, timesteps inside its interval, as the paper trains), timed by phase. Sampling:
DDIM latency of the plain DiT, of a Remix-DiT mixing at run time (one mix per step), and of its experts
exported as plain DiTs (`ExpertSwitch.from_remix`, what tools/export_remix_experts.py writes), picked by
timestep. Variants are interleaved repeat by repeat and medians taken, so drift in the machine's speed hits
all alike; on a shared machine the noise still matters (compare the ratios of
several runs). Like train.py on CPU, it keeps freed memory in the process (megatron/runtime.py).

Shape legend: B batch, C channels, H/W pixels, K bases, N experts, L remixed linears, O/I out/in features.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from harness import interleaved, medians  # noqa: E402

from megatron.model.dit import (  # noqa: E402
    DiT,
    DiTConfig,
    ExpertSwitch,
    GaussianDiffusion,
    RemixConfig,
    timestep_interval,
)
from megatron.runtime import keep_freed_memory_in_process  # noqa: E402
from megatron.training.optim import build_optimizer  # noqa: E402

PHASES = ("forward", "backward", "optimizer")


@dataclasses.dataclass
class Trainee:
    """One model with its optimizer; a step draws an expert (Remix) and times forward, backward and AdamW."""

    model: DiT
    optimizer: torch.optim.Optimizer
    diffusion: GaussianDiffusion
    generator: torch.Generator

    def step(self, x0: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        remix, B = self.model.config.remix, x0.shape[0]
        if remix is None:
            lo, hi = 0, self.diffusion.num_timesteps
        else:
            lo, hi = timestep_interval(int(torch.randint(remix.num_experts, (1,), generator=self.generator)), remix)
        t = torch.randint(lo, hi, (B,), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator)
        start = time.perf_counter()
        losses, aux = self.diffusion.training_losses(self.model, x0, t, y, noise)
        loss = losses["loss"].mean() + aux["prior_loss"] if "prior_loss" in aux else losses["loss"].mean()
        after_forward = time.perf_counter()
        loss.backward()
        after_backward = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        return {"forward": after_forward - start, "backward": after_backward - after_forward,
                "optimizer": end - after_backward, "step": end - start}


def build(config: DiTConfig, seed: int) -> DiT:
    """A model with every weight random (DiT zero-inits the adaLN and output linears; values do not change FLOPs,
    but zeros would make the experts' exported weights alike and the sampler's outputs trivial)."""
    torch.manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.startswith("remix_coeffs.") and param.abs().max() == 0:
                param.normal_(0, 0.02)
    return model


def mixing_time(model: DiT, repeats: int) -> float:
    """Median seconds to mix one expert's weights for every remixed linear (forward only, no autograd)."""
    layers = [model.get_submodule(name) for name in model.remixed_layer_names()]
    times = []
    with torch.no_grad():
        coeffs_LK = model.expert_coefficients(0)
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for layer, coeffs_K in zip(layers, coeffs_LK):
                layer.mixed_weights(coeffs_K)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="training micro-batch (images)")
    parser.add_argument("--bases", type=int, default=4, help="K")
    parser.add_argument("--experts", type=int, nargs="+", default=[20, 8], help="N, one Remix model per value")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", default=None, help="write a bar chart of the medians to this PNG")
    opts = parser.parse_args()
    keep_freed_memory_in_process()  # as train.py does on CPU
    torch.set_num_threads(opts.threads)
    base = DiTConfig(opts.image_size, opts.channels, opts.patch_size, opts.depth, opts.hidden, opts.heads,
                     num_classes=1000)
    diffusion = GaussianDiffusion(1000)
    models = {"plain DiT": build(base, 0)}
    for n in opts.experts:
        remix = RemixConfig(num_basis=opts.bases, num_experts=n, num_timesteps=diffusion.num_timesteps)
        models[f"Remix K={opts.bases} N={n}"] = build(dataclasses.replace(base, remix=remix), 0)
    plain = "plain DiT"

    # -- training step ----------------------------------------------------------------------------
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(opts.batch, opts.channels, opts.image_size, opts.image_size, generator=generator).clamp(-1, 1)
    y = torch.randint(1000, (opts.batch,), generator=generator)
    trainees = {}
    for name, model in models.items():
        model.train()
        scales = dict.fromkeys(model.coefficient_parameter_names(), 10.0)  # own lr, as remix_coeff_lr gives
        optimizer = build_optimizer(model, 1e-4, (0.9, 0.999), 1e-8, 0.0, torch.device("cpu"), scales)
        trainees[name] = Trainee(model, optimizer, diffusion, torch.Generator().manual_seed(2))
    # warm-up rounds first: the first calls grow the heap and fault pages in
    train_times = interleaved(lambda name, ts=trainees: ts[name].step(x0, y), trainees, opts.repeats, opts.warmup)
    train_median = {name: medians(records) for name, records in train_times.items()}
    for trainee in trainees.values():  # free the optimizer state before sampling
        trainee.optimizer.state.clear()
    del trainees

    # -- sampling ---------------------------------------------------------------------------------
    samplers: dict[str, nn.Module] = {}
    for name, model in models.items():
        samplers[name if name == plain else f"{name}, runtime mix"] = model.eval()
        if name != plain:
            samplers[f"{name}, exported"] = ExpertSwitch.from_remix(model)
    y_sample = torch.randint(1000, (opts.sample_batch,), generator=generator)
    shape = (opts.sample_batch, opts.channels, opts.image_size, opts.image_size)

    def sample(sampler: nn.Module) -> dict[str, float]:
        start = time.perf_counter()
        diffusion.ddim_sample(sampler, shape, y_sample, steps=opts.sample_steps,
                              generator=torch.Generator().manual_seed(3))
        return {"sample": time.perf_counter() - start}

    with torch.no_grad():
        sample_times = interleaved(lambda name: sample(samplers[name]), samplers, opts.repeats, 1)
    sample_median = {name: medians(records)["sample"] for name, records in sample_times.items()}

    # -- report -----------------------------------------------------------------------------------
    tokens = (opts.image_size // opts.patch_size) ** 2
    print(f"DiT depth={opts.depth} hidden={opts.hidden} heads={opts.heads} image={opts.image_size} "
          f"patch={opts.patch_size} ({tokens} tokens) channels={opts.channels}; fp32, "
          f"{torch.get_num_threads()} threads, median of {opts.repeats} interleaved repeats")
    print("(machine noise matters: other jobs slow every variant alike only on average; trust ratios over runs)")
    print()
    print(f"training step, batch {opts.batch}: forward + backward + AdamW")
    print(f"{'model':<24}{'params':>9}{'forward':>9}{'backward':>9}{'AdamW':>9}{'step (s)':>10}{'vs plain':>10}"
          f"{'steps/s':>9}")
    for name, model in models.items():
        m = train_median[name]
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<24}{params / 1e6:>8.1f}M{m['forward']:>9.3f}{m['backward']:>9.3f}{m['optimizer']:>9.3f}"
              f"{m['step']:>10.3f}{m['step'] / train_median[plain]['step']:>10.3f}{1 / m['step']:>9.2f}")
    print()
    print(f"DDIM sampling, {opts.sample_steps} steps, batch {opts.sample_batch}")
    print(f"{'sampler':<36}{'time (s)':>10}{'vs plain':>10}")
    for name, seconds in sample_median.items():
        print(f"{name:<36}{seconds:>10.3f}{seconds / sample_median[plain]:>10.3f}")
    print()
    for name, model in models.items():
        if name == plain:
            continue
        ratio = train_median[name]["step"] / train_median[plain]["step"]
        mix = mixing_time(model, opts.repeats)
        print(f"{name} / plain training step   {ratio:.3f}  (target <= 1.10; the paper: 1.28)")
        print(f"{name} / plain sampling: runtime mix {sample_median[f'{name}, runtime mix'] / sample_median[plain]:.3f}"
              f", exported {sample_median[f'{name}, exported'] / sample_median[plain]:.3f}  (exported target <= 1.02)")
        print(f"{name}: mixing every remixed linear once (no grad) {mix * 1e3:.1f} ms = "
              f"{mix / train_median[plain]['step']:.1%} of the plain step")
    if opts.plot:
        plot(train_median, sample_median, plain, opts.plot)
        print(f"plot: {opts.plot}")


def plot(train_median: dict[str, dict[str, float]], sample_median: dict[str, float], plain: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(train_median)
    bottom = [0.0] * len(names)
    for phase in PHASES:
        values = [train_median[n][phase] for n in names]
        ax_t.bar(names, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, n in enumerate(names):
        ax_t.text(i, bottom[i], f"{train_median[n]['step'] / train_median[plain]['step']:.2f}x", ha="center",
                  va="bottom")
    ax_t.set_ylabel("seconds (median)")
    ax_t.set_title("training step (fwd + bwd + AdamW)")
    ax_t.legend()
    names = list(sample_median)
    ax_s.bar(range(len(names)), [sample_median[n] for n in names], color="C4")
    for i, n in enumerate(names):
        ax_s.text(i, sample_median[n], f"{sample_median[n] / sample_median[plain]:.2f}x", ha="center", va="bottom")
    ax_s.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
    ax_s.set_ylabel("seconds (median)")
    ax_s.set_title("DDIM sampling")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

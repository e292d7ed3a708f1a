"""Class-conditional samples of a trained DiT / Remix-DiT run, as one PNG grid (one class per column).

    python tools/sample_dit.py runs/remix_study/remix_digits_4x20_s1234 --output grid.png
    python tools/sample_dit.py RUN_DIR --experts exported/remix_4x20 --output grid.png --sampler ddim --steps 50 \
        --cfg-scale 4 --seed 0 --labels 0,1,2 --num 12

RUN_DIR is a save folder (its `latest`) or one global_stepN folder; its config gives the image shape, the noise
schedule and whether to clip x0 (not for latents). Without --experts the run's model samples, a Remix-DiT mixing
its experts' weights at every step; with --experts the plain DiTs written by tools/export_remix_experts.py do (no
mixing; the run's weights are not read). The time of the sampling alone is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "tools"):  # run as a script: the package is the repo's, the exporter a sibling
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from export_remix_experts import load_exported_experts, read_manifest  # noqa: E402

from megatron.config import ConfigError, NeoXArgs, load_config  # noqa: E402
from megatron.config.loader import read_yaml  # noqa: E402
from megatron.evaluation.grids import save_image_grid  # noqa: E402
from megatron.model.dit import GaussianDiffusion, dit_config_from_args  # noqa: E402
from megatron.runtime import MissingExtra  # noqa: E402
from megatron.training import checkpoint as ckpt  # noqa: E402
from megatron.training.pretrained import load_pretrained  # noqa: E402

SAMPLERS = ("ddim", "ddpm")


def run_config(run_dir: Path) -> tuple[NeoXArgs, Path]:
    """(the run's resolved config, its checkpoint folder) without reading the weights (as load_pretrained does)."""
    path = ckpt.resolve_checkpoint(run_dir)
    if path is None or not (path / "config.yml").is_file():
        raise ConfigError(f"{run_dir}: no checkpoint with a config.yml (expected a save folder with `latest` or a "
                          f"global_stepN folder)")
    saved = read_yaml(str(path / "config.yml"))
    per_rank = saved["train_micro_batch_size_per_gpu"] * saved["gradient_accumulation_steps"]
    world = saved["train_batch_size"] // per_rank  # the run's data-parallel size, for the batch-size check
    args = load_config([str(path / "config.yml")], ["--moe_expert_parallel_size", "1", "--zero_stage", "0"],
                       data_parallel_size=world)
    return args, path


def parse_labels(text: str | None, num_classes: int) -> list[int]:
    """`0,1,2` as class ids; None: every class."""
    if text is None:
        return list(range(num_classes))
    try:
        labels = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--labels {text!r}: expected comma-separated class ids such as 0,1,2") from None
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise ValueError(f"--labels {text}: {bad[0]} is not a class id of this run (expected 0 <= id < {num_classes})")
    return labels


def load_model(run_dir: Path, experts: Path | None) -> tuple[NeoXArgs, nn.Module, str]:
    """(the run's config, the model to sample with, what it is, for the report line)."""
    if experts is None:
        args, model, path = load_pretrained(run_dir)
        if args.model_type != "dit":
            raise ConfigError(f"{run_dir}: model_type {args.model_type} (expected a dit run)")
        kind = "Remix-DiT, runtime mixing" if model.config.remix is not None else "plain DiT"
        return args, model, f"{kind} from {path}"
    args, path = run_config(run_dir)
    if args.model_type != "dit":
        raise ConfigError(f"{run_dir}: model_type {args.model_type} (expected a dit run)")
    manifest = read_manifest(experts)
    plain = {k: v for k, v in dataclasses.asdict(dit_config_from_args(args)).items() if k != "remix"}
    if manifest["dit_config"] != plain or manifest["num_timesteps"] != args.diffusion_steps:
        raise ValueError(f"--experts {experts}: exported for dit_config {manifest['dit_config']} and num_timesteps "
                         f"{manifest['num_timesteps']}, the run {path} has {plain} and diffusion_steps "
                         f"{args.diffusion_steps}")
    return args, load_exported_experts(experts), f"{manifest['num_experts']} exported experts from {experts}"


def sample(model: nn.Module, diffusion: GaussianDiffusion, labels_B: torch.Tensor, shape: tuple[int, ...],
           sampler: str, steps: int, cfg_scale: float | None, seed: int, clip_denoised: bool) -> torch.Tensor:
    """Images [B, C, H, W] as the task samples them: eval mode (no label dropout), no grad, noise from `seed`."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if sampler == "ddim":
            return diffusion.ddim_sample(model, shape, labels_B, steps=steps, generator=generator,
                                         cfg_scale=cfg_scale, clip_denoised=clip_denoised)
        return diffusion.ddpm_sample(model, shape, labels_B, generator=generator, cfg_scale=cfg_scale,
                                     clip_denoised=clip_denoised)


def main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a DiT / Remix-DiT save folder (its `latest`) or one global_stepN")
    parser.add_argument("--experts", type=Path, default=None, help="a folder written by export_remix_experts.py")
    parser.add_argument("--output", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--num", type=int, default=16, help="images; the labels repeat to fill them")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (ddpm always runs every timestep)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="classifier-free guidance; 1: none; default: the run's cfg_scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", default=None, help="comma-separated class ids (default: every class)")
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args(argv)
    try:
        if options.num < 1:
            raise ValueError(f"--num {options.num}: expected >= 1")
        args, model, what = load_model(options.run_dir, options.experts)
        if args.image_dataset == "latents" or args.image_channels not in (1, 3):
            raise ValueError(f"image_dataset {args.image_dataset}, image_channels {args.image_channels}: a PNG grid "
                             f"needs images of 1 or 3 channels (latents need their VAE's decoder, not run here)")
        labels = parse_labels(options.labels, args.num_classes)
        cfg_scale = args.cfg_scale if options.cfg_scale is None else options.cfg_scale
        cfg_scale = None if cfg_scale == 1.0 else cfg_scale
        if cfg_scale is not None and args.class_dropout_prob == 0:
            raise ValueError(f"--cfg-scale {cfg_scale}: the run has class_dropout_prob 0, so no null class to guide "
                             f"with (use --cfg-scale 1)")
        diffusion = GaussianDiffusion(args.diffusion_steps, args.beta_start, args.beta_end, args.learn_sigma)
        if options.sampler == "ddim":
            diffusion.ddim_timesteps(options.steps)  # checks the step count before any work
    except (ConfigError, FileNotFoundError, ValueError, MissingExtra) as err:
        sys.exit(f"sample_dit: {err}")
    device = torch.device(options.device)
    model = model.to(device)
    labels_B = torch.tensor(labels, device=device)[torch.arange(options.num, device=device) % len(labels)]
    shape = (options.num, args.image_channels, args.image_size, args.image_size)
    start = time.perf_counter()
    images = sample(model, diffusion, labels_B, shape, options.sampler, options.steps, cfg_scale, options.seed,
                    clip_denoised=args.image_dataset != "latents")
    seconds = time.perf_counter() - start
    path = save_image_grid(images.cpu(), options.output, nrow=min(len(labels), options.num))
    steps = options.steps if options.sampler == "ddim" else args.diffusion_steps
    guidance = "none" if cfg_scale is None else cfg_scale
    print(f"sample_dit: {options.num} images, {options.sampler} {steps} steps, cfg {guidance}, {what}: "
          f"{seconds:.2f} s -> {path}")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])

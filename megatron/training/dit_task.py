"""Class-conditional image diffusion as a `Task`: a DiT or a Remix-DiT, DDPM epsilon loss, the same trainer.

Shape legend: B images, C channels, H/W pixels, N Remix experts, K bases.

Batches are a pure function of (step, micro-batch, rank): images by `batch_indices`, and the expert,
timesteps and noise from a generator seeded by those numbers, so a resumed run draws exactly what an
uninterrupted one would. Remix-DiT samples hierarchically (the paper's recipe): an expert first, then
timesteps inside its interval, so each forward mixes one expert. Who draws (`remix_expert_draw`): the
whole step (the paper: one expert per optimizer step, so one row of the coefficient table learns per
step), each data-parallel rank, or each micro-batch (many rows of the table get gradients every step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from megatron.config import ConfigError
from megatron.data.images import batch_indices, build_image_dataset
from megatron.model.dit import (
    DiT,
    GaussianDiffusion,
    dit_config_from_args,
    load_official_dit_state_dict,
    timestep_interval,
)
from megatron.model.moe.stats import normalized_entropy
from megatron.parallel import DistInfo, all_reduce_mean

log = logging.getLogger("megatron.dit")


@dataclass
class DiffusionBatch:
    images_BCHW: torch.Tensor
    labels_B: torch.Tensor
    timesteps_B: torch.Tensor
    noise_BCHW: torch.Tensor
    step: int


def seeded(*numbers: int) -> torch.Generator:
    """A generator seeded by a tuple of integers (step, slot, ...): independent streams, reproducible."""
    seed = 0
    for n in numbers:
        seed = (seed * 1_000_003 + n) % 2**62
    return torch.Generator().manual_seed(seed)


def prior_weight_at(step: int, weight: float, anneal_iters: int) -> float:
    """gamma, linearly from `weight` at step 0 to exactly 0 at `anneal_iters`, and 0 after."""
    if anneal_iters <= 0 or step >= anneal_iters:
        return 0.0
    return weight * (1.0 - step / anneal_iters)


def plain_dit_state_dict(source: str) -> dict[str, torch.Tensor]:
    """A plain DiT's weights from our save folder (or one global_stepN) or an official DiT `.pt` file."""
    path = Path(source)
    if path.is_dir():
        from megatron.training.pretrained import load_pretrained

        args, model, _ = load_pretrained(path)
        if args.model_type != "dit" or args.remix_num_basis:
            raise ConfigError(f"remix_init_from: {source} is not a plain DiT run (model_type {args.model_type}, "
                              f"remix_num_basis {args.remix_num_basis})")
        return model.state_dict()
    return torch.load(path, map_location="cpu", weights_only=True)


class DiTTask:
    def __init__(self, args, dist_info: DistInfo):
        self.args, self.dist = args, dist_info
        try:
            data = build_image_dataset(args.image_dataset, args.image_path, args.image_size, args.image_channels,
                                       labels_path=args.image_labels_path)
        except (ValueError, OSError) as err:  # the data module's one-line messages, as config errors
            raise ConfigError(str(err)) from None
        if data.channels != args.image_channels or data.num_classes > args.num_classes:
            raise ConfigError(f"image_dataset {args.image_dataset}: images have {data.channels} channels and "
                              f"{data.num_classes} classes, the config says image_channels {args.image_channels} "
                              f"and num_classes {args.num_classes}")
        self.train_data, self.valid_data = data.split(args.image_valid_fraction, args.seed)
        self.model: nn.Module = DiT(dit_config_from_args(args))
        if args.remix_init_from:
            try:
                load_official_dit_state_dict(self.model, plain_dit_state_dict(args.remix_init_from))
            except ValueError as err:
                raise ConfigError(f"remix_init_from: {args.remix_init_from}: {err}") from None
            log.info("every basis initialised from the plain DiT %s", args.remix_init_from)
        self.diffusion = GaussianDiffusion(args.diffusion_steps, args.beta_start, args.beta_end, args.learn_sigma)
        self.remix = self.model.config.remix
        self.micro_batch = args.train_micro_batch_size_per_gpu
        self.global_batch = args.train_batch_size
        self.anneal_iters = (args.remix_prior_anneal_iters if args.remix_prior_anneal_iters is not None
                             else args.train_iters // 2)
        self.evaluator = None  # the Frechet-distance classifier, trained on first use
        self.steps_done = 0

    # -- batches ---------------------------------------------------------------------------------
    def draw_expert(self, step: int, micro_batch: int) -> int:
        args, slot = self.args, micro_batch * self.dist.world_size + self.dist.rank
        who = {"step": (step,), "rank": (step, self.dist.rank), "micro_batch": (step, slot)}[args.remix_expert_draw]
        return int(torch.randint(self.remix.num_experts, (1,), generator=seeded(args.seed, 17, *who)))

    def train_batch(self, step: int, micro_batch: int) -> DiffusionBatch:
        args, slot = self.args, micro_batch * self.dist.world_size + self.dist.rank
        self.steps_done = step + 1  # for naming evaluation samples
        index_B = batch_indices(len(self.train_data), self.micro_batch, step, slot, args.seed,
                                slots_per_step=self.global_batch // self.micro_batch)
        generator = seeded(args.seed, 29, step, slot)
        if self.remix is None:
            lo, hi = 0, args.diffusion_steps
        else:
            lo, hi = timestep_interval(self.draw_expert(step, micro_batch), self.remix)
        timesteps_B = torch.randint(lo, hi, (self.micro_batch,), generator=generator)
        images_BCHW = self.train_data.images_NCHW[index_B]
        noise_BCHW = torch.randn(images_BCHW.shape, generator=generator)
        device = self.dist.device
        return DiffusionBatch(images_BCHW.to(device), self.train_data.labels_N[index_B].to(device),
                              timesteps_B.to(device), noise_BCHW.to(device), step)

    def tokens_per_step(self) -> int:
        return self.global_batch  # images

    # -- loss ------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: DiffusionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, aux = self.diffusion.training_losses(model, batch.images_BCHW, batch.timesteps_B, batch.labels_B,
                                                     batch.noise_BCHW)
        loss = losses["loss"].mean()
        metrics = {"loss": loss.detach(), "mse": losses["mse"].mean().detach()}
        total = loss
        if "prior_loss" in aux:
            gamma = prior_weight_at(batch.step, self.args.remix_prior_weight, self.anneal_iters)
            metrics["remix/prior_loss"] = aux["prior_loss"].detach()
            metrics["remix/prior_weight"] = torch.tensor(gamma)
            if gamma:
                total = total + gamma * aux["prior_loss"]
        return total, metrics

    def optimizer_stepped(self) -> None:
        pass  # no per-step state outside the optimizer

    def interval_metrics(self) -> dict[str, Any]:
        if self.remix is None:
            return {}
        weights_NK = self.model.coefficient_table().detach().float().abs()
        probs_NK = weights_NK / weights_NK.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return {"remix/coeff_entropy": float(normalized_entropy(weights_NK).mean()),
                "remix/coeff_max": float(probs_NK.max(dim=1)[0].mean())}

    # -- evaluation ------------------------------------------------------------------------------
    def validation_batches(self):
        """Every validation image at one timestep in each of `eval_timestep_intervals` equal intervals,
        with noise and timesteps fixed by the seed: the same numbers at every evaluation."""
        args, data = self.args, self.valid_data
        generator = seeded(args.seed, 41)
        intervals = args.eval_timestep_intervals
        for i in range(intervals):
            lo, hi = i * args.diffusion_steps // intervals, (i + 1) * args.diffusion_steps // intervals
            for start in range(0, len(data), self.micro_batch):
                images_BCHW = data.images_NCHW[start:start + self.micro_batch]
                b = images_BCHW.shape[0]
                timesteps_B = torch.randint(lo, hi, (b,), generator=generator)
                noise_BCHW = torch.randn(images_BCHW.shape, generator=generator)
                yield i, DiffusionBatch(images_BCHW, data.labels_N[start:start + b], timesteps_B, noise_BCHW, 0)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device, intervals = self.dist.device, self.args.eval_timestep_intervals
        sums, counts = torch.zeros(intervals, dtype=torch.float64), torch.zeros(intervals, dtype=torch.float64)
        for i, batch in self.validation_batches():
            x0, t, y, noise = (v.to(device) for v in (batch.images_BCHW, batch.timesteps_B, batch.labels_B,
                                                      batch.noise_BCHW))
            losses, _ = self.diffusion.training_losses(model, x0, t, y, noise)
            sums[i] += float(losses["mse"].sum())
            counts[i] += losses["mse"].numel()
        per_interval = all_reduce_mean((sums / counts).to(device)).cpu()
        metrics = {"val/loss": float(per_interval.mean())}
        metrics.update({f"val/loss_t{i}": float(v) for i, v in enumerate(per_interval)})
        if self.args.fd_samples:
            metrics.update(self.frechet(model))
        return metrics

    def sample(self, model: nn.Module, labels_B: torch.Tensor, seed: int) -> torch.Tensor:
        shape = (labels_B.shape[0], self.args.image_channels, self.args.image_size, self.args.image_size)
        cfg = self.args.cfg_scale if self.args.cfg_scale != 1.0 else None
        was_training = model.training
        model.eval()  # no label dropout while sampling
        try:
            with torch.no_grad():
                return self.diffusion.ddim_sample(
                    model, shape, labels_B.to(self.dist.device), steps=self.args.sample_steps,
                    generator=torch.Generator().manual_seed(seed), cfg_scale=cfg,
                    clip_denoised=self.args.image_dataset != "latents")  # latents are not bounded to [-1, 1]
        finally:
            model.train(was_training)

    def frechet(self, model: nn.Module) -> dict[str, float]:
        from megatron.evaluation.frechet import FrechetEvaluator

        if self.evaluator is None:
            self.evaluator = FrechetEvaluator(self.train_data.images_NCHW, self.train_data.labels_N,
                                              self.valid_data.images_NCHW, self.train_data.num_classes,
                                              seed=self.args.seed)
        labels_B = torch.arange(self.args.fd_samples) % self.train_data.num_classes
        images = self.sample(model, labels_B, self.args.seed).cpu()
        if self.dist.is_main and self.args.log_dir:
            from megatron.evaluation.grids import save_image_grid

            classes = self.train_data.num_classes  # labels cycle over the classes: one class per column
            save_image_grid(images[:10 * classes], Path(self.args.log_dir) / "samples" / f"step{self.steps_done}.png",
                            nrow=classes)
        return {f"val/{k}": v for k, v in self.evaluator.evaluate(images, labels_B).items()}

    # -- optimizer and state ---------------------------------------------------------------------
    def lr_scales(self) -> dict[str, float]:
        if self.remix is None or self.args.remix_coeff_lr is None:
            return {}
        scale = self.args.remix_coeff_lr / self.args.optimizer.params.lr
        return dict.fromkeys(self.model.coefficient_parameter_names(), scale)

    def state_dict(self) -> dict[str, Any]:
        return {}  # batches are a function of the step

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

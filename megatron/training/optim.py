"""AdamW with GPT-NeoX's weight-decay groups, and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def build_optimizer(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    device: torch.device,
    lr_scales: dict[str, float] | None = None,
    fp16: bool = False,
) -> torch.optim.AdamW:
    """AdamW; biases, norms and 1-D parameters get no weight decay (as in GPT-NeoX).

    `lr_scales` names parameters that follow the schedule at a multiple of the learning rate (Remix-DiT's
    mixing coefficients); they get no weight decay either, as they are not weights. torch's fused kernel
    (one pass over every tensor) is used on CUDA and on the CPU, where it was 5.5x faster than the foreach kernel
    for 29M parameters on 2 threads (benchmarks/remix_overhead.py's AdamW phase), except with fp16's gradient
    scaler there (the sharded scaler's CPU step does not fit the fused kernel); elsewhere the foreach kernel.
    """
    lr_scales = lr_scales or {}
    unknown = set(lr_scales) - {name for name, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"lr_scales: {sorted(unknown)[0]} is not a parameter of the model")
    decay, no_decay, scaled = [], [], {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in lr_scales:
            scaled.setdefault(lr_scales[name], []).append(param)
        else:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        *({"params": params, "weight_decay": 0.0, "lr_scale": scale} for scale, params in scaled.items()),
    ]
    fused = device.type == "cuda" or (device.type == "cpu" and not fp16)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused, foreach=None if fused else True)


def lr_at(
    step: int,
    peak_lr: float,
    min_lr: float,
    warmup_iters: int,
    decay_iters: int,
    style: str,
) -> float:
    """Learning rate of optimizer update number `step` (1-based).

    Linear warmup reaches `peak_lr` at `step == warmup_iters`; then the rate decays (cosine, linear
    or not at all) to `min_lr` at `step == decay_iters`, and stays there.
    """
    if warmup_iters > 0 and step <= warmup_iters:
        return peak_lr * step / warmup_iters
    if style == "constant":
        return peak_lr
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    if style == "cosine":
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if style == "linear":
        return peak_lr - (peak_lr - min_lr) * progress
    raise ValueError(f"lr_decay_style: unknown style {style!r} (expected cosine, linear or constant)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

"""The diffusion family's settings: DiT and Remix-DiT configs, which expert serves which timesteps, and the builder
from the resolved run config (the model never reads the run config itself).

Kept free of the networks so that the model, the Remix layers and the expert export all read it without
importing one another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIXERS = ("softmax", "raw", "oracle")
SCOPES = ("global", "local")


@dataclass
class RemixConfig:
    """Remix-DiT settings. `prior_strength` scales the one-hot prior in the softmax logits at init."""

    num_basis: int = 4  # K
    num_experts: int = 20  # N
    num_timesteps: int = 1000  # T
    mixer: str = "softmax"  # softmax | raw | oracle
    scope: str = "global"  # global: one table for the model; local: one table per remixed linear
    prior_strength: float = 3.0

    def __post_init__(self) -> None:
        if self.num_basis < 1:
            raise ValueError(f"remix num_basis: {self.num_basis} (expected >= 1)")
        if self.num_experts < 1:
            raise ValueError(f"remix num_experts: {self.num_experts} (expected >= 1)")
        if self.num_timesteps < self.num_experts:
            raise ValueError(f"remix num_timesteps: {self.num_timesteps} (expected >= num_experts "
                             f"{self.num_experts}, so that every expert has a timestep)")
        if self.mixer not in MIXERS:
            raise ValueError(f"remix mixer: {self.mixer!r} (expected one of {', '.join(MIXERS)})")
        if self.scope not in SCOPES:
            raise ValueError(f"remix scope: {self.scope!r} (expected one of {', '.join(SCOPES)})")
        if not (math.isfinite(self.prior_strength) and self.prior_strength >= 0):
            raise ValueError(f"remix prior_strength: {self.prior_strength} (expected a finite value >= 0)")


@dataclass
class DiTConfig:
    image_size: int
    in_channels: int
    patch_size: int
    depth: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    remix: RemixConfig | None = None

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size}: not divisible by patch_size {self.patch_size}")
        if self.hidden_size % 4 or self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size}: expected a multiple of 4 (2-D sin-cos) and of "
                             f"num_heads {self.num_heads}")
        if not 0 <= self.class_dropout_prob < 1:
            raise ValueError(f"class_dropout_prob {self.class_dropout_prob}: expected 0 <= p < 1")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


def check_timesteps(t_B: torch.Tensor, num_timesteps: int) -> None:
    """Raise unless t_B holds integer timesteps in [0, num_timesteps): a float t would pick experts silently."""
    if t_B.is_floating_point() or t_B.is_complex():
        raise ValueError(f"timesteps: dtype {t_B.dtype} (expected integer timesteps in [0, {num_timesteps}))")
    if t_B.numel() and (int(t_B.min()) < 0 or int(t_B.max()) >= num_timesteps):
        raise ValueError(f"timesteps: range [{int(t_B.min())}, {int(t_B.max())}] (expected within "
                         f"[0, {num_timesteps}))")


def timestep_interval(n: int, cfg: RemixConfig) -> tuple[int, int]:
    """Expert n's timesteps [lo, hi): N equal splits of [0, T) with integer boundaries floor(nT/N)."""
    if not 0 <= n < cfg.num_experts:
        raise ValueError(f"expert {n}: expected 0 <= n < num_experts {cfg.num_experts}")
    return n * cfg.num_timesteps // cfg.num_experts, (n + 1) * cfg.num_timesteps // cfg.num_experts


def expert_of_timestep(t: torch.Tensor | int, cfg: RemixConfig) -> torch.Tensor | int:
    """The expert whose interval holds t: the largest n with floor(nT/N) <= t, i.e. ((t + 1) N - 1) // T.

    (floor(tN/T) would disagree with `timestep_interval` when N does not divide T.)
    """
    N, T = cfg.num_experts, cfg.num_timesteps
    if isinstance(t, torch.Tensor):
        check_timesteps(t, T)
        return torch.div((t.long() + 1) * N - 1, T, rounding_mode="floor")
    if not 0 <= t < T:
        raise ValueError(f"timestep {t}: expected 0 <= t < {T}")
    return ((t + 1) * N - 1) // T


def dit_config_from_args(args) -> DiTConfig:
    """The run config's DiT (and Remix, when `remix_num_basis` is set) settings as the model's own config."""
    remix = None
    if args.remix_num_basis:
        remix = RemixConfig(num_basis=args.remix_num_basis, num_experts=args.remix_num_experts,
                            num_timesteps=args.diffusion_steps, mixer=args.remix_mixer, scope=args.remix_coeff_scope)
    return DiTConfig(
        image_size=args.image_size,
        in_channels=args.image_channels,
        patch_size=args.patch_size,
        depth=args.num_layers,
        hidden_size=args.hidden_size,
        num_heads=args.num_attention_heads,
        mlp_ratio=args.mlp_ratio,
        num_classes=args.num_classes,
        class_dropout_prob=args.class_dropout_prob,
        learn_sigma=args.learn_sigma,
        remix=remix,
    )
